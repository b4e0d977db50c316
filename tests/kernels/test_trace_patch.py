"""The instrumentation patches (benchmarks/trace/*.patch) must keep applying to, and compiling with, the
kernel sources: docs/kernels.md's time breakdowns and the split-order sweep are rerun with them (benchmarks/trace/)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRACE = ROOT / "benchmarks" / "trace"
# patch -> (what the trace script relies on, the translation unit to compile)
PATCHES = {
    "decode-globaltimer.patch": (("OSCAR_DECODE_TRACE_PTR", "* 12 + (k)"), "decode_d128.cu"),
    "store-globaltimer.patch": (("OSCAR_STORE_TRACE_PTR", "* 8 + (k)"), "store.cu"),
    "win-first-override.patch": (("OSCAR_EXPERIMENT_WIN_FIRST",), "decode_d128.cu"),
}


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME  # what the extension build uses (CI: /usr/local/cuda)

    cand = pathlib.Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
    return str(cand) if cand.is_file() else None


def _apply(patch: pathlib.Path, cwd: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *extra, str(patch)], check=False, cwd=cwd, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("name", sorted(PATCHES))
def test_trace_patch_applies_to_the_kernel_sources(name):
    patch = TRACE / name
    text = patch.read_text()
    for needle in PATCHES[name][0]:
        assert needle in text, f"{name} lost {needle!r}, which benchmarks/trace/ relies on"
    res = _apply(patch, ROOT, "--check")
    assert res.returncode == 0, (
        f"benchmarks/trace/{name} no longer applies to csrc/ ({res.stderr.strip()}); "
        "regenerate it against the current kernel (apply by hand, then `git diff > ...`)"
    )


@pytest.mark.skipif(shutil.which("git") is None or _nvcc() is None, reason="needs git and nvcc")
@pytest.mark.parametrize("name", sorted(PATCHES))
def test_trace_patch_compiles(name, tmp_path):
    from torch.utils.cpp_extension import include_paths

    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    res = _apply(TRACE / name, tmp_path)
    assert res.returncode == 0, res.stderr
    unit = PATCHES[name][1]
    cmd = [_nvcc(), "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_90a", "-cubin", "-o",
           str(tmp_path / "unit.cubin"), f"-I{tmp_path / 'csrc'}", *(f"-I{p}" for p in include_paths("cuda")),
           str(tmp_path / "csrc" / unit)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert res.returncode == 0, f"{unit} does not compile with {name}:\n{res.stderr[-3000:]}"


def test_trace_summaries_read_the_slots_the_patches_write():
    """The scripts' table readers on a synthetic trace (ns): the slot numbers of the patches' docstrings."""
    import torch

    from benchmarks.trace import trace_decode, trace_store

    t = torch.zeros(trace_decode.FIRST_DECODE_ROW + 3, trace_decode.SLOTS, dtype=torch.float64)
    t[1, :2] = torch.tensor([1000.0, 2000.0], dtype=torch.float64)  # one rotate_q CTA: entry, end
    base = 1000.0
    # decode rows: 2 INT2 CTAs then 1 window CTA; slots 0 entry .. 11 merge loop (see the script's docstring)
    for row, (entry, loop, partial) in enumerate([(1500, 6000, 7000), (1600, 6500, 7500), (1700, 5000, 8000)]):
        r = t[trace_decode.FIRST_DECODE_ROW + row]
        r[0], r[8], r[1], r[9], r[3], r[4] = entry, entry + 100, entry + 200, entry + 300, loop, partial
    last = t[trace_decode.FIRST_DECODE_ROW + 2]  # the window CTA came last: it merged
    last[10], last[11], last[5], last[6], last[7] = 8200, 8800, 9000, 9100, 9500
    s = trace_decode.summarize(t, n_int=2, n_dec=3)
    assert s["rotate_q_end"] == (2000 - base) / 1e3 and s["entry_last"] == (1700 - base) / 1e3
    assert s["int2_loop_max"] == 5.5 and s["win_loop_max"] == 4.0 and s["partial_max"] == 7.0
    assert s["last_merge_loop_max"] == 7.8 and s["end_max"] == 8.5

    ts = torch.zeros(6, trace_store.SLOTS, dtype=torch.float64)
    ts[0, [0, 1, 2, 3, 5, 6]] = torch.tensor([100.0, 900, 900, 4100, 6400, 7200], dtype=torch.float64)
    ts[3, [0, 1, 2, 3, 5, 6]] = torch.tensor([200.0, 800, 1000, 4000, 6000, 7000], dtype=torch.float64)
    st = trace_store.summarize(ts)
    assert st == {"ctas": 2, "staged": 0.8, "r_landed": 0.9, "rotated": 4.0, "params": 6.3, "end": 7.1}
