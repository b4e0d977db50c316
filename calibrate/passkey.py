"""Passkey retrieval on CPU with the reference quantizers (long-range retrieval through the INT2 cache).

A ~3000-token haystack of held-out Shakespeare (``shakespeare:tragedies``) gets the sentence
``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` at a sentence boundary near a depth
(10%, 50%, 90% of the haystack); the chat prompt asks for the key and the answer is the key's digits.
No generation loop: one teacher-forced pass over prompt + answer, and a trial is *retrieved* when the
argmax at every answer position is the answer token (what greedy decoding would emit). The mean
log-prob of the answer tokens is recorded too.

Cache semantics:

* ``exact_prefill``: the prompt is one exact prefill (vLLM's one-chunk prefill attends exact K/V),
  so the first answer token comes from the exact prefill; the later answer tokens are decode steps
  that read K/V outside the BF16 windows from INT2. Implemented with a KV cache: one exact prefill
  per trial, shared by every method, then the answer tokens through ``evaluate.make_attention``.
* ``int2_prefill``: every query, prompt included, reads K/V outside its windows from INT2 (chunked
  prefill; the semantics of ``evaluate.perplexity``). One full forward per method and trial.

Methods: ``exact``, ``naive_int2``, ``paper``, ``hadamard_mse`` (``evaluate.METHODS``), and any variant of
``experiments.variant_registry`` as ``v:NAME`` (its calibration statistics from ``--variant-workdir``).

Run: ``python -m vllm_oscar.calibrate.passkey --rotations ARTIFACT_DIR --trials 20 --threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch

KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
DEPTHS = (0.1, 0.5, 0.9)
#: The assistant's reply starts with this; the answer is " NNNNN". Without it SmolLM2-135M-Instruct's
#: greedy reply starts with a word ("You ...") even at full precision, so exact match would be 0%.
ANSWER_PREFIX = "The pass key is"
SEMANTICS = ("exact_prefill", "int2_prefill")
#: prefix of a method that is an accuracy variant of ``experiments.variant_registry`` (e.g.
#: ``v:hadamard_kws_mse``), run through ``variants.make_variant_attention``
VARIANT_PREFIX = "v:"
DEFAULT_METHODS = ("exact", "naive_int2", "paper", "hadamard_mse")
#: passkey method name -> evaluate.METHODS name
METHOD_MAP = {"exact": "exact", "naive_int2": "naive_int2", "paper": "oscar", "hadamard_mse": "hadamard_mse"}
_SENTENCE_END = re.compile(r"[.!?]['\")\]]*(?=\s)")


def random_key(rng: random.Random) -> str:
    """A 5-digit key (no leading zero)."""
    return str(rng.randint(10000, 99999))


def haystack(tokenizer, text: str, num_tokens: int, start: int) -> str:
    """About ``num_tokens`` tokens of ``text`` from the line that begins at or after char ``start``,
    ending at a line end (never more than ``num_tokens`` tokens)."""
    begin = text.find("\n", start) + 1 if start > 0 else 0
    chunk = text[begin: begin + 12 * num_tokens]
    ids = tokenizer(chunk, add_special_tokens=False)["input_ids"][:num_tokens]
    out = tokenizer.decode(ids)
    cut = out.rfind("\n")
    return (out[:cut] if cut > 0 else out).strip()


def insert_needle(text: str, needle: str, depth: float) -> tuple[str, int]:
    """``text`` with ``needle`` inserted after the sentence end nearest to ``depth * len(text)``;
    returns the new text and the needle's char offset."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    target = depth * len(text)
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    at = min(ends, key=lambda e: abs(e - target)) if ends else round(target)
    return text[:at] + " " + needle + text[at:], at + 1


