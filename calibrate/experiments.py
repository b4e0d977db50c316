"""The accuracy-variant sweep (issue 6): statistics, captures, proxy screening and perplexity.

``python -m vllm_oscar.calibrate.experiments --help``. Everything is tuned on the calibration text
(``shakespeare:comedies``) or the dev split (``shakespeare:problems``); the held-out sets
(``shakespeare:tragedies``, ``shakespeare:histories`` and a modern-English set) are only evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from vllm_oscar.calibrate import variants as V
from vllm_oscar.calibrate.capture import attention_override, causal_sdpa, layer_index
from vllm_oscar.calibrate.pipeline import exact_passes
from vllm_oscar.ops import reference as ref

DEV_SET = "shakespeare:problems"
CALIBRATION_SET = "shakespeare:comedies"
HELDOUT_SETS = ("shakespeare:tragedies", "shakespeare:histories")
#: modern English: the Lee news corpus (Australian Broadcasting Corporation news, 2000s) that
#: gensim ships as test data (``gensim/test/test_data/lee_background.cor``), taken from the PyPI wheel.
MODERN_PACKAGE = "gensim==4.4.0"
MODERN_MEMBER = "gensim/test/test_data/lee_background.cor"
DEFAULT_CACHE = Path.home() / ".cache" / "vllm-oscar" / "text"


def modern_english_text(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the modern-English held-out text, extracted from the gensim wheel (downloaded with
    ``pip download --no-deps``, never installed) on first use."""
    out = cache / "lee_background.txt"
    if out.is_file():
        return out
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        MODERN_PACKAGE, "-d", tmp], check=True, capture_output=True)
        wheel = next(Path(tmp).glob("gensim-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            text = z.read(MODERN_MEMBER).decode("utf-8")
    # one news story per line: keep them as paragraphs
    out.write_text("\n\n".join(line.strip() for line in text.splitlines() if line.strip()) + "\n")
    return out


def resolve_set(name: str) -> str:
    return str(modern_english_text()) if name == "modern:lee" else name


# --------------------------------------------------------------------------------------------------
# Statistics and captures
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def collect_stats(model, sequences: torch.Tensor, info, progress: bool = True) -> V.VariantStats:
    """One exact pass over ``sequences [N, T]`` accumulating :class:`variants.VariantStats`."""
    stats = V.VariantStats(info.num_layers, info.num_kv_heads, info.head_dim)

    def hook(module, q, k, v):
        o = causal_sdpa(module, q, k, v)
        stats.add(layer_index(module), q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), o[0])
        return o

    exact_passes(model, sequences, hook, "stats", progress)
    return stats


@torch.inference_mode()
def collect_weighted_stats(model, sequences: torch.Tensor, stats: V.VariantStats, *, sink: int = 64,
                           recent: int = 256, k_weight: str = "p2", progress: bool = True) -> V.VariantStats:
    """Add attention-weighted K/V moments (:func:`variants.attention_token_weights`) to ``stats``."""

    def hook(module, q, k, v):
        q_, k_, v_ = (x[0].transpose(0, 1) for x in (q, k, v))
        wk, wv = V.attention_token_weights(q_, k_, v_, module.scaling, sink=sink, recent=recent,
                                           k_weight=k_weight)
        stats.add_weighted(layer_index(module), k_, v_, wk, wv)
        return causal_sdpa(module, q, k, v)

    exact_passes(model, sequences, hook, "weighted stats", progress)
    return stats


@torch.inference_mode()
def collect_channel_stats(model, sequences: torch.Tensor, info, progress: bool = True) -> V.ChannelStats:
    """One exact pass over ``sequences [N, T]`` accumulating :class:`variants.ChannelStats`."""
    stats = V.ChannelStats(info.num_layers, info.num_kv_heads, info.head_dim)

    def hook(module, q, k, v):
        stats.add(layer_index(module), k[0].transpose(0, 1), v[0].transpose(0, 1))
        return causal_sdpa(module, q, k, v)

    exact_passes(model, sequences, hook, "channel stats", progress)
    return stats


@torch.inference_mode()
def capture(model, seq: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(q [T,Hq,d], k [T,Hkv,d], v [T,Hkv,d])]`` per layer from one exact forward of ``seq [T]``."""
    out: dict[int, tuple] = {}

    def hook(module, q, k, v):
        out[layer_index(module)] = tuple(x[0].transpose(0, 1).float().clone() for x in (q, k, v))
        return causal_sdpa(module, q, k, v)

    with attention_override(model, hook):
        model.get_decoder()(seq[None])
    return [out[i] for i in range(len(out))]


def o_proj_weights(model) -> list[torch.Tensor]:
    return [layer.self_attn.o_proj.weight.detach().float() for layer in model.get_decoder().layers]


def proxy_errors(captures, transforms, variant: V.AttentionVariant, w_os, scale, q_start: int = 512,
                 q_stride: int = 4, o_refs=None) -> list[float]:
    """Per-layer proxy error (relative, after ``o_proj``) averaged over the captured sequences, on
    every ``q_stride``-th query from ``q_start`` (``o_refs[c][i]``: cached exact outputs)."""
    errs = []
    for i, t in enumerate(transforms):
        ks, vs = variant.specs(i)
        e = [V.layer_proxy_error(c[i][0], c[i][1], c[i][2], t, ks, vs, w_os[i], scale, sink=variant.sink,
                                 recent=variant.recent, q_start=q_start, q_stride=q_stride,
                                 o_ref=None if o_refs is None else o_refs[n][i])
             for n, c in enumerate(captures)]
        errs.append(sum(e) / len(e))
    return errs


def exact_outputs(captures, scale, q_start: int = 512, q_stride: int = 4):
    """``[capture][layer]`` exact attention outputs at the proxy's query positions."""
    return [[V.exact_attention(q, k, v, scale)[q_start::q_stride] for q, k, v in c] for c in captures]


@torch.inference_mode()
def perplexity(model, sequences: torch.Tensor, attention_fn) -> tuple[float, float]:
    """``(ppl, nll_sum)`` over ``sequences [N, T]``."""
    nll, count = 0.0, 0
    with attention_override(model, attention_fn):
        for seq in sequences:
            logits = model(seq[None]).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, seq[1:], reduction="sum"))
            count += seq.numel() - 1
    return math.exp(nll / count), nll


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------

