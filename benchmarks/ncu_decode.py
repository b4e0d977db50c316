"""Where a decode call's warps wait: Nsight Compute metrics of one oscar decode_kernel launch (GPU only).

The kernel benchmark times calls; this says why a call takes that long (issue slots used, the stall
reasons of the warps, DRAM throughput, occupancy). It runs ``ops.decode`` eagerly on the benchmark's
inputs (benchmarks/kernels.py: random INT2 cache, scattered pages, the BF16 window, no R_V as the vLLM
backend runs it) a few times, so that Nsight Compute can pick one launch:

    ncu --set full -k regex:decode_kernel -s 2 -c 1 -o /tmp/dec python -m benchmarks.ncu_decode \\
        --shape qwen3-8b --batch 1 --ctx 32768
    python -m benchmarks.ncu_decode --summarize /tmp/dec.ncu-rep     # the metrics docs/kernels.md quotes
    python -m benchmarks.ncu_decode --hotspots /tmp/dec.ncu-rep      # stall samples: per-warp code vs loop

(``-s 2`` skips the first two launches; ncu serializes kernels, so the rotate_q kernel and the decode
do not overlap as they do with programmatic dependent launch: read the decode's own time, not the call's.)
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys

# (ncu section name, metric name): what --summarize prints, in this order
SUMMARY_METRICS = (
    ("GPU Speed Of Light Throughput", "Duration"),
    ("GPU Speed Of Light Throughput", "DRAM Throughput"),
    ("GPU Speed Of Light Throughput", "Memory Throughput"),
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    ("Compute Workload Analysis", "Issue Slots Busy"),
    ("Compute Workload Analysis", "Executed Ipc Active"),
    ("Scheduler Statistics", "One or More Eligible"),
    ("Scheduler Statistics", "Active Warps Per Scheduler"),
    ("Scheduler Statistics", "Eligible Warps Per Scheduler"),
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"),
    ("Occupancy", "Achieved Occupancy"),
    ("Occupancy", "Registers Per Thread"),
    ("Launch Statistics", "Grid Size"),
)


def run_decode(shape: str, batch: int, ctx: int, calls: int) -> None:
    import torch

    from benchmarks import kernels as kb
    from vllm_oscar import ops

    if shape not in kb.ALL_SHAPES:
        raise SystemExit(f"unknown --shape {shape!r}; choose from {', '.join(kb.ALL_SHAPES)}")
    hq, hkv, d = kb.ALL_SHAPES[shape]
    inp = kb.OscarInputs(batch, hq, hkv, d, ctx, 1)
    ws = ops.make_decode_workspace(batch, hq, hkv, d, ctx, sink=kb.SINK, recent=kb.RECENT)
    for _ in range(calls):
        inp.call(ws, 0, rot_v=False)
    torch.cuda.synchronize()
    print(f"{calls} decode calls: {shape} batch {batch} context {ctx}, {ws.num_splits} INT2 splits")


def _ncu_csv(report: str, *page: str) -> str:
    """A saved report's ``page`` as CSV (``ncu --import REPORT --page ... --csv``)."""
    return subprocess.run(["ncu", "--import", report, "--page", *page, "--csv"], check=True, capture_output=True,
                          text=True).stdout


def _number(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def summarize(report: str) -> list[tuple[str, str, str]]:
    """(metric, unit, value) for SUMMARY_METRICS, plus every warp stall reason ncu reports, from a saved
    report (its details and raw pages)."""
    rows = list(csv.DictReader(io.StringIO(_ncu_csv(report, "details"))))
    got = {(r["Section Name"], r["Metric Name"]): (r["Metric Unit"], r["Metric Value"]) for r in rows}
    out = [(name, *got[(sec, name)]) for sec, name in SUMMARY_METRICS if (sec, name) in got]
    table = list(csv.reader(io.StringIO(_ncu_csv(report, "raw"))))
    if len(table) >= 3:  # header, units, one launch
        names, units, values = table[0], table[1], table[2]
        prefix = "smsp__average_warps_issue_stalled_"
        stalls = [(n[len(prefix):].removesuffix("_per_issue_active.ratio"), u, v)
                  for n, u, v in zip(names, units, values, strict=False)
                  if n.startswith(prefix) and n.endswith("_per_issue_active.ratio")]
        stalls.sort(key=lambda s: -_number(s[2]))
        out += [(f"stall {name} (warps per issued instruction)", u, v) for name, u, v in stalls]
    return out


def hotspots(sass_csv: str, top: int = 12) -> dict:
    """Warp stall samples of one launch by where they fall, from ncu's per-instruction export (the source
    page with ``--print-source sass``): code a warp runs once (prologue, merges, epilogue:
    executed at most 1.5x as often as the kernel's first instruction, which every warp runs once) against
    the loop (everything executed more often), each with its largest stall reasons, plus the ``top``
    instructions by samples."""
    rows = list(csv.reader(io.StringIO(sass_csv)))
    start = next(i for i, r in enumerate(rows) if r[:2] == ["Address", "Source"])
    header, data = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def samples(r):
        return _number(r[col["Warp Stall Sampling (All Samples)"]])

    def executed(r):
        return _number(r[col["Instructions Executed"]])

    total = sum(samples(r) for r in data) or 1.0
    per_warp = executed(data[0])
    parts = {}
    for name, rows_of in (("once per warp", [r for r in data if executed(r) <= 1.5 * per_warp]),
                          ("loop", [r for r in data if executed(r) > 1.5 * per_warp])):
        by_reason = {x: sum(_number(r[col[x]]) for r in rows_of) / total for x in reasons}
        parts[name] = dict(instructions=len(rows_of), share=sum(samples(r) for r in rows_of) / total,
                           reasons=dict(sorted(by_reason.items(), key=lambda kv: -kv[1])[:6]))
    hot = sorted(data, key=lambda r: -samples(r))[:top]
    return dict(total_samples=total, warps=per_warp, parts=parts,
                top=[dict(sass=r[col["Source"]].strip(), share=samples(r) / total, executed=executed(r),
                          reason=max(reasons, key=lambda x: _number(r[col[x]]))) for r in hot])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--summarize", metavar="REPORT", help="print the summary metrics of a saved .ncu-rep")
    ap.add_argument("--hotspots", metavar="REPORT", help="print where a saved .ncu-rep's warps stall")
    args = ap.parse_args(argv)
    if args.hotspots:
        res = hotspots(_ncu_csv(args.hotspots, "source", "--print-source", "sass"))
        print(f"{res['total_samples']:.0f} stall samples over {res['warps']:.0f} warps")
        for name, part in res["parts"].items():
            reasons = ", ".join(f"{k[len('stall_'):]} {v:.1%}" for k, v in part["reasons"].items())
            print(f"{name:14s} {part['share']:6.1%} of samples, {part['instructions']} instructions: {reasons}")
        for h in res["top"]:
            print(f"  {h['share']:6.1%}  executed {h['executed']:>9.0f}  {h['reason'][len('stall_'):]:14s} {h['sass']}")
        return
    if args.summarize:
        for name, unit, value in summarize(args.summarize):
            print(f"{name:60s} {value:>12s} {unit}")
        return
    if args.batch < 1 or args.ctx < 1 or args.calls < 1:
        ap.error("--batch, --ctx and --calls must be positive")
    run_decode(args.shape, args.batch, args.ctx, args.calls)


if __name__ == "__main__":
    sys.exit(main())
