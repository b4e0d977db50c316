"""The OSCAR backend end to end on CPU: vLLM's manager, tensors and metadata; the spec as the kernels.

What runs is the production path except the compiled kernels: vLLM's ``KVCacheManager`` allocates,
frees and prefix-matches blocks; vLLM's V2-runner helpers (``init_attn_backend``, ``_allocate_kv_cache``,
``_reshape_kv_cache``, ``bind_kv_cache``) build the metadata builders and the (padded) cache views; the
OSCAR builder plans each step and the impl stores and attends. ``reference_kernels`` stands in for the
CUDA kernels and FlashAttention with ``vllm_oscar.ops.reference``.

Every output is compared with a dense re-computation of the backend's semantics for that token:
a first chunk attends its exact K/V; any other token at position ``p`` of a chunk starting at ``s``
attends, in the rotated space, the BF16 window copy of key ``j < s`` when ``j < sink`` or
``j >= s + 1 - recent``, the INT2 copy of every other ``j < s``, and the exact chunk rows ``s..p``
(a decode is a chunk of one token, which is exactly ``reference.paged_decode``).
"""

from __future__ import annotations

import pytest
import reference_kernels
import torch
from oscar_testing import build_attention_layers, collect_specs, engine_config, make_manager

from vllm_oscar.attention.specs import OscarFullAttentionSpec
from vllm_oscar.layout import params_for_scale_dtype
from vllm_oscar.ops import reference as ref

SINK, RECENT = 32, 64
NUM_LAYERS, HQ, HKV, D = 2, 4, 2, 64
VOCAB = 97