MSE = V.QuantSpec("mse", 0.0, "fp16")
MSE_LOG8 = V.QuantSpec("mse", 0.0, "log8_i8")
MSE_U8 = V.QuantSpec("mse", 0.0, "u8")  # the served u8 pair; 2-bit rows get the store kernel's own fit
MINMAX = V.QuantSpec("minmax", 0.0, "fp16")  # KIVI's quantizer: min-max, no clipping, fp16 scale + zero
PAPER = V.AttentionVariant()  # minmax, clip 0.96/0.92, fp16 scale+offset, 64+256 windows


class Setup:
    """Model, faithful artifact, calibration statistics and captures, computed once and cached."""

    def __init__(self, args, lm=None):
        from vllm_oscar.calibrate.data import token_sequences  # noqa: PLC0415
        from vllm_oscar.calibrate.models import load_model  # noqa: PLC0415

        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.lm = load_model("smollm2") if lm is None else lm
        self.info = self.lm.info
        self._rotations = args.rotations
        self._cal = token_sequences(self.lm.tokenizer, CALIBRATION_SET, 2048, 16)
        self._captures = self._artifact = None
        self._stats = self._per_head = self._imp_v = self._channel = None
        self._k_scores: dict[int, dict] = {}  # per target key width (k_scores)

    @property
    def artifact(self):
        """The faithful artifact (``--rotations``, else calibrated here once), loaded on first use: the
        data-free variants (Hadamard, identity) never need it."""
        from vllm_oscar.calibrate.pipeline import calibrate  # noqa: PLC0415
        from vllm_oscar.hub import load_rotations  # noqa: PLC0415

        if self._artifact is None:
            if self._rotations:
                self._artifact = load_rotations(self._rotations)
            else:
                art_dir = self.work / "faithful-artifact"
                if not (art_dir / "oscar_config.json").is_file():
                    calibrate(self.lm.model, self._cal, self.info, source=CALIBRATION_SET).save(art_dir)
                self._artifact = load_rotations(str(art_dir))
        return self._artifact

    # calibration statistics, each computed on first use and cached in the work directory ---------
    @property
    def stats(self) -> V.VariantStats:
        if self._stats is not None:
            return self._stats
        info, cal = self.info, self._cal
        stats_file = self.work / "variant-stats.pt"
        keys = ("qq", "q_rows", "k_sum", "kk", "v_sum", "vv", "oo", "tokens",
                "kkw", "vvw", "kw_sum", "vw_sum", "k_wtot", "v_wtot")
        self._stats = V.VariantStats(info.num_layers, info.num_kv_heads, info.head_dim)
        if stats_file.is_file():
            for k, v in torch.load(stats_file).items():
                setattr(self._stats, k, v)
        else:
            print("statistics: 16 x 2048 comedies tokens (+ attention-weighted on every other)",
                  file=sys.stderr)
            self._stats = collect_stats(self.lm.model, cal, info)
            collect_weighted_stats(self.lm.model, cal[::2], self._stats, k_weight="p2dv")
            torch.save({k: getattr(self._stats, k) for k in keys}, stats_file)
        return self._stats

    @property
    def per_head(self) -> dict:
        from vllm_oscar.calibrate.pipeline import collect_moments

        if self._per_head is not None:
            return self._per_head
        info, cal = self.info, self._cal
        heads_file = self.work / "paper-per-head.pt"
        if heads_file.is_file():
            self._per_head = torch.load(heads_file)
        else:  # the faithful targets per KV group (two passes, as the calibrator does)
            moments = collect_moments(self.lm.model, cal, info, progress=False)
            groups = range(info.num_kv_heads)
            rk = torch.stack([torch.stack([ref.fit_rotation(m.qq_sum[g] / m.q_rows)[0] for g in groups])
                              for m in moments])
            rv = torch.stack([torch.stack([ref.fit_rotation(m.wvv_sum[g] / m.w_sum[g].clamp(min=1e-12))[0]
                                           for g in groups]) for m in moments])
            self._per_head = {"k": rk.float(), "v": rv.float()}
            torch.save(self._per_head, heads_file)
        return self._per_head

    @property
    def imp_v(self) -> torch.Tensor:
        if self._imp_v is None:
            self._imp_v = V.o_proj_importance(self.lm.model, self.info.num_kv_heads, self.info.head_dim)
        return self._imp_v

    @property
    def channel(self) -> V.ChannelStats:
        """Plain per-channel K/V statistics of the 16 calibration sequences (one exact pass)."""
        if self._channel is not None:
            return self._channel
        info = self.info
        shape = (info.num_layers, info.num_kv_heads, info.head_dim)
        f = self.work / "channel-stats.pt"
        if f.is_file():
            self._channel = V.ChannelStats.from_state(*shape, torch.load(f))
        else:
            print(f"channel statistics: {self._cal.shape[0]} x {self._cal.shape[1]} calibration tokens", file=sys.stderr)
            self._channel = collect_channel_stats(self.lm.model, self._cal, info)
            torch.save(self._channel.state(), f)
        return self._channel

    def captures(self):
        if self._captures is None:
            self._captures = [capture(self.lm.model, self._cal[i]) for i in (3, 11)]
        return self._captures

    def k_scores(self, high: int = 3) -> dict:
        """Per layer, the drop of the attention-output proxy error when that layer's keys go from 2 to
        ``high`` bits (Hadamard, MSE grid, log8 pairs, V 2-bit, 64 + 256 windows), on the two 2048-token
        calibration captures, queries from position 1024 (:func:`variants.k_bits_sensitivity`).
        Calibration text only; cached in the work directory as ``k{high}-layer-scores.json``."""
        if high in self._k_scores:
            return self._k_scores[high]
        f = self.work / f"k{high}-layer-scores.json"
        if f.is_file():
            self._k_scores[high] = json.loads(f.read_text())
            return self._k_scores[high]
        t0 = time.time()
        q_start, q_stride = 1024, 4
        rec = V.k_bits_sensitivity(self.captures(), self.orthogonal("hadamard"),
                                   V.AttentionVariant(k=MSE_LOG8, v=MSE_LOG8), o_proj_weights(self.lm.model),
                                   self.info.head_dim ** -0.5, low=2, high=high, q_start=q_start,
                                   q_stride=q_stride)
        self._k_scores[high] = {
            "data": f"{CALIBRATION_SET}, calibration sequences 3 and 11 (2 x 2048 tokens)",
            "proxy": f"layer_proxy_error summed over the 2 captures, every {q_stride}th query from {q_start}; "
                     "Hadamard, MSE grid, log8_i8 pairs, V 2-bit, 64 + 256 windows",
            "proxy_k2": [r["low"] for r in rec], f"proxy_k{high}": [r["high"] for r in rec],
            "drop": [r["drop"] for r in rec], "seconds": round(time.time() - t0, 1)}
        f.write_text(json.dumps(self._k_scores[high], indent=2) + "\n")
        return self._k_scores[high]

    def k_layers(self, rule: str, n: int, high: int = 3) -> tuple[int, ...]:
        """``n`` layers for ``high``-bit keys: ``top`` = the largest :meth:`k_scores` drops from 2 to
        ``high`` bits, ``even`` = evenly spaced (the naive control, no data)."""
        if rule == "top":
            return V.top_layers(self.k_scores(high)["drop"], n)
        if rule == "even":
            return V.even_layers(self.info.num_layers, n)
        raise ValueError(rule)

    # transforms ------------------------------------------------------------------------------------
    def orthogonal(self, which: str) -> list[V.LayerTransform]:
        h = self.info.num_kv_heads
        if which == "hadamard":
            had = ref.hadamard(self.info.head_dim, torch.float32)
            return [V.LayerTransform.orthogonal(had, had, h) for _ in range(self.info.num_layers)]
        if which in ("none", "knone_vhad"):  # the model's own channels (knone_vhad: V Hadamard)
            eye = torch.eye(self.info.head_dim)
            rv = ref.hadamard(self.info.head_dim, torch.float32) if which == "knone_vhad" else eye
            return [V.LayerTransform.orthogonal(eye, rv, h) for _ in range(self.info.num_layers)]
        if which == "paper":
            a = self.artifact
            return [V.LayerTransform.orthogonal(a.k_rotation[i], a.v_rotation[i], h)
                    for i in range(a.num_layers)]
        if which == "paper_per_head":
            return [V.LayerTransform.orthogonal(self.per_head["k"][i], self.per_head["v"][i], h)
                    for i in range(self.info.num_layers)]
        if which == "paper_softmax_v":
            tv = V.fit_transforms(self.stats, "oscar", "oscar_softmax_v")
            a = self.artifact
            return [V.LayerTransform.orthogonal(a.k_rotation[i], tv[i].v_store, h)
                    for i in range(a.num_layers)]
        if which == "qeig":  # K: eigenvectors of each KV group's Sigma_Q (no Hadamard); V: Hadamard
            u = V.query_eigenbasis(self.stats.sigma_q()).float()
            had = ref.hadamard(self.info.head_dim, torch.float32).expand(h, -1, -1)
            return [V.LayerTransform.orthogonal(u[i], had, h) for i in range(self.info.num_layers)]
        raise ValueError(which)

    def weighted(self, kind: str, v: bool = False, full: bool = False) -> list[V.LayerTransform]:
        """``kind`` rotations (``orthogonal``) with the per-dimension weights of the weighted grid fit,
        from the calibration text only: K = the calibration queries' second moment along each stored
        coordinate (:func:`variants.query_weights`; ``full``: the whole matrix,
        :func:`variants.query_moment_matrix`), V (if ``v``) = the output projection's importance
        (:func:`variants.output_weights`)."""
        base = self.orthogonal(kind)
        sq = self.stats.sigma_q()
        kw = V.query_moment_matrix(sq, base) if full else V.query_weights(sq, base)
        vw = V.output_weights(self.imp_v, base) if v else None
        return V.with_weights(base, kw, vw)

    def centered(self, kind: str) -> list[V.LayerTransform]:
        """Attention-weighted K and V means removed; ``kind`` = hadamard | paper | importance."""
        kw = dict(weighted=True, center_k=True, center_v=True, v_importance=self.imp_v)
        if kind == "paper":
            return V.fit_transforms(self.stats, "oscar", "oscar", artifact=self.artifact, **kw)
        return V.fit_transforms(self.stats, kind, kind, **kw)

    def channel_centered(self, kind: str, estimator: str, sides: str) -> list[V.LayerTransform]:
        """``kind`` (hadamard | paper) rotations with plain per-channel means of the calibration text
        removed from the ``sides`` (``"k"``, ``"v"`` or ``"kv"``). ``estimator``: ``mean`` (every
        token), ``mean64`` (tokens at positions >= 64 of each sequence: the BF16 sink window and its
        attention-sink token 0 left out), ``med`` (coordinate-wise median in the rotated basis,
        positions >= 64)."""
        base = self.orthogonal(kind)
        ch = self.channel

        def mu(side):
            if side not in sides:
                return None
            if estimator == "mean":
                return ch.mean(side)
            if estimator == "mean64":
                return ch.mean(side, skip=64)
            if estimator == "med":
                basis = torch.stack([t.k_store if side == "k" else t.v_store for t in base])
                return ch.median(side, basis)
            raise ValueError(estimator)

        return V.with_means(base, mu("k"), mu("v"))

    def channel_selected(self, kind: str, estimator: str, variant: V.AttentionVariant) -> list[V.LayerTransform]:
        """Per layer and side, keep the plain channel mean (``channel_centered``) only where it lowers
        the attention-output proxy on the two calibration captures: K judged with V unquantized, V with
        K unquantized (the other side's centering is then exact, so one centered transform serves both)."""
        base = self.orthogonal(kind)
        full = self.channel_centered(kind, estimator, "kv")
        caps, w_os, scale = self.captures(), o_proj_weights(self.lm.model), self.info.head_dim ** -0.5
        o_refs = exact_outputs(caps, scale)
        kvar, vvar = replace(variant, v=None), replace(variant, k=None)
        k0, k1 = (proxy_errors(caps, t, kvar, w_os, scale, o_refs=o_refs) for t in (base, full))
        v0, v1 = (proxy_errors(caps, t, vvar, w_os, scale, o_refs=o_refs) for t in (base, full))
        return [replace(b, k_mean=f.k_mean if k1[i] < k0[i] else None, v_mean=f.v_mean if v1[i] < v0[i] else None)
                for i, (b, f) in enumerate(zip(base, full, strict=True))]


