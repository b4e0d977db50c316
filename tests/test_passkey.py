"""Passkey retrieval harness (calibrate/passkey.py): needle placement, prompt/answer construction, the
retrieval rule, and evaluate.make_attention's prefill/decode split. No model weights; seconds."""

import random
import re

import pytest
import torch
from vllm_oscar.calibrate import evaluate as ev
from vllm_oscar.calibrate import passkey as pk
from vllm_oscar.calibrate.capture import causal_sdpa
from fake_tokenizers import CharTokenizer


TEXT = "\n".join(f"Line {i} speaks of the sea. And the wind answers! Does it? Aye." for i in range(200))


def test_random_key_is_seeded_five_digits():
    a = [pk.random_key(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1] and re.fullmatch(r"[1-9]\d{4}", a[0])


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_at_sentence_boundary_near_depth(depth):
    needle = pk.KEY_SENTENCE.format(key="12345")
    out, at = pk.insert_needle(TEXT, needle, depth)
    assert out[at:at + len(needle)] == needle
    assert out[at - 2] in ".!?" and out[at - 1] == " "  # right after a sentence end
    assert abs(at / len(TEXT) - depth) < 0.02
    assert out[:at - 1] + out[at + len(needle):] == TEXT  # nothing else changed


def test_haystack_is_bounded_and_ends_at_a_line():
    tok = CharTokenizer()
    hay = pk.haystack(tok, TEXT, 500, 1234)
    assert 400 < len(hay) <= 500 and hay in TEXT
    assert TEXT[TEXT.index(hay) + len(hay)] == "\n" and TEXT[TEXT.index(hay) - 1] == "\n"


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_build_example(depth):
    tok = CharTokenizer()
    hay = pk.haystack(tok, TEXT, 3000, 0)
    ex = pk.build_example(tok, hay, "40713", depth)
    prompt = tok.decode(ex["prompt"])
    assert prompt.endswith(pk.QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ex["answer"]) == "40713"
    assert prompt[ex["needle_token"]:].startswith("The pass key is 40713.")
    assert abs(ex["needle_fraction"] - depth) < 0.05  # of the prompt: template, needle and question add ~5%


def test_score_rule():
    answer = [3, 1, 4]
    logits = torch.full((3, 6), -5.0)
    logits[torch.arange(3), torch.tensor(answer)] = 5.0
    hit, lp = pk.score(logits, answer)
    expected = torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor(answer)].mean()
    assert hit and lp == pytest.approx(float(expected))
    logits[1, 2] = 6.0  # one position's argmax is wrong: greedy decoding would not emit the key
    assert pk.score(logits, answer)[0] is False
    with pytest.raises(ValueError):
        pk.score(logits[:2], answer)


class _Attn(torch.nn.Module):
    layer_idx, scaling = 0, 64**-0.5


def _qkv(t=40, hq=4, hkv=2, d=64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, t, d, generator=g) for h in (hq, hkv, hkv))


def test_make_attention_prefill_decode_split():
    module, (q, k, v) = _Attn(), _qkv()
    t = q.shape[2]
    kw = {"k_clip": 0.0, "v_clip": 0.0, "sink": 2, "recent": 4}
    m = ev.METHODS["hadamard_mse"]
    full = ev.make_attention(m, None, 64, **kw)(module, q, k, v)  # every query reads INT2
    exact = causal_sdpa(module, q, k, v)
    assert not torch.allclose(full, exact, atol=1e-3)
    # With a KV cache (3 queries over 40 keys) the queries are the last 3 positions.
    torch.testing.assert_close(ev.make_attention(m, None, 64, **kw)(module, q[:, :, -3:], k, v), full[:, -3:])
    torch.testing.assert_close(causal_sdpa(module, q[:, :, -3:], k, v), exact[:, -3:])
    # int2_from: earlier queries read exactly (one-chunk prefill), later ones read INT2 (decode).
    split = ev.make_attention(m, None, 64, int2_from=t - 3, **kw)(module, q, k, v)
    torch.testing.assert_close(split[:, : t - 3], exact[:, : t - 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[:, t - 3:], full[:, t - 3:])


def test_build_example_with_answer_prefix():
    tok = CharTokenizer()
    ex = pk.build_example(tok, pk.haystack(tok, TEXT, 800, 0), "40713", 0.5, pk.ANSWER_PREFIX)
    assert tok.decode(ex["prompt"]).endswith("<|im_start|>assistant\n" + pk.ANSWER_PREFIX)
    assert tok.decode(ex["answer"]) == " 40713"  # what follows the prefix: a space, then the digits


def test_key_digits_retrieved():
    assert pk.key_digits_retrieved(" 60494", "60494") and pk.key_digits_retrieved("in60494", "60494")
    assert not pk.key_digits_retrieved("a63775", "63075")


def test_summarize_and_table():
    rec = {"trial": 0, "key": "60494", "needle_fraction": 0.1, "prompt_tokens": 10}
    res = {"settings": {"depths": [0.1, 0.9]}, "trials": {"exact/exact_prefill": [
        dict(rec, depth=0.1, retrieved=True, logprob=-0.2, argmax=" 60494"),
        dict(rec, depth=0.9, retrieved=False, logprob=-0.6, argmax="in60494"),
        dict(rec, depth=0.9, retrieved=False, logprob=-1.0, argmax="a60194")]}}
    out = pk.summarize(res)["results"]["exact/exact_prefill"]
    assert out["90%"] == {"trials": 2, "retrieved": 0, "rate": 0.0, "mean_answer_logprob": -0.8,
                          "later_digits_retrieved": 1}
    assert out["all"]["retrieved"] == 1 and out["all"]["later_digits_retrieved"] == 2
    assert "| `exact` | exact_prefill | 1/1 [1] (-0.20) | 0/2 [1] (-0.80) | 1/3 [2] (-0.60) |" in pk.format_table(res)


def test_merge_keeps_other_methods_and_checks_the_prompts():
    rec = {"trial": 0, "depth": 0.1, "key": "60494", "needle_fraction": 0.1, "prompt_tokens": 10,
           "retrieved": True, "logprob": -0.2, "argmax": " 60494"}
    settings = {k: 0 for k in pk.TRIAL_SETTINGS}
    old = {"settings": dict(settings), "trials": {"exact/exact_prefill": [rec], "paper/int2_prefill": [rec]}}
    new = {"settings": dict(settings, variants={"v:x": {}}), "command": "c", "wall_seconds": 1,
           "trials": {"exact/exact_prefill": [rec], "v:x/exact_prefill": [dict(rec, retrieved=False)]}}
    out = pk.merge_results(old, new)
    assert list(out["trials"]) == ["exact/exact_prefill", "paper/int2_prefill", "v:x/exact_prefill"]
    assert out["merged_runs"][0]["methods"] == ["exact/exact_prefill", "v:x/exact_prefill"]
    # a later run (--start-trial) extends a method's trials; the same trial is replaced
    later = dict(rec, trial=1, retrieved=False)
    ext = pk.merge_results(out, dict(new, trials={"exact/exact_prefill": [later, dict(rec, logprob=-0.1)]}))
    assert [(r["trial"], r["logprob"]) for r in ext["trials"]["exact/exact_prefill"]] == [(0, -0.1), (1, -0.2)]
    assert ext["trials"]["paper/int2_prefill"] == [rec]
    with pytest.raises(ValueError):  # other prompts: a different key at the same trial
        pk.merge_results(old, dict(new, trials={"exact/exact_prefill": [dict(rec, key="11111")]}))
    with pytest.raises(ValueError):
        pk.merge_results(old, dict(new, settings=dict(settings, seed=1)))
