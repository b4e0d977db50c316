"""End-to-end benchmarks of KV-cache formats in vLLM: capacity, latency, throughput, accuracy.

    python -m benchmarks.run --suite all            # on the GPU machine, vLLM staged (shared/device)
    python -m benchmarks.run --suite perf --formats auto,fp8,oscar_int2 --contexts 8192,32768
    python -m benchmarks.run --suite accuracy --formats oscar_int2   # ppl at 2K/4K/8K, recall, passkey
    python -m benchmarks.run --suite accuracy --formats fp8 --tasks recall --recall-trials 20
    python -m benchmarks.run --suite serve --formats oscar_int2   # online: vllm serve + vllm bench serve

Every format goes through the same code path: one fresh engine per (suite, format), started in a
subprocess so GPU memory is returned between formats. Results: ``benchmarks/results/e2e-<gpu>.json``
(capacity, latency, throughput on the Qwen3-8B shape with dummy weights) and
``benchmarks/results/accuracy-gpu-smollm2.json`` (SmolLM2-135M-Instruct, real weights: perplexity,
verbatim recall, passkey), each with the machine, versions and settings. A later call replaces the
formats it runs (the accuracy suite: the tasks and perplexity contexts it runs) and keeps the rest.
``--markdown`` prints the tables from existing JSON without a GPU.

Semantics worth knowing:
- capacity is vLLM's own ``get_kv_cache_capacity`` (what it logs as "Maximum concurrency for N tokens
  per request") evaluated for each request length on the engine's real KV-cache config;
- batch-1 TPOT = (time of the 129th output token - time of the 1st) / 128, from engine-step timestamps
  (``benchmarks/steps.py``), so the prefill is not in it; the lowest of ``--latency-reps`` runs;
- full-KV decode (``--sat-context``): as many requests of that many tokens as the format's KV cache
  holds, all submitted at once; decode throughput while every one of them decodes (after the last
  prefill, before the first finishes) and end-to-end output throughput, from the same timestamps;
- ``--profile-contexts`` (batch 1) and ``--profile-full-kv`` (the ``--sat-context`` configuration, instead
  of timing it): decode steps recorded with ``torch.profiler``, the step's GPU time split into GEMMs,
  attention, other kernels and gaps (``benchmarks/step_profile.py``; JSON ``"decode_profile"``);
- accuracy: one engine per format for all its tasks; every prompt is prefilled in ``--chunk``-token
  (32) steps, up to ``--max-num-seqs`` (64) requests side by side, so every prompt token reads the
  quantized history beyond the BF16 windows as decode does (a one-chunk prefill would attend to exact
  K/V and hide the cache's error); prefix caching off. Tasks (``--tasks``, default all):
  - ``ppl``: teacher-forced perplexity through ``prompt_logprobs`` on held-out Shakespeare
    (``--eval-sets``), ``--num-seqs`` windows per set at each ``--seq-lens`` context (2048, 4096, 8192;
    SmolLM2 has 8192 positions, so its 8192 context scores 8191-token windows); JSON
    ``"perplexity": {context: {set: ppl}}``;
  - ``recall``: a 64-token passage of ``shakespeare:romances`` inserted (token ids) at depths 10..90% of
    ``shakespeare:tragedies`` haystacks of 1K, 2K, 4K and 7.5K tokens; the prompt ends with the passage's
    first 32 tokens and the greedy continuation (32 tokens, EOS ignored) is scored per position against
    the passage's next 32: token accuracy and exact-match rate per (haystack, depth) cell,
    ``--recall-trials`` (20) trials a cell, each its own seeded haystack window and passage;
  - ``passkey``: ``calibrate.passkey``'s chat prompt (~3000-token tragedies haystack, a 5-digit key at
    depths 10/50/90%, reply primed with "The pass key is"), same seed and order as the CPU reference
    (same keys and haystacks), greedy reply of up to 8 tokens; success = the reply's first number is
    the key, ``--passkey-trials`` (20) per depth.
  GPU cost: ``worker_accuracy``'s docstring (about 1.5-2.5 min per format on an H100, TurboQuant more).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import longctx, steps
from benchmarks.serving import stop_on_sigterm, wait_or_stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DUMMY_QWEN3_8B = ROOT / "benchmarks" / "models" / "qwen3-8b-dummy"

_NO_WINDOWS = {"sink_tokens": 0, "recent_tokens": 0, "levels": "minmax", "k_clip_ratio": 0.0, "v_clip_ratio": 0.0}
#: name -> engine kwargs. Baselines int2_naive / int2_hadamard: the plugin with rotation none / hadamard,
#: no clipping and no windows (the paper's naive and QuaRot-style INT2).
FORMATS: dict[str, dict] = {
    "auto": {"kv_cache_dtype": "auto"},
    "fp8": {"kv_cache_dtype": "fp8"},
    "turboquant_4bit_nc": {"kv_cache_dtype": "turboquant_4bit_nc"},
    "turboquant_3bit_nc": {"kv_cache_dtype": "turboquant_3bit_nc"},
    "int2_naive": {"kv_cache_dtype": "oscar_int2",
                   "additional_config": {"oscar": {"rotation": "none", **_NO_WINDOWS}}},
    "int2_hadamard": {"kv_cache_dtype": "oscar_int2",
                      "additional_config": {"oscar": {"rotation": "hadamard", **_NO_WINDOWS}}},
    "oscar_int2": {"kv_cache_dtype": "oscar_int2"},
    # oscar_int2 with R_V applied in the decode kernel's epilogue instead of folded into o_proj (A/B)
    "oscar_int2_nofold": {"kv_cache_dtype": "oscar_int2",
                          "additional_config": {"oscar": {"fold_value_rotation": False}}},
    # oscar_int2 with 2-byte (scale, offset) pairs (vllm_oscar/layout.py): 68 instead of 72 bytes per token and
    # KV head at d=128
    "oscar_int2_u8": {"kv_cache_dtype": "oscar_int2", "additional_config": {"oscar": {"scale_dtype": "u8"}}},
    # u8 pairs with the bytes they save spent on a 512-token recent window: about the default's bytes per
    # token at 32K (68 * 32768 + 576 * 512 against 72 * 32768 + 320 * 512 per KV head at d=128)
    "oscar_int2_u8_r512": {"kv_cache_dtype": "oscar_int2",
                           "additional_config": {"oscar": {"scale_dtype": "u8", "recent_tokens": 512}}},
}
DEFAULT_PERF_FORMATS = "auto,fp8,turboquant_3bit_nc,oscar_int2"
DEFAULT_ACC_FORMATS = "auto,fp8,turboquant_4bit_nc,turboquant_3bit_nc,int2_naive,int2_hadamard,oscar_int2"


def _environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                              time.gmtime())}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        import vllm

        env["vllm"] = vllm.__version__
        import vllm_oscar

        env["vllm_oscar"] = vllm_oscar.__version__
    except Exception as exc:  # noqa: BLE001 - record, don't fail
        env["error"] = repr(exc)
    return env


# -------------------------------------------------------------------------------------- workers


def _save_partial(args, out: dict) -> None:
    """Write a worker's results so far: the driver keeps them if the worker is cut off by a time limit."""
    Path(args.worker_out).write_text(json.dumps(out))