class Stack:
    """One engine's worth of OSCAR state on CPU, driven step by step like vLLM's scheduler + runner."""

    def __init__(self, model: str, *, folded: bool = False, scale_dtype: str = "float16", pool_pages: int | None = None):
        from vllm.config import set_current_vllm_config
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, get_request_block_hasher
        from vllm.v1.worker.gpu.attn_utils import _allocate_kv_cache, _reshape_kv_cache, init_attn_backend
        from vllm.v1.worker.utils import bind_kv_cache
        from vllm.v1.worker.workspace import init_workspace_manager

        cfg = engine_config(model, max_model_len=1024, additional_config={
            "oscar": {"sink_tokens": SINK, "recent_tokens": RECENT, "scale_dtype": scale_dtype}})
        cfg.compilation_config.static_forward_context.clear()
        self.cfg = cfg
        self.layers = build_attention_layers(cfg)
        init_workspace_manager(torch.device("cpu"))
        with set_current_vllm_config(cfg):
            for layer in self.layers:
                layer.process_weights_after_loading(torch.bfloat16)  # loads the rotations
        # folded: o_proj absorbed R_V (attention/fold.py), so every output stays in the rotated space
        self.folded = folded
        for layer in self.layers:
            layer.impl.set_value_rotation_folded(folded)
        cfg.cache_config.num_gpu_blocks_override = pool_pages  # None: as many pages as 4 MiB holds
        self.kv = get_kv_cache_configs(cfg, [collect_specs(cfg)], [4 << 20])[0]
        with set_current_vllm_config(cfg):
            self.attn_groups, _, kernel_block_sizes = init_attn_backend(self.kv, cfg, torch.device("cpu"))
        raw = _allocate_kv_cache(self.kv, {}, torch.device("cpu"))
        flat = [g for groups in self.attn_groups for g in groups]
        caches = _reshape_kv_cache(flat, raw, cfg.cache_config.cache_dtype, kernel_block_sizes, {}, self.kv)
        bind_kv_cache(caches, cfg.compilation_config.static_forward_context, [])
        self.int2_gid = next(i for i, g in enumerate(self.kv.kv_cache_groups)
                             if isinstance(g.kv_cache_spec, OscarFullAttentionSpec))
        self.mgr = make_manager(cfg, self.kv)
        self.hasher = get_request_block_hasher(self.mgr.coordinator.hash_block_size, sha256)
        g = torch.Generator().manual_seed(0)
        # K/V/Q of a token depend on (layer, token id, position) only, so shared prefixes share K/V as in
        # a real model. A few outlier channels in K (as after RoPE in real models) make INT2 error visible.
        k_scale = torch.ones(D)
        k_scale[::9] = 3.0
        self.tables = [
            {name: (torch.randn(VOCAB, h, D, generator=g) * sc, torch.randn(1024, h, D, generator=g) * sc)
             for name, h, sc in (("q", HQ, 0.7), ("k", HKV, 0.7 * k_scale), ("v", HKV, 1.0))}
            for _ in range(NUM_LAYERS)
        ]
        self.outputs: list[tuple] = []  # (layer, request id, position, chunk start, output [HQ, D])
        self.requests: dict = {}

    def request(self, rid: str, tokens: list[int]):
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        req = Request(rid, tokens, SamplingParams(max_tokens=1 << 20), None, block_hasher=self.hasher)
        self.requests[rid] = req
        return req

    def qkv(self, layer: int, tokens: torch.Tensor, positions: torch.Tensor):
        t = self.tables[layer]
        return [(t[n][0][tokens] + t[n][1][positions]).to(torch.bfloat16) for n in ("q", "k", "v")]

    def step(self, items):
        """Run one engine step; ``items`` = [(request, num_new_tokens, hit or None)], decodes first."""
        from vllm.forward_context import set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        rows = []
        for req, n, hit in items:
            blocks, n_hit = hit if hit is not None else (None, 0)
            assert self.mgr.allocate_slots(req, n, num_new_computed_tokens=n_hit, new_computed_blocks=blocks)
            req.num_computed_tokens += n_hit
            rows.append((req, req.num_computed_tokens, n))
        tokens = torch.tensor([t for r, s, n in rows for t in r.all_token_ids[s:s + n]])
        positions = torch.cat([torch.arange(s, s + n) for _, s, n in rows])
        qsl = torch.tensor([0] + [n for _, _, n in rows]).cumsum(0).to(torch.int32)
        seq = torch.tensor([s + n for _, s, n in rows], dtype=torch.int32)
        metadata, slots, sm_by_group = {}, {}, []
        for gid, group in enumerate(self.kv.kv_cache_groups):
            bs = group.kv_cache_spec.block_size
            ids = [list(self.mgr.get_block_ids(r.request_id)[gid]) for r, _, _ in rows]
            bt = torch.zeros(len(rows), max(map(len, ids)), dtype=torch.int32)
            for i, b in enumerate(ids):
                bt[i, : len(b)] = torch.tensor(b, dtype=torch.int32)
            req_of_tok = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([n for _, _, n in rows]))
            sm = (bt[req_of_tok, positions // bs].long() * bs + positions % bs)
            sm_by_group.append(sm)
            cam = CommonAttentionMetadata(
                query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(rows),
                num_actual_tokens=len(tokens), max_query_len=max(n for _, _, n in rows), max_seq_len=int(seq.max()),
                block_table_tensor=bt, slot_mapping=sm, seq_lens_cpu_upper_bound=seq.clone(),
            )
            for ag in self.attn_groups[gid]:
                md = ag.get_metadata_builder(0).build(0, cam)
                for name in ag.layer_names:
                    metadata[name], slots[name] = md, sm
        with set_forward_context(metadata, self.cfg, num_tokens=len(tokens), slot_mapping=slots):
            for li, layer in enumerate(self.layers):
                q, k, v = self.qkv(li, tokens, positions)
                if not layer.attn_backend.forward_includes_kv_cache_update:  # vLLM's separate update op
                    layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, sm_by_group[self.int2_gid])
                out = torch.empty(len(tokens), HQ, D, dtype=torch.bfloat16)
                layer.impl.forward(layer, q, k, v, layer.kv_cache, metadata[layer.layer_name], output=out)
                t = 0
                for req, s, n in rows:
                    for p in range(s, s + n):
                        self.outputs.append((li, req.request_id, p, s, out[t]))
                        t += 1
        for req, s, n in rows:
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens:
                req.append_output_token_ids(int(req.num_computed_tokens * 7 % VOCAB))  # the "sampled" token

    # -------------------------------------------------------------------------- the dense target

    @staticmethod
    def _attend(q, k, v, last_key):
        """fp32 attention of queries ``q [m, HQ, D]`` over ``k, v [n, HKV, D]``; query i sees keys
        ``0 .. last_key[i]`` (GQA: query head h reads KV head h // (HQ / HKV))."""
        g = HQ // HKV
        scores = torch.einsum("mhd,khd->hmk", q, k.repeat_interleave(g, 1)) * D**-0.5
        mask = torch.arange(k.shape[0])[None, :] > last_key[:, None]
        scores = scores.masked_fill(mask[None], float("-inf"))
        return torch.einsum("hmk,khd->mhd", torch.softmax(scores, -1), v.repeat_interleave(g, 1))

    def check(self, atol: float = 0.03) -> dict:
        """Compare every recorded output with the spec (rounded where the backend rounds to bf16)."""
        r = self.cfg.additional_config["oscar"]["_resolved"]
        bf = torch.bfloat16
        worst, int2_effect, n_int2 = 0.0, 0.0, 0
        chunks: dict = {}
        for li, rid, p, s, out in self.outputs:
            chunks.setdefault((li, rid, s), []).append((p, out))
        cache: dict = {}
        for (li, rid, s), items in chunks.items():
            layer = self.layers[li]
            if (li, rid) not in cache:
                toks = self.requests[rid].all_token_ids
                q, k, v = self.qkv(li, torch.tensor(toks), torch.arange(len(toks)))
                rk, rv = layer.oscar_rotation_k, layer.oscar_rotation_v
                cache[li, rid] = dict(
                    q=q, k=k, v=v,
                    kw=(k.float() @ rk).to(bf).float(), vw=(v.float() @ rv).to(bf).float(),  # window copies
                    # INT2 copies, rotated
                    kq=ref.fake_quantize_rows(k, rk, r["k_clip_ratio"], r["levels"], params_for_scale_dtype(r["scale_dtype"])),
                    vq=ref.fake_quantize_rows(v, rv, r["v_clip_ratio"], r["levels"], params_for_scale_dtype(r["scale_dtype"])),
                    kc=torch.matmul(k, layer.oscar_rotation_k_act).float(),  # chunk rows: the backend's bf16 GEMM
                    vc=torch.matmul(v, layer.oscar_rotation_v_act).float(),
                )
            c = cache[li, rid]
            ps = torch.tensor([p for p, _ in items])
            out = torch.stack([o for _, o in items]).float()
            top = int(ps.max()) + 1
            exact = self._attend(c["q"][ps].float(), c["k"][:top].float(), c["v"][:top].float(), ps)
            if s == 0:  # first chunk: exact attention in the model space (times R_V in bf16 when folded)
                want = torch.matmul(exact.to(bf), layer.oscar_rotation_v_act).float() if self.folded else exact
            else:
                j = torch.arange(s)[:, None, None]
                window = (j < SINK) | (j >= s + 1 - RECENT)
                pk, pv = torch.where(window, c["kw"][:s], c["kq"][:s]), torch.where(window, c["vw"][:s], c["vq"][:s])
                if len(items) == 1 and int(ps[0]) == s:  # decode: reference.paged_decode (fp32 throughout)
                    qr = c["q"][ps].float() @ layer.oscar_rotation_k
                    kk, vv = torch.cat([pk, c["kw"][s:top]]), torch.cat([pv, c["vw"][s:top]])
                    want = self._attend(qr, kk, vv, ps)
                    if not self.folded:
                        want = want @ layer.oscar_rotation_v.T
                else:  # continuation chunk: bf16 prefix buffer + bf16 chunk rows, bf16 rotations
                    qr = torch.matmul(c["q"][ps], layer.oscar_rotation_k_act).float()
                    kk = torch.cat([pk.to(bf).float(), c["kc"][s:top]])
                    vv = torch.cat([pv.to(bf).float(), c["vc"][s:top]])
                    o_rot = self._attend(qr, kk, vv, ps).to(bf)
                    want = o_rot.float() if self.folded else torch.matmul(o_rot, layer.oscar_rotation_v_t_act).float()
                reads_int2 = ps >= SINK + RECENT
                n_int2 += int(reads_int2.sum())
                if reads_int2.any():
                    model_space = want @ layer.oscar_rotation_v.T if self.folded else want
                    int2_effect = max(int2_effect, float((model_space - exact)[reads_int2].abs().max()))
            worst = max(worst, float((out - want).abs().max()))
        assert worst <= atol, f"backend output deviates from the spec by {worst:.4f} (> {atol})"
        return {"max_err": worst, "int2_effect": int2_effect, "tokens_with_int2": n_int2}


@pytest.fixture
def stack(model_factory, monkeypatch):
    reference_kernels.install(monkeypatch)
    return Stack(model_factory("backend", num_layers=NUM_LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D))


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chunked_prefill_decode_mixed_batches_and_prefix_hit(stack):
    a = stack.request("a", _tokens(1, 500))
    b = stack.request("b", _tokens(2, 300))
    stack.step([(a, 200, None)])  # first chunk: exact
    stack.step([(a, 200, None)])  # continuation: INT2 + window prefix
    stack.step([(a, 100, None), (b, 150, None)])  # two prefills in one varlen batch
    stack.step([(a, 1, None), (b, 150, None)])  # mixed: decode + continuation chunk
    for _ in range(6):
        stack.step([(a, 1, None), (b, 1, None)])
    c = stack.request("c", a.all_token_ids[:400] + _tokens(3, 60))
    blocks, hit = stack.mgr.get_computed_blocks(c)[:2]
    assert hit == 384  # a's INT2 pages, sink and window blocks are reused
    stack.step([(a, 1, None), (b, 1, None), (c, len(c.all_token_ids) - hit, (blocks, hit))])
    for _ in range(3):
        stack.step([(a, 1, None), (b, 1, None), (c, 1, None)])
    stats = stack.check()
    assert stats["tokens_with_int2"] > 100
    assert stats["int2_effect"] > 5 * stats["max_err"]  # the check can tell INT2 history from exact history


def test_u8_scale_dtype_pages_through_the_backend(model_factory, monkeypatch):
    """"scale_dtype": "u8": the backend stores, decodes and gathers 2-byte (scale, offset) pages (the page
    size, the layer args and every kernel call carry the format) and matches the spec's u8 quantizer."""
    reference_kernels.install(monkeypatch)
    stack = Stack(model_factory("backend-u8", num_layers=NUM_LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D),
                  scale_dtype="u8")
    assert stack.kv.kv_cache_groups[0].kv_cache_spec.layout.params == "u8"
    a = stack.request("a", _tokens(7, 400))
    b = stack.request("b", _tokens(8, 200))
    stack.step([(a, 200, None)])
    stack.step([(a, 200, None), (b, 100, None)])  # continuation (gather) + a first chunk
    for _ in range(4):
        stack.step([(a, 1, None), (b, 1, None)])  # decodes, odd and even batches: both decode paths
    stats = stack.check()
    assert stats["tokens_with_int2"] > 100
    assert stats["int2_effect"] > 5 * stats["max_err"]


def test_folded_value_rotation_leaves_every_output_rotated(model_factory, monkeypatch):
    """With R_V folded into o_proj, decode, continuation chunks and first chunks all return o R_V."""
    reference_kernels.install(monkeypatch)
    stack = Stack(model_factory("backend", num_layers=NUM_LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D),
                  folded=True)
    a = stack.request("a", _tokens(5, 400))
    b = stack.request("b", _tokens(6, 200))
    stack.step([(a, 200, None)])  # first chunk: exact attention, then times R_V
    stack.step([(a, 200, None), (b, 100, None)])  # continuation + a first chunk in one batch
    for _ in range(4):
        stack.step([(a, 1, None), (b, 1, None)])  # decode without the R_V epilogue
    stats = stack.check()
    assert stats["tokens_with_int2"] > 100


def test_preempted_request_resumes_with_identical_decodes(stack, model_factory, monkeypatch):
    a = stack.request("a", _tokens(4, 300))
    for n in (128, 128, 44):
        stack.step([(a, n, None)])
    for _ in range(5):
        stack.step([(a, 1, None)])
    # Preempt (recompute): every block returns to the pool; the request restarts from its tokens.
    stack.mgr.free(a)
    a.num_computed_tokens = 0
    blocks, hit = stack.mgr.get_computed_blocks(a)[:2]
    assert hit == 256
    stack.step([(a, len(a.all_token_ids) - hit, (blocks, hit))])
    for _ in range(5):
        stack.step([(a, 1, None)])
    stats = stack.check()
    assert stats["tokens_with_int2"] > 0
    # The decodes after the resume read the same cache contents as without preemption.
    ref_stack = Stack(model_factory("backend", num_layers=NUM_LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D))
    a2 = ref_stack.request("a", _tokens(4, 300))
    for n in (128, 128, 44):
        ref_stack.step([(a2, n, None)])
    for _ in range(11):
        ref_stack.step([(a2, 1, None)])
    assert list(a2.all_token_ids) == list(a.all_token_ids)
    resumed = [o for li, rid, p, s, o in stack.outputs if s == p and p >= 306 and li == 1]
    plain = [o for li, rid, p, s, o in ref_stack.outputs if s == p and p >= 306 and li == 1]
    assert len(resumed) == len(plain) == 5
    for x, y in zip(resumed, plain):
        assert torch.equal(x, y)


def test_aborted_requests_pages_are_reused_dirty_without_leaking_into_others(model_factory, monkeypatch):
    """Client disconnects free a request's pages mid-prefill and mid-decode (vLLM's ``free``, as for any
    finished request). On a small pool the next requests get those very pages, still holding the aborted
    requests' codes, (scale, offset) pairs and BF16 window rows: every output must still match the spec
    (nothing reads a slot before it is written), and the request that kept running is unaffected."""
    reference_kernels.install(monkeypatch)
    stack = Stack(model_factory("backend", num_layers=NUM_LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D),
                  pool_pages=80)
    a = stack.request("a", _tokens(11, 330))
    b = stack.request("b", _tokens(12, 420))
    c = stack.request("c", _tokens(13, 260))
    stack.step([(a, 200, None), (b, 200, None)])
    stack.step([(a, 130, None), (b, 100, None), (c, 200, None)])  # b is aborted before its last 120 tokens
    stack.step([(a, 1, None), (c, 60, None)])
    for _ in range(3):
        stack.step([(a, 1, None), (c, 1, None)])
    held = {r.request_id: {bid for group in stack.mgr.get_block_ids(r.request_id) for bid in group} for r in (b, c)}
    for aborted in (b, c):  # b mid-prefill, c mid-decode
        stack.mgr.free(aborted)
    pool = stack.mgr.block_pool
    # The 80-page pool leaves d and e no choice but the aborted requests' pages (evicting their prefix-cache
    # entries); d and e share no tokens with b or c, so nothing is a hit.
    d = stack.request("d", _tokens(14, 380))
    e = stack.request("e", _tokens(15, 300))
    stack.step([(a, 1, None), (d, 200, None), (e, 200, None)])
    stack.step([(a, 1, None), (d, 180, None), (e, 100, None)])
    for _ in range(4):
        stack.step([(a, 1, None), (d, 1, None), (e, 1, None)])
    reused = {bid for r in (d, e) for group in stack.mgr.get_block_ids(r.request_id) for bid in group}
    assert reused & (held["b"] | held["c"]), "the pool never handed out an aborted request's page: test is vacuous"
    stats = stack.check()
    assert stats["tokens_with_int2"] > 100
    assert stats["int2_effect"] > 5 * stats["max_err"]
    for r in (a, d, e):
        stack.mgr.free(r)
    assert pool.get_num_free_blocks() == stack.kv.num_blocks - 1  # every page back (one is vLLM's null page)
