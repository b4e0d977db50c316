"""Prompt builders and scorers of the accuracy suite's long-context tasks (``benchmarks.run --suite accuracy``).

No vLLM here: plain token-id lists in, token-id lists out, so the pieces are tested on CPU with a fake
tokenizer (``tests/test_benchmarks_longctx.py``).

* perplexity windows: ``calibrate.data.token_sequences`` (the same windows as the CPU reference), at
  several contexts; a context equal to the model's position limit is scored on ``limit - 1`` tokens
  (vLLM rejects a prompt that leaves no room for the one generated token);
* verbatim recall: a ``passage_tokens`` passage of one text inserted at a depth of a haystack window of
  another, then the passage's first ``cue_tokens`` tokens again; the model continues greedily and is
  scored on the passage's next tokens, position by position;
* passkey: ``calibrate.passkey``'s chat prompt, built in the CPU reference's order (same seed: same keys,
  haystacks and depths), answered by greedy generation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

PPL_CONTEXTS = (2048, 4096, 8192)
RECALL_HAYSTACKS = (1024, 2048, 4096, 7680)
RECALL_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
#: also the run order: the short tasks first, so that a worker cut off by its time limit (TurboQuant's
#: engine took 331 s to start on the H100 and its 32-token-chunk recall outlasted the rest of a 550 s
#: limit) has recorded them; recall saves each haystack size as it finishes
TASKS = ("ppl", "passkey", "recall")


def depth_key(depth: float) -> str:
    return f"{depth:.0%}"


def size_label(tokens: int | str) -> str:
    """1024 -> '1K', 7680 -> '7.5K' (table headers)."""
    n = int(tokens)
    return f"{n / 1024:g}K" if n % 512 == 0 else str(n)


class MemoTokenizer:
    """A tokenizer whose ``__call__`` results are memoized: ``token_sequences`` tokenizes a whole set at
    every call, and the suite asks for the same set at several contexts."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._memo: dict = {}

    def __call__(self, text, **kwargs):
        key = (text, tuple(sorted(kwargs.items())))
        if key not in self._memo:
            self._memo[key] = self._tok(text, **kwargs)
        return self._memo[key]

    def __getattr__(self, name):
        return getattr(self._tok, name)


# ------------------------------------------------------------------------------------------ perplexity


def ppl_tokens(context: int, limit: int | None) -> int:
    """Tokens scored at ``context``: the context itself, or ``limit - 1`` when it equals the model's
    position limit (prompt + the one generated token must fit ``max_model_len <= limit``)."""
    if limit is not None and context > limit:
        raise ValueError(f"context {context} exceeds the model's {limit} positions")
    return context if limit is None or context < limit else limit - 1


def ppl_windows(tokenizer, set_name: str, seq_len: int, num_seqs: int) -> list[list[int]]:
    """``calibrate.data.token_sequences``' windows, as many as the text holds up to ``num_seqs``
    (the caller records how many it got)."""
    from vllm_oscar.calibrate.data import load_text, token_sequences

    text, _ = load_text(set_name)
    available = len(tokenizer(text, add_special_tokens=False)["input_ids"]) // seq_len
    n = min(num_seqs, available)
    return token_sequences(tokenizer, set_name, seq_len, n).tolist() if n else []


def nll_of(prompt: Sequence[int], prompt_logprobs) -> tuple[float, int]:
    """Summed negative log-likelihood of ``prompt[1:]`` from vLLM's ``prompt_logprobs`` (first entry None)."""
    nll = 0.0
    for t, lp in zip(prompt[1:], prompt_logprobs[1:]):
        nll -= lp[t].logprob
    return nll, len(prompt) - 1


# ------------------------------------------------------------------------------------------ recall


