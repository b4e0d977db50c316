"""The decode trace instrumentation (benchmarks/trace/decode-globaltimer.patch) must keep applying to, and
compiling with, the kernel sources: docs/kernels.md's time breakdown is rerun with it
(benchmarks/trace/trace_decode.py)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATCH = ROOT / "benchmarks" / "trace" / "decode-globaltimer.patch"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME  # what the extension build uses (CI: /usr/local/cuda)

    cand = pathlib.Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
    return str(cand) if cand.is_file() else None


def _apply(cwd: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *extra, str(PATCH)], check=False, cwd=cwd, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_decode_trace_patch_applies_to_the_kernel_sources():
    text = PATCH.read_text()
    # what the trace script relies on: the op's address variable and the 12-slot rows
    assert "OSCAR_DECODE_TRACE_PTR" in text and "* 12 + (k)" in text
    res = _apply(ROOT, "--check")
    assert res.returncode == 0, (
        f"benchmarks/trace/decode-globaltimer.patch no longer applies to csrc/ ({res.stderr.strip()}); "
        "regenerate it against the current kernel (apply by hand, then `git diff > ...`)"
    )


@pytest.mark.skipif(shutil.which("git") is None or _nvcc() is None, reason="needs git and nvcc")
def test_decode_trace_patch_compiles(tmp_path):
    from torch.utils.cpp_extension import include_paths

    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    res = _apply(tmp_path)
    assert res.returncode == 0, res.stderr
    cmd = [_nvcc(), "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_90a", "-cubin", "-o",
           str(tmp_path / "d128.cubin"), f"-I{tmp_path / 'csrc'}", *(f"-I{p}" for p in include_paths("cuda")),
           str(tmp_path / "csrc" / "decode_d128.cu")]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert res.returncode == 0, f"the patched decode kernel does not compile:\n{res.stderr[-3000:]}"