def _engine(fmt: str, skip_sliding_window: bool = False, **kwargs):
    """``LLM`` for one format; ``skip_sliding_window`` keeps a model's sliding-window layers in BF16 in the
    quantized formats (``--kv-cache-dtype-skip-layers sliding_window``: oscar_int2 cannot serve them)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: its KV config is readable
    from vllm import LLM

    fmt_args = dict(FORMATS[fmt])
    if skip_sliding_window and fmt_args["kv_cache_dtype"] != "auto":
        fmt_args["kv_cache_dtype_skip_layers"] = ["sliding_window"]
    return LLM(**kwargs, **fmt_args)


def worker_perf(args) -> dict:
    """Capacity, batch-1 TPOT and offline throughput for one format on the Qwen3-8B shape."""
    import random

    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    contexts = [int(c) for c in args.contexts.split(",") if c]
    profile_contexts = list(args.profile_contexts)
    max_len = max(contexts + profile_contexts + [args.tp_in + args.tp_out, args.sat_context]) + 256
    t0 = time.time()
    llm = _engine(args.format, args.skip_sliding_window, model=str(args.model_dir), load_format="dummy",
                  skip_tokenizer_init=True, max_model_len=max_len, gpu_memory_utilization=args.gpu_mem,
                  enable_prefix_caching=False,
                  max_num_seqs=256, seed=0,
                  **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}),
                  **({"quantization": args.quantization} if args.quantization else {}))
    out: dict = {"format": args.format, "startup_s": round(time.time() - t0, 1), "max_model_len": max_len,
                 "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens}
    vcfg = llm.llm_engine.vllm_config
    kvc = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config

    def capacity(n: int) -> tuple[int, float]:
        """(KV tokens, maximum concurrency) vLLM computes for n-token requests on this engine's cache."""
        saved = vcfg.model_config.max_model_len
        vcfg.model_config.max_model_len = n
        try:
            return get_kv_cache_capacity(vcfg, kvc)
        finally:
            vcfg.model_config.max_model_len = saved

    cap = {}
    for n in (8192, 32768, 131072):
        tokens, conc = capacity(n)
        cap[str(n)] = {"max_concurrency": round(conc, 3), "kv_tokens": int(tokens)}
    out["capacity"] = cap
    out["num_blocks"] = kvc.num_blocks
    if FORMATS[args.format]["kv_cache_dtype"] == "oscar_int2":
        try:
            from vllm_oscar.attention.fold import layer_state
            out["oscar_layers"] = llm.apply_model(layer_state)[0]
        except Exception as exc:  # noqa: BLE001 - a report, not the measurement: record why and go on
            out["oscar_layers"] = {"error": repr(exc)}
        print(f"[{args.format}] {out['oscar_layers']}", flush=True)
    _save_partial(args, out)
    rng = random.Random(0)
    # Token ids inside the model's vocabulary (ids past it trip the embedding's device-side assert, as
    # SmolLM2's 49,152 did); the Qwen3-8B and Gemma 3 shapes keep the ids [1000, 100000) they always had.
    id_hi = min(100000, vcfg.model_config.get_vocab_size())
    id_lo = min(1000, id_hi // 2)

    def prompt(n):
        return {"prompt_token_ids": [rng.randrange(id_lo, id_hi) for _ in range(n)]}

    def timed(prompts, sp):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    timed([prompt(512)], SamplingParams(max_tokens=129, ignore_eos=True, temperature=0))  # warm-up
    lat = {}
    for c in contexts if args.latency_reps > 0 else []:  # --latency-reps 0: contexts only size max_model_len
        p = prompt(c)["prompt_token_ids"]
        reps = [steps.single_stream_tpot(steps.drive(llm, [p], 129, prefix=f"lat{c}-{i}"), f"lat{c}-{i}-0")
                for i in range(args.latency_reps)]
        best = min(reps, key=lambda r: r["tpot_ms"])
        lat[str(c)] = {"tpot_ms": best["tpot_ms"], "itl_median_ms": best["itl_median_ms"],
                       "prefill_s": best["first_token_s"], "reps": reps,
                       "method": "decode-step timestamps (benchmarks/steps.py): (last - first token) / 128, "
                                 f"prefill excluded; lowest of {args.latency_reps} runs"}
        print(f"[{args.format}] ctx {c}: TPOT " + ", ".join(f"{r['tpot_ms']} (median gap {r['itl_median_ms']})"
                                                          for r in reps) + " ms", flush=True)
        out["latency_bs1"] = lat
        _save_partial(args, out)
    prof: dict = {}

    def profiled(key: str, prompts: list[list[int]], warm_tokens: int, max_tokens: int | None = None) -> None:
        """One profiled decode window into out["decode_profile"][key] (benchmarks/step_profile.py)."""
        from benchmarks import step_profile

        try:
            run = step_profile.profile_decode(llm, prompts, steps=args.profile_steps, warm_tokens=warm_tokens,
                                              prefix=f"profile{key}", max_tokens=max_tokens)
            prof[key] = step_profile.summarize(run, vcfg.model_config.get_num_layers(vcfg.parallel_config))
        except Exception as exc:  # noqa: BLE001 - a diagnosis beside the measurements: record why, go on
            prof[key] = {"error": repr(exc)}
        print(f"[{args.format}] profile {key}: " + json.dumps({k: v for k, v in prof[key].items() if k != "kernels"}),
              flush=True)
        out["decode_profile"] = prof
        _save_partial(args, out)

    for c in profile_contexts:
        profiled(str(c), [prompt(c)["prompt_token_ids"]], warm_tokens=8)
    if args.sat_context:  # the full-KV configuration: timed, or (--profile-full-kv) profiled instead
        conc = capacity(args.sat_context)[1]
        n = min(int(conc), 256, args.sat_requests or 256)  # max_num_seqs
        plen = args.sat_context - args.sat_out
        if n < 1 or plen < 1:
            raise SystemExit(f"--sat-context {args.sat_context} --sat-out {args.sat_out}: {conc:.2f} requests fit and "
                             f"prompts would be {plen} tokens; need at least one request and a positive prompt")
        t = time.perf_counter()  # seconds_total includes making the prompts
        sat_prompts = [prompt(plen)["prompt_token_ids"] for _ in range(n)]
        if args.profile_full_kv:  # every request decoding, 2 tokens in
            profiled(f"{args.sat_context}x{n}", sat_prompts, warm_tokens=2, max_tokens=args.sat_out)
        else:
            sat = steps.full_batch_decode(steps.drive(llm, sat_prompts, args.sat_out, prefix="sat"),
                                          [f"sat-{i}" for i in range(n)])
            sat.update({"context": args.sat_context, "prompt_len": plen, "output_len": args.sat_out,
                        "max_concurrency": round(conc, 3), "seconds_total": round(time.perf_counter() - t, 1)})
            out["full_kv_decode"] = sat
            print(f"[{args.format}] full KV at {args.sat_context}: {json.dumps(sat)}", flush=True)
            _save_partial(args, out)
    if args.tp_requests:
        prompts = [prompt(args.tp_in) for _ in range(args.tp_requests)]
        sp = SamplingParams(max_tokens=args.tp_out, ignore_eos=True, temperature=0)
        dt = timed(prompts, sp)
        out["throughput"] = {"requests": args.tp_requests, "input_len": args.tp_in, "output_len": args.tp_out,
                             "seconds": round(dt, 2), "output_tok_s": round(args.tp_requests * args.tp_out / dt, 1),
                             "total_tok_s": round(args.tp_requests * (args.tp_in + args.tp_out) / dt, 1)}
    return out


def _run_ppl(llm, windows: dict[int, dict[str, list[list[int]]]]) -> dict[str, dict[str, float]]:
    """Perplexity per context and set: every window of every context in one ``generate`` call (teacher
    forced, ``prompt_logprobs``; the engine prefills each in ``--chunk``-token steps)."""
    import math

    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0, detokenize=False)
    flat = [(ctx, s, w) for ctx, per in windows.items() for s, ws in per.items() for w in ws]
    res = llm.generate([{"prompt_token_ids": w} for _, _, w in flat], sp, use_tqdm=False)
    sums: dict[str, dict[str, list[float]]] = {}
    for (ctx, s, w), r in zip(flat, res):
        nll, n = longctx.nll_of(w, r.prompt_logprobs)
        acc = sums.setdefault(str(ctx), {}).setdefault(s, [0.0, 0])
        acc[0] += nll
        acc[1] += n
    return {ctx: {s: math.exp(nll / n) for s, (nll, n) in per.items()} for ctx, per in sums.items()}