@dataclass(frozen=True)
class RecallSpec:
    haystacks: tuple[int, ...] = RECALL_HAYSTACKS
    depths: tuple[float, ...] = RECALL_DEPTHS
    trials: int = 20
    passage_tokens: int = 64
    cue_tokens: int = 32
    haystack_set: str = "shakespeare:tragedies"
    #: another genre: no play of the haystack set, so the passage occurs once in the prompt before its cue
    passage_set: str = "shakespeare:romances"
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.cue_tokens < self.passage_tokens:
            raise ValueError(f"need 0 < cue_tokens < passage_tokens, got {self.cue_tokens}, {self.passage_tokens}")
        if self.trials < 1 or not self.haystacks or not self.depths:
            raise ValueError("need at least one trial, haystack size and depth")

    @property
    def answer_tokens(self) -> int:
        return self.passage_tokens - self.cue_tokens

    def prompt_tokens(self, haystack: int) -> int:
        return haystack + self.passage_tokens + self.cue_tokens

    def settings(self) -> dict:
        return asdict(self)


def recall_prompt(haystack: Sequence[int], passage: Sequence[int], depth: float, cue_tokens: int) -> dict:
    """``haystack[:at] + passage + haystack[at:] + passage[:cue_tokens]``, ``at = round(depth * len(haystack))``
    (token-id level); the expected continuation is ``passage[cue_tokens:]``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    at = round(depth * len(haystack))
    prompt = list(haystack[:at]) + list(passage) + list(haystack[at:]) + list(passage[:cue_tokens])
    return {"prompt": prompt, "expected": list(passage[cue_tokens:]), "passage_at": at}


def recall_trials(haystack_ids: Sequence[int], passage_ids: Sequence[int], spec: RecallSpec) -> list[dict]:
    """Every (haystack size, depth, trial) example; each trial draws its haystack window and passage from
    its own seeded generator, so a cell's trials do not change when other cells or trial counts do."""
    longest = max(spec.haystacks)
    if len(haystack_ids) < longest or len(passage_ids) < spec.passage_tokens:
        raise ValueError(f"need {longest} haystack and {spec.passage_tokens} passage tokens, "
                         f"have {len(haystack_ids)} and {len(passage_ids)}")
    out = []
    for size in spec.haystacks:
        for depth in spec.depths:
            for t in range(spec.trials):
                rng = random.Random(f"recall/{spec.seed}/{size}/{depth}/{t}")
                h0 = rng.randrange(len(haystack_ids) - size + 1)
                p0 = rng.randrange(len(passage_ids) - spec.passage_tokens + 1)
                ex = recall_prompt(haystack_ids[h0:h0 + size], passage_ids[p0:p0 + spec.passage_tokens], depth,
                                   spec.cue_tokens)
                out.append({**ex, "haystack": size, "depth": depth, "trial": t, "haystack_offset": h0,
                            "passage_offset": p0})
    return out


def score_recall(generated: Sequence[int], expected: Sequence[int]) -> int:
    """Positions where the generated token is the passage's token (a missing position counts as wrong)."""
    return sum(g == e for g, e in zip(generated, expected))


def _recall_stats(counts: list[int], n: int) -> dict:
    return {"trials": len(counts), "token_accuracy": round(sum(counts) / (n * len(counts)), 4),
            "exact_match": round(sum(c == n for c in counts) / len(counts), 4)}


def _recall_block(settings: dict, cells: dict[str, dict[str, list[int]]]) -> dict:
    n = settings["passage_tokens"] - settings["cue_tokens"]
    return {
        "settings": settings,
        "cells": {h: {d: {**_recall_stats(cs, n), "correct": cs} for d, cs in per.items()} for h, per in cells.items()},
        "by_haystack": {h: _recall_stats([c for cs in per.values() for c in cs], n) for h, per in cells.items()},
        "all": _recall_stats([c for per in cells.values() for cs in per.values() for c in cs], n),
    }


def summarize_recall(examples: list[dict], correct: list[int], spec: RecallSpec) -> dict:
    """Token accuracy and exact-match rate per (haystack, depth) cell, per haystack (mean over depths) and
    overall; ``correct`` holds each trial's number of right tokens (out of ``spec.answer_tokens``)."""
    cells: dict = {}
    for ex, c in zip(examples, correct):
        cells.setdefault(str(ex["haystack"]), {}).setdefault(depth_key(ex["depth"]), []).append(c)
    return _recall_block(spec.settings(), cells)


def mark_incomplete(block: dict, sizes) -> dict:
    """Mark a recall block that covers only some of the haystack ``sizes`` it was asked for: the sizes it
    has cells for are done, the rest missing. Unchanged when every size is there."""
    done = [h for h in sizes if str(h) in block["cells"]]
    if len(done) < len(sizes):
        block["incomplete"] = {"haystacks_done": done, "haystacks_missing": [h for h in sizes if h not in done]}
    return block