def variant_registry() -> dict[str, dict]:
    """name -> {description, transforms(setup) (None = exact attention), variant(setup), passkey_only}.

    ``passkey_only``: the variant needs an exact prompt prefill (pinned tokens), which only the passkey
    harness's ``exact_prefill`` semantics has; the perplexity sweep cannot run it."""
    def entry(description, transforms, variant=lambda s: PAPER, passkey_only=False):
        return {"description": description, "transforms": transforms, "variant": variant,
                "passkey_only": passkey_only}

    def orth(which):
        return lambda s: s.orthogonal(which)

    def cent(kind):
        return lambda s: s.centered(kind)

    def mse(s):
        return V.AttentionVariant(k=MSE, v=MSE)

    def k_only(s):  # V kept at 16 bits: what quantizing K alone costs
        return V.AttentionVariant(k=MSE, v=None)

    def v_only(s):  # K kept at 16 bits
        return V.AttentionVariant(k=None, v=MSE)

    def log8(s):
        return V.AttentionVariant(k=MSE_LOG8, v=MSE_LOG8)

    def log8_bits(kb, vb):  # a different split of the code bits between K and V
        return lambda s: V.AttentionVariant(k=replace(MSE_LOG8, bits=kb), v=replace(MSE_LOG8, bits=vb))

    def wide_k(spec, rule, n, high=3):  # high-bit K in n layers (k_layers), 2-bit K elsewhere, 2-bit V; spec's pairs
        return lambda s: V.AttentionVariant(k=spec, v=spec, k_bits=V.layer_bits(
            s.info.num_layers, s.k_layers(rule, n, high), high=high))

    def u8(s):
        return V.AttentionVariant(k=MSE_U8, v=MSE_U8)

    def log8_r512(s):
        return V.AttentionVariant(k=MSE_LOG8, v=MSE_LOG8, recent=512)

    def kch(k, v, group=128):  # K per channel over `group`-token groups (KIVI), V per token
        return lambda s: V.AttentionVariant(k=replace(k, token_group=group), v=v)

    def lloyd_max(s):
        return V.AttentionVariant(k=V.QuantSpec("lm", 0.96), v=V.QuantSpec("lm", 0.92))

    def clip_searched(s):
        k, v = V.search_clip_ratios(s.captures(), s.orthogonal("paper"), PAPER, o_proj_weights(s.lm.model),
                                    0.125)
        return replace_variant(PAPER, k_clips=k, v_clips=v)

    def logit_var(lam):
        return lambda s: V.AttentionVariant(k=MSE, v=MSE, k_logit_var=lam)

    def pinned(count, pool=1):
        return lambda s: V.AttentionVariant(k=MSE, v=MSE, pin_tokens=count, pin_pool=pool)

    def pin_entry(description, count, pool=1):
        return entry(description, orth("hadamard"), pinned(count, pool), passkey_only=True)

    def exit_pinned(count, pool=1):
        return lambda s: V.AttentionVariant(k=MSE, v=MSE, pin_tokens=count, pin_pool=pool, pin_rule="window_exit")

    def wfit(k_mode, v_mode="none"):
        return lambda s: V.AttentionVariant(k=replace(MSE, weighting=k_mode), v=replace(MSE, weighting=v_mode))

    def wtr(kind, v=False, full=False):
        return lambda s: s.weighted(kind, v=v, full=full)

    def chan(kind, estimator, sides, var):
        if sides == "sel":
            return lambda s: s.channel_selected(kind, estimator, var(s))
        return lambda s: s.channel_centered(kind, estimator, sides)

    reg = {
        "exact": entry("no quantization", None, lambda s: None),
        "paper": entry("faithful OSCAR: calibrated per-layer R = U H P_br, clip 0.96/0.92, min-max INT2, "
                       "fp16 scale+offset, 64+256 BF16 windows", orth("paper")),
        "hadamard": entry("data-free Hadamard, otherwise the paper (same clipping, quantizer, windows)",
                          orth("hadamard")),
        "paper_per_head": entry("(1) the paper's targets fitted per KV head", orth("paper_per_head")),
        "paper_clip_search": entry("(2) paper rotations, per-layer K/V clip ratios minimizing the "
                                   "attention-output error on calibration captures", orth("paper"),
                                   clip_searched),
        "paper_softmax_v": entry("(3) paper K rotation, V rotation from the true softmax target (SV)^T(SV)/N",
                                 orth("paper_softmax_v")),
        "paper_lloyd_max": entry("(4) paper rotations + the authors' Lloyd-Max levels (ratio 1.16) after "
                                 "clipping", orth("paper"), lloyd_max),
        "hadamard_mse": entry("(4) Hadamard + MSE-fitted affine grid per row (no clipping), fp16 "
                              "scale+offset", orth("hadamard"), mse),
        "hadamard_mse_k_only": entry("attribution: hadamard_mse with only K quantized (V at 16 bits)",
                                     orth("hadamard"), k_only),
        "hadamard_mse_v_only": entry("attribution: hadamard_mse with only V quantized (K at 16 bits)",
                                     orth("hadamard"), v_only),
        "hadamard_mse_logitvar04": entry("(6) hadamard_mse + softmax logit-variance correction, lambda 0.4 "
                                         "(needs each row's mean squared K error: +16 bits/row if stored)",
                                         orth("hadamard"), logit_var(0.4)),
        "hadamard_mse_logitvar10": entry("(6) as hadamard_mse_logitvar04 with lambda 1 (the Gaussian-noise "
                                         "value)", orth("hadamard"), logit_var(1.0)),
        "hadamard_mse_logitvar_m10": entry("(6) the opposite sign, lambda -1 (INT2 keys' logits raised: the "
                                           "correction for an error independent of the reconstruction)",
                                           orth("hadamard"), logit_var(-1.0)),
        "hadamard_mse_pin32": pin_entry("(6) hadamard_mse + the 32 prompt tokens per (layer, KV head) that the "
                                        "prompt's last 32 queries attend to most, read exactly (SnapKV-style; "
                                        "needs an exact prefill: passkey only)", 32),
        "hadamard_mse_pin128": pin_entry("(6) as hadamard_mse_pin32 with 128 tokens", 128),
        "hadamard_mse_pin32_pool7": pin_entry("(6) as hadamard_mse_pin32, scores averaged over 7 neighbours "
                                              "(keeps a pinned token's neighbours)", 32, 7),
        "hadamard_mse_pin128_pool7": pin_entry("(6) as hadamard_mse_pin32_pool7 with 128 tokens", 128, 7),
        "hadamard_mse_exitpin128": entry("(6) hadamard_mse + 128 tokens per (layer, KV head) read exactly, chosen "
                                         "causally as tokens leave the recent window by the attention they "
                                         "received in it (H2O-like, pin_rule window_exit)", orth("hadamard"),
                                         exit_pinned(128)),
        "hadamard_mse_exitpin128_pool7": entry("(6) as hadamard_mse_exitpin128, scores averaged over 7 "
                                               "neighbours", orth("hadamard"), exit_pinned(128, 7)),
        "hadamard_mse_log8": entry("data-free: Hadamard + MSE grid with 8-bit log scale + 8-bit offset "
                                   "(16 bits/row)", orth("hadamard"), log8),
        "hadamard_mse_log8_k3v1": entry("(5) hadamard_mse_log8 with 3-bit K and 1-bit V codes: the same 2 code "
                                        "bits per element on average, moved to the keys (the 4096 gap is K's)",
                                        orth("hadamard"), log8_bits(3, 1)),
        "hadamard_mse_log8_k3v2": entry("reference point over budget: hadamard_mse_log8 with 3-bit K, 2-bit V "
                                        "(2.5 code bits per element)", orth("hadamard"), log8_bits(3, 2)),
        # 3-bit keys in a few layers (k_bits): the layers chosen on calibration captures only
        # (Setup.k_scores(3)) or evenly spaced (control). Bits at 32K for 30 layers, head_dim 64.
        "hadamard_mse_log8_k3top6": entry("hadamard_mse_log8 with 3-bit K in the 6 layers whose calibration proxy "
                                          "error drops most from 2- to 3-bit keys (Setup.k_scores(3); layers in "
                                          "config.k_bits), 2-bit K elsewhere (2.483 bits at 32K)",
                                          orth("hadamard"), wide_k(MSE_LOG8, "top", 6)),
        "hadamard_mse_log8_k3even6": entry("control: hadamard_mse_log8 with 3-bit K in 6 evenly spaced layers (2, 7, "
                                           "12, 17, 22, 27) (2.483 bits at 32K)", orth("hadamard"),
                                           wide_k(MSE_LOG8, "even", 6)),
        "hadamard_mse_log8_k3top4": entry("as hadamard_mse_log8_k3top6 with the 4 top layers (2.450 bits at 32K)",
                                          orth("hadamard"), wide_k(MSE_LOG8, "top", 4)),
        "hadamard_mse_log8_k3top8": entry("as hadamard_mse_log8_k3top6 with the 8 top layers (2.516 bits at 32K: "
                                          "over budget)", orth("hadamard"), wide_k(MSE_LOG8, "top", 8)),
        # 4-bit (nibble) keys in fewer layers at the same bits: 4-bit K in 3 layers costs what 3-bit K in 6
        # does. Layers ranked by the proxy drop from 2- to 4-bit keys (Setup.k_scores(4)), calibration only.
        "hadamard_mse_log8_k4top3": entry(
            "hadamard_mse_log8 with 4-bit K in the 3 layers whose calibration proxy error drops most from "
            "2- to 4-bit keys (Setup.k_scores(4); layers in config.k_bits), 2-bit K elsewhere (2.483 bits "
            "at 32K, as k3top6)", orth("hadamard"), wide_k(MSE_LOG8, "top", 3, 4)),
        "hadamard_mse_log8_k4top2": entry(
            "as hadamard_mse_log8_k4top3 with the 2 top layers (2.450 bits at 32K, as k3top4)",
            orth("hadamard"), wide_k(MSE_LOG8, "top", 2, 4)),
        # The served 2-byte pair (params="u8", reference.round_params_u8) instead of log8_i8: 2-bit rows use
        # the store kernel's fit (reference.quantize_int2_mse), i.e. the eval method hadamard_mse_u8.
        "hadamard_mse_u8": entry("the served hadamard_mse_u8 as a variant: Hadamard + the store kernel's MSE grid, "
                                 "u8 (scale, offset) pairs (16 bits/row), 2-bit K and V, 64+256 windows "
                                 "(2.384 bits at 32K)", orth("hadamard"), u8),
        "hadamard_mse_u8_k3top6": entry("hadamard_mse_u8 with 3-bit K in hadamard_mse_log8_k3top6's 6 layers "
                                        "(Setup.k_layers('top', 6, 3)); the 3-bit rows keep the u8 pair "
                                        "(2.483 bits at 32K)", orth("hadamard"), wide_k(MSE_U8, "top", 6)),
        "hadamard_mse_log8_r512": entry("(5) data-free: hadamard_mse_log8 with the saved bits spent on a "
                                        "512-token recent window", orth("hadamard"), log8_r512),
        # Per-channel key groups (KIVI, arXiv 2402.02750): K quantized per channel over 128 (64, 256, 32)
        # token positions aligned at the sink, one fp16 pair per channel and group; V per token as named.
        # Bits per element at 32K for head_dim 64 (up to G - 1 K tokens held twice, variants.bits_per_element).
        "none_mse": entry("control for the *_kch* rows: no rotation (the model's channels), MSE grid per row, "
                          "fp16 (2.632 bits at 32K)", orth("none"), mse),
        "kivi_k128": entry("KIVI-2 with our 64+256 windows: no rotation, K min-max per channel over 128-token "
                           "groups, V min-max per token, fp16 pairs, no clipping (2.510 bits at 32K)",
                           orth("none"), kch(MINMAX, MINMAX)),
        "hadamard_mse_kch128": entry("hadamard_mse with K per channel over 128-token groups (MSE grid per "
                                     "channel and group), V per token (2.510 bits at 32K)",
                                     orth("hadamard"), kch(MSE, MSE)),
        "none_mse_kch128": entry("no rotation, K per channel over 128-token groups, V per token, MSE grids, fp16 "
                                 "(2.510 bits at 32K)", orth("none"), kch(MSE, MSE)),
        "knone_vhad_mse_kch128": entry("K unrotated per channel over 128-token groups, V Hadamard per token (the "
                                       "default's V), MSE grids, fp16 (2.510 bits at 32K)",
                                       orth("knone_vhad"), kch(MSE, MSE)),
        "hadamard_mse_kch64": entry("hadamard_mse_kch128 with 64-token K groups (2.632 bits at 32K, as the "
                                    "default)", orth("hadamard"), kch(MSE, MSE, 64)),
        "hadamard_mse_kch256": entry("hadamard_mse_kch128 with 256-token K groups (= the recent window; 2.448 "
                                     "bits at 32K)", orth("hadamard"), kch(MSE, MSE, 256)),
        "hadamard_mse_kch128_vlog8": entry("hadamard_mse_kch128 with V's pair as 8-bit log scale + 8-bit offset "
                                           "(2.386 bits at 32K)", orth("hadamard"), kch(MSE, MSE_LOG8)),
        "kivi_k32": entry("reference over budget: kivi_k128 with KIVI's own 32-token K groups (2.879 bits at "
                          "32K)", orth("none"), kch(MINMAX, MINMAX, 32)),
        "paper_mse": entry("(4) paper rotations + MSE-fitted grid, fp16", orth("paper"), mse),
        "hadamard_wc_mse": entry("(6) Hadamard, attention-weighted K/V means removed (calibrated), MSE grid, "
                                 "fp16", cent("hadamard"), mse),
        "paper_wc_mse": entry("(6) paper rotations + weighted means removed + MSE grid, fp16",
                              cent("paper"), mse),
        "importance_wc_mse": entry("(6) weighted means removed, importance transform G^1/2 H, MSE grid, fp16",
                                   cent("importance"), mse),
        "paper_wc_mse_log8": entry("paper_wc_mse with 8-bit log scale + 8-bit offset (16 bits/row)",
                                   cent("paper"), log8),
        "hadamard_wc_mse_log8": entry("hadamard_wc_mse with 8-bit log scale + 8-bit offset (16 bits/row)",
                                      cent("hadamard"), log8),
        "importance_wc_mse_log8": entry("importance_wc_mse with 8-bit log scale + 8-bit offset (16 bits/row)",
                                        cent("importance"), log8),
        "paper_wc_mse_log8_r512": entry("(5) paper_wc_mse_log8 with the saved bits spent on a 512-token "
                                        "recent window", cent("paper"), log8_r512),
    }
    # Attention-aware (weighted) grid fit: {rotation}_{kw|kws|kwfull|kvws}_mse. K rows fitted by least
    # squares weighted with the calibration queries' second moment per stored coordinate (kw: the line
    # fit only; kws: also a weighted start and the weighted error picks the candidate; kwfull: the
    # whole query second-moment matrix as the quadratic form); kvws: V too, weighted by W_o's importance.
    rot_desc = {"hadamard": "Hadamard", "paper": "paper (calibrated U H P_br) rotations",
                "qeig": "K in the eigenbasis of each KV group's Sigma_Q (no Hadamard; V Hadamard)"}
    reg["qeig_mse"] = entry(f"{rot_desc['qeig']} + MSE grid (unweighted)", orth("qeig"), mse)
    for kind, rdesc in rot_desc.items():
        reg[f"{kind}_kw_mse"] = entry(f"{rdesc}; K: MSE grid with the line fit weighted by diag(Sigma_Q) in "
                                      "the stored basis; V: MSE grid", wtr(kind), wfit("fit"))
        reg[f"{kind}_kws_mse"] = entry(f"{rdesc}; K: weighted fit + weighted Lloyd-Max start + candidate with "
                                       "the smallest weighted error; V: MSE grid", wtr(kind), wfit("fit_select"))
        reg[f"{kind}_kwfull_mse"] = entry(f"{rdesc}; K: fit and choice minimize e^T Sigma_Q' e (whole matrix); "
                                          "V: MSE grid", wtr(kind, full=True), wfit("full"))
        reg[f"{kind}_kvws_mse"] = entry(f"{rdesc}; K as kws; V: weighted fit/choice with diag(W_o importance)",
                                        wtr(kind, v=True), wfit("fit_select", "fit_select"))
    # Plain per-channel centering (issue: K's constant per-channel bias): {rotation}_c{sides}_{estimator}
    # [_mse]; the means come from the calibration text only (ChannelStats, one exact pass).
    estimators = {"mean": "plain mean of every calibration token",
                  "mean64": "plain mean of the calibration tokens at positions >= 64 (sink window out)",
                  "med": "coordinate-wise median in the rotated basis (positions >= 64)"}
    side_names = {"kv": "K and V", "k": "K only", "v": "V only",
                  "sel": "K and/or V, per layer where it lowers the proxy on the calibration captures"}
    quantizers = (("hadamard", "_mse", mse, "Hadamard + MSE grid"),
                  ("hadamard", "", lambda s: PAPER, "Hadamard + paper quantizer (min-max, clip 0.96/0.92)"),
                  ("paper", "", lambda s: PAPER, "paper rotations + paper quantizer (min-max, clip 0.96/0.92)"),
                  ("paper", "_mse", mse, "paper rotations + MSE grid"))
    for sides, sdesc in side_names.items():
        for est, edesc in estimators.items():
            for kind, suffix, var, qdesc in quantizers:
                reg[f"{kind}_c{sides}_{est}{suffix}"] = entry(
                    f"{qdesc}; per-channel centering of {sdesc}; center: {edesc}", chan(kind, est, sides, var), var)
    return reg