def _run_recall(llm, examples: list[dict], spec: longctx.RecallSpec, progress=None) -> dict:
    """Greedy continuation of every recall prompt, scored position by position: one ``generate`` call per
    haystack size, smallest first. After each size but the last, ``progress(block)`` gets the summary of
    the sizes done so far, marked ``incomplete`` (the worker saves it: a time limit then keeps them)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=spec.answer_tokens, temperature=0, ignore_eos=True, detokenize=False)
    sizes = sorted({e["haystack"] for e in examples})
    correct: dict[int, int] = {}  # example index -> right tokens
    for n, size in enumerate(sizes):
        idx = [i for i, e in enumerate(examples) if e["haystack"] == size]
        res = llm.generate([{"prompt_token_ids": examples[i]["prompt"]} for i in idx], sp, use_tqdm=False)
        for i, r in zip(idx, res, strict=True):
            correct[i] = longctx.score_recall(list(r.outputs[0].token_ids), examples[i]["expected"])
        if progress is not None and n + 1 < len(sizes):
            done = sorted(correct)
            block = longctx.summarize_recall([examples[i] for i in done], [correct[i] for i in done], spec)
            progress(longctx.mark_incomplete(block, sizes))
    return longctx.summarize_recall(examples, [correct[i] for i in range(len(examples))], spec)


def _run_passkey(llm, tokenizer, examples: list[dict], spec: longctx.PasskeySpec) -> dict:
    """Greedy reply (up to ``spec.max_tokens``) to every passkey chat prompt, one ``generate`` call."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=spec.max_tokens, temperature=0, detokenize=False)
    res = llm.generate([{"prompt_token_ids": e["prompt"]} for e in examples], sp, use_tqdm=False)
    replies = [(list(r.outputs[0].token_ids), tokenizer.decode(list(r.outputs[0].token_ids),
                                                               skip_special_tokens=True)) for r in res]
    return longctx.summarize_passkey(examples, replies, spec)


def _headline(task: str, block: dict) -> str:
    if task == "ppl":
        return "; ".join(f"{ctx}: " + ", ".join(f"{s.split(':')[-1]} {v:.3f}" for s, v in per.items())
                         for ctx, per in block.items())
    if task == "recall":
        per = ", ".join(f"{longctx.size_label(h)} {s['token_accuracy']:.3f}" for h, s in block["by_haystack"].items())
        return (f"token accuracy {block['all']['token_accuracy']:.3f} (exact {block['all']['exact_match']:.3f}, "
                f"{block['all']['trials']} trials; {per})")
    per = ", ".join(f"{d} {s['success']}/{s['trials']}" for d, s in block["depths"].items())
    return f"success {block['all']['success']}/{block['all']['trials']} ({per})"


def worker_accuracy(args) -> dict:
    """Perplexity at ``--seq-lens``, verbatim recall and passkey for one format, on one engine.

    Every prompt is built (tokenized) before the engine starts, so a bad setting fails in seconds. The
    engine prefills every request in ``--chunk``-token steps while up to ``--max-num-seqs`` requests run
    together: ``long_prefill_token_threshold=chunk`` caps each request's new tokens per step, for its first
    chunk too (vLLM 0.26.0 ``vllm/v1/core/sched/scheduler.py``: lines 507-508 cap a running request's
    next chunk, lines 861-863 a waiting request's first one, a preempted one's re-prefill included), and
    ``max_num_batched_tokens = max_num_seqs * chunk`` lets every running request take its full chunk.

    GPU budget (H100, SmolLM2-135M, defaults): engine start ~60-90 s (TurboQuant 2-4 min, compiling);
    ppl 2 sets x 4 windows x (2048 + 4096 + 8191) = 115K prompt tokens in ~256 steps of <= 768 tokens;
    recall 4 sizes x 5 depths x 20 trials = 400 prompts, 20 x 5 x (1024 + 2048 + 4096 + 7680 + 4 x 96) = 1.52M
    prompt tokens in ~750 steps of 2048 tokens, + 12.8K generated; passkey 3 depths x 20 trials = 60
    prompts x ~3.1K = 190K tokens + <= 480 generated. ~1.8M tokens in ~1100 steps: at an assumed 20-40 ms
    a step, 0.5-1 min of tasks, so ~1.5-2.5 min per format (TurboQuant ~3-5 min; split it with
    ``--tasks``). Recall dominates; 20 trials per cell is the issue's minimum, so it is not reduced.
    """
    from transformers import AutoConfig, AutoTokenizer
    from vllm_oscar.calibrate.data import load_text

    tasks = args.tasks
    tok = longctx.MemoTokenizer(AutoTokenizer.from_pretrained(args.model))
    limit = getattr(AutoConfig.from_pretrained(args.model), "max_position_embeddings", None)
    out: dict = {"format": args.format, "chunk": args.chunk}
    needed = []  # longest prompt + generated tokens of each task
    if "ppl" in tasks:
        windows: dict[int, dict[str, list[list[int]]]] = {}
        ppl_settings = {}
        for ctx in args.seq_lens:
            n = longctx.ppl_tokens(ctx, limit)
            windows[ctx] = {s: longctx.ppl_windows(tok, s, n, args.num_seqs) for s in args.eval_sets.split(",")}
            ppl_settings[str(ctx)] = {"tokens": n, "num_seqs": {s: len(ws) for s, ws in windows[ctx].items()},
                                      "chunk": args.chunk, "max_num_seqs": args.max_num_seqs,
                                      "enforce_eager": args.enforce_eager}
            short = {s: len(ws) for s, ws in windows[ctx].items() if len(ws) < args.num_seqs}
            if short:
                print(f"[{args.format}] ppl {ctx}: fewer windows than --num-seqs {args.num_seqs}: {short}", flush=True)
        needed.append(max(longctx.ppl_tokens(c, limit) for c in args.seq_lens) + 1)
    if "recall" in tasks:
        rspec = longctx.RecallSpec(haystacks=args.recall_haystacks, depths=args.recall_depths,
                                   trials=args.recall_trials, seed=args.seed)
        ids = {s: tok(load_text(s)[0], add_special_tokens=False)["input_ids"]
               for s in (rspec.haystack_set, rspec.passage_set)}
        recall_ex = longctx.recall_trials(ids[rspec.haystack_set], ids[rspec.passage_set], rspec)
        needed.append(max(len(e["prompt"]) for e in recall_ex) + rspec.answer_tokens)
    if "passkey" in tasks:
        pspec = longctx.PasskeySpec(depths=args.passkey_depths, trials=args.passkey_trials, seed=args.seed)
        passkey_ex = longctx.passkey_trials(tok, load_text(pspec.data)[0], pspec)
        needed.append(max(len(e["prompt"]) for e in passkey_ex) + pspec.max_tokens)
    if limit is not None and max(needed) > limit:
        raise SystemExit(f"a prompt plus its generated tokens needs {max(needed)} positions; the model has {limit}")
    max_len = max(needed) + 16 if limit is None else min(max(needed) + 16, limit)

    t0 = time.time()
    engine = {"max_model_len": max_len, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_seqs * args.chunk, "long_prefill_token_threshold": args.chunk,
              "enable_chunked_prefill": True, "enable_prefix_caching": False, "gpu_memory_utilization": 0.5,
              "enforce_eager": args.enforce_eager}
    llm = _engine(args.format, model=args.model, seed=0, **engine,
                  **({"additional_config": {"oscar": {"rotations": args.rotations}}}
                     if args.rotations and args.format == "oscar_int2" else {}))
    out["startup_s"] = round(time.time() - t0, 1)
    out["engine"] = engine
    print(f"[{args.format}] engine up in {out['startup_s']} s (max_model_len {max_len})", flush=True)
    _save_partial(args, out)
    for task in tasks:
        t = time.time()
        if task == "ppl":
            block = out["perplexity"] = _run_ppl(llm, windows)
            out["perplexity_settings"] = ppl_settings
        elif task == "recall":
            def recall_settings(block):
                block["settings"].update(prefill_chunk=args.chunk, generation="greedy, EOS ignored",
                                         enforce_eager=args.enforce_eager,
                                         semantics="every prompt token reads the cache beyond the BF16 windows")
                return block

            def save_sizes_done(block):
                out["recall"] = recall_settings(block)
                print(f"[{args.format}] recall, sizes done so far: {_headline('recall', block)}", flush=True)
                _save_partial(args, out)

            block = out["recall"] = recall_settings(_run_recall(llm, recall_ex, rspec, progress=save_sizes_done))
        else:
            block = out["passkey"] = _run_passkey(llm, tok, passkey_ex, pspec)
            block["settings"].update(prefill_chunk=args.chunk, generation="greedy, stops at EOS",
                                     enforce_eager=args.enforce_eager,
                                     semantics="int2_prefill (calibrate.passkey): every prompt token reads the "
                                               "cache beyond the BF16 windows; same keys and haystacks as the "
                                               "CPU reference at the same seed")
        out.setdefault("elapsed_s", {})[task] = round(time.time() - t, 1)
        print(f"[{args.format}] {task}: {_headline(task, block)} ({out['elapsed_s'][task]:.0f} s)", flush=True)
        _save_partial(args, out)
    return out


