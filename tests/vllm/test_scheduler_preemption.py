"""vLLM's own scheduler over the OSCAR KV-cache groups under memory pressure (CPU, no model).

``vllm.v1.core.sched.scheduler.Scheduler`` runs on a ``KVCacheConfig`` made by ``get_kv_cache_configs``
from the real layer specs (INT2 pages of 128 tokens + the BF16 window group of 16-token pages sharing
one pool), with a fake model that samples one token per finished prefill/decode step. This is the
scheduling half of the GPU ``preemption`` case (tests/e2e/gpu_e2e.py), which uses the same numbers.
"""

from __future__ import annotations

import pytest
from oscar_testing import build_attention_layers, collect_specs, engine_config

# Pool and requests of the GPU preemption case: three requests are admitted (each reserves its INT2 pages and
# the window's admission cap), then all three grow by ~2000 decode tokens, which the pool cannot hold.
POOL_PAGES, CHUNK, MAX_LEN = 84, 256, 2560
NUM_REQUESTS, PROMPT, OUTPUT = 8, 300, 2000


def _scheduler(model: str, pool_pages: int, chunk: int = CHUNK):
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, init_none_hash, resolve_kv_cache_block_sizes
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    cfg = engine_config(model, max_model_len=MAX_LEN, max_num_batched_tokens=chunk, max_num_seqs=16)
    cfg.compilation_config.static_forward_context.clear()
    build_attention_layers(cfg)
    specs = collect_specs(cfg)
    cfg.cache_config.num_gpu_blocks_override = pool_pages
    kv = get_kv_cache_configs(cfg, [specs], [64 << 20])[0]
    assert kv.num_blocks == pool_pages
    cfg.cache_config.num_gpu_blocks = kv.num_blocks
    sched_bs, hash_bs = resolve_kv_cache_block_sizes(kv, cfg)
    init_none_hash(sha256)
    return Scheduler(cfg, kv, StructuredOutputManager(cfg), block_size=sched_bs, hash_block_size=hash_bs,
                     log_stats=True), hash_bs


def _run(sched, hash_bs, max_steps: int = 40_000) -> tuple[set[str], int, int]:
    """Drive ``schedule`` -> fake model -> ``update_from_output`` until every request finishes."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    hasher = get_request_block_hasher(hash_bs, sha256)
    text = [(i * 31 + 7) % 1000 + 10 for i in range(PROMPT + 10 * NUM_REQUESTS)]
    for i in range(NUM_REQUESTS):
        sched.add_request(Request(f"r{i}", [100 + i] + text[: PROMPT + 10 * i],
                                  SamplingParams(max_tokens=OUTPUT, ignore_eos=True), None, block_hasher=hasher))
    finished, preemptions, output_tokens = set(), 0, 0
    for _ in range(max_steps):
        out = sched.schedule()
        if out.total_num_scheduled_tokens == 0:
            break  # nothing schedulable: a stall unless everything finished
        preemptions += len(out.preempted_req_ids or ())
        ids = list(out.num_scheduled_tokens)
        sampled = [[7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens else [] for r in ids]
        output_tokens += sum(map(len, sampled))
        results = sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)}, sampled_token_ids=sampled))
        finished |= {o.request_id for eco in results.values() for o in eco.outputs if o.finish_reason is not None}
        if len(finished) == NUM_REQUESTS:
            break
    return finished, preemptions, output_tokens


def test_preemption_under_memory_pressure_finishes_every_request(model_factory):
    model = model_factory("preempt", num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64)
    sched, hash_bs = _scheduler(model, POOL_PAGES)
    finished, preemptions, output_tokens = _run(sched, hash_bs)
    print(f"{len(finished)}/{NUM_REQUESTS} requests finished, {preemptions} preemptions")  # shown with pytest -s
    assert len(finished) == NUM_REQUESTS, f"{len(finished)}/{NUM_REQUESTS} finished: the scheduler stalled"
    assert preemptions > 0, "the pool was large enough to avoid preemption: the case tests nothing"
    # Recompute-preemption re-prefills but never re-samples: each request emitted exactly OUTPUT tokens
    # (the fake model samples on every step whose prefill is complete, so a lost token would show here).
    assert output_tokens == NUM_REQUESTS * OUTPUT
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == POOL_PAGES - 1  # everything returned (one page is vLLM's null block)


def test_a_pool_that_cannot_admit_one_request_is_refused_at_start_up(model_factory):
    """The GPU run that stalled (48 pages, 1024-token chunks) is refused by get_kv_cache_configs with the page
    counts; the smallest pool the check accepts really does serve the requests."""
    import re

    model = model_factory("preempt", num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64)
    with pytest.raises(ValueError, match="never schedule a request") as err:
        _scheduler(model, 48, chunk=1024)
    need = int(re.search(r"only when its whole sequence fits: (\d+) pages", str(err.value))[1])
    assert "OscarFullAttentionSpec" in str(err.value) and "OscarWindowSpec" in str(err.value)
    with pytest.raises(ValueError, match="never schedule"):
        _scheduler(model, need, chunk=1024)  # `need` usable pages + vLLM's null page
    sched, hash_bs = _scheduler(model, need + 1, chunk=1024)
    finished, _, _ = _run(sched, hash_bs)
    assert len(finished) == NUM_REQUESTS
