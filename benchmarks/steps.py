"""Decode timing from engine-step timestamps: batch-1 TPOT without the prefill in it, and the decode
throughput of a full KV cache.

``drive`` adds requests to a ``vllm.LLM``'s engine with ``RequestOutputKind.DELTA`` and calls
``llm_engine.step()`` itself, recording after every step the wall time and how many tokens each
request received. The engine core must run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as
``benchmarks.run`` sets it), so a step returns when the GPU work it waited for is done.

Why not ``(time of prompt + 129 tokens - time of prompt + 1 token) / 128``, the method used before:
both terms carry a full prefill, and at 128K context a prefill of several seconds that varies by 1%
moves that difference by more than the whole decode; one run at 128K came out at 4.90 ms per token,
below the time to read the weights once (``e2e-h100-latency.json`` ``discarded_runs``). Here the
prefill ends before the first timestamp that is used.

The functions below the driver are pure (lists of ``Step`` in, numbers out) and tested on CPU.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Step:
    """One ``llm_engine.step()`` call: when it returned, and the tokens each request got in it."""

    t: float
    tokens: dict[str, int] = field(default_factory=dict)


def drive(llm, prompts: list[list[int]], max_tokens: int, prefix: str = "req") -> list[Step]:
    """Run ``prompts`` (token ids) to ``max_tokens`` greedy tokens each (EOS ignored); one ``Step`` per
    engine step, the first at the time the requests were added (empty)."""
    from vllm import SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise RuntimeError("drive() needs an idle engine: another caller's requests are still running")
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0, output_kind=RequestOutputKind.DELTA)
    steps = [Step(time.perf_counter())]
    for i, ids in enumerate(prompts):
        engine.add_request(f"{prefix}-{i}", tokens_input(list(ids)), sp)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        got = {o.request_id: len(o.outputs[0].token_ids) for o in outs if o.outputs and o.outputs[0].token_ids}
        steps.append(Step(now, got))
    total = {}
    for s in steps:
        for r, n in s.tokens.items():
            total[r] = total.get(r, 0) + n
    short = {r: n for r, n in total.items() if n != max_tokens}
    if len(total) != len(prompts) or short:
        raise RuntimeError(f"expected {len(prompts)} requests x {max_tokens} tokens, got {total}")
    return steps


def _token_times(steps: list[Step], rid: str) -> list[float]:
    """The time of each token of ``rid`` (a step that delivers k tokens counts k times at its time)."""
    return [s.t for s in steps for _ in range(s.tokens.get(rid, 0))]


def single_stream_tpot(steps: list[Step], rid: str) -> dict:
    """Batch-1 decode latency of ``rid``: mean time per output token after the first (vLLM's TPOT
    definition, ``(last - first) / (n - 1)``), and the median and 90th percentile of the gaps between
    consecutive tokens. The first token's time (prefill) is reported apart."""
    times = _token_times(steps, rid)
    if len(times) < 3:
        raise ValueError(f"request {rid!r} has {len(times)} tokens; TPOT needs at least 3")
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return {"tpot_ms": round(1000 * (times[-1] - times[0]) / (len(times) - 1), 3),
            "itl_median_ms": round(1000 * statistics.median(gaps), 3),
            "itl_p90_ms": round(1000 * gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))], 3),
            "decode_tokens": len(times) - 1,
            "first_token_s": round(times[0] - steps[0].t, 3)}


def full_batch_decode(steps: list[Step], rids: list[str]) -> dict:
    """Decode throughput while every request in ``rids`` is decoding: from the step that gave the last
    of them its first token (every prefill done) to the step that gave the first of them its last token
    (before any finishes). Tokens counted are those delivered after the window opens, up to and with
    the step that closes it; steps in the window that did not give every request a token (a preemption,
    say) are counted and reported, not hidden."""
    first, last = {}, {}
    for i, s in enumerate(steps):
        for r in s.tokens:
            first.setdefault(r, i)
            last[r] = i
    missing = [r for r in rids if r not in first]
    if missing:
        raise ValueError(f"requests {missing[:4]} got no tokens")
    open_i = max(first[r] for r in rids)
    close_i = min(last[r] for r in rids)
    prefill_s = steps[open_i].t - steps[0].t
    wall_s = steps[-1].t - steps[0].t
    n_out = sum(sum(s.tokens.values()) for s in steps)
    out = {"requests": len(rids), "prefill_phase_s": round(prefill_s, 3), "wall_s": round(wall_s, 3),
           "output_tok_s_end_to_end": round(n_out / wall_s, 1),
           # the most requests that got a token in one step: below `requests` when the scheduler never ran
           # them all at once (admission, preemption)
           "max_requests_in_one_step": max(sum(1 for r in rids if s.tokens.get(r, 0)) for s in steps)}
    if close_i <= open_i:
        out["error"] = ("no step in which every request decodes: the first request finished before the last "
                        "one's prefill ended; raise the output length")
        return out
    window = steps[open_i + 1: close_i + 1]
    tokens = sum(sum(s.tokens.get(r, 0) for r in rids) for s in window)
    seconds = steps[close_i].t - steps[open_i].t
    partial = sum(1 for s in window if any(s.tokens.get(r, 0) == 0 for r in rids))
    gaps = [b.t - a.t for a, b in zip(steps[open_i:close_i], window)]
    out.update({"decode_tok_s": round(tokens / seconds, 1), "window_steps": len(window),
                "window_s": round(seconds, 3), "step_ms_median": round(1000 * statistics.median(gaps), 3),
                "steps_without_every_request": partial})
    return out