def build_example(tokenizer, hay: str, key: str, depth: float, answer_prefix: str = "") -> dict:
    """Prompt ids (chat template + generation prompt [+ ``answer_prefix``, the start of the assistant's
    reply]), answer ids (the key's digits as the model would emit them there; after a prefix, a space
    then the digits) and where the needle lies (token fraction of the prompt)."""
    text, at = insert_needle(hay, KEY_SENTENCE.format(key=key), depth)
    messages = [{"role": "user", "content": text + QUESTION}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt_text + (" " if answer_prefix else "") + key, add_special_tokens=False)["input_ids"]
    if joint[: len(prompt)] != prompt:
        raise ValueError("the answer does not tokenize as a continuation of the prompt")
    answer = joint[len(prompt):]
    needle_tok = len(tokenizer(prompt_text[: prompt_text.index(text) + at], add_special_tokens=False)["input_ids"])
    return {"prompt": prompt, "answer": answer, "needle_token": needle_tok,
            "needle_fraction": needle_tok / len(prompt)}


def score(logits: torch.Tensor, answer: list[int] | torch.Tensor) -> tuple[bool, float]:
    """``logits [n, V]`` at the positions that predict the ``n`` answer tokens: (retrieved, mean log-prob).
    Retrieved = the argmax is the answer token at every position (greedy decoding emits the key)."""
    a = torch.as_tensor(answer, dtype=torch.long)
    if logits.shape[0] != a.numel():
        raise ValueError(f"{logits.shape[0]} logit rows for {a.numel()} answer tokens")
    lp = torch.log_softmax(logits.float(), -1).gather(1, a[:, None])[:, 0]
    return bool((logits.argmax(-1) == a).all()), float(lp.mean())


@torch.inference_mode()
def exact_prefill_logits(model, prompt: list[int], answer: list[int], attention_fns: dict) -> dict:
    """Per method: answer logits with an exact prefill of ``prompt`` (shared) and the answer tokens
    decoded through ``attention_fns[name]`` (``None``: the model's own attention)."""
    from vllm_oscar.calibrate.capture import attention_override, causal_sdpa

    observers = [fn.observe_prefill for fn in attention_fns.values() if hasattr(fn, "observe_prefill")]

    def observed(module, q, k, v):  # methods that pick tokens from the prefill see it; it stays exact
        for observe in observers:
            observe(module, q, k)
        return causal_sdpa(module, q, k, v)

    with attention_override(model, observed) if observers else contextlib.nullcontext():
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    first, cache, n = out.logits[0, -1:].float(), out.past_key_values, len(prompt)
    result = {}
    for name, fn in attention_fns.items():
        if len(answer) == 1:
            result[name] = first
            continue
        ids = torch.tensor([answer[:-1]])
        if fn is None:
            rest = model(ids, past_key_values=cache, use_cache=True).logits[0]
        else:
            with attention_override(model, fn):
                rest = model(ids, past_key_values=cache, use_cache=True).logits[0]
        cache.crop(-(cache.get_seq_length() - n))  # back to the prompt (negative: tokens to drop)
        result[name] = torch.cat([first, rest.float()])
    return result


@torch.inference_mode()
def int2_prefill_logits(model, prompt: list[int], answer: list[int], fn) -> torch.Tensor:
    """Answer logits of one forward over prompt + answer[:-1] where every query goes through ``fn``."""
    from vllm_oscar.calibrate.capture import attention_override

    ids = torch.tensor([prompt + answer[:-1]])
    if fn is None:
        return model(ids, logits_to_keep=len(answer)).logits[0].float()
    with attention_override(model, fn):
        return model(ids, logits_to_keep=len(answer)).logits[0].float()


def key_digits_retrieved(argmax_text: str, key: str) -> bool:
    """With the answer prefix (answer = " " + digits, one token per digit): the teacher-forced argmax at
    the positions that predict the key's digits spells the key, i.e. the key is retrieved whatever the
    first answer position prefers (SmolLM2 sometimes continues "The pass key is" with "in"/"a")."""
    return argmax_text[-len(key):] == key