def _write_screen(out: Path, key: str, make) -> None:
    """``out[key] = make(out[key] or {})``; the file's other entries are kept."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[key] = make(results.get(key, {}))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def replace_variant(v: V.AttentionVariant, **kw) -> V.AttentionVariant:
    from dataclasses import replace  # noqa: PLC0415

    return replace(v, **kw)


def run_sweep(args) -> dict:
    from vllm_oscar.calibrate.data import token_sequences  # noqa: PLC0415

    registry = variant_registry()
    names = args.variants.split(",") if args.variants else [n for n in registry if not registry[n]["passkey_only"]]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {list(registry)}")
    passkey_only = [n for n in names if registry[n]["passkey_only"]]
    if passkey_only:
        raise SystemExit(f"variant(s) {passkey_only} choose pinned tokens from an exact prompt prefill, which the "
                         "perplexity sweep does not have: run them with `python -m vllm_oscar.calibrate.passkey "
                         "--methods v:NAME`")
    setup = Setup(args)
    out_path = Path(args.output_json)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.setdefault("variants", {})
    # without --rotations the file's earlier artifact stays recorded unless a variant here needs one
    calibrated_here = "calibrated by this command"
    results["settings"] = {
        "model": setup.info.id,
        "calibration": f"{CALIBRATION_SET}, 16 x 2048 tokens (weighted moments: 8 x 2048)",
        "faithful_artifact": (args.rotations
                              or results.get("settings", {}).get("faithful_artifact", calibrated_here)),
        "semantics": "teacher-forced; each token reads K/V outside the BF16 windows from INT2 (decode-like)",
    }
    sets = {s: token_sequences(setup.lm.tokenizer, resolve_set(s), args.seq_len, args.num_seqs)
            for s in args.eval_data}
    d = setup.info.head_dim
    for name in names:
        spec = registry[name]
        r = results["variants"].setdefault(name, {"description": spec["description"], "perplexity": {}})
        todo = [s for s in sets if f"{s}@{args.seq_len}" not in r["perplexity"]]
        if not todo:
            continue
        tr = spec["transforms"](setup) if spec["transforms"] else None
        var = spec["variant"](setup)
        if not args.rotations and setup._artifact is not None:
            results["settings"]["faithful_artifact"] = calibrated_here
        fn = causal_sdpa if tr is None else V.make_variant_attention(tr, var)
        if var is not None:
            r["bits_per_element"] = {f"at_{c}": round(var.bits(d, c, setup.info.num_layers), 4)
                                    for c in (2048, 4096, 32768)}
            r["config"] = var.config()
        else:
            r["bits_per_element"] = {f"at_{c}": 16.0 for c in (2048, 4096, 32768)}
        if var is not None and var.k_bits is not None:
            for w in sorted(set(var.k_bits) - {var.k.bits}):  # the wider-key layers and their scores
                r[f"k{w}_layers"] = [i for i, b in enumerate(var.k_bits) if b == w]
                if w in setup._k_scores:
                    results[f"k{w}_layer_scores"] = setup._k_scores[w]
        if tr is not None and any(t.k_mean is not None or t.v_mean is not None for t in tr):
            r["centered_layers"] = {"k": [i for i, t in enumerate(tr) if t.k_mean is not None],
                                    "v": [i for i, t in enumerate(tr) if t.v_mean is not None]}
        for s in todo:
            t0 = time.time()
            ppl, _ = perplexity(setup.lm.model, sets[s], fn)
            r["perplexity"][f"{s}@{args.seq_len}"] = ppl
            print(f"{name:28s} {s:28s} @{args.seq_len}: {ppl:.3f} ({time.time() - t0:.0f}s)", flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=2) + "\n")
    base = results["variants"].get("exact", {}).get("perplexity", {})
    for r in results["variants"].values():
        r["increase_over_exact_pct"] = {k: round(100 * (v / base[k] - 1), 2)
                                        for k, v in r["perplexity"].items() if k in base}
    results.setdefault("runs", []).append({"seq_len": args.seq_len, "num_seqs": args.num_seqs,
                                           "sets": list(sets), "variants": names})
    return results


def _avg(xs) -> float:
    return sum(xs) / len(xs)


def centering_screen(setup: Setup, dev_seqs: int = 2) -> dict:
    """Why per-channel centering helps or not, per layer, on ``dev_seqs`` captures of the dev split
    (the means come from the calibration text): the mean's share of the rows' energy, the squared
    INT2 error of the quantized rows (positions >= 64) with / without centering, plain and weighted
    per token by how much its error moves the attention outputs (:func:`variants.attention_token_weights`),
    and the attention-output proxy (K only, V only, K+V; every 4th query from 512)."""
    from vllm_oscar.calibrate.data import token_sequences

    seqs = token_sequences(setup.lm.tokenizer, DEV_SET, 2048, dev_seqs)
    caps = [capture(setup.lm.model, s) for s in seqs]
    w_os, scale = o_proj_weights(setup.lm.model), caps[0][0][0].shape[-1] ** -0.5
    o_refs = exact_outputs(caps, scale)
    # per token of each capture and layer: how much its INT2 error moves the attention outputs (the
    # weights of the *_wc_* means: K sum_q p_qt^2 ||v_t - o_q||^2, V sum_q p_qt^2, INT2-read pairs)
    weights = [[V.attention_token_weights(q, k, v, scale, sink=64, recent=256, k_weight="p2dv") for q, k, v in c]
               for c in caps]
    paper_k, paper_v = V.QuantSpec("minmax", 0.96), V.QuantSpec("minmax", 0.92)
    setups = {"hadamard_mse": ("hadamard", MSE, MSE), "paper": ("paper", paper_k, paper_v),
              "paper_mse": ("paper", MSE, MSE)}
    out = {"dev_set": f"{DEV_SET}, {dev_seqs} x 2048", "layers": setup.info.num_layers, "configs": {}}
    for cname, (kind, ks, vs) in setups.items():
        base = setup.orthogonal(kind)
        for est in ("none", "mean", "mean64", "med"):
            tr = base if est == "none" else setup.channel_centered(kind, est, "kv")
            rec: dict = {}
            for j, (side, spec) in enumerate((("k", ks), ("v", vs))):
                err, werr, energy, mean_energy = [], [], [], []
                for i, t in enumerate(tr):
                    e = we = en = me = 0.0
                    for n, c in enumerate(caps):
                        kt, vt = V.transformed_kv(c[i][1], c[i][2], t)
                        x = (kt if side == "k" else vt)[64:]
                        row_err = ((V.fake_quantize_variant(x, spec) - x) ** 2).sum(-1)  # [T - 64, Hkv]
                        e += float(row_err.sum())
                        we += float((row_err * weights[n][i][j][:, 64:].T).sum())
                        en += float((x * x).sum())
                        me += float((x.mean(0) ** 2).sum()) * x.shape[0]
                    err.append(e)
                    werr.append(we)
                    energy.append(en)
                    mean_energy.append(me)
                rec[f"{side}_int2_sq_error"] = err
                rec[f"{side}_int2_sq_error_attention_weighted"] = werr
                rec[f"{side}_energy"] = energy
                rec[f"{side}_mean_energy"] = mean_energy
            for label, var in (("kv", V.AttentionVariant(k=ks, v=vs)), ("k", V.AttentionVariant(k=ks, v=None)),
                               ("v", V.AttentionVariant(k=None, v=vs))):
                rec[f"proxy_{label}"] = proxy_errors(caps, tr, var, w_os, scale, o_refs=o_refs)
            out["configs"][f"{cname}/{est}"] = rec
            print(f"{cname:14s} {est:7s} proxy K+V {_avg(rec['proxy_kv']):.5f} K {_avg(rec['proxy_k']):.5f} "
                  f"V {_avg(rec['proxy_v']):.5f}  INT2 sq err K {sum(rec['k_int2_sq_error']):.4g} "
                  f"V {sum(rec['v_int2_sq_error']):.4g}", flush=True)
    return out


def score_errors(captures, transforms, kspec: V.QuantSpec, scale: float, *, sink: int = 64, recent: int = 256,
                 q_start: int = 512, q_stride: int = 4) -> list[dict]:
    """Per layer, the logit (score) error of INT2 keys over the (query, key) pairs read from INT2
    (outside the windows), for every ``q_stride``-th query from ``q_start``: ``rel`` = mean squared
    error / mean squared exact logit (same pairs), ``attn`` = the same mean weighted by the exact
    attention probability of each pair (the errors where the query actually looks)."""
    out = []
    for i, t in enumerate(transforms):
        num = den = anum = aden = 0.0
        for c in captures:
            q, k, v = c[i]
            kt, _ = V.transformed_kv(k, v, t)
            kq = V.fake_quantize_variant(kt, kspec, V._weights(kspec, t.k_weight, "K"))
            pos = torch.arange(q_start, q.shape[0], q_stride)
            qt = V._per_group(q[pos].float(), t.k_query).transpose(0, 1)  # [Hq, P, d]
            g = qt.shape[0] // kt.shape[1]
            kth = kt.transpose(0, 1).repeat_interleave(g, 0)
            kqh = kq.transpose(0, 1).repeat_interleave(g, 0)
            s_ex = (qt @ kth.transpose(1, 2)) * scale
            ds = (qt @ (kqh - kth).transpose(1, 2)) * scale
            causal, exact = ref.exact_window_mask(pos, q.shape[0], sink, recent)
            int2 = causal & ~exact
            p = torch.softmax(s_ex.masked_fill(~causal, float("-inf")), -1)
            num += float((ds * ds)[:, int2].sum())
            den += float((s_ex * s_ex)[:, int2].sum())
            pm = p.masked_fill(~int2, 0.0)
            anum += float((pm * ds * ds).sum())
            aden += float(pm.sum())
        out.append({"rel": num / den, "attn": anum / max(aden, 1e-30)})
    return out


def weighted_fit_screen(setup: Setup, names: list[str], dev_seqs: int = 2) -> dict:
    """Screen of the weighted grid fit on ``dev_seqs`` dev-split captures (held out from the
    calibration text that gives the weights): per variant and layer, the attention-output proxy
    (K only with V exact, and K+V) and the INT2 key logit errors (:func:`score_errors`)."""
    from vllm_oscar.calibrate.data import token_sequences

    registry = variant_registry()
    seqs = token_sequences(setup.lm.tokenizer, DEV_SET, 2048, dev_seqs)
    caps = [capture(setup.lm.model, s) for s in seqs]
    w_os, scale = o_proj_weights(setup.lm.model), setup.info.head_dim ** -0.5
    o_refs = exact_outputs(caps, scale)
    out = {"dev_set": f"{DEV_SET}, {dev_seqs} x 2048", "variants": {}}
    for name in names:
        t0 = time.time()
        tr = registry[name]["transforms"](setup)
        var = registry[name]["variant"](setup)
        rec = {"proxy_k": proxy_errors(caps, tr, replace(var, v=None), w_os, scale, o_refs=o_refs),
               "proxy_kv": proxy_errors(caps, tr, var, w_os, scale, o_refs=o_refs),
               "score_error": score_errors(caps, tr, var.k, scale, sink=var.sink, recent=var.recent)}
        out["variants"][name] = rec
        print(f"{name:24s} proxy K {_avg(rec['proxy_k']):.5f} K+V {_avg(rec['proxy_kv']):.5f} "
              f"logit err rel {_avg([e['rel'] for e in rec['score_error']]):.5f} "
              f"attn-weighted {_avg([e['attn'] for e in rec['score_error']]):.5f} ({time.time() - t0:.0f}s)",
              flush=True)
    return out


def format_table(results: dict, seq_len: int = 2048) -> str:
    """Markdown table (variant x held-out set, % over exact, bits/element) from a results file."""
    sets = []
    for r in results["variants"].values():
        for k in r["perplexity"]:
            s, ctx = k.rsplit("@", 1)
            if int(ctx) == seq_len and s not in sets:
                sets.append(s)
    short = {s: s.split(":")[-1] for s in sets}
    head = ["variant"] + [f"{short[s]} ppl (vs exact)" for s in sets] + [f"bits/elem @{seq_len}", "@32K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {n: i for i, n in enumerate(variant_registry())}
    for name, r in sorted(results["variants"].items(), key=lambda kv: order.get(kv[0], len(order))):
        if not any(f"{s}@{seq_len}" in r["perplexity"] for s in sets):
            continue
        cells = []
        for s in sets:
            key = f"{s}@{seq_len}"
            if key not in r["perplexity"]:
                cells.append("")
                continue
            base = results["variants"].get("exact", {}).get("perplexity", {}).get(key)
            inc = None if base is None else 100 * (r["perplexity"][key] / base - 1)
            pct = "" if name == "exact" or inc is None else f" ({inc:+.1f}%)"
            cells.append(f"{r['perplexity'][key]:.3f}{pct}")
        b = r.get("bits_per_element", {})
        lines.append("| " + " | ".join([f"`{name}`", *cells, f"{b.get(f'at_{seq_len}', 16):.3f}",
                                          f"{b.get('at_32768', 16):.3f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:  # pragma: no cover - the CLI is exercised by hand (CPU minutes)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output-json", default="benchmarks/results/accuracy-variants-smollm2.json")
    p.add_argument("--workdir", default="/tmp/vllm-oscar-variants", help="cached statistics and captures")
    p.add_argument("--rotations", default=None, help="the faithful artifact (default: calibrate one)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--variants", default=None, help="comma-separated subset of the sweep's variant names")
    p.add_argument("--eval-data", nargs="+", default=[*HELDOUT_SETS, "modern:lee"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--table", action="store_true", help="print the markdown table of --output-json and exit")
    p.add_argument("--centering-screen", action="store_true",
                   help="per-layer screen of per-channel centering on dev-split captures, into --output-json")
    p.add_argument("--weighted-screen", action="store_true",
                   help="dev-split screen (proxy, logit errors) of --variants, into --output-json")
    args = p.parse_args(argv)
    if args.list:
        for name, spec in variant_registry().items():
            print(f"{name:28s} {spec['description']}")
        return 0
    if args.table:
        print(format_table(json.loads(Path(args.output_json).read_text()), args.seq_len))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    command = "python -m vllm_oscar.calibrate.experiments " + " ".join(argv or sys.argv[1:])
    if args.centering_screen:
        _write_screen(Path(args.output_json), "channel_centering_screen",
                      lambda old: {**centering_screen(Setup(args)), "command": command,
                                   "seconds": round(time.time() - t0, 1)})
        return 0
    if args.weighted_screen:
        def weighted(old):  # variants screened by earlier runs stay
            scr = weighted_fit_screen(Setup(args), args.variants.split(","))
            return {**scr, "variants": {**old.get("variants", {}), **scr["variants"]}, "command": command}

        _write_screen(Path(args.output_json), "weighted_fit_screen", weighted)
        return 0
    results = run_sweep(args)
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": args.threads, "total_seconds": round(time.time() - t0, 1)}
    results.setdefault("commands", []).append(command)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
