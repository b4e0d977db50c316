"""The accuracy suite's long-context tasks (benchmarks/longctx.py, benchmarks/run.py --suite accuracy):
prompt builders, scorers, the worker's wiring (a fake engine and a character tokenizer), the argument
parsing and the tables. No GPU, no model weights."""

import json
import random
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
from fake_tokenizers import CharTokenizer

from benchmarks import longctx as lc
from benchmarks import run

HAY = list(range(1000, 1000 + 9000))  # distinct ids: a passage can be found where it was put
PASSAGES = list(range(50000, 50000 + 500))


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_recall_prompt_places_the_passage_at_depth_and_repeats_the_cue(depth):
    hay, passage = HAY[:1024], PASSAGES[:64]
    ex = lc.recall_prompt(hay, passage, depth, 32)
    at = round(depth * 1024)
    p = ex["prompt"]
    assert ex["passage_at"] == at
    assert p[at:at + 64] == passage  # the passage, whole, at the depth
    assert p[:at] + p[at + 64:-32] == hay  # the haystack otherwise unchanged
    assert p[-32:] == passage[:32]  # the cue: the passage's first 32 tokens again, at the end
    assert ex["expected"] == passage[32:]  # the continuation the model must produce
    assert len(p) == 1024 + 64 + 32


def test_recall_prompt_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        lc.recall_prompt(HAY[:10], PASSAGES[:4], 1.5, 2)


def test_recall_trials_cover_every_cell_deterministically_within_the_model_limit():
    spec = lc.RecallSpec(trials=20)
    a = lc.recall_trials(HAY, PASSAGES, spec)
    assert a == lc.recall_trials(HAY, PASSAGES, spec)  # deterministic
    assert len(a) == 4 * 5 * 20
    cells = {(e["haystack"], e["depth"]) for e in a}
    assert cells == {(h, d) for h in (1024, 2048, 4096, 7680) for d in (0.1, 0.3, 0.5, 0.7, 0.9)}
    for e in a:
        h0, p0, at = e["haystack_offset"], e["passage_offset"], e["passage_at"]
        passage = PASSAGES[p0:p0 + 64]
        assert e["prompt"][at:at + 64] == passage and e["expected"] == passage[32:]
        assert e["prompt"][:at] == HAY[h0:h0 + at]
        assert len(e["prompt"]) == spec.prompt_tokens(e["haystack"])
        assert len(e["prompt"]) + spec.answer_tokens <= 8192  # SmolLM2's positions, generation included
    # trials differ (haystack windows and passages), and a cell's trials do not depend on the trial count
    cell = [e for e in a if e["haystack"] == 2048 and e["depth"] == 0.5]
    assert len({(e["haystack_offset"], e["passage_offset"]) for e in cell}) == 20
    fewer = lc.recall_trials(HAY, PASSAGES, lc.RecallSpec(trials=3))
    assert [e["prompt"] for e in fewer if e["haystack"] == 2048 and e["depth"] == 0.5] == \
        [e["prompt"] for e in cell[:3]]
    assert lc.recall_trials(HAY, PASSAGES, lc.RecallSpec(trials=3, seed=1))[0]["prompt"] != fewer[0]["prompt"]


def test_recall_trials_need_enough_text():
    with pytest.raises(ValueError, match="need 7680 haystack"):
        lc.recall_trials(HAY[:5000], PASSAGES, lc.RecallSpec())
    with pytest.raises(ValueError, match="cue_tokens"):
        lc.RecallSpec(passage_tokens=32, cue_tokens=32)


def test_recall_scorer_and_summary():
    exp = list(range(32))
    assert lc.score_recall(exp, exp) == 32
    assert lc.score_recall(exp[:1] + exp[:-1], exp) == 1  # shifted by one: only the first position agrees
    assert lc.score_recall(exp[:10], exp) == 10  # stopped early: the missing positions are wrong
    spec = lc.RecallSpec(haystacks=(1024, 2048), depths=(0.1, 0.9), trials=2)
    examples = [{"haystack": h, "depth": d} for h in (1024, 2048) for d in (0.1, 0.9) for _ in range(2)]
    correct = [32, 32, 32, 16, 0, 32, 32, 32]
    s = lc.summarize_recall(examples, correct, spec)
    assert s["cells"]["1024"]["90%"] == {"trials": 2, "token_accuracy": 0.75, "exact_match": 0.5, "correct": [32, 16]}
    assert s["by_haystack"]["1024"]["token_accuracy"] == 0.875
    assert s["by_haystack"]["2048"] == {"trials": 4, "token_accuracy": 0.75, "exact_match": 0.75}
    assert s["all"]["token_accuracy"] == round(208 / 256, 4) and s["all"]["exact_match"] == 0.75
    assert s["settings"]["cue_tokens"] == 32 and s["settings"]["passage_set"] != s["settings"]["haystack_set"]


