"""benchmarks/steps.py: decode timing from engine-step timestamps (pure functions, and the driver on a
scripted engine)."""

from types import SimpleNamespace

import pytest

from benchmarks import steps
from benchmarks.steps import Step


def _single(prefill_s=2.0, gap_s=0.01, n=129, slow_every=None):
    out, t = [Step(0.0)], prefill_s
    out.append(Step(t, {"r": 1}))
    for i in range(1, n):
        t += gap_s * (5 if slow_every and i % slow_every == 0 else 1)
        out.append(Step(t, {"r": 1}))
    return out


def test_single_stream_tpot_excludes_prefill():
    res = steps.single_stream_tpot(_single(prefill_s=7.5), "r")
    assert res["tpot_ms"] == pytest.approx(10.0)
    assert res["itl_median_ms"] == pytest.approx(10.0)
    assert res["first_token_s"] == pytest.approx(7.5)
    assert res["decode_tokens"] == 128
    # the same decode after a prefill 10x longer gives the same TPOT
    assert steps.single_stream_tpot(_single(prefill_s=75.0), "r")["tpot_ms"] == pytest.approx(10.0)


def test_single_stream_tpot_mean_and_median_differ_on_outliers():
    res = steps.single_stream_tpot(_single(slow_every=8), "r")  # every 8th gap is 50 ms
    assert res["itl_median_ms"] == pytest.approx(10.0)
    assert res["tpot_ms"] == pytest.approx(1000 * (112 * 0.01 + 16 * 0.05) / 128)
    assert res["itl_p90_ms"] == pytest.approx(50.0)


def test_single_stream_tpot_counts_multi_token_steps():
    seq = [Step(0.0), Step(1.0, {"r": 1}), Step(1.02, {"r": 2}), Step(1.03, {"r": 1})]
    res = steps.single_stream_tpot(seq, "r")
    assert res["decode_tokens"] == 3
    assert res["tpot_ms"] == pytest.approx(10.0)


def test_single_stream_tpot_needs_tokens():
    with pytest.raises(ValueError, match="at least 3"):
        steps.single_stream_tpot([Step(0.0), Step(1.0, {"r": 1})], "r")


def _staggered(n_req=3, out_len=10, step_s=0.02, prefill_step_s=0.5):
    """Request i is prefilled in step i+1 (0.5 s each, decoding the earlier ones meanwhile), then all
    decode in lockstep, 20 ms a step; each stops after out_len tokens."""
    seq, t, got = [Step(0.0)], 0.0, {f"q{i}": 0 for i in range(n_req)}
    started = 0
    while any(v < out_len for v in got.values()):
        t += prefill_step_s if started < n_req else step_s
        if started < n_req:
            started += 1
        tok = {r: 1 for r in list(got)[:started] if got[r] < out_len}
        for r in tok:
            got[r] += 1
        seq.append(Step(t, tok))
    return seq


def test_full_batch_decode_window():
    seq = _staggered()
    res = steps.full_batch_decode(seq, ["q0", "q1", "q2"])
    # window: after step 3 (q2's first token) up to q0's 10th token (step 10): 7 steps x 3 tokens in 0.14 s
    assert res["window_steps"] == 7
    assert res["window_s"] == pytest.approx(0.14)
    assert res["decode_tok_s"] == pytest.approx(21 / 0.14, rel=1e-3)
    assert res["step_ms_median"] == pytest.approx(20.0)
    assert res["prefill_phase_s"] == pytest.approx(1.5)
    assert res["steps_without_every_request"] == 0
    assert res["max_requests_in_one_step"] == 3
    assert res["output_tok_s_end_to_end"] == pytest.approx(30 / seq[-1].t, abs=0.05)  # rounded to 0.1


def test_full_batch_decode_reports_gaps_in_the_window():
    seq = _staggered()
    seq[6] = Step(seq[6].t, {"q0": 1, "q2": 1})  # q1 got nothing in a window step (say, preempted)
    assert steps.full_batch_decode(seq, ["q0", "q1", "q2"])["steps_without_every_request"] == 1


def test_full_batch_decode_without_a_window_says_why():
    res = steps.full_batch_decode(_staggered(out_len=2), ["q0", "q1", "q2"])
    assert "decode_tok_s" not in res and "raise the output length" in res["error"]
    assert res["max_requests_in_one_step"] == 2  # q0 finished in the step that gave q2 its first token


def test_full_batch_decode_missing_request():
    with pytest.raises(ValueError, match="got no tokens"):
        steps.full_batch_decode(_staggered(), ["q0", "zz"])


class _ScriptedEngine:
    """Stands in for ``LLMEngine``: one token per request per step, DELTA outputs."""

    def __init__(self, deliver=None):
        self.reqs, self.deliver = {}, deliver or (lambda left: 1)

    def has_unfinished_requests(self):
        return any(v > 0 for v in self.reqs.values())

    def add_request(self, rid, prompt, params):
        assert prompt["type"] == "token" and params.output_kind.name == "DELTA"
        self.reqs[rid] = params.max_tokens

    def step(self):
        outs = []
        for rid, left in self.reqs.items():
            if left > 0:
                k = min(left, self.deliver(left))
                self.reqs[rid] = left - k
                outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=[7] * k)]))
        return outs


def test_drive_records_every_token():
    llm = SimpleNamespace(llm_engine=_ScriptedEngine())
    seq = steps.drive(llm, [[1, 2, 3], [4, 5]], 5, prefix="x")
    assert seq[0].tokens == {} and len(seq) == 6
    assert all(s.tokens == {"x-0": 1, "x-1": 1} for s in seq[1:])


def test_drive_refuses_a_short_run_and_a_busy_engine():
    llm = SimpleNamespace(llm_engine=_ScriptedEngine(deliver=lambda left: 0 if left == 2 else 1))
    llm.llm_engine.step = list  # delivers nothing: requests never finish
    llm.llm_engine.has_unfinished_requests = iter([False, True, False]).__next__
    with pytest.raises(RuntimeError, match="expected 1 requests x 4 tokens"):
        steps.drive(llm, [[1]], 4)
    busy = SimpleNamespace(llm_engine=_ScriptedEngine())
    busy.llm_engine.reqs["other"] = 3
    with pytest.raises(RuntimeError, match="idle engine"):
        steps.drive(busy, [[1]], 4)