def worker_serve(args) -> dict:
    """Online serving: ``vllm serve`` (Qwen3-8B shape, dummy weights) driven by ``vllm bench serve`` with
    random 4096-in / 512-out requests at each ``--serve-rates`` rate; TTFT and TPOT p50/p99, throughput."""
    import tempfile

    from benchmarks.serving import running_server

    fmt = args.format
    if not args.serve_tokenizer:
        raise SystemExit("--serve-tokenizer (or OSCAR_TEST_MODEL) is required: `vllm bench serve` samples random "
                         "prompts through a tokenizer; any one whose vocabulary fits the model's works")
    port = 8100 + os.getpid() % 500
    cli = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    serve = cli + ["serve", str(args.model_dir), "--load-format", "dummy", "--tokenizer", args.serve_tokenizer,
                   "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
                   "--gpu-memory-utilization", str(args.gpu_mem), "--max-model-len", str(args.tp_in + args.tp_out + 64),
                   "--kv-cache-dtype", FORMATS[fmt]["kv_cache_dtype"], "--no-enable-prefix-caching"]
    if "additional_config" in FORMATS[fmt]:
        serve += ["--additional-config", json.dumps(FORMATS[fmt]["additional_config"])]
    out_dir = Path(tempfile.mkdtemp(prefix="oscar-serve-"))
    res: dict = {"format": fmt, "serve": {"input_len": args.tp_in, "output_len": args.tp_out, "rates": {}}}
    with running_server(serve, port, out_dir / "server.log", timeout_s=600) as base:
        for rate in args.serve_rates.split(","):
            name = f"rate-{rate}.json"
            subprocess.run(cli + [
                "bench", "serve", "--backend", "vllm", "--base-url", base, "--model", "bench",
                "--tokenizer", args.serve_tokenizer, "--dataset-name", "random", "--random-input-len", str(args.tp_in),
                "--random-output-len", str(args.tp_out), "--num-prompts", str(args.serve_prompts), "--ignore-eos",
                "--request-rate", rate, "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,99",
                "--save-result", "--result-dir", str(out_dir), "--result-filename", name], check=True)
            got = json.loads((out_dir / name).read_text())
            res["serve"]["rates"][rate] = {k: got.get(k) for k in (
                "request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms",
                "median_ttft_ms", "median_tpot_ms", "completed")}
            print(f"[{fmt}] rate {rate}: {res['serve']['rates'][rate]}", flush=True)
            _save_partial(args, res)
    return res


# -------------------------------------------------------------------------------------- driver