def test_ppl_tokens_at_the_model_limit():
    assert lc.ppl_tokens(2048, 8192) == 2048
    assert lc.ppl_tokens(8192, 8192) == 8191  # prompt + the generated token fit max_model_len = 8192
    assert lc.ppl_tokens(8192, None) == 8192
    with pytest.raises(ValueError, match="exceeds"):
        lc.ppl_tokens(16384, 8192)


def test_nll_of_reads_prompt_logprobs():
    lp = [None, {5: SimpleNamespace(logprob=-1.0)}, {6: SimpleNamespace(logprob=-2.0)}]
    assert lc.nll_of([4, 5, 6], lp) == (3.0, 2)


# ------------------------------------------------------------------------------------------ passkey


TEXT = "\n".join(f"Line {i} speaks of the sea. And the wind answers! Does it? Aye." for i in range(2000))


def test_passkey_trials_follow_the_cpu_reference_order():
    from vllm_oscar.calibrate import passkey as pk

    tok = CharTokenizer()
    spec = lc.PasskeySpec(trials=3, haystack_tokens=600, seed=7)
    got = lc.passkey_trials(tok, TEXT, spec)
    assert [(e["trial"], e["depth"]) for e in got] == [(t, d) for t in range(3) for d in (0.1, 0.5, 0.9)]
    rng = random.Random(7)  # calibrate/passkey.py main(): key, then haystack start, per (trial, depth)
    for e in got:
        key = pk.random_key(rng)
        start = rng.randrange(0, len(TEXT) - 20 * 600)
        want = pk.build_example(tok, pk.haystack(tok, TEXT, 600, start), key, e["depth"], pk.ANSWER_PREFIX)
        assert e["key"] == key and e["prompt"] == want["prompt"] and e["answer"] == want["answer"]
        prompt = tok.decode(e["prompt"])
        assert pk.KEY_SENTENCE.format(key=key) in prompt
        assert prompt.endswith(pk.QUESTION + "<|im_end|>\n<|im_start|>assistant\n" + pk.ANSWER_PREFIX)
        assert tok.decode(e["answer"]) == " " + key
    assert lc.passkey_trials(tok, TEXT, spec) == got


@pytest.mark.parametrize("reply,ok", [(" 40713.", True), (" 40713", True), ("40713 is the key", True),
                                      (" 140713", False), (" in the text", False), (" 4071", False),
                                      (" 12345, not 40713", False)])
def test_passkey_success_is_the_first_number(reply, ok):
    assert lc.passkey_success(reply, "40713") is ok


def test_passkey_summary():
    spec = lc.PasskeySpec(depths=(0.1, 0.9), trials=2)
    examples = [{"trial": t, "depth": d, "key": "40713", "prompt": [1] * 5, "answer": [32, 52, 48]}
                for t in range(2) for d in (0.1, 0.9)]
    replies = [([32, 52, 48, 55], " 40713."), ([32, 52, 49], " 41"), ([32], " 40713"), ([1], "no")]
    s = lc.summarize_passkey(examples, replies, spec)
    assert s["depths"]["10%"] == {"trials": 2, "success": 2, "retrieved": 1, "rate": 1.0}
    assert s["depths"]["90%"] == {"trials": 2, "success": 0, "retrieved": 0, "rate": 0.0}
    assert s["all"]["success"] == 2 and [t["reply"] for t in s["trials"]][:2] == [" 40713.", " 41"]


# ------------------------------------------------------------------------------------------ worker wiring


