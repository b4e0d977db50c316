"""The BF16 windows in vLLM's own KV-cache manager: allocation, freeing, prefix hits, preemption, capacity.

Everything runs through ``vllm.v1.core.kv_cache_manager.KVCacheManager`` on a ``KVCacheConfig`` made by
``get_kv_cache_configs`` from real layer specs, driven the way the scheduler drives it
(``get_computed_blocks`` -> ``allocate_slots`` -> tokens computed -> next step).
"""

from __future__ import annotations

import pytest
from oscar_testing import KVSim, build_kv_manager

BS = 16  # window block (vLLM block size); INT2 pages hold 8 x 16 = 128 tokens
SINK, RECENT = 64, 256


@pytest.fixture(scope="module")
def sim_factory(model_factory):
    model = model_factory("mgr", num_layers=2, head_dim=64)

    def make(num_blocks=None, **oscar):
        return KVSim(*build_kv_manager(model, oscar={"sink_tokens": SINK, "recent_tokens": RECENT, **oscar},
                                       num_blocks=num_blocks))

    return make


def _expected_window_blocks(num_computed: int, num_tokens: int) -> set[int]:
    """Window blocks a request must hold: the sink, and every block from the window of the next query
    (positions >= num_computed + 1 - recent) up to the last allocated slot."""
    start = max(0, num_computed + 1 - RECENT) // BS
    return set(range(SINK // BS)) | set(range(min(start, (num_tokens - 1) // BS), (num_tokens - 1) // BS + 1))


def test_sink_blocks_kept_and_blocks_outside_the_window_freed(sim_factory):
    sim = sim_factory()
    r = sim.add("a", list(range(1000)))
    for chunk in [256, 256, 256, 232] + [1] * 400:
        sim.step(r, chunk)
        int2, win = sim.block_ids(r)
        assert len(int2) == -(-r.num_computed_tokens // 128) and all(int2)  # INT2: every token, real blocks
        real = {i for i, b in enumerate(win) if b != 0}
        # Blocks are freed on the next allocation (vLLM frees on the processed-token basis).
        assert real == _expected_window_blocks(r.num_computed_tokens - sim.last_chunk, r.num_computed_tokens)
    assert {i for i, b in enumerate(sim.block_ids(r)[1]) if b} >= {0, 1, 2, 3}
    sim.mgr.free(r)
    assert sim.free_blocks() == sim.total_blocks


def test_prefix_hit_brings_sink_and_window(sim_factory):
    sim = sim_factory()
    a = sim.add("a", list(range(900)))
    for chunk in (256, 256, 256, 132):
        sim.step(a, chunk)
    a_win = sim.block_ids(a)[1]
    sim.mgr.free(a)
    b = sim.add("b", list(range(700)) + [5] * 100)  # shares 700 tokens with a
    blocks, hit = sim.hit(b)
    assert hit == 640  # largest multiple of the 128-token INT2 page inside the shared prefix
    win = [blk.block_id for blk in blocks.blocks[1]]
    assert win[:4] == a_win[:4]  # the sink comes from the cache, not recomputed
    window_idx = range((640 + 1 - RECENT) // BS, 640 // BS)
    assert all(win[i] == 0 for i in range(4, window_idx.start))  # nulls between sink and window
    assert all(win[i] != 0 for i in window_idx)
    sim.step(b, 160, hit=(blocks, hit))
    held = {i for i, x in enumerate(sim.block_ids(b)[1]) if x}
    assert held >= {0, 1, 2, 3} and held >= set(window_idx) - set(range(4, (640 + 1 - RECENT) // BS))


def test_prefix_hit_needs_every_sink_block(sim_factory):
    sim = sim_factory()
    a = sim.add("a", list(range(900)))
    for chunk in (256, 256, 256, 132):
        sim.step(a, chunk)
    sink_ids = sim.block_ids(a)[1][:4]
    sim.mgr.free(a)
    sim.mgr.block_pool.evict_blocks({sink_ids[2]})  # e.g. evicted under memory pressure
    _, hit = sim.hit(sim.add("b", list(range(800)) + [1]))
    assert hit == 0


def test_preemption_and_resume_reuse_the_cache(sim_factory):
    sim = sim_factory()
    r = sim.add("a", list(range(600)))
    for chunk in (256, 256, 88):
        sim.step(r, chunk)
    for _ in range(150):
        sim.step(r, 1)
    before = sim.block_ids(r)
    # Preempt (vLLM v1 recomputes): all blocks go back to the pool, the request restarts from its tokens.
    sim.preempt(r)
    assert sim.free_blocks() == sim.total_blocks
    blocks, hit = sim.hit(r)
    assert hit == (r.num_tokens - 1) // 128 * 128 == 640
    assert [b.block_id for b in blocks.blocks[1]][:4] == before[1][:4]
    sim.step(r, r.num_tokens - hit, hit=(blocks, hit))
    for _ in range(50):
        sim.step(r, 1)
    assert {i for i, b in enumerate(sim.block_ids(r)[1]) if b} == _expected_window_blocks(
        r.num_computed_tokens - 1, r.num_computed_tokens)


def test_capacity_matches_what_requests_hold(sim_factory):
    """vLLM's logged concurrency charges each request its INT2 pages plus the steady window: a decoding
    request holds exactly that, the pool fits floor(concurrency) of them and not one more."""
    sim = sim_factory(num_blocks=None)
    charged = sim.charged_blocks_per_request()  # from the specs' max_memory_usage_bytes, as vLLM logs
    n = int(sim.max_concurrency)
    # 2039-token prompts: after the first decode the window [1785, 2040] starts inside a block, the case
    # vLLM's +1 block charges for (an aligned window would hold one block less).
    reqs = [sim.add(f"r{i}", [i] + list(range(1, 2039))) for i in range(n)]
    for r in reqs:
        # Prefill in 128-token chunks, then the first decode step, which frees the last chunk's BF16 rows
        # outside the window (in a real batch that happens on the request's next step). The chunk in
        # flight is the one cost the per-request figure leaves out: a full pool must still hold one
        # chunk's BF16 rows (here 8 blocks; see attention/window.py).
        while r.num_computed_tokens < r.num_prompt_tokens:
            sim.step(r, min(128, r.num_prompt_tokens - r.num_computed_tokens))
        sim.step(r, 1)
        int2, win = sim.block_ids(r)
        assert len(int2) + sum(1 for b in win if b) == charged  # the pool is full at vLLM's logged concurrency
    assert sim.free_blocks() < charged
    extra = sim.add("extra", [10_000 + n] + list(range(1, 2039)))  # no prefix shared with the others
    with pytest.raises(AssertionError, match="no free KV blocks"):
        while extra.num_computed_tokens < extra.num_prompt_tokens:
            sim.step(extra, min(128, extra.num_prompt_tokens - extra.num_computed_tokens))
