"""Build the optional CUDA extension ``vllm_oscar._C`` from ``csrc/``.

Everything else lives in pyproject.toml. Without a CUDA toolkit (no ``CUDA_HOME``/``nvcc``), or with
``VLLM_OSCAR_SKIP_CUDA_BUILD=1``, the package installs without kernels and says so here; at run time
``vllm_oscar.ops`` raises a clear error on first use of a kernel.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[vllm-oscar setup] {msg}", file=sys.stderr)


def _cuda_extensions():
    if os.environ.get("VLLM_OSCAR_SKIP_CUDA_BUILD", "0") == "1":
        _say("VLLM_OSCAR_SKIP_CUDA_BUILD=1: building without CUDA kernels.")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        _say("csrc/ has no sources yet: building without CUDA kernels.")
        return [], {}
    # torch guesses CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc shim would make that /usr/local.
    # Prefer the toolkit's own folder when it exists.
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency
        _say(f"torch is not importable ({exc}): building without CUDA kernels.")
        return [], {}
    if CUDA_HOME is None:
        _say("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH): building without CUDA kernels; "
             "vllm_oscar.ops will raise on first use.")
        return [], {}
    # sm_90a for Hopper-only instructions (wgmma/TMA), plus sm_80 as the portable target.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                  # No --use_fast_math: the store op must reproduce the reference's IEEE fp32 division
                  # bit for bit (codes and fp16 scale/offset are compared with torch.equal).
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    ext = CUDAExtension(
        name="vllm_oscar._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