class FakeLLM:
    """Teacher-forced log-probs of -1 per token; recall: copies what followed the cue's earlier occurrence;
    passkey: answers with the key it reads in the prompt."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sp, use_tqdm=False):
        self.calls.append((len(prompts), sp))
        out = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            if sp.prompt_logprobs is not None:
                out.append(SimpleNamespace(prompt_logprobs=[None] + [{t: SimpleNamespace(logprob=-1.0)}
                                                                    for t in ids[1:]],
                                           outputs=[SimpleNamespace(token_ids=[0])]))
                continue
            if sp.ignore_eos:  # recall
                cue = ids[-32:]
                at = next(i for i in range(len(ids) - 32) if ids[i:i + 32] == cue)
                gen = ids[at + 32:at + 32 + sp.max_tokens]
            else:
                key = re.search(r"The pass key is (\d+)\.", "".join(map(chr, ids))).group(1)
                gen = [ord(c) for c in f" {key}."]
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=gen)]))
        return out


def test_worker_runs_every_task_on_one_batched_engine(monkeypatch, tmp_path, capsys):
    import transformers

    llm, engines = FakeLLM(), []

    def engine(fmt, **kw):
        engines.append((fmt, kw))
        return llm

    monkeypatch.setattr(run, "_engine", engine)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: SimpleNamespace(max_position_embeddings=8192))
    args = run.build_parser().parse_args([
        "--worker", "accuracy", "--format", "oscar_int2", "--model", "fake", "--worker-out", str(tmp_path / "w.json"),
        "--seq-lens", "256,512", "--num-seqs", "2", "--recall-haystacks", "512,1024", "--recall-depths", "0.1,0.9",
        "--recall-trials", "2", "--passkey-trials", "2", "--passkey-depths", "0.5"])
    out = run.worker_accuracy(args)
    assert len(engines) == 1  # one engine for all tasks
    kw = engines[0][1]
    assert kw["max_num_seqs"] == 64 and kw["max_num_batched_tokens"] == 64 * 32
    assert kw["long_prefill_token_threshold"] == 32 and kw["enable_prefix_caching"] is False
    assert kw["enable_chunked_prefill"] is True and kw["max_model_len"] <= 8192
    assert kw["enforce_eager"] is False  # compiled with CUDA graphs unless --enforce-eager
    # one generate call per task (recall: per haystack size), short tasks first
    assert [n for n, _ in llm.calls] == [2 * 2 * 2, 2, 2 * 2, 2 * 2]
    assert out["perplexity"].keys() == {"256", "512"}
    assert out["perplexity"]["512"]["shakespeare:tragedies"] == pytest.approx(2.718281828)
    assert out["perplexity_settings"]["512"]["num_seqs"] == {"shakespeare:tragedies": 2, "shakespeare:histories": 2}
    assert out["recall"]["all"] == {"trials": 8, "token_accuracy": 1.0, "exact_match": 1.0}
    assert out["recall"]["settings"]["prefill_chunk"] == 32
    assert out["passkey"]["all"]["success"] == 2 and out["passkey"]["all"]["retrieved"] == 2
    assert set(out["elapsed_s"]) == {"ppl", "recall", "passkey"}
    assert json.loads((tmp_path / "w.json").read_text())["passkey"]["all"]["trials"] == 2  # partial save
    assert "incomplete" not in out["recall"] and set(out["recall"]["by_haystack"]) == {"512", "1024"}
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[oscar_int2] ")]
    assert [ln.split()[1] for ln in lines] == ["engine", "ppl:", "passkey:", "recall,", "recall:"]
    assert "token accuracy 1.000" in lines[4] and lines[2].endswith("s)")


def test_a_worker_stopped_during_recall_keeps_the_sizes_it_finished(monkeypatch, tmp_path):
    """The worker saves recall after each haystack size; if its time limit hits during a later size, the
    saved file has the finished sizes, marked incomplete, and the markdown table says so."""
    import transformers

    class StopAfterFirstSize(FakeLLM):
        def generate(self, prompts, sp, use_tqdm=False):
            if sp.ignore_eos and any(c[1].ignore_eos for c in self.calls):
                raise TimeoutError("stand-in for the driver's time limit")
            return super().generate(prompts, sp, use_tqdm)

    monkeypatch.setattr(run, "_engine", lambda fmt, **kw: StopAfterFirstSize())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: SimpleNamespace(max_position_embeddings=8192))
    args = run.build_parser().parse_args([
        "--worker", "accuracy", "--format", "turboquant_3bit_nc", "--model", "fake", "--tasks", "recall,passkey",
        "--enforce-eager",
        "--worker-out", str(tmp_path / "w.json"), "--recall-haystacks", "1024,512", "--recall-depths", "0.1,0.9",
        "--recall-trials", "2", "--passkey-trials", "2", "--passkey-depths", "0.5"])
    with pytest.raises(TimeoutError):
        run.worker_accuracy(args)
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["passkey"]["all"]["success"] == 2  # ran before recall
    assert saved["passkey"]["settings"]["enforce_eager"] is True and saved["engine"]["enforce_eager"] is True
    rec = saved["recall"]
    assert rec["incomplete"] == {"haystacks_done": [512], "haystacks_missing": [1024]}
    assert set(rec["by_haystack"]) == {"512"} and rec["all"]["trials"] == 4 and rec["settings"]["prefill_chunk"] == 32
    assert rec["settings"]["enforce_eager"] is True
    table = run._recall_tables({"turboquant_3bit_nc": saved})[0]
    assert "| `turboquant_3bit_nc` | 1.000 | 1.000 (1.00) over 0.5K only |" in table


def test_worker_refuses_a_context_beyond_the_model(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setattr(run, "_engine", lambda fmt, **kw: pytest.fail("engine started"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: SimpleNamespace(max_position_embeddings=8192))
    args = run.build_parser().parse_args(["--model", "m", "--format", "auto", "--tasks", "ppl",
                                          "--seq-lens", "16384", "--worker-out", str(tmp_path / "w.json")])
    with pytest.raises(ValueError, match="exceeds the model's 8192"):
        run.worker_accuracy(args)


# ------------------------------------------------------------------------------------------ arguments


def test_accuracy_arguments_defaults_alias_and_round_trip():
    p = run.build_parser()
    a = p.parse_args([])
    assert a.tasks == ("ppl", "passkey", "recall") and a.seq_lens == (2048, 4096, 8192)
    assert a.recall_trials == 20 and a.passkey_trials == 20 and a.chunk == 32 and a.max_num_seqs == 64
    assert a.recall_haystacks == (1024, 2048, 4096, 7680) and a.recall_depths == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert p.parse_args(["--seq-len", "4096"]).seq_lens == (4096,)  # the old option, one context
    assert p.parse_args(["--tasks", "passkey,ppl"]).tasks == ("ppl", "passkey")  # run order
    with pytest.raises(SystemExit):
        p.parse_args(["--tasks", "ppl,needle"])
    a = p.parse_args(["--model", "m", "--tasks", "recall", "--recall-trials", "25", "--recall-depths", "0.25,0.75",
                      "--seq-lens", "2048,8192", "--rotations", "r", "--seed", "3", "--enforce-eager"])
    back = p.parse_args(run.accuracy_worker_args(a) + ["--worker", "accuracy", "--format", "auto"])
    for k in ("model", "tasks", "seq_lens", "num_seqs", "chunk", "max_num_seqs", "recall_trials", "recall_haystacks",
              "recall_depths", "passkey_trials", "passkey_depths", "seed", "rotations", "eval_sets", "enforce_eager"):
        assert getattr(back, k) == getattr(a, k), k
    st = run.accuracy_settings(a)
    assert st["recall"] == {"trials": 25, "haystacks": [1024, 2048, 4096, 7680], "depths": [0.25, 0.75]}
    assert st["tasks"] == ["recall"] and "32-token steps" in st["semantics"] and st["enforce_eager"] is True
    assert p.parse_args([]).enforce_eager is False and "--enforce-eager" not in run.accuracy_worker_args(p.parse_args([]))


# ------------------------------------------------------------------------------------------ tables and merging


def _recall_block(acc_by_size: dict[int, list[float]]) -> dict:
    spec = lc.RecallSpec(haystacks=tuple(acc_by_size), depths=(0.1, 0.9), trials=1)
    examples = [{"haystack": h, "depth": d} for h in acc_by_size for d in (0.1, 0.9)]
    return lc.summarize_recall(examples, [round(32 * a) for accs in acc_by_size.values() for a in accs], spec)


def test_recall_table_marks_a_format_measured_on_fewer_haystack_sizes():
    """Overall recall averages over the sizes a format ran; one that ran fewer (a call split by
    --recall-haystacks, only part of it done) is labelled, so its overall number is not read against the others."""
    res = {"auto": {"recall": _recall_block({1024: [0.5, 0.5], 2048: [0.25, 0.25]})},
           "turboquant_3bit_nc": {"recall": _recall_block({1024: [0.125, 0.125]})}}
    table = run._recall_tables(res)[0]
    assert "| `auto` | 0.500 | 0.250 | 0.375 (0.00) |  |" in table
    assert "| `turboquant_3bit_nc` | 0.125 |  | 0.125 (0.00) over 1K only | -0.375 (1K @10%) |" in table


def _passkey_block(hits: dict[float, int], trials: int = 20) -> dict:
    spec = lc.PasskeySpec(depths=tuple(hits), trials=trials)
    examples, replies = [], []
    for d, n in hits.items():
        for t in range(trials):
            examples.append({"trial": t, "depth": d, "key": "12345", "prompt": [0], "answer": [1]})
            replies.append(([1], " 12345") if t < n else ([2], " 9"))
    return lc.summarize_passkey(examples, replies, spec)


NEW_RESULTS = {"settings": {"seq_lens": [2048, 8192]}, "results": [
    {"format": "auto", "perplexity": {"2048": {"shakespeare:tragedies": 34.0}, "8192": {"shakespeare:tragedies": 30.0}},
     "perplexity_settings": {"2048": {"tokens": 2048}, "8192": {"tokens": 8191}},
     "recall": _recall_block({1024: [1.0, 1.0], 7680: [1.0, 0.5]}),
     "passkey": _passkey_block({0.1: 20, 0.5: 19, 0.9: 18})},
    {"format": "oscar_int2", "perplexity": {"2048": {"shakespeare:tragedies": 37.4},
                                            "8192": {"shakespeare:tragedies": 33.0}},
     "recall": _recall_block({1024: [1.0, 0.75], 7680: [0.5, 0.5]}),
     "passkey": _passkey_block({0.1: 15, 0.5: 10, 0.9: 20})},
    {"format": "fp8", "error": "worker timed out after 1500s"},
]}


def test_markdown_of_the_new_shape():
    text = run.markdown(None, NEW_RESULTS)
    assert "Perplexity through vLLM (SmolLM2-135M-Instruct), 2048 context\n" in text
    assert "8192 context (8191 tokens)" in text
    assert "| `oscar_int2` | 37.400 | +10.0% |" in text and "| `oscar_int2` | 33.000 | +10.0% |" in text
    assert "| `fp8` | worker timed out after 1500s |  |" in text
    assert "| format | @2K | @8K |\n|---|---|---|\n| `oscar_int2` | +10.0% | +10.0% |" in text
    assert "| format | haystack 1K | haystack 7.5K | all (exact match) | worst cell vs BF16 |" in text
    assert "| `auto` | 1.000 | 0.750 | 0.875 (0.75) |  |" in text
    assert "| `oscar_int2` | 0.875 | 0.500 | 0.688 (0.25) | -0.500 (7.5K @10%) |" in text
    assert text.count("| `fp8` | worker timed out after 1500s |  |  |  |") == 2  # recall, passkey
    assert "| format | depth 10% | depth 50% | depth 90% | all |" in text
    assert "| `oscar_int2` | 15/20 | 10/20 | 20/20 | 45/60 |" in text


def test_old_results_read_and_merge_into_the_new_shape(tmp_path):
    old = {"command": "a", "environment": {}, "settings": {"seq_len": 2048, "num_seqs": 4, "chunk": 32},
           "results": [{"format": "auto", "chunk": 32, "perplexity": {"shakespeare:tragedies": 34.0}},
                       {"format": "oscar_int2", "chunk": 32, "perplexity": {"shakespeare:tragedies": 37.4}}]}
    up = run.upgrade_accuracy(old)
    assert up["results"][1]["perplexity"] == {"2048": {"shakespeare:tragedies": 37.4}}
    assert up["results"][1]["perplexity_settings"]["2048"]["max_num_seqs"] == 1  # measured one request at a time
    assert old["results"][1]["perplexity"] == {"shakespeare:tragedies": 37.4}  # input untouched
    assert run.upgrade_accuracy(up) == up  # the new shape is left as it is
    path = tmp_path / "acc.json"
    path.write_text(json.dumps(old))
    # a later call runs recall only for oscar_int2: its old perplexity stays, auto stays as it was
    new = {"command": "b", "environment": {}, "settings": {"seq_lens": [2048]},
           "results": [{"format": "oscar_int2", "recall": NEW_RESULTS["results"][1]["recall"]}]}
    merged = run._merge(path, new, True, upgrade=run.upgrade_accuracy, combine=run.combine_accuracy)
    by = {r["format"]: r for r in merged["results"]}
    assert by["oscar_int2"]["perplexity"] == {"2048": {"shakespeare:tragedies": 37.4}}
    assert by["oscar_int2"]["recall"]["all"]["trials"] == 4
    assert by["auto"]["perplexity"] == {"2048": {"shakespeare:tragedies": 34.0}}
    # a later 8192 run adds its context; an old error goes with a clean run
    by["oscar_int2"]["error"] = "worker exited 1 after 9s"
    path.write_text(json.dumps(merged))
    new = {"command": "c", "environment": {}, "results": [
        {"format": "oscar_int2", "perplexity": {"8192": {"shakespeare:tragedies": 33.0}}}]}
    merged = run._merge(path, new, True, upgrade=run.upgrade_accuracy, combine=run.combine_accuracy)
    r = {r["format"]: r for r in merged["results"]}["oscar_int2"]
    assert r["perplexity"].keys() == {"2048", "8192"} and "error" not in r and "recall" in r
    assert "| `oscar_int2` | 37.400 | +10.0% |" in run.markdown(None, old)  # the old file reads as before


def test_recall_split_across_calls_merges_per_haystack_size():
    """Two calls with different ``--recall-haystacks`` (same other settings) give one block: cells of both,
    the later call's where both measured a size, statistics recomputed; differing settings: the new block
    replaces the old; a partial call's missing sizes stay marked unless the other call has them."""
    spec = lc.RecallSpec(haystacks=(1024, 2048), depths=(0.1, 0.9), trials=2)
    ex = [{"haystack": h, "depth": d} for h in (1024, 2048) for d in (0.1, 0.9) for _ in range(2)]
    first = lc.summarize_recall(ex[:4], [32, 32, 0, 0], replace(spec, haystacks=(1024,)))
    second = lc.summarize_recall(ex[4:], [16, 16, 16, 16], replace(spec, haystacks=(2048,)))
    whole = lc.summarize_recall(ex, [32, 32, 0, 0, 16, 16, 16, 16], spec)
    merged = run.combine_accuracy({"format": "f", "recall": first}, {"format": "f", "recall": second})["recall"]
    assert json.loads(json.dumps(merged)) == json.loads(json.dumps(whole))  # as the results file holds them
    redo = lc.summarize_recall(ex[:4], [32, 32, 32, 32], replace(spec, haystacks=(1024,)))
    again = run.combine_accuracy({"format": "f", "recall": merged}, {"format": "f", "recall": redo})["recall"]
    assert again["by_haystack"]["1024"]["token_accuracy"] == 1.0 and again["by_haystack"]["2048"]["trials"] == 4
    other = lc.summarize_recall(ex[4:], [0] * 4, replace(spec, haystacks=(2048,), trials=3))
    assert run.combine_accuracy({"format": "f", "recall": first}, {"format": "f", "recall": other})["recall"] == other
    partial = {**second, "settings": {**second["settings"], "haystacks": [2048, 4096]},
               "incomplete": {"haystacks_done": [2048], "haystacks_missing": [4096]}}
    m = lc.merge_recall(first, partial)
    assert m["incomplete"] == {"haystacks_done": [1024, 2048], "haystacks_missing": [4096]}
    assert m["settings"]["haystacks"] == [1024, 2048, 4096] and m["all"]["trials"] == 8


def test_plots_of_the_new_shape(tmp_path):
    pytest.importorskip("matplotlib")
    written = run.plots(None, NEW_RESULTS, tmp_path)
    assert [p.name for p in written] == ["accuracy-gpu-smollm2.png", "recall-gpu-smollm2.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_accuracy_results_path_follows_acc_tag():
    assert run.accuracy_path(None).name == "accuracy-gpu-smollm2.json"
    args = run.build_parser().parse_args(["--acc-tag", "chunk8192"])
    assert run.accuracy_path(args.acc_tag).name == "accuracy-gpu-smollm2-chunk8192.json"
