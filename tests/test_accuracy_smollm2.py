"""The CPU accuracy gate on real weights (SmolLM2-135M-Instruct, head_dim 64), ~9 minutes on 2 cores.

Calibrates on Shakespeare's comedies (32K tokens, as `vllm-oscar eval-ppl` does by default) and
measures teacher-forced perplexity at 2048 context on held-out tragedies and histories with every
token reading K/V outside the BF16 windows from INT2.

Measured with the full command (`vllm-oscar eval-ppl --num-seqs 4`, see
benchmarks/results/accuracy-cpu-smollm2.json): exact 34.42 / 35.89; OSCAR +10.6% / +12.4%;
Hadamard + the same clipping and windows +9.2% / +10.8%; KIVI-2 +16.2% / +21.2%; OSCAR without
windows +256%; QuaRot-style Hadamard INT2 +455%; naive INT2 +1758%. An independent implementation
of the method measured about +11% for OSCAR and ~20x for naive INT2 on this model: we match it.

Gates (with headroom for the 2-sequence sample used here): OSCAR within +15% of exact; OSCAR better
than naive INT2, QuaRot-style INT2, KIVI-2 and OSCAR without windows; naive INT2 at least 5x exact
(proof that the cache really is quantized). On this model the calibrated rotations do *not* beat the
data-free Hadamard with the same clipping and windows (measured 1.4-1.6 points worse); the test
pins that the two stay within 3 points of each other rather than claiming a win we did not measure.

The adopted quantizer (issue 6, docs/accuracy.md "Adopted"): the per-row MSE-fitted grid, which the
data-free mode serves by default (`hadamard_mse`: +2.0% / +2.5% with 4 sequences per set, the
calibrated rotations with it `oscar_mse` +3.2% / +2.6%). Gates: the data-free default within +6% of
exact (the issue's goal), and both MSE methods better than the paper's clipped min-max grid with the
same rotations.
"""

import pytest
import torch

pytestmark = pytest.mark.slow

OSCAR_MAX_INCREASE = 0.15
DATA_FREE_MAX_GAP = 0.03
DEFAULT_MAX_INCREASE = 0.06  # the data-free default (Hadamard + MSE grid)


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("transformers")
    from vllm_oscar.calibrate.data import token_sequences
    from vllm_oscar.calibrate.evaluate import METHODS, evaluate
    from vllm_oscar.calibrate.models import load_model
    from vllm_oscar.calibrate.pipeline import calibrate

    torch.manual_seed(0)
    lm = load_model("smollm2")
    calib = token_sequences(lm.tokenizer, "shakespeare:comedies", 2048, 16)
    art = calibrate(lm.model, calib, lm.info, source="shakespeare:comedies", progress=False)
    eval_sets = {s: token_sequences(lm.tokenizer, s, 2048, 2) for s in ("shakespeare:tragedies",
                                                                        "shakespeare:histories")}
    return evaluate(lm.model, eval_sets, art, list(METHODS), progress=False)


def _ppl(results, method):
    return results["methods"][method]["perplexity"]


def test_quantization_is_really_applied(results):
    for s, exact in _ppl(results, "exact").items():
        assert _ppl(results, "naive_int2")[s] > 5 * exact


def test_oscar_within_margin_of_exact(results):
    for s, exact in _ppl(results, "exact").items():
        assert _ppl(results, "oscar")[s] <= exact * (1 + OSCAR_MAX_INCREASE), (s, results["methods"]["oscar"])


@pytest.mark.parametrize("other", ["naive_int2", "hadamard_int2", "kivi2", "oscar_no_windows"])
def test_oscar_beats_other_2bit_variants(results, other):
    for s, ppl in _ppl(results, "oscar").items():
        assert ppl < _ppl(results, other)[s], (s, ppl, _ppl(results, other)[s])


def test_data_free_hadamard_with_windows_is_close(results):
    exact = _ppl(results, "exact")
    for s, ppl in _ppl(results, "oscar").items():
        gap = (ppl - _ppl(results, "hadamard_int2_windows")[s]) / exact[s]
        assert abs(gap) <= DATA_FREE_MAX_GAP, (s, gap)


def test_data_free_default_within_margin_of_exact(results):
    for s, exact in _ppl(results, "exact").items():
        assert _ppl(results, "hadamard_mse")[s] <= exact * (1 + DEFAULT_MAX_INCREASE), (s, results["methods"]["hadamard_mse"])


U8_MAX_GAP = 0.01  # hadamard_mse_u8 against hadamard_mse, relative to exact (measured 0.1-0.2 points, 4 seqs)


def test_u8_pairs_cost_at_most_a_point(results):
    """The 2-byte (scale, offset) pairs (`"scale_dtype": "u8"`): within a point of the fp16 pairs, and within
    the issue's +6% of exact at 2.38 bits per element at 32K (docs/accuracy.md)."""
    exact = _ppl(results, "exact")
    for s, ppl in _ppl(results, "hadamard_mse_u8").items():
        assert abs(ppl - _ppl(results, "hadamard_mse")[s]) / exact[s] <= U8_MAX_GAP, (s, ppl, _ppl(results, "hadamard_mse")[s])
        assert ppl <= exact[s] * (1 + DEFAULT_MAX_INCREASE), (s, ppl)


@pytest.mark.parametrize("mse, minmax", [("hadamard_mse", "hadamard_int2_windows"), ("oscar_mse", "oscar"),
                                         ("hadamard_mse", "oscar")])
def test_mse_grid_beats_the_clipped_minmax_grid(results, mse, minmax):
    for s, ppl in _ppl(results, mse).items():
        assert ppl < _ppl(results, minmax)[s], (s, ppl, _ppl(results, minmax)[s])
