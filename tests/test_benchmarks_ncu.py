"""benchmarks/ncu_decode.py on CPU: the stall breakdown it reads from an Nsight Compute export (the GPU
run that produced docs/kernels.md's figures is in the doc)."""

import pytest

from benchmarks import ncu_decode

HEADER = ("Address,Source,Warp Stall Sampling (All Samples),Instructions Executed,"
          "stall_barrier,stall_long_sb,stall_wait,stall_wait (Not Issued)")


def _export(rows):
    # ncu's export starts with the kernel name line, then the header, then one line per instruction
    return "\n".join(['"Kernel Name","decode_kernel",', HEADER] + [",".join(map(str, r)) for r in rows]) + "\n"


def test_hotspots_splits_samples_between_per_warp_code_and_the_loop():
    sass = _export([
        ("0x0", "LDC R1", 2, 100, 0, 0, 2, 9),          # entry: every warp once
        ("0x10", "STS.128 [R10]", 30, 100, 0, 30, 0, 0),  # once per warp: waits on a global load
        ("0x20", "LOP3 R2", 40, 400, 0, 0, 40, 0),       # loop: 4 iterations per warp
        ("0x30", "BAR.SYNC", 28, 150, 28, 0, 0, 0),      # 1.5x the entry count still counts as per warp
    ])
    res = ncu_decode.hotspots(sass, top=2)
    assert res["total_samples"] == 100 and res["warps"] == 100
    once, loop = res["parts"]["once per warp"], res["parts"]["loop"]
    assert once["instructions"] == 3 and once["share"] == pytest.approx(0.60)
    assert loop["instructions"] == 1 and loop["share"] == pytest.approx(0.40)
    assert once["reasons"]["stall_long_sb"] == pytest.approx(0.30)
    assert once["reasons"]["stall_barrier"] == pytest.approx(0.28)
    assert "stall_wait (Not Issued)" not in once["reasons"]  # only the all-samples columns
    assert [h["sass"] for h in res["top"]] == ["LOP3 R2", "STS.128 [R10]"]
    assert res["top"][1]["reason"] == "stall_long_sb"


def test_run_arguments_must_be_positive():
    with pytest.raises(SystemExit):
        ncu_decode.main(["--batch", "0"])


def test_summarize_reads_the_summary_metrics_and_ranks_the_stall_reasons(monkeypatch):
    details = ('"Section Name","Metric Name","Metric Unit","Metric Value"\n'
               '"GPU Speed Of Light Throughput","Duration","us","28.64"\n'
               '"Scheduler Statistics","Eligible Warps Per Scheduler","warp","0.72"\n'
               '"Memory Workload Analysis","L1 Hit Rate","%","3.1"\n')  # not a summary metric
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    raw = (f'"ID","{stall.format("barrier")}","{stall.format("wait")}","dram__bytes.sum"\n'
           '"","inst","inst","byte"\n"0","1.319","1,782","4000"\n')
    pages = {"details": details, "raw": raw}
    monkeypatch.setattr(ncu_decode, "_ncu_csv", lambda report, page, *rest: pages[page])
    assert ncu_decode.summarize("rep") == [
        ("Duration", "us", "28.64"), ("Eligible Warps Per Scheduler", "warp", "0.72"),
        ("stall wait (warps per issued instruction)", "inst", "1,782"),
        ("stall barrier (warps per issued instruction)", "inst", "1.319"),
    ]