def merge_recall(old: dict, new: dict) -> dict | None:
    """One recall block from two calls that measured different haystack sizes with otherwise the same
    settings (the new call's sizes win where both have them), or ``None`` when the settings differ."""
    same = {k: v for k, v in old["settings"].items() if k != "haystacks"} == {
        k: v for k, v in new["settings"].items() if k != "haystacks"}
    if not same:
        return None
    cells = {h: {d: c["correct"] for d, c in per.items()} for h, per in old["cells"].items()}
    cells.update({h: {d: c["correct"] for d, c in per.items()} for h, per in new["cells"].items()})
    cells = dict(sorted(cells.items(), key=lambda kv: int(kv[0])))
    sizes = sorted({*old["settings"]["haystacks"], *new["settings"]["haystacks"]})
    return mark_incomplete(_recall_block({**new["settings"], "haystacks": sizes}, cells), sizes)


# ------------------------------------------------------------------------------------------ passkey


@dataclass(frozen=True)
class PasskeySpec:
    depths: tuple[float, ...] = PASSKEY_DEPTHS
    trials: int = 20
    haystack_tokens: int = 3000
    data: str = "shakespeare:tragedies"
    max_tokens: int = 8
    seed: int = 0

    def settings(self) -> dict:
        from vllm_oscar.calibrate.passkey import ANSWER_PREFIX, KEY_SENTENCE, QUESTION

        return {**asdict(self), "key_sentence": KEY_SENTENCE, "question": QUESTION, "answer_prefix": ANSWER_PREFIX}


def passkey_trials(tokenizer, text: str, spec: PasskeySpec) -> list[dict]:
    """``calibrate.passkey``'s examples in its CLI's order (trial-major, depths round-robin, one seeded
    generator for keys and haystack starts): the same seed gives the CPU reference's keys and haystacks."""
    from vllm_oscar.calibrate.passkey import ANSWER_PREFIX, build_example, haystack, random_key

    rng = random.Random(spec.seed)
    out = []
    for t in range(spec.trials):
        for depth in spec.depths:
            key = random_key(rng)
            start = rng.randrange(0, len(text) - 20 * spec.haystack_tokens)
            ex = build_example(tokenizer, haystack(tokenizer, text, spec.haystack_tokens, start), key, depth,
                               ANSWER_PREFIX)
            out.append({**ex, "key": key, "depth": depth, "trial": t})
    return out


_NUMBER = re.compile(r"\d+")


def passkey_success(reply: str, key: str) -> bool:
    """The reply (after the prompt's "The pass key is") answers with the key: its first number is the key.
    ``calibrate.passkey.key_digits_retrieved`` reads the last digits of a teacher-forced argmax string; a
    generated reply has no teacher forcing, so the first number must be the key itself."""
    m = _NUMBER.search(reply)
    return m is not None and m.group() == key


def summarize_passkey(examples: list[dict], replies: list[tuple[list[int], str]], spec: PasskeySpec) -> dict:
    """Per depth and overall: ``success`` (the reply's first number is the key) and ``retrieved`` (the
    generated tokens start with the answer tokens, the CPU reference's greedy criterion)."""
    trials = []
    for ex, (ids, text) in zip(examples, replies):
        trials.append({"trial": ex["trial"], "depth": ex["depth"], "key": ex["key"], "reply": text,
                       "prompt_tokens": len(ex["prompt"]), "success": passkey_success(text, ex["key"]),
                       "retrieved": list(ids[:len(ex["answer"])]) == list(ex["answer"])})

    def stats(rs: list[dict]) -> dict:
        n = len(rs)
        return {"trials": n, "success": sum(r["success"] for r in rs), "retrieved": sum(r["retrieved"] for r in rs),
                "rate": round(sum(r["success"] for r in rs) / n, 4) if n else None}

    return {"settings": spec.settings(),
            "depths": {depth_key(d): stats([r for r in trials if r["depth"] == d]) for d in spec.depths},
            "all": stats(trials), "trials": trials}
