"""benchmarks/run.py turns result JSON into the README tables (no GPU needed)."""

from benchmarks.run import FORMATS, markdown


def test_markdown_tables_from_results():
    e2e = {"results": [
        {"format": "auto", "capacity": {"8192": {"max_concurrency": 48.0}, "32768": {"max_concurrency": 12.0},
                                        "131072": {"max_concurrency": 3.0}},
         "latency_bs1": {"32768": {"tpot_ms": 8.45}}, "throughput": {"output_tok_s": 1984.0}},
        {"format": "oscar_int2", "capacity": {"8192": {"max_concurrency": 250.0},
                                              "32768": {"max_concurrency": 78.6},
                                              "131072": {"max_concurrency": 20.5}},
         "latency_bs1": {"32768": {"tpot_ms": 6.9}}},
        {"format": "fp8", "error": "worker exited 1 after 30s"},
    ]}
    acc = {"results": [{"format": "auto", "perplexity": {"shakespeare:tragedies": 34.0}},
                       {"format": "oscar_int2", "perplexity": {"shakespeare:tragedies": 37.4}}]}
    text = markdown(e2e, acc)
    assert "| `oscar_int2` | 250.00 | 78.60 | 20.50 | 6.55x |" in text
    assert "| `fp8` | worker exited 1 after 30s |" in text
    assert "| `auto` | 8.45 | 1984 |" in text
    assert "| `oscar_int2` | 37.400 | +10.0% |" in text


def test_full_kv_decode_table_compares_with_bf16():
    def sat(n, tok, step, err=None):
        d = {"context": 32768, "requests": n, "prompt_len": 28672, "output_len": 4096, "prefill_phase_s": 20.25,
             "output_tok_s_end_to_end": 300.0}
        return {**d, "error": err} if err else {**d, "decode_tok_s": tok, "step_ms_median": step}
    e2e = {"results": [
        {"format": "auto", "full_kv_decode": sat(12, 480.0, 25.0)},
        {"format": "oscar_int2", "full_kv_decode": sat(78, 2600.0, 30.0)},
        {"format": "fp8", "full_kv_decode": sat(24, None, None, err="no step in which every request decodes")},
    ]}
    text = markdown(e2e, None)
    assert "Decode throughput with a full KV cache (32K-token requests" in text
    assert "| `oscar_int2` | 78 × (28672 + 4096) | 2600 | 5.42x | 30.0 | 20.2 | 300 |" in text
    assert "| `fp8` | 24 × (28672 + 4096) | no step in which every request decodes |" in text


def test_serve_table_compares_each_rate_with_bf16():
    def rate(tput):
        return {"output_throughput": tput, "p50_ttft_ms": 700.4, "p99_ttft_ms": 12445.5, "p50_tpot_ms": 38.04,
                "p99_tpot_ms": 43.74}
    serve = {"settings": {"prompts": 128, "input_len": 4096, "output_len": 512}, "results": [
        {"format": "auto", "serve": {"rates": {"8": rate(1832.0)}}},
        {"format": "oscar_int2", "serve": {"rates": {"8": rate(2454.0), "inf": rate(2561.0)}}},
        {"format": "fp8", "error": "worker timed out after 270s"},
    ]}
    text = markdown(None, None, serve)
    assert "128 random prompts of 4096 in / 512 out" in text
    assert "| `oscar_int2` | 8 | 2454 | 1.34x | 700 / 12446 | 38.0 / 43.7 |" in text
    assert "| `oscar_int2` | inf | 2561 | nanx |" in text  # no BF16 run at that rate: no ratio
    assert "| `fp8` | worker timed out after 270s |" in text


def test_every_format_goes_through_the_same_engine_kwargs():
    assert FORMATS["oscar_int2_nofold"]["additional_config"]["oscar"]["fold_value_rotation"] is False
    assert {f["kv_cache_dtype"] for f in FORMATS.values()} == {
        "auto", "fp8", "turboquant_4bit_nc", "turboquant_3bit_nc", "oscar_int2"}
    assert FORMATS["int2_naive"]["additional_config"]["oscar"]["rotation"] == "none"
    assert FORMATS["int2_hadamard"]["additional_config"]["oscar"]["recent_tokens"] == 0


def test_results_of_a_later_call_merge_by_format(tmp_path):
    """One format per device call: a later call replaces its own formats' rows and keeps the others."""
    from benchmarks.run import _merge

    path = tmp_path / "e2e.json"
    first = {"command": "a", "environment": {},
             "results": [{"format": "oscar_int2", "x": 1}, {"format": "auto", "x": 1}]}
    _merge(path, first, merge=True)
    second = {"command": "b", "environment": {}, "results": [{"format": "oscar_int2", "x": 2}]}
    merged = _merge(path, second, merge=True)
    assert [(r["format"], r["x"]) for r in merged["results"]] == [("auto", 1), ("oscar_int2", 2)]
    assert [(r["command"], r["formats"]) for r in merged["runs"]] == [("a", ["auto", "oscar_int2"]), ("b", ["oscar_int2"])]
    third = _merge(path, {"command": "c", "environment": {}, "results": [{"format": "fp8"}]}, merge=True)
    assert [r["command"] for r in third["runs"]] == ["a", "b", "c"]
    replaced = _merge(path, {"command": "c", "environment": {}, "results": [{"format": "fp8"}]}, merge=False)
    assert [r["format"] for r in replaced["results"]] == ["fp8"]


def test_plots_from_results(tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("matplotlib")
    from benchmarks.run import plots

    e2e = {"results": [{"format": "auto", "capacity": {n: {"max_concurrency": c} for n, c in
                                                     (("8192", 48.0), ("32768", 12.0), ("131072", 3.0))},
                        "latency_bs1": {"8192": {"tpot_ms": 7.2}, "32768": {"tpot_ms": 8.6}}}]}
    acc = {"results": [{"format": "auto", "perplexity": {"a": 34.0}},
                       {"format": "oscar_int2", "perplexity": {"a": 35.0}}]}
    written = plots(e2e, acc, tmp_path)
    assert [p.name for p in written] == ["e2e-h100.png", "accuracy-gpu-smollm2.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_skip_sliding_window_keeps_those_layers_bf16_in_quantized_formats_only(monkeypatch):
    """``--skip-sliding-window`` (models such as Gemma 3, whose sliding-window layers oscar_int2 cannot serve):
    every quantized format gets ``kv_cache_dtype_skip_layers=["sliding_window"]``, BF16 gets nothing."""
    import vllm

    from benchmarks import run

    calls = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: calls.append(kw))
    for fmt in ("auto", "fp8", "oscar_int2_u8"):
        run._engine(fmt, True, model="m")
    run._engine("oscar_int2", False, model="m")
    assert [c.get("kv_cache_dtype_skip_layers") for c in calls] == [None, ["sliding_window"], ["sliding_window"], None]
    assert run.FORMATS["oscar_int2_u8"] == {"kv_cache_dtype": "oscar_int2",
                                           "additional_config": {"oscar": {"scale_dtype": "u8"}}}  # not mutated
    assert (run.ROOT / "benchmarks" / "models" / "gemma3-12b-dummy" / "config.json").exists()
