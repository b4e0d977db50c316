"""Count the SASS instructions of the decode kernel's INT2 loop (one warp, one 256-token stage).

Compiles ``decode_kernel<D, 1, PB, W>`` (``--params``: the fp16 or u8 (scale, offset) pairs; ``--window-tiles``: W,
the build whose window CTAs take several tiles) for sm_90a with nvcc (no GPU needed), disassembles it with
``nvdisasm`` (on PATH, or the copy Triton ships), finds the innermost loop holding the stage's MMAs
and lists its branches with their source lines. With ``--take`` it walks one path through the loop
(unconditional branches always, the listed conditional ones taken, the others not) and counts the
instructions on it by opcode::

    python -m benchmarks.sass_loop --head-dim 128                        # the loop's branches
    python -m benchmarks.sass_loop --head-dim 128 --take 7290,7ff0,...   # one path's count

The common path of a whole stage (docs/kernels.md, *Instruction count*) takes: the page-per-warp
producer branch, its whole-stage branch, and the branches that skip the boundary fix-ups (3) and the
lazy rescale (after ``VOTE.ANY``); it does not take the branches that skip the producer, return from it
or skip the parameter copy of lanes 0-3.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    for cand in glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "triton", "backends", "nvidia",
                                       "bin", name)):
        return cand
    raise SystemExit(f"{name} not found: put it on PATH (CUDA toolkit) or install triton, which ships a copy")


def disassemble(head_dim: int, params: str = "fp16", window_tiles: bool = False) -> str:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        raise SystemExit("nvcc not found (CUDA toolkit): needed to compile the kernel")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp, "k.cu"), Path(tmp, "k.cubin")
        src.write_text('#include "kernels/decode.cuh"\nnamespace oscar {\n'
                       f"template __global__ void decode_kernel<{head_dim}, 1, {PB_CONSTANTS[params]}, "
                       f"{'true' if window_tiles else 'false'}>"
                       "(const DecodeParams p);\n}\n")
        subprocess.run([nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-arch=sm_90a", "-cubin",
                        f"-I{ROOT / 'csrc'}", "-o", str(cubin), str(src)], check=True)
        return subprocess.run([find_tool("nvdisasm"), "-gi", "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout


#: --params -> decode_kernel's PB (csrc/kernels/params.h)
PB_CONSTANTS = {"fp16": "kParamBytesFp16", "u8": "kParamBytesU8"}


def parse(sass: str) -> list[tuple[int, str, str]]:
    """(address, instruction, source line) for every instruction."""
    out, line = [], ""
    for raw in sass.splitlines():
        m = re.search(r'//## File ".*?/(\w+\.cuh)", line (\d+)', raw)
        if m:
            line = f"{m.group(1)}:{m.group(2)}"
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m:
            out.append((int(m.group(1), 16), m.group(2), line))
    return out


def loop_body(ins, min_mma: int):
    """The shortest backward-branch loop holding at least ``min_mma`` MMAs: the INT2 stage loop."""
    addr = {a: i for i, (a, _, _) in enumerate(ins)}
    best = None
    for i, (a, s, _) in enumerate(ins):
        m = re.search(r"BRA .*?0x([0-9a-f]+)", s)
        if m and int(m.group(1), 16) < a:
            body = ins[addr[int(m.group(1), 16)]: i + 1]
            if sum("HMMA" in x for _, x, _ in body) >= min_mma and (best is None or len(body) < len(best)):
                best = body
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--params", default="fp16", choices=tuple(PB_CONSTANTS), help="the (scale, offset) format")
    ap.add_argument("--window-tiles", action="store_true",
                    help="the decode_kernel build for resident grids (several window tiles per window CTA)")
    ap.add_argument("--take", default="", help="comma list of hex addresses of conditional branches to take")
    args = ap.parse_args()
    sass = disassemble(args.head_dim, args.params, args.window_tiles)
    # nvdisasm prints label targets; rewrite `(.L_x_N) into the label's address.
    labels = {}
    cur = None
    for raw in sass.splitlines():
        m = re.match(r"\.(L_x_\d+):", raw.strip())
        if m:
            cur = m.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/", raw)
        if m and cur:
            labels[cur] = m.group(1)
            cur = None
    sass = re.sub(r"`\(\.(L_x_\d+)\)", lambda m: "0x" + labels.get(m.group(1), "0"), sass)
    ins = parse(sass)
    tile_mmas = {64: 16, 128: 32, 256: 32}[args.head_dim]
    body = loop_body(ins, tile_mmas)
    if body is None:
        raise SystemExit("no loop with the stage's MMAs found")
    print(f"loop {body[0][0]:05x}-{body[-1][0]:05x}: {len(body)} instructions (static)")
    if not args.take:
        for a, s, line in body:
            if "BRA" in s or "VOTE" in s:
                print(f"  {a:05x}  {s:40s} {line}")
        return 0
    taken = {int(x, 16) for x in args.take.split(",") if x}
    idx = {a: i for i, (a, _, _) in enumerate(body)}
    counts, i, n = collections.Counter(), 0, 0
    while i < len(body):
        a, s, _ = body[i]
        n += 1
        counts[re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0]] += 1
        if i == len(body) - 1:
            break
        m = re.search(r"BRA .*?0x([0-9a-f]+)", s)
        if m and (not s.startswith("@") or a in taken):
            i = idx[int(m.group(1), 16)]
            continue
        i += 1
    print(f"path: {n} instructions per warp and stage")
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
