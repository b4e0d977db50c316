"""Which starting grids the MSE-fitted INT2 quantizer needs (CPU, ~1 minute).

The MSE fit (``reference.quantize_int2_mse``) refines each start by alternating least squares and keeps
the candidate with the smallest squared error. Each start costs the store kernel up to
``MSE_PASSES`` refinement passes per row, which is most of its prefill time, so the start set is a
speed/accuracy trade. This measures it on real rows: K and V of SmolLM2-135M-Instruct from one exact
forward of a dev-set sequence (every third layer, every fourth row), rotated by the normalized
Hadamard (the data-free default), as rows of 64 (the model's head dim) and of 128 (two heads side by
side, a stand-in for d=128 models). It prints, per row length, the squared error of each start set
relative to the earlier five-start set and which candidate each row's winner was, and writes
``benchmarks/results/mse-starts-smollm2.json``::

    python -m vllm_oscar.calibrate.mse_starts
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vllm_oscar.ops import reference as ref

#: The start set used before 2026-11-24 (Lloyd-Max plus these fractions of the min-max range).
FIVE_STARTS = (1.0, 0.8, 0.6, 0.45)
#: (label, fractions, Lloyd-Max start, passes) of the sets compared; the first is the baseline.
START_SETS = (
    ("lm + 1.0/0.8/0.6/0.45 (before)", FIVE_STARTS, True, ref.MSE_PASSES),
    ("lm + 0.6 (now)", (0.6,), True, ref.MSE_PASSES),
    ("lm + 0.8/0.6", (0.8, 0.6), True, ref.MSE_PASSES),
    ("lm + 0.6/0.45", (0.6, 0.45), True, ref.MSE_PASSES),
    ("lm + 0.8", (0.8,), True, ref.MSE_PASSES),
    ("lm only", (), True, ref.MSE_PASSES),
    ("0.6 only", (0.6,), False, ref.MSE_PASSES),
    ("lm + 0.6, 3 passes", (0.6,), True, 3),
    ("lm + 0.6, 2 passes", (0.6,), True, 2),
)
OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mse-starts-smollm2.json"


def rotated_rows(captures, d: int, layer_stride: int = 3, row_stride: int = 4) -> torch.Tensor:
    """K and V rows of every ``layer_stride``-th layer, every ``row_stride``-th row of head-dim rows, as
    rows of ``d`` (``d`` a multiple of the head dim: heads side by side), Hadamard-rotated, fp32."""
    h = ref.hadamard(d).float()
    rows = []
    for i, (_, k, v) in enumerate(captures):
        if i % layer_stride:
            continue
        for x in (k, v):
            x = x.reshape(-1, x.shape[-1])[::row_stride]
            rows.append(x.reshape(-1, d) @ h)
    return torch.cat(rows)


def squared_error(rows: torch.Tensor, **kw) -> float:
    codes, scale, offset = ref.quantize_int2_mse(rows, **kw)
    return float(((ref.dequantize_int2(codes, scale, offset).float() - rows) ** 2).sum())


def winner_shares(rows: torch.Tensor, fractions: tuple[float, ...]) -> list[float]:
    """Share of rows whose kept candidate is each of: min-max grid, Lloyd-Max start, each fraction."""
    trace: list = []
    ref.quantize_int2_mse(rows, start_fractions=fractions, lloyd_max_start=True, _trace=trace)
    errs = torch.stack([t[2] for t in trace], -1)
    win = errs.argmin(-1)  # argmin keeps the first smallest, the quantizer's rule
    return [round(float((win == i).float().mean()), 4) for i in range(errs.shape[-1])]


def main(argv=None) -> int:  # pragma: no cover - CPU minutes with the real model; the helpers are tested
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shakespeare:problems", help="dev text (never an evaluation set)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--output", default=str(OUT))
    args = p.parse_args(argv)

    from vllm_oscar.calibrate.data import token_sequences  # noqa: PLC0415
    from vllm_oscar.calibrate.experiments import capture  # noqa: PLC0415
    from vllm_oscar.calibrate.models import load_model  # noqa: PLC0415

    lm = load_model("smollm2")
    seq = token_sequences(lm.tokenizer, args.data, args.seq_len, 1)[0]
    captures = capture(lm.model, seq)
    candidates = ["minmax", "lloyd_max", *map(str, FIVE_STARTS)]  # winner_shares' order
    results = {}
    for d in (lm.info.head_dim, 2 * lm.info.head_dim):
        rows = rotated_rows(captures, d)
        errs = {label: squared_error(rows, start_fractions=fractions, lloyd_max_start=lm_start, passes=passes)
                for label, fractions, lm_start, passes in START_SETS}
        base = errs[START_SETS[0][0]]  # the five starts: every ratio is relative to them
        for label, err in errs.items():
            print(f"d={d} rows={rows.shape[0]} {label:32s} squared error x{err / base:.4f}", flush=True)
        shares = dict(zip(candidates, winner_shares(rows, FIVE_STARTS)))
        print(f"d={d} winner shares of the five starts: {shares}", flush=True)
        results[str(d)] = {"rows": rows.shape[0],
                           "relative_squared_error": {label: round(err / base, 5) for label, err in errs.items()},
                           "winner_shares_five_starts": shares}
    out = {"command": "python -m vllm_oscar.calibrate.mse_starts", "model": lm.source, "data": args.data,
           "seq_len": args.seq_len, "rows": "K and V, layers 0, 3, 6, ..., every 4th row, Hadamard-rotated",
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "results": results}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
