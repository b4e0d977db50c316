"""Where a batch-1 decode step's GPU time goes, kernel by kernel, inside vLLM (``--profile-contexts``).

``benchmarks.run --suite perf`` measures batch-1 TPOT from engine-step timestamps; this module explains
it. ``profile_decode`` runs one request of a given prompt length on an engine (in-process engine core,
as ``benchmarks.run`` sets it), lets it decode a few tokens, then records ``steps`` engine steps with
``torch.profiler`` (CUDA activity only: the kernels of the CUDA-graph replays, with their GPU start and
end times). ``summarize`` turns the kernel list into per-step figures:

- ``steps``: decode steps in the window, counted from the attention kernel that runs once per layer
  and step (OSCAR's ``decode_kernel``, FlashAttention-3's forward kernel), divided by the layer count;
  the engine steps and tokens of the window are recorded beside it;
- ``gpu_busy_ms``: the union of the kernels' time intervals per step (kernels that overlap, as the
  programmatic-dependent-launch chains do, count once);
- ``gpu_gaps_ms``: the rest of the GPU span per step (launch gaps between kernels);
- ``by_category_ms``: summed kernel time per step in ``CATEGORIES`` (first matching pattern wins; a kernel
  launched early by programmatic dependent launch counts its wait, e.g. OSCAR's store behind the decode);
  ``attention_busy_ms`` / ``attention_busy_us_per_layer``: the union of the attention kernels' intervals
  per step and per layer, the attention's share of the step;
- ``kernels``: the kernels with the most time per step, each with its launches per step.

The functions below ``profile_decode`` are pure (lists of ``Kernel`` in, numbers out) and tested on CPU
(``tests/test_benchmarks_step_profile.py``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

# (category, pattern on the demangled kernel name); the first match wins, so the attention patterns go
# before the generic ones.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("oscar_decode", r"oscar::(rotate_q_kernel|decode_kernel)"),
    ("oscar_store", r"oscar::store_kernel"),
    ("oscar_gather", r"oscar::gather_kernel"),
    ("kv_cache_write", r"reshape_and_cache|concat_and_cache"),  # before "flash": reshape_and_cache_flash
    ("flash_attention", r"(?i)flash"),
    ("gemm", r"(?i)gemm|cutlass|cublas|nvjet|xmma|wgmma|matmul"),
)
ATTENTION_CATEGORIES = ("oscar_decode", "oscar_store", "oscar_gather", "flash_attention", "kv_cache_write")

# The attention kernel that runs exactly once per layer and decode step, per KV format family.
STEP_KERNELS = {
    "oscar": r"oscar::decode_kernel<",
    "flash": r"FlashAttnFwdSm90|flash_fwd_kernel|flash_fwd_splitkv_kernel",
}


@dataclass(frozen=True)
class Kernel:
    """One kernel execution: demangled name, GPU start and end in microseconds."""

    name: str
    start_us: float
    end_us: float

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


def profile_decode(llm, prompts: list[list[int]], steps: int = 32, warm_tokens: int = 8,
                   prefix: str = "profile", max_tokens: int | None = None) -> dict:
    """Profile ``steps`` engine steps in which every request of ``prompts`` (token ids) decodes.

    Returns ``{"kernels": [Kernel, ...], "engine_steps": n, "tokens": n, "requests": n, "wall_s": s}``
    for :func:`summarize`. The window opens once every request has ``warm_tokens`` tokens (all prefills
    done: no prefill chunk in it); the requests are aborted after it. ``max_tokens`` (default
    ``warm_tokens + steps + 8``) must keep the first requests decoding until the last one's prefill is
    done: with many long prompts, about the output length of the full-KV run they stand for."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise RuntimeError("profile_decode() needs an idle engine")
    limit = max_tokens or warm_tokens + steps + 8
    sp = SamplingParams(max_tokens=limit, ignore_eos=True, temperature=0, output_kind=RequestOutputKind.DELTA)
    rids = [f"{prefix}-{i}" for i in range(len(prompts))]
    for rid, ids in zip(rids, prompts):
        engine.add_request(rid, tokens_input(list(ids)), sp)
    got = dict.fromkeys(rids, 0)

    def step() -> int:
        n = 0
        for o in engine.step():
            if o.request_id in got and o.outputs:
                new = len(o.outputs[0].token_ids)
                got[o.request_id] += new
                n += new
        return n

    while min(got.values()) < warm_tokens and engine.has_unfinished_requests():
        step()
    short = sorted(r for r, n in got.items() if limit - n < steps)
    if short or min(got.values()) < warm_tokens:
        engine.abort_request(rids)
        raise RuntimeError(f"{len(short)} of {len(rids)} requests would finish inside the {steps}-step window (tokens "
                           f"so far: min {min(got.values())}, max {max(got.values())} of {limit}): the first ones "
                           "finished decoding before the last prefill ended; raise max_tokens")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0, tokens = time.perf_counter(), 0
        for _ in range(steps):
            tokens += step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    engine.abort_request(rids)
    while engine.has_unfinished_requests():
        engine.step()
    kernels = [Kernel(e.name, float(e.time_range.start), float(e.time_range.end))
               for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not kernels:
        raise RuntimeError("torch.profiler recorded no CUDA kernels (CUPTI unavailable?)")
    return {"kernels": kernels, "engine_steps": steps, "tokens": tokens, "requests": len(prompts), "wall_s": wall}


def category(name: str) -> str:
    """The ``CATEGORIES`` entry of a kernel name, or ``"other"``."""
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other"


def busy_us(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' intervals (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start_us):
        if k.end_us <= end:
            continue
        total += k.end_us - max(k.start_us, end)
        end = k.end_us
    return total


def count_steps(kernels: list[Kernel], num_layers: int) -> tuple[int, str]:
    """Decode steps in the window: launches of the once-per-layer attention kernel / ``num_layers``,
    and which pattern counted them. Raises if no family's kernel is there or the count is not whole."""
    for family, pattern in STEP_KERNELS.items():
        n = sum(1 for k in kernels if re.search(pattern, k.name) and "Combine" not in k.name)
        if n:
            if n % num_layers:
                raise ValueError(f"{n} launches of the {family} step kernel is not a multiple of {num_layers} "
                                 "layers: the window cut a step, or the kernel does not run once per layer")
            return n // num_layers, pattern
    raise ValueError(f"no kernel of {list(STEP_KERNELS.values())} in the window: cannot count decode steps")


def summarize(run: dict, num_layers: int, top: int = 12) -> dict:
    """Per-step figures of a :func:`profile_decode` run (see the module docstring)."""
    kernels: list[Kernel] = run["kernels"]
    steps, pattern = count_steps(kernels, num_layers)
    cat_of = {name: category(name) for name in {k.name for k in kernels}}  # a few dozen names, ~10^4 kernels
    cats: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for k in kernels:
        cats[cat_of[k.name]] = cats.get(cat_of[k.name], 0.0) + k.us
        per_name.setdefault(k.name, []).append(k.us)
    span = max(k.end_us for k in kernels) - min(k.start_us for k in kernels)
    busy = busy_us(kernels)
    attention_ms = sum(v for c, v in cats.items() if c in ATTENTION_CATEGORIES) / steps / 1000
    attention_busy_ms = busy_us([k for k in kernels if cat_of[k.name] in ATTENTION_CATEGORIES]) / steps / 1000
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "steps": steps,
        "step_kernel": pattern,
        "engine_steps": run["engine_steps"],
        "requests": run.get("requests", 1),
        "tokens": run["tokens"],
        "wall_ms_per_engine_step": round(1000 * run["wall_s"] / run["engine_steps"], 3),
        "gpu_span_ms_per_step": round(span / steps / 1000, 3),
        "gpu_busy_ms": round(busy / steps / 1000, 3),
        "gpu_gaps_ms": round((span - busy) / steps / 1000, 3),
        "kernel_ms": round(sum(k.us for k in kernels) / steps / 1000, 3),
        "by_category_ms": {c: round(v / steps / 1000, 4) for c, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "attention_ms": round(attention_ms, 4),
        "attention_busy_ms": round(attention_busy_ms, 4),
        "attention_busy_us_per_layer": round(1000 * attention_busy_ms / num_layers, 2),
        "kernels": [{"name": name[:160], "category": cat_of[name], "per_step": round(len(d) / steps, 2),
                     "us_per_step": round(sum(d) / steps, 2), "us_each_median": round(sorted(d)[len(d) // 2], 2)}
                    for name, d in ranked],
    }


def markdown_table(profiles: dict[str, dict[str, dict]]) -> str:
    """``{format: {key: summarize(...)}}`` as a markdown table (``benchmarks.run --markdown``); a key is the
    context (batch 1) or ``"<context>x<requests>"``."""
    rows = [["format", "context", "GPU span / step (ms)", "GEMMs", "attention (µs per layer)", "other kernels",
             "gaps", "wall / engine step (profiled)"]]
    for fmt, by_ctx in profiles.items():
        for ctx, p in sorted(by_ctx.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("x"))):
            tokens, _, requests = ctx.partition("x")
            label = f"{int(tokens) // 1024}K" + (f" × {requests} requests" if requests else "")
            if "error" in p:
                rows.append([f"`{fmt}`", label, p["error"], "", "", "", "", ""])
                continue
            cats = p["by_category_ms"]
            other = sum(v for c, v in cats.items() if c not in ATTENTION_CATEGORIES and c != "gemm")
            rows.append([f"`{fmt}`", label, f"{p['gpu_span_ms_per_step']:.3f}",
                         f"{cats.get('gemm', 0.0):.3f}",
                         f"{p['attention_busy_ms']:.3f} ({p['attention_busy_us_per_layer']:.1f})", f"{other:.3f}",
                         f"{p['gpu_gaps_ms']:.3f}", f"{p['wall_ms_per_engine_step']:.3f}"])
    head = ("Decode step, kernel by kernel (torch.profiler over CUDA-graph replays, ms per step; "
            "benchmarks/step_profile.py)\n\n")
    return head + "\n".join("| " + " | ".join(r) + " |" for r in [rows[0], ["---"] * len(rows[0]), *rows[1:]])