def _run_worker(kind: str, fmt: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", kind, "--format", fmt, *extra]
    res_file = RESULTS / f".worker-{kind}-{fmt}.json"
    res_file.unlink(missing_ok=True)
    cmd += ["--worker-out", str(res_file)]
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    rc = wait_or_stop(subprocess.Popen(cmd, cwd=ROOT), args.worker_timeout)
    rc = "timeout" if rc is None else rc
    data = json.loads(res_file.read_text()) if res_file.exists() else {"format": fmt}
    res_file.unlink(missing_ok=True)
    if rc != 0:  # keep the partial measurements, say why the rest is missing
        data["error"] = f"worker {'timed out' if rc == 'timeout' else f'exited {rc}'} after {time.time() - t:.0f}s"
    return data


def _merge(path: Path, fresh: dict, merge: bool, upgrade=None, combine=None) -> dict:
    """Results of the formats run now replace theirs in ``path``; other formats' results are kept (one
    format per device call fits the 10-minute limit). ``upgrade(old_file)`` brings the old file to the
    current shape first; ``combine(old_entry, new_entry)``, when given, folds a format's new entry into
    its old one instead of replacing it (the accuracy suite: a later ``--tasks recall`` call keeps the
    format's perplexity)."""
    if merge and path.exists():
        old = json.loads(path.read_text())
        if upgrade is not None:
            old = upgrade(old)
        now = {r["format"] for r in fresh["results"]}
        if combine is not None:
            before = {r["format"]: r for r in old.get("results", [])}
            fresh = {**fresh, "results": [combine(before[r["format"]], r) if r["format"] in before else r
                                          for r in fresh["results"]]}
        kept = [r for r in old.get("results", []) if r["format"] not in now]
        runs = list(old.get("runs") or [])
        if "command" in old and all(r.get("command") != old["command"] for r in runs):
            # a file from a single call (or an older shape): its own command is the first run
            covered = {f for r in runs for f in r.get("formats", [])}
            runs.insert(0, {"command": old["command"], "environment": old.get("environment", {}),
                            "formats": sorted(r["format"] for r in old.get("results", []) if r["format"] not in covered)})
        runs.append({"command": fresh["command"], "environment": fresh["environment"], "formats": sorted(now)})
        fresh = {**fresh, "results": kept + fresh["results"], "runs": runs}
    order = list(FORMATS)
    fresh["results"].sort(key=lambda r: order.index(r["format"]) if r["format"] in order else len(order))
    path.write_text(json.dumps(fresh, indent=2) + "\n")
    return fresh


def upgrade_accuracy(acc: dict) -> dict:
    """A copy of accuracy results with entries written before ``--seq-lens`` (``"perplexity": {set: ppl}``
    measured at ``settings.seq_len``, 2048 when absent, one request at a time) in the current shape
    (``"perplexity": {context: {set: ppl}}`` plus ``"perplexity_settings"``); current entries unchanged."""
    acc = copy.deepcopy(acc)
    settings = acc.get("settings") or {}
    ctx = str(settings.get("seq_len", 2048))
    for r in acc.get("results", []):
        p = r.get("perplexity")
        if p and not any(isinstance(v, dict) for v in p.values()):
            r["perplexity"] = {ctx: p}
            r.setdefault("perplexity_settings", {ctx: {
                "tokens": int(ctx), "num_seqs": {s: settings.get("num_seqs") for s in p},
                "chunk": r.get("chunk", settings.get("chunk")), "max_num_seqs": 1}})
    return acc


def combine_accuracy(old: dict, new: dict) -> dict:
    """One format's accuracy entry after a new call: its tasks replace the old ones, perplexity per
    context and recall per haystack size (when the two calls' other recall settings agree, so that
    ``--recall-haystacks`` can split the task across calls); the old error goes unless the new call has
    its own."""
    out = {**old, **new}
    for k in ("perplexity", "perplexity_settings", "elapsed_s"):
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            out[k] = {**old[k], **new[k]}
    if old.get("recall") and new.get("recall"):
        out["recall"] = longctx.merge_recall(old["recall"], new["recall"]) or new["recall"]
    if "error" not in new:
        out.pop("error", None)
    return out


def _table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _perplexity_tables(res: dict[str, dict]) -> list[str]:
    """One table per context (format, ppl per set, vs BF16), then the increase over BF16 by context."""
    ctxs = sorted({c for r in res.values() for c in r.get("perplexity", {})}, key=int)
    parts, mean_rel = [], {}
    for ctx in ctxs:
        sets = sorted({s for r in res.values() for s in r.get("perplexity", {}).get(ctx, {})})
        base = res.get("auto", {}).get("perplexity", {}).get(ctx, {})
        rows = [["format"] + [f"ppl {s.split(':')[-1]}" for s in sets] + ["vs BF16"]]
        for f, r in res.items():
            p = r.get("perplexity", {}).get(ctx, {})
            if not p and "error" not in r:
                continue
            rels = [100 * (p[s] / base[s] - 1) for s in sets if s in p and s in base]
            if rels and f != "auto":
                mean_rel.setdefault(f, {})[ctx] = sum(rels) / len(rels)
            rows.append([f"`{f}`"] + [f"{p[s]:.3f}" if s in p else r.get("error", "") for s in sets]
                        + [", ".join(f"{v:+.1f}%" for v in rels)])
        tokens = {r.get("perplexity_settings", {}).get(ctx, {}).get("tokens") for r in res.values()} - {None}
        note = f" ({', '.join(map(str, sorted(tokens)))} tokens)" if tokens and tokens != {int(ctx)} else ""
        parts.append(f"Perplexity through vLLM (SmolLM2-135M-Instruct), {ctx} context{note}\n\n" + _table(rows))
    if len(ctxs) > 1 and mean_rel:
        rows = [["format"] + [f"@{longctx.size_label(c)}" for c in ctxs]]
        rows += [[f"`{f}`"] + [f"{per[c]:+.1f}%" if c in per else "" for c in ctxs] for f, per in mean_rel.items()]
        parts.append("Perplexity increase over BF16 by context (mean of the sets)\n\n" + _table(rows))
    return parts


def _missing(res: dict[str, dict], key: str) -> list[list[str]]:
    """Rows for formats whose worker failed before ``key``'s task finished."""
    return [[f"`{f}`", r["error"]] for f, r in res.items() if not r.get(key) and r.get("error")]


def _recall_tables(res: dict[str, dict]) -> list[str]:
    """Token accuracy per haystack size (mean over depths), overall (exact-match rate), and each format's
    worst (haystack, depth) cell against BF16's same cell."""
    rec = {f: r["recall"] for f, r in res.items() if r.get("recall")}
    if not rec:
        return []
    sizes = sorted({h for b in rec.values() for h in b["by_haystack"]}, key=int)
    base = rec.get("auto")
    rows = [["format"] + [f"haystack {longctx.size_label(h)}" for h in sizes]
            + ["all (exact match)", "worst cell vs BF16"]]
    for f, b in rec.items():
        worst = ""
        if base is not None and f != "auto":
            deltas = [(c["token_accuracy"] - base["cells"][h][d]["token_accuracy"], h, d)
                      for h, per in b["cells"].items() for d, c in per.items() if d in base["cells"].get(h, {})]
            if deltas:
                dv, h, d = min(deltas, key=lambda x: x[0])
                worst = f"{dv:+.3f} ({longctx.size_label(h)} @{d})"
        total = f"{b['all']['token_accuracy']:.3f} ({b['all']['exact_match']:.2f})"
        done = sorted(b["by_haystack"], key=int)
        # a worker stopped by its time limit after some sizes, or a call that ran fewer sizes than the others:
        # its overall number is not comparable with theirs
        if b.get("incomplete") or len(done) < len(sizes):
            total += " over " + ", ".join(longctx.size_label(h) for h in done) + " only"
        rows.append([f"`{f}`"] + [f"{b['by_haystack'][h]['token_accuracy']:.3f}" if h in b["by_haystack"] else ""
                                  for h in sizes] + [total, worst])
    rows += [r + [""] * (len(rows[0]) - len(r)) for r in _missing(res, "recall")]
    st = next(iter(rec.values()))["settings"]
    return [f"Verbatim recall through vLLM: token accuracy of the greedy continuation ({st['passage_tokens'] - st['cue_tokens']}"
            f" tokens) of a {st['passage_tokens']}-token passage cued by its first {st['cue_tokens']}, mean over depths "
            f"{', '.join(longctx.depth_key(d) for d in st['depths'])}; {st['trials']} trials a cell\n\n" + _table(rows)]


def _passkey_tables(res: dict[str, dict]) -> list[str]:
    pk = {f: r["passkey"] for f, r in res.items() if r.get("passkey")}
    if not pk:
        return []
    depths = sorted({d for b in pk.values() for d in b["depths"]}, key=lambda d: float(d.rstrip("%")))
    rows = [["format"] + [f"depth {d}" for d in depths] + ["all"]]
    for f, b in pk.items():
        cells = [b["depths"].get(d) for d in depths] + [b["all"]]
        rows.append([f"`{f}`"] + [f"{c['success']}/{c['trials']}" if c else "" for c in cells])
    rows += [r + [""] * (len(rows[0]) - len(r)) for r in _missing(res, "passkey")]
    st = next(iter(pk.values()))["settings"]
    return [f"Passkey through vLLM (chat template, ~{st['haystack_tokens']}-token haystack, greedy reply of up "
            f"to {st['max_tokens']} tokens; success = the reply's first number is the key)\n\n" + _table(rows)]


def _serve_table(serve: dict) -> str:
    """One row per (format, request rate) of ``--suite serve``; throughput also as a multiple of BF16's."""
    res = {r["format"]: r for r in serve["results"]}
    base = res.get("auto", {}).get("serve", {}).get("rates", {})
    rows = [["format", "rate (req/s)", "out tok/s", "x BF16", "TTFT p50 / p99 (ms)", "TPOT p50 / p99 (ms)"]]
    for f, r in res.items():
        if "serve" not in r:
            rows.append([f"`{f}`", r.get("error", "failed"), "", "", "", ""])
            continue
        for rate, m in r["serve"]["rates"].items():
            ratio = m["output_throughput"] / base[rate]["output_throughput"] if rate in base else float("nan")
            rows.append([f"`{f}`", rate, f"{m['output_throughput']:.0f}", f"{ratio:.2f}x",
                         f"{m['p50_ttft_ms']:.0f} / {m['p99_ttft_ms']:.0f}",
                         f"{m['p50_tpot_ms']:.1f} / {m['p99_tpot_ms']:.1f}"])
    s = serve.get("settings", {})
    return (f"Online serving, `vllm bench serve`, {s.get('prompts')} random prompts of {s.get('input_len')} in / "
            f"{s.get('output_len')} out\n\n" + _table(rows))


def markdown(e2e: dict | None, acc: dict | None, serve: dict | None = None) -> str:
    parts = []
    if e2e:
        res = {r["format"]: r for r in e2e["results"]}
        base = res.get("auto", {})
        rows = [["format", "conc. 8K", "conc. 32K", "conc. 128K", "x BF16 @32K"]]
        for f, r in res.items():
            if "capacity" not in r:
                rows.append([f"`{f}`", r.get("error", "failed"), "", "", ""])
                continue
            c = r["capacity"]
            ratio = c["32768"]["max_concurrency"] / base["capacity"]["32768"]["max_concurrency"] if base.get(
                "capacity") else float("nan")
            rows.append([f"`{f}`"] + [f"{c[k]['max_concurrency']:.2f}" for k in ("8192", "32768", "131072")]
                        + [f"{ratio:.2f}x"])
        parts.append("KV capacity (maximum concurrency vLLM computes, Qwen3-8B shape)\n\n" + _table(rows))
        ctxs = sorted({k for r in res.values() for k in r.get("latency_bs1", {})}, key=int)
        rows = [["format"] + [f"TPOT @{int(c) // 1024}K (ms)" for c in ctxs] + ["throughput (out tok/s)"]]
        for f, r in res.items():
            lat = r.get("latency_bs1", {})
            tp = r.get("throughput", {})
            rows.append([f"`{f}`"] + [f"{lat[c]['tpot_ms']:.2f}" if c in lat else "" for c in ctxs]
                        + [f"{tp['output_tok_s']:.0f}" if tp else ""])
        parts.append("Batch-1 decode latency and offline throughput\n\n" + _table(rows))
        sat = {f: r["full_kv_decode"] for f, r in res.items() if "full_kv_decode" in r}
        if sat:
            base_tok = sat.get("auto", {}).get("decode_tok_s")
            rows = [["format", "requests × (in + out)", "decode tok/s", "x BF16", "step (ms)", "prefill phase (s)",
                     "end-to-end out tok/s"]]
            for f, d in sat.items():
                tok = d.get("decode_tok_s")
                rows.append([f"`{f}`", f"{d['requests']} × ({d['prompt_len']} + {d['output_len']})",
                             f"{tok:.0f}" if tok else d.get("error", ""),
                             f"{tok / base_tok:.2f}x" if tok and base_tok else "",
                             f"{d['step_ms_median']:.1f}" if tok else "", f"{d['prefill_phase_s']:.1f}",
                             f"{d['output_tok_s_end_to_end']:.0f}"])
            ctx = next(iter(sat.values()))["context"]
            parts.append(f"Decode throughput with a full KV cache ({ctx // 1024}K-token requests, as many as "
                         "each format holds)\n\n" + _table(rows))
        prof = {f: r["decode_profile"] for f, r in res.items() if "decode_profile" in r}
        if prof:
            from benchmarks import step_profile

            parts.append(step_profile.markdown_table(prof))
    if acc:
        res = {r["format"]: r for r in upgrade_accuracy(acc)["results"]}
        parts += _perplexity_tables(res) + _recall_tables(res) + _passkey_tables(res)
    if serve:
        parts.append(_serve_table(serve))
    return "\n\n".join(parts)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(e2e: dict | None, acc: dict | None, out_dir: Path) -> list[Path]:
    """PNG plots of the result JSON (matplotlib: ``pip install matplotlib``; not needed for anything else)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if e2e:
        res = [r for r in e2e["results"] if "capacity" in r]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        lens = ["8192", "32768", "131072"]
        width = 0.8 / max(1, len(res))
        for i, r in enumerate(res):
            ax1.bar([j + i * width for j in range(len(lens))], [r["capacity"][n]["max_concurrency"] for n in lens],
                    width, label=r["format"])
            lat = r.get("latency_bs1", {})
            ctx = sorted(lat, key=int)
            ax2.plot([int(c) // 1024 for c in ctx], [lat[c]["tpot_ms"] for c in ctx], marker="o", label=r["format"])
        ax1.set_xticks([j + width * (len(res) - 1) / 2 for j in range(len(lens))], ["8K", "32K", "128K"])
        ax1.set_yscale("log")
        ax1.set_ylabel("max concurrent requests (vLLM)")
        ax1.set_title("KV capacity, Qwen3-8B shape, H100")
        ax1.legend()
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("context (K tokens)")
        ax2.set_ylabel("batch-1 TPOT (ms)")
        ax2.set_title("Decode latency, Qwen3-8B shape, H100")
        ax2.legend()
        written.append(_save_figure(fig, out_dir / "e2e-h100.png"))
    if acc:
        res = upgrade_accuracy(acc)["results"]
        base = next((r["perplexity"] for r in res if r["format"] == "auto" and r.get("perplexity")), None)
        rows = [r for r in res if r.get("perplexity") and r["format"] != "auto"]  # BF16 is the 0 of the axis
        if base:
            ctxs = sorted(base, key=int)
            height = 0.8 / len(ctxs)
            fig, ax = plt.subplots(figsize=(6, 1.5 + 0.25 * len(rows) * len(ctxs)))
            for i, ctx in enumerate(ctxs):
                ys, vals = [], []
                for j, r in enumerate(rows):
                    p = r["perplexity"].get(ctx, {})
                    sets = [s for s in base[ctx] if s in p]
                    if sets:
                        ys.append(j + i * height)
                        vals.append(sum(100 * (p[s] / base[ctx][s] - 1) for s in sets) / len(sets))
                ax.barh(ys, vals, height, label=f"{longctx.size_label(ctx)} context")
            ax.set_yticks([j + height * (len(ctxs) - 1) / 2 for j in range(len(rows))], [r["format"] for r in rows])
            ax.invert_yaxis()
            # Log axis: FP8 (~2%) and naive INT2 (~900%) in one plot.
            ax.set_xscale("log")
            ax.set_xlabel("perplexity increase over BF16 (%, log scale; mean of sets)")
            ax.set_title("Perplexity cost, SmolLM2-135M through vLLM")
            if len(ctxs) > 1:
                ax.legend()
            written.append(_save_figure(fig, out_dir / "accuracy-gpu-smollm2.png"))
        rec = [r for r in res if r.get("recall")]
        if rec:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for r in rec:
                by = r["recall"]["by_haystack"]
                sizes = sorted(by, key=int)
                ax.plot([int(h) for h in sizes], [by[h]["token_accuracy"] for h in sizes], marker="o",
                        label=r["format"])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("haystack (tokens)")
            ax.set_ylabel("recall token accuracy (mean over depths)")
            ax.set_title("Verbatim recall, SmolLM2-135M through vLLM")
            ax.legend()
            written.append(_save_figure(fig, out_dir / "recall-gpu-smollm2.png"))
    return written


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t for t in text.split(",") if t)
    bad = [t for t in tasks if t not in longctx.TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown tasks {bad}; choose from {list(longctx.TASKS)}")
    return tuple(t for t in longctx.TASKS if t in tasks)  # run order: longctx.TASKS


def accuracy_path(acc_tag: str | None) -> Path:
    """Where the accuracy suite's results go: ``accuracy-gpu-smollm2.json``, or ``-<acc_tag>`` before ``.json``."""
    return RESULTS / f"accuracy-gpu-smollm2{'-' + acc_tag if acc_tag else ''}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["all", "perf", "accuracy", "serve"], default="all",
                   help="all = perf + accuracy; serve (online, `vllm bench serve`) runs only when named")
    p.add_argument("--formats", default=None, help=f"comma list of {list(FORMATS)}")
    p.add_argument("--model-dir", default=str(DUMMY_QWEN3_8B), help="config folder for dummy-weight perf runs")
    p.add_argument("--skip-sliding-window", action="store_true",
                   help="perf: keep the model's sliding-window layers in BF16 in the quantized formats "
                        "(--kv-cache-dtype-skip-layers sliding_window; e.g. benchmarks/models/gemma3-12b-dummy)")
    p.add_argument("--contexts", default="8192,32768,65536,131072", help="batch-1 latency contexts")
    p.add_argument("--gpu-mem", type=float, default=0.9)
    p.add_argument("--quantization", default=None,
                   help="weight quantization of the perf engines (vLLM's `quantization`, e.g. fp8: online FP8 weights); "
                        "default: BF16 weights")
    p.add_argument("--latency-reps", type=int, default=2,
                   help="batch-1 runs per context (the lowest TPOT is kept); 0: no latency runs (capacity only)")
    p.add_argument("--profile-contexts", type=_ints, default=(),
                   help="batch-1 contexts whose decode steps are profiled kernel by kernel (benchmarks/step_profile.py)")
    p.add_argument("--profile-steps", type=int, default=32, help="engine steps in each profiled window")
    p.add_argument("--profile-full-kv", action="store_true",
                   help="profile the --sat-context configuration (as many requests as the cache holds, all decoding) "
                        "instead of timing its whole decode")
    p.add_argument("--sat-context", type=int, default=32768,
                   help="full-KV decode: as many requests of this many tokens as the format's KV cache holds "
                        "(vLLM's maximum concurrency, at most 256), decode throughput while all of them decode; "
                        "0 skips it")
    p.add_argument("--sat-out", type=int, default=4096,
                   help="full-KV decode: output tokens per request. With 512 or 1536, oscar_int2 at 32K never had "
                        "every request decoding at once on the H100: the last prompt was admitted only after the "
                        "first request finished (README, 'Admission at a full cache')")
    p.add_argument("--sat-requests", type=int, default=0,
                   help="requests of the --sat-context run (0: as many as the cache holds; fewer: a small batch's "
                        "decode steps, timed while every request decodes)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="perf engine: vLLM's prefill chunk budget per step (default: vLLM's, 16384 on an H100)")
    p.add_argument("--tp-requests", type=int, default=256)
    p.add_argument("--tp-in", type=int, default=4096)
    p.add_argument("--tp-out", type=int, default=512)
    p.add_argument("--model", default=os.environ.get("OSCAR_TEST_MODEL"), help="real model for accuracy")
    p.add_argument("--rotations", default=None, help="calibrated rotations for oscar_int2 accuracy")
    p.add_argument("--tasks", type=_tasks, default=longctx.TASKS,
                   help=f"accuracy tasks, comma list of {list(longctx.TASKS)} (default: all)")
    p.add_argument("--eval-sets", default="shakespeare:tragedies,shakespeare:histories")
    p.add_argument("--seq-lens", "--seq-len", dest="seq_lens", type=_ints, default=longctx.PPL_CONTEXTS,
                   help="perplexity contexts, comma list (a context equal to the model's limit scores limit-1 "
                        "tokens); --seq-len N is the one-context alias")
    p.add_argument("--num-seqs", type=int, default=4, help="perplexity windows per set and context")
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk (tokens a request gets per step), all tasks")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="accuracy engine: requests prefilled together (max_num_batched_tokens = this x --chunk)")
    p.add_argument("--recall-trials", type=int, default=20, help="trials per (haystack, depth) cell")
    p.add_argument("--recall-haystacks", type=_ints, default=longctx.RECALL_HAYSTACKS, help="haystack tokens")
    p.add_argument("--recall-depths", type=_floats, default=longctx.RECALL_DEPTHS)
    p.add_argument("--passkey-trials", type=int, default=20, help="trials per depth")
    p.add_argument("--passkey-depths", type=_floats, default=longctx.PASSKEY_DEPTHS)
    p.add_argument("--seed", type=int, default=0, help="recall and passkey example seed")
    p.add_argument("--enforce-eager", action="store_true",
                   help="accuracy engine without torch.compile and CUDA graphs: TurboQuant's engine then starts "
                        "without its ~2.5 min of compiling and graph capture; recorded in every task's settings "
                        "(the numerics upstream of the cache differ slightly from the compiled engine's)")
    p.add_argument("--tag", default="h100", help="file suffix: e2e-<tag>.json")
    p.add_argument("--acc-tag", default=None,
                   help="accuracy results go to accuracy-gpu-smollm2-<tag>.json (e.g. a run with another --chunk, "
                        "so its numbers do not replace the 32-token-chunk ones)")
    p.add_argument("--worker-timeout", type=int, default=1500)
    p.add_argument("--fresh", action="store_true", help="replace the result JSON instead of merging formats into it")
    p.add_argument("--serve-rates", default="4,16,inf", help="request rates (req/s) for --suite serve")
    p.add_argument("--serve-prompts", type=int, default=256)
    p.add_argument("--serve-tokenizer", default=os.environ.get("OSCAR_TEST_MODEL"),
                   help="tokenizer for `vllm bench serve` and the dummy-weight server (default: $OSCAR_TEST_MODEL)")
    p.add_argument("--markdown", action="store_true", help="print tables from existing results and exit")
    p.add_argument("--plots", action="store_true", help="write PNG plots of existing results to docs/ and exit "
                                                         "(needs matplotlib)")
    p.add_argument("--worker", choices=["perf", "accuracy", "serve"], help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def accuracy_worker_args(args) -> list[str]:
    """The accuracy options a worker gets from the driver (parsed back by ``build_parser``)."""
    extra = ["--model", args.model, "--tasks", _csv(args.tasks), "--eval-sets", args.eval_sets,
             "--seq-lens", _csv(args.seq_lens), "--num-seqs", str(args.num_seqs), "--chunk", str(args.chunk),
             "--max-num-seqs", str(args.max_num_seqs), "--recall-trials", str(args.recall_trials),
             "--recall-haystacks", _csv(args.recall_haystacks), "--recall-depths", _csv(args.recall_depths),
             "--passkey-trials", str(args.passkey_trials), "--passkey-depths", _csv(args.passkey_depths),
             "--seed", str(args.seed)]
    extra += ["--enforce-eager"] if args.enforce_eager else []
    return extra + (["--rotations", args.rotations] if args.rotations else [])


def accuracy_settings(args) -> dict:
    return {"model": args.model, "tasks": list(args.tasks), "seq_lens": list(args.seq_lens),
            "num_seqs": args.num_seqs, "chunk": args.chunk, "max_num_seqs": args.max_num_seqs,
            "eval_sets": args.eval_sets, "rotations": args.rotations, "seed": args.seed,
            "enforce_eager": args.enforce_eager,
            "recall": {"trials": args.recall_trials, "haystacks": list(args.recall_haystacks),
                       "depths": list(args.recall_depths)},
            "passkey": {"trials": args.passkey_trials, "depths": list(args.passkey_depths)},
            "semantics": f"one engine per format; every prompt prefilled in {args.chunk}-token steps "
                         "(long_prefill_token_threshold), so every token reads the quantized cache beyond the "
                         "BF16 windows as decode does; perplexity teacher-forced (prompt_logprobs), recall "
                         "and passkey greedy"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    e2e_path = RESULTS / f"e2e-{args.tag}.json"
    acc_path = accuracy_path(args.acc_tag)
    load = lambda q: json.loads(q.read_text()) if q.exists() else None
    if args.markdown:
        print(markdown(load(e2e_path), load(acc_path), load(RESULTS / f"serve-{args.tag}.json")))
        return 0
    if args.plots:
        for path in plots(load(e2e_path), load(acc_path), ROOT / "docs"):
            print(path.relative_to(ROOT))
        return 0
    if args.worker:
        stop_on_sigterm()  # the parent's time limit must also stop a `vllm serve` this worker started
        if args.format not in FORMATS:
            raise SystemExit(f"unknown format {args.format!r}; valid: {list(FORMATS)}")
        res = {"perf": worker_perf, "accuracy": worker_accuracy, "serve": worker_serve}[args.worker](args)
        _save_partial(args, res)
        return 0

    unknown = [f for f in (args.formats or "").split(",") if f and f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown --formats {unknown}; valid: {list(FORMATS)}")
    if args.profile_full_kv and args.sat_context <= 0:
        raise SystemExit("--profile-full-kv profiles the full-KV configuration of --sat-context; give --sat-context N "
                         "(e.g. 32768), or drop --profile-full-kv")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shared = ["--model-dir", args.model_dir, "--contexts", args.contexts, "--gpu-mem", str(args.gpu_mem),
              "--latency-reps", str(args.latency_reps), "--sat-context", str(args.sat_context),
              "--profile-contexts", _csv(args.profile_contexts), "--profile-steps", str(args.profile_steps),
              *(["--profile-full-kv"] if args.profile_full_kv else []),
              "--sat-out", str(args.sat_out), "--sat-requests", str(args.sat_requests),
              *(["--max-num-batched-tokens", str(args.max_num_batched_tokens)] if args.max_num_batched_tokens else []),
              *(["--skip-sliding-window"] if args.skip_sliding_window else []),
              *(["--quantization", args.quantization] if args.quantization else []),
              "--tp-requests", str(args.tp_requests), "--tp-in", str(args.tp_in), "--tp-out", str(args.tp_out)]
    e2e = acc = None
    if args.suite in ("all", "perf"):
        fmts = (args.formats or DEFAULT_PERF_FORMATS).split(",")
        e2e = {"environment": _environment(), "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
               "settings": {"model": ("Qwen3-8B shape, dummy weights" if Path(args.model_dir) == DUMMY_QWEN3_8B
                                      else f"{Path(args.model_dir).name} config, dummy weights"),
                            "sliding_window_layers_bf16": args.skip_sliding_window,
                            "weights": f"quantization={args.quantization}" if args.quantization else "bf16",
                            "gpu_memory_utilization": args.gpu_mem,
                            "contexts": args.contexts, "latency_reps": args.latency_reps,
                            **({"profile_contexts": _csv(args.profile_contexts), "profile_steps": args.profile_steps,
                                "profile_full_kv": args.profile_full_kv}
                               if args.profile_contexts or args.profile_full_kv else {}),
                            "full_kv_decode": [args.sat_context, args.sat_out],
                            **({"sat_requests": args.sat_requests} if args.sat_requests else {}),
                            "throughput": [args.tp_requests, args.tp_in, args.tp_out]},
               "results": [_run_worker("perf", f, args, shared) for f in fmts]}
        e2e = _merge(e2e_path, e2e, not args.fresh)
    if args.suite == "serve":
        fmts = (args.formats or "auto,fp8,oscar_int2").split(",")
        extra = shared + ["--serve-rates", args.serve_rates, "--serve-prompts", str(args.serve_prompts)]
        if args.serve_tokenizer:
            extra += ["--serve-tokenizer", args.serve_tokenizer]
        served = {"environment": _environment(), "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
                  "settings": {"model": "Qwen3-8B shape, dummy weights", "gpu_memory_utilization": args.gpu_mem,
                               "input_len": args.tp_in, "output_len": args.tp_out, "prompts": args.serve_prompts,
                               "rates": args.serve_rates},
                  "results": [_run_worker("serve", f, args, extra) for f in fmts]}
        _merge(RESULTS / f"serve-{args.tag}.json", served, not args.fresh)
        for r in served["results"]:
            print(r["format"], json.dumps(r.get("serve", r.get("error"))))
        return 0
    if args.suite in ("all", "accuracy"):
        if not args.model:
            raise SystemExit("--model (or OSCAR_TEST_MODEL) is required for the accuracy suite")
        fmts = (args.formats or DEFAULT_ACC_FORMATS).split(",")
        extra = accuracy_worker_args(args)
        acc = {"environment": _environment(), "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
               "settings": accuracy_settings(args),
               "results": [_run_worker("accuracy", f, args, extra) for f in fmts]}
        acc = _merge(acc_path, acc, not args.fresh, upgrade=upgrade_accuracy, combine=combine_accuracy)
    print(markdown(e2e, acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
