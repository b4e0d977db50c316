"""End-to-end benchmarks of KV-cache formats in vLLM: capacity, latency, throughput, accuracy.

    python -m benchmarks.run --suite all            # on the GPU machine, vLLM staged (shared/device)
    python -m benchmarks.run --suite perf --formats auto,fp8,oscar_int2 --contexts 8192,32768
    python -m benchmarks.run --suite serve --formats oscar_int2   # online: vllm serve + vllm bench serve

Every format goes through the same code path: one fresh engine per (suite, format), started in a
subprocess so GPU memory is returned between formats. Results: ``benchmarks/results/e2e-<gpu>.json``
(capacity, latency, throughput on the Qwen3-8B shape with dummy weights) and
``benchmarks/results/accuracy-gpu-smollm2.json`` (perplexity on real weights), each with the machine,
versions and settings. ``--markdown`` prints the tables from existing JSON without a GPU.

Semantics worth knowing:
- capacity is vLLM's own ``get_kv_cache_capacity`` (what it logs as "Maximum concurrency for N tokens
  per request") evaluated for each request length on the engine's real KV-cache config;
- batch-1 TPOT = (time of 1 prompt + 129 tokens - time of the same prompt + 1 token) / 128, prefix
  caching off so both runs prefill;
- perplexity is teacher-forced through ``prompt_logprobs`` with chunked prefill in ``--chunk``-token
  chunks, so every token reads the quantized history beyond the windows as decode does (a one-chunk
  prefill would attend to exact K/V and hide the cache's error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

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


def _engine(fmt: str, **kwargs):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: its KV config is readable
    from vllm import LLM

    return LLM(**kwargs, **FORMATS[fmt])


def worker_perf(args) -> dict:
    """Capacity, batch-1 TPOT and offline throughput for one format on the Qwen3-8B shape."""
    import random

    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts + [args.tp_in]) + 256
    t0 = time.time()
    llm = _engine(args.format, model=str(args.model_dir), load_format="dummy", skip_tokenizer_init=True,
                  max_model_len=max_len, gpu_memory_utilization=args.gpu_mem, enable_prefix_caching=False,
                  max_num_seqs=256, seed=0)
    out: dict = {"format": args.format, "startup_s": round(time.time() - t0, 1), "max_model_len": max_len}
    vcfg = llm.llm_engine.vllm_config
    kvc = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    cap = {}
    for n in (8192, 32768, 131072):
        saved = vcfg.model_config.max_model_len
        vcfg.model_config.max_model_len = n
        try:
            tokens, conc = get_kv_cache_capacity(vcfg, kvc)
        finally:
            vcfg.model_config.max_model_len = saved
        cap[str(n)] = {"max_concurrency": round(conc, 3), "kv_tokens": int(tokens)}
    out["capacity"] = cap
    out["num_blocks"] = kvc.num_blocks
    _save_partial(args, out)
    rng = random.Random(0)

    def prompt(n):
        return {"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(n)]}

    def timed(prompts, sp):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    many = SamplingParams(max_tokens=129, ignore_eos=True, temperature=0)
    timed([prompt(512)], many)  # warm-up: compile, graphs, allocator
    lat = {}
    for c in contexts:
        p = prompt(c)
        t1 = min(timed([p], one) for _ in range(2))
        t2 = min(timed([p], many) for _ in range(2))
        lat[str(c)] = {"tpot_ms": round(1000 * (t2 - t1) / 128, 3), "prefill_s": round(t1, 3)}
        print(f"[{args.format}] ctx {c}: TPOT {lat[str(c)]['tpot_ms']} ms", flush=True)
        out["latency_bs1"] = lat
        _save_partial(args, out)
    if args.tp_requests:
        prompts = [prompt(args.tp_in) for _ in range(args.tp_requests)]
        sp = SamplingParams(max_tokens=args.tp_out, ignore_eos=True, temperature=0)
        dt = timed(prompts, sp)
        out["throughput"] = {"requests": args.tp_requests, "input_len": args.tp_in, "output_len": args.tp_out,
                             "seconds": round(dt, 2), "output_tok_s": round(args.tp_requests * args.tp_out / dt, 1),
                             "total_tok_s": round(args.tp_requests * (args.tp_in + args.tp_out) / dt, 1)}
    return out


def worker_accuracy(args) -> dict:
    """Teacher-forced perplexity through prompt_logprobs on held-out Shakespeare, small-chunk prefill."""
    import math

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_oscar.calibrate.data import token_sequences

    tok = AutoTokenizer.from_pretrained(args.model)
    out: dict = {"format": args.format, "chunk": args.chunk, "perplexity": {}}
    llm = _engine(args.format, model=args.model, max_model_len=args.seq_len + 16, gpu_memory_utilization=0.5,
                  enable_chunked_prefill=True, max_num_batched_tokens=args.chunk, max_num_seqs=1,
                  long_prefill_token_threshold=args.chunk, enable_prefix_caching=False, seed=0,
                  **({"additional_config": {"oscar": {"rotations": args.rotations}}}
                     if args.rotations and args.format == "oscar_int2" else {}))
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    for set_name in args.eval_sets.split(","):
        seqs = token_sequences(tok, set_name, args.seq_len, args.num_seqs)
        nll, count = 0.0, 0
        for s in seqs.tolist():
            res = llm.generate([{"prompt_token_ids": s}], sp, use_tqdm=False)[0]
            for t, lp in zip(s[1:], res.prompt_logprobs[1:]):
                nll -= lp[t].logprob
                count += 1
        out["perplexity"][set_name] = math.exp(nll / count)
        print(f"[{args.format}] {set_name}: ppl {out['perplexity'][set_name]:.3f}", flush=True)
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
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=args.worker_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    data = json.loads(res_file.read_text()) if res_file.exists() else {"format": fmt}
    res_file.unlink(missing_ok=True)
    if rc != 0:  # keep the partial measurements, say why the rest is missing
        data["error"] = f"worker {'timed out' if rc == 'timeout' else f'exited {rc}'} after {time.time() - t:.0f}s"
    return data


def _merge(path: Path, fresh: dict, merge: bool) -> dict:
    """Results of the formats run now replace theirs in ``path``; other formats' results are kept (one
    format per device call fits the 10-minute limit)."""
    if merge and path.exists():
        old = json.loads(path.read_text())
        now = {r["format"] for r in fresh["results"]}
        kept = [r for r in old.get("results", []) if r["format"] not in now]
        runs = old.get("runs", []) + [{"command": fresh["command"], "environment": fresh["environment"],
                                       "formats": sorted(now)}]
        fresh = {**fresh, "results": kept + fresh["results"], "runs": runs}
    order = list(FORMATS)
    fresh["results"].sort(key=lambda r: order.index(r["format"]) if r["format"] in order else len(order))
    path.write_text(json.dumps(fresh, indent=2) + "\n")
    return fresh


def _table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def markdown(e2e: dict | None, acc: dict | None) -> str:
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
    if acc:
        res = {r["format"]: r for r in acc["results"]}
        sets = sorted({s for r in res.values() for s in r.get("perplexity", {})})
        base = res.get("auto", {}).get("perplexity", {})
        rows = [["format"] + [f"ppl {s.split(':')[-1]}" for s in sets] + ["vs BF16"]]
        for f, r in res.items():
            p = r.get("perplexity", {})
            rel = ", ".join(f"{100 * (p[s] / base[s] - 1):+.1f}%" for s in sets if s in p and s in base)
            rows.append([f"`{f}`"] + [f"{p[s]:.3f}" if s in p else r.get("error", "") for s in sets] + [rel])
        parts.append("Perplexity through vLLM (SmolLM2-135M-Instruct)\n\n" + _table(rows))
    return "\n\n".join(parts)


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
        fig.tight_layout()
        path = out_dir / "e2e-h100.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if acc:
        res = [r for r in acc["results"] if r.get("perplexity")]
        base = next((r["perplexity"] for r in res if r["format"] == "auto"), None)
        if base:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            sets = sorted(base)
            names = [r["format"] for r in res]
            vals = [sum(100 * (r["perplexity"][s] / base[s] - 1) for s in sets) / len(sets) for r in res]
            ax.barh(names, vals)
            ax.set_xlabel("perplexity increase over BF16 (%), mean of held-out sets")
            ax.set_title("SmolLM2-135M through vLLM, 2048 context")
            fig.tight_layout()
            path = out_dir / "accuracy-gpu-smollm2.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["all", "perf", "accuracy", "serve"], default="all",
                   help="all = perf + accuracy; serve (online, `vllm bench serve`) runs only when named")
    p.add_argument("--formats", default=None, help=f"comma list of {list(FORMATS)}")
    p.add_argument("--model-dir", default=str(DUMMY_QWEN3_8B), help="config folder for dummy-weight perf runs")
    p.add_argument("--contexts", default="8192,32768,65536,131072", help="batch-1 latency contexts")
    p.add_argument("--gpu-mem", type=float, default=0.9)
    p.add_argument("--tp-requests", type=int, default=256)
    p.add_argument("--tp-in", type=int, default=4096)
    p.add_argument("--tp-out", type=int, default=512)
    p.add_argument("--model", default=os.environ.get("OSCAR_TEST_MODEL"), help="real model for accuracy")
    p.add_argument("--rotations", default=None, help="calibrated rotations for oscar_int2 accuracy")
    p.add_argument("--eval-sets", default="shakespeare:tragedies,shakespeare:histories")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--chunk", type=int, default=32, help="chunked-prefill size for perplexity")
    p.add_argument("--tag", default="h100", help="file suffix: e2e-<tag>.json")
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
    args = p.parse_args(argv)

    e2e_path, acc_path = RESULTS / f"e2e-{args.tag}.json", RESULTS / "accuracy-gpu-smollm2.json"
    load = lambda q: json.loads(q.read_text()) if q.exists() else None  # noqa: E731
    if args.markdown:
        print(markdown(load(e2e_path), load(acc_path)))
        return 0
    if args.plots:
        for path in plots(load(e2e_path), load(acc_path), ROOT / "docs"):
            print(path.relative_to(ROOT))
        return 0
    if args.worker:
        if args.format not in FORMATS:
            raise SystemExit(f"unknown format {args.format!r}; valid: {list(FORMATS)}")
        res = {"perf": worker_perf, "accuracy": worker_accuracy, "serve": worker_serve}[args.worker](args)
        _save_partial(args, res)
        return 0

    unknown = [f for f in (args.formats or "").split(",") if f and f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown --formats {unknown}; valid: {list(FORMATS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shared = ["--model-dir", args.model_dir, "--contexts", args.contexts, "--gpu-mem", str(args.gpu_mem),
              "--tp-requests", str(args.tp_requests), "--tp-in", str(args.tp_in), "--tp-out", str(args.tp_out)]
    e2e = acc = None
    if args.suite in ("all", "perf"):
        fmts = (args.formats or DEFAULT_PERF_FORMATS).split(",")
        e2e = {"environment": _environment(), "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
               "settings": {"model": "Qwen3-8B shape, dummy weights", "gpu_memory_utilization": args.gpu_mem,
                            "contexts": args.contexts, "throughput": [args.tp_requests, args.tp_in, args.tp_out]},
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
        extra = ["--model", args.model, "--eval-sets", args.eval_sets, "--seq-len", str(args.seq_len),
                 "--num-seqs", str(args.num_seqs), "--chunk", str(args.chunk)]
        if args.rotations:
            extra += ["--rotations", args.rotations]
        acc = {"environment": _environment(), "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
               "settings": {"model": args.model, "seq_len": args.seq_len, "num_seqs": args.num_seqs,
                            "chunk": args.chunk, "eval_sets": args.eval_sets, "rotations": args.rotations},
               "results": [_run_worker("accuracy", f, args, extra) for f in fmts]}
        acc = _merge(acc_path, acc, not args.fresh)
    print(markdown(e2e, acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
