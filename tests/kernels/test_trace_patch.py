"""The trace instrumentation (benchmarks/trace/*-globaltimer.patch) must keep applying to, and compiling
with, the kernel sources: docs/kernels.md's time breakdowns are rerun with it (benchmarks/trace/)."""

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