def _summary(records: list[dict]) -> dict:
    n = len(records)
    hit = sum(r["retrieved"] for r in records)
    digits = sum(key_digits_retrieved(r["argmax"], r["key"]) for r in records)
    return {"trials": n, "retrieved": hit, "rate": round(hit / n, 3) if n else None,
            "mean_answer_logprob": round(sum(r["logprob"] for r in records) / n, 4) if n else None,
            "later_digits_retrieved": digits}


def format_table(results: dict) -> str:
    depths = [f"{d:.0%}" for d in results["settings"]["depths"]]
    lines = ["| method | semantics | " + " | ".join(f"depth {d}" for d in depths) + " | all |",
             "|---|---|" + "---|" * (len(depths) + 1)]
    for key, per in results["results"].items():
        method, sem = key.split("/")
        cells = []
        for d in depths + ["all"]:
            s = per.get(d)
            cells.append("-" if not s or not s["trials"] else
                         f"{s['retrieved']}/{s['trials']} [{s['later_digits_retrieved']}] "
                         f"({s['mean_answer_logprob']:.2f})")
        lines.append(f"| `{method}` | {sem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(results: dict) -> dict:
    """(Re)compute ``results["results"]`` (per method/semantics and depth) from the per-trial records."""
    depths = results["settings"]["depths"]
    results["results"] = {}
    for k, recs in results["trials"].items():
        per = {f"{d:.0%}": _summary([r for r in recs if r["depth"] == d]) for d in depths}
        per["all"] = _summary(recs)
        results["results"][k] = per
    return results


#: settings that must agree for two runs' trials to be the same prompts (seeded keys and haystacks)
TRIAL_SETTINGS = ("data", "haystack_tokens", "depths", "seed", "answer_prefix", "key_sentence", "question",
                  "sink_tokens", "recent_tokens")


def merge_results(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s methods added (same method/semantics keys replaced): the trials of both
    must be the same prompts (same trial settings, and the shared trials' keys and needle positions
    agree). A method in both gets the union of its trials (``new``'s replacing the same trial and depth),
    so a run with ``--start-trial`` extends an earlier one. ``new``'s command and variant descriptions are appended under ``merged_runs``."""
    for k in TRIAL_SETTINGS:
        if old["settings"].get(k) != new["settings"].get(k):
            raise ValueError(f"cannot merge: setting {k!r} differs ({old['settings'].get(k)!r} vs "
                             f"{new['settings'].get(k)!r})")
    def ident(r):
        return r["key"], r["needle_fraction"]

    seen = {(r["trial"], r["depth"]): ident(r) for recs in old["trials"].values() for r in recs}
    for recs in new["trials"].values():
        for r in recs:
            if seen.setdefault((r["trial"], r["depth"]), ident(r)) != ident(r):
                raise ValueError(f"cannot merge: trial {r['trial']} depth {r['depth']} is another prompt")
    out = dict(old)
    out["trials"] = dict(old["trials"])
    for k, recs in new["trials"].items():  # a method's trials: the union, this run's replacing the same trial
        mine = {(r["trial"], r["depth"]) for r in recs}
        out["trials"][k] = sorted([r for r in old["trials"].get(k, []) if (r["trial"], r["depth"]) not in mine]
                                  + recs, key=lambda r: (r["trial"], r["depth"]))
    out.setdefault("merged_runs", []).append({"command": new["command"], "wall_seconds": new["wall_seconds"],
                                              "methods": list(new["trials"]),
                                              "threads": new["settings"].get("threads"),
                                              "variants": new["settings"].get("variants", {})})
    return out


def main(argv=None) -> int:  # pragma: no cover - CPU minutes; the pieces are tested
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rotations", default=".carry/smollm2-art", help="calibrated artifact (method 'paper')")
    p.add_argument("--data", default="shakespeare:tragedies")
    p.add_argument("--haystack-tokens", type=int, default=3000)
    p.add_argument("--depths", default=",".join(str(d) for d in DEPTHS))
    p.add_argument("--trials", type=int, default=20, help="per depth (exact_prefill)")
    p.add_argument("--int2-trials", type=int, default=None, help="per depth for int2_prefill (default: --trials)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--int2-methods", default=None, help="methods run with int2_prefill (default: --methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-trial", type=int, default=0,
                   help="skip the first N trials per depth (their keys and haystacks are drawn and discarded, so "
                        "trial t is the same prompt as in a run from 0); with --merge this extends a run")
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX,
                   help="start of the assistant's reply before the key ('' = the digits right after the "
                        "generation prompt)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("VLLM_OSCAR_NUM_THREADS", "1")))
    p.add_argument("--deadline", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--variant-workdir", default="/tmp/vllm-oscar-variants",
                   help="cached calibration statistics of the 'v:NAME' methods (experiments --workdir)")
    p.add_argument("--output", default="benchmarks/results/passkey-cpu-smollm2.json")
    p.add_argument("--merge", action="store_true",
                   help="keep --output's other methods' trials (the same settings are required) and add/replace "
                        "this run's")
    p.add_argument("--table", action="store_true", help="re-summarize --output's trials and print the table")
    args = p.parse_args(argv)
    if args.table:
        results = summarize(json.loads(Path(args.output).read_text()))
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
        print(format_table(results))
        return 0
    torch.set_num_threads(args.threads)

    from vllm_oscar.calibrate import evaluate as ev
    from vllm_oscar.calibrate.data import load_text
    from vllm_oscar.calibrate.models import load_model

    from vllm_oscar.artifact import RotationArtifact

    t0 = time.time()
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    head_dim = lm.info.head_dim
    methods = args.methods.split(",")
    # Only the evaluate.METHODS other than exact read the calibrated artifact (rotations, clip ratios,
    # windows); a run of exact and 'v:NAME' variants alone uses the configuration defaults, which the
    # faithful artifacts also record (64 + 256 windows), so that the windows and trials stay comparable.
    if any(m != "exact" and not m.startswith(VARIANT_PREFIX) for m in methods):
        art = RotationArtifact.load(args.rotations)
        windows, quant = art.config.windows, art.config.quantization
    else:
        from vllm_oscar.config import QuantizationConfig, WindowConfig

        art, windows, quant = None, WindowConfig(), QuantizationConfig(group_size=lm.info.head_dim)
    sink, recent = windows.sink_tokens, windows.recent_tokens
    k_clip, v_clip = quant.k_clip_ratio, quant.v_clip_ratio
    int2_methods = (args.int2_methods or args.methods).split(",")
    int2_methods = [m for m in int2_methods if m and m != "exact"]  # exact is the same under both
    fns, variant_info, setup = {}, {}, None
    for m in methods:
        if m.startswith(VARIANT_PREFIX):
            from types import SimpleNamespace

            from vllm_oscar.calibrate import experiments as E
            from vllm_oscar.calibrate import variants as V

            if setup is None:
                setup = E.Setup(SimpleNamespace(workdir=args.variant_workdir, rotations=args.rotations), lm=lm)
            spec = E.variant_registry()[m[len(VARIANT_PREFIX):]]
            var = spec["variant"](setup)
            fns[m] = V.make_variant_attention(spec["transforms"](setup), var)
            variant_info[m] = {"description": spec["description"], **var.config()}
            continue
        em = ev.METHODS[METHOD_MAP[m]]
        fns[m] = None if em.kind == "exact" else ev.make_attention(
            em, art, head_dim, k_clip=k_clip, v_clip=v_clip, sink=sink, recent=recent)
    depths = [float(d) for d in args.depths.split(",")]
    text, _ = load_text(args.data)
    rng = random.Random(args.seed)
    int2_trials = args.trials if args.int2_trials is None else args.int2_trials

    records: dict[str, list[dict]] = {}

    def record(name: str, logits: torch.Tensor, answer: list[int], info: dict) -> tuple[bool, float, str]:
        """Score one method's answer logits and file the trial (``info``) under ``name``."""
        hit, lp = score(logits, answer)
        argmax = tok.decode(logits.argmax(-1).tolist())
        records.setdefault(name, []).append({**info, "retrieved": hit, "logprob": lp, "argmax": argmax})
        return hit, lp, argmax

    for _ in range(args.start_trial * len(depths)):  # the skipped trials' draws, as a run from 0 makes them
        random_key(rng)
        rng.randrange(0, len(text) - 20 * args.haystack_tokens)
    # round-robin: depths stay balanced
    trials = [(t, d) for t in range(args.start_trial, args.start_trial + args.trials) for d in depths]
    stopped_early = False
    for t, d in trials:
        if args.deadline and time.time() - t0 > args.deadline:
            stopped_early = True
            break
        key = random_key(rng)
        start = rng.randrange(0, len(text) - 20 * args.haystack_tokens)
        ex = build_example(tok, haystack(tok, text, args.haystack_tokens, start), key, d, args.answer_prefix)
        tt = time.time()
        per = exact_prefill_logits(model, ex["prompt"], ex["answer"], fns)
        line = [f"trial {t} depth {d:.0%} key {key} len {len(ex['prompt'])} needle@{ex['needle_fraction']:.2f}"]
        info = {"trial": t, "depth": d, "key": key, "needle_fraction": round(ex["needle_fraction"], 4),
                "prompt_tokens": len(ex["prompt"])}
        for m, logits in per.items():
            hit, lp, argmax = record(f"{m}/exact_prefill", logits, ex["answer"], info)
            line.append(f"{m}:{'Y' if hit else 'n'}{lp:.2f}:{argmax}")
        if t - args.start_trial < int2_trials:
            for m in int2_methods:
                logits = int2_prefill_logits(model, ex["prompt"], ex["answer"], fns[m])
                hit, lp, _ = record(f"{m}/int2_prefill", logits, ex["answer"], info)
                line.append(f"{m}[int2_prefill]:{'Y' if hit else 'n'}{lp:.2f}")
        print(" ".join(line), f"({time.time() - tt:.0f}s)", flush=True)

    results = {
        "model": lm.source,
        "settings": {"data": args.data, "haystack_tokens": args.haystack_tokens, "depths": depths,
                     "trials_per_depth_requested": args.trials, "int2_prefill_trials_per_depth": int2_trials,
                     "seed": args.seed, "sink_tokens": sink, "recent_tokens": recent,
                     "paper": {"rotations": args.rotations if art is not None else None, "levels": "minmax",
                               "k_clip_ratio": k_clip, "v_clip_ratio": v_clip},
                     "hadamard_mse": {"rotations": "hadamard", "levels": "mse", "clip": None},
                     "naive_int2": {"rotations": None, "levels": "minmax", "clip": None, "windows": None},
                     "variants": variant_info,
                     "threads": args.threads, "stopped_early_by_deadline": stopped_early,
                     "key_sentence": KEY_SENTENCE, "question": QUESTION,
                     "answer_prefix": args.answer_prefix,
                     "scoring": "retrieved = argmax equals the answer token at every answer position "
                                "(teacher-forced); logprob = mean log-prob of the answer tokens",
                     "semantics": {"exact_prefill": "prompt is an exact prefill (first answer token predicted "
                                                    "exactly); answer tokens decode reading INT2 beyond windows",
                                   "int2_prefill": "every query reads INT2 beyond its windows"}},
        "command": "python -m vllm_oscar.calibrate.passkey " + " ".join(shlex.quote(a) for a in (
            sys.argv[1:] if argv is None else argv)),
        "wall_seconds": round(time.time() - t0),
        "results": {},
        "trials": records,
    }
    if args.merge and Path(args.output).is_file():
        results = merge_results(json.loads(Path(args.output).read_text()), results)
    summarize(results)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
