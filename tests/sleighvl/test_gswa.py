"""GSWA (DESIGN.md, "GSWA (as this project defines it)"): the module against an independent
implementation of the design's formula built on torch's own `nn.MultiheadAttention`, its invariants
(identity at alpha = 0, T = 1, mean 1 over the tiles, thumbnail 1, permutation equivariance,
gradients), and how the weights act on a tiny SleighVL in `scale` and `attention` mode.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sleigh.sleighvl.checkpoint import build_model
from sleigh.sleighvl.config import PRESETS, GSWAConfig, SleighVLConfig
from sleigh.sleighvl.gswa import GSWA
from sleigh.sleighvl.init import init_weights
from sleigh.sleighvl.model import SleighVL

CV = 32  # vision hidden of the tiny preset
GCFG = GSWAConfig(hidden_size=64, num_layers=2, num_heads=2)
FORMULA_TOL = 1e-5
VIEW_COUNTS = (1, 2, 3, 5, 13)


def random_gswa(cfg: GSWAConfig = GCFG, *, alpha: float = 1.0, seed: int = 0) -> GSWA:
    """Every parameter random (LayerNorms too), attention sharp enough that tile weights differ from 1."""
    torch.manual_seed(seed)
    g = GSWA(cfg, CV)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name == "alpha":
                p.fill_(alpha)
            elif p.dim() >= 2:
                p.normal_(0.0, 2.0 * p.shape[-1] ** -0.5)
            elif name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    return g


def random_cls(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, CV, generator=torch.Generator().manual_seed(seed))


def _mha(dim: int, heads: int, in_w, in_b, out_w=None, out_b=None) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        m.in_proj_weight.copy_(in_w)
        m.in_proj_bias.copy_(in_b)
        m.out_proj.weight.copy_(out_w if out_w is not None else torch.eye(dim))
        m.out_proj.bias.copy_(out_b if out_b is not None else torch.zeros(dim))
    return m.eval()


@torch.no_grad()
def design_weights(g: GSWA, cls: torch.Tensor) -> torch.Tensor:
    """DESIGN.md's GSWA written out with torch's MultiheadAttention (not sleigh's attention code)."""
    T, D, H = cls.shape[0], g.proj.out_features, g.cfg.num_heads
    h = g.proj(g.norm(cls))[None]  # (1, T, Dg)
    for blk in g.blocks:
        x = blk.norm1(h)
        mha = _mha(D, H, blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj.weight, blk.attn.proj.bias)
        h = h + mha(x, x, x, need_weights=False)[0]
        h = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
    x = g.final_norm(h)
    # the last block only contributes its attention probabilities: value rows are irrelevant (zeros)
    mha = _mha(D, H, torch.cat([g.final_qk.weight, torch.zeros(D, D)]), torch.cat([g.final_qk.bias, torch.zeros(D)]))
    _, A = mha(x, x, x, need_weights=True, average_attn_weights=True)  # (1, T, T), mean over heads
    if T == 1:
        return torch.ones(1)
    a = A[0, T - 1, : T - 1]  # the thumbnail attending to each tile
    w = (T - 1) * a / a.sum()
    w = 1 + g.alpha * (w - 1)
    return torch.cat([w, torch.ones(1)])


# -- the module ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T", VIEW_COUNTS)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_matches_the_design_formula(T, alpha, layers):
    g = random_gswa(replace(GCFG, num_layers=layers), alpha=alpha)
    cls = random_cls(T)
    with torch.no_grad():
        got = g(cls)
    want = design_weights(g, cls)
    assert got.shape == (T,) and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert err <= FORMULA_TOL, f"max abs {err:.3g} > {FORMULA_TOL} (weights {got.tolist()} vs {want.tolist()})"


@pytest.mark.parametrize("T", VIEW_COUNTS)
def test_alpha_zero_is_exactly_the_identity(T):
    g = random_gswa(alpha=0.0)
    with torch.no_grad():
        w = g(random_cls(T))
    assert torch.equal(w, torch.ones(T)), w.tolist()


def test_new_module_starts_as_the_identity():
    g = GSWA(GCFG, CV)  # default init: the gate alpha is 0
    assert g.alpha.item() == 0.0
    with torch.no_grad():
        assert torch.equal(g(random_cls(5)), torch.ones(5))


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_single_view_gets_weight_one(alpha):
    g = random_gswa(alpha=alpha)
    with torch.no_grad():
        assert torch.equal(g(random_cls(1)), torch.ones(1))


@pytest.mark.parametrize("T", [2, 3, 5, 13])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_tile_weights_average_one_and_thumbnail_is_one(T, alpha):
    g = random_gswa(alpha=alpha)
    with torch.no_grad():
        w = g(random_cls(T, seed=T))
    tiles = w[:-1]
    assert w[-1].item() == 1.0
    assert abs(tiles.mean().item() - 1.0) <= 1e-6, tiles.tolist()
    if T > 2:  # with two or more tiles GSWA must actually discriminate
        assert tiles.std().item() > 1e-3, tiles.tolist()
    if alpha <= 1.0:  # convex mix of positive attention shares and 1
        assert (w > 0).all(), w.tolist()


def test_permuting_tiles_permutes_weights():
    g = random_gswa()
    cls = random_cls(7)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    with torch.no_grad():
        w = g(cls)
        w_perm = g(torch.cat([cls[perm], cls[-1:]]))
    assert torch.allclose(w_perm, torch.cat([w[perm], w[-1:]]), atol=1e-6), (w.tolist(), w_perm.tolist())
    assert not torch.allclose(w_perm[:-1], w[:-1], atol=1e-4)  # the permutation was not a no-op


def test_gradients_reach_every_parameter():
    g = random_gswa(replace(GCFG, num_layers=3), alpha=1.0)
    cls = random_cls(5).requires_grad_(True)
    r = torch.randn(5, generator=torch.Generator().manual_seed(9))
    (g(cls) * r).sum().backward()
    names = [n for n, _ in g.named_parameters()]
    assert "alpha" in names and any(n.startswith("blocks.1.") for n in names)
    for name, p in g.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().max().item() > 0, f"{name}: zero gradient"
    assert cls.grad is not None and cls.grad.abs().max().item() > 0


# -- GSWA inside SleighVL -----------------------------------------------------------------------

IMG_ID = PRESETS["tiny"].llm.vocab_size - 1  # the preset's InternLM2 ids lie beyond its 1024 rows
PREFIX, SUFFIX = [1, 5, 6, 7], [8, 9, 10]


def tiny_cfg(apply: str | None) -> SleighVLConfig:
    base = PRESETS["tiny"]
    cfg = replace(base, prompt=replace(base.prompt, img_context_token_id=IMG_ID))
    return replace(cfg, gswa=None) if apply is None else replace(cfg, gswa=replace(cfg.gswa, apply=apply))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """One set of random tiny weights with GSWA (alpha 1), shared by every model below."""
    torch.manual_seed(0)
    model = SleighVL(tiny_cfg("attention"))
    init_weights(model, seed=11)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_model(state, apply: str | None, alpha: float | None = None) -> SleighVL:
    cfg = tiny_cfg(apply)
    sd = dict(state)
    if apply is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("gswa.")}
    elif alpha is not None:
        sd["gswa.alpha"] = torch.tensor(float(alpha))
    return build_model(cfg, sd, "test")  # strict: the same weights, nothing missing or extra


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    """Three views (two tiles + thumbnail)."""
    return torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(5))


def prompt_ids(T: int) -> torch.Tensor:
    tpv = PRESETS["tiny"].vision.tokens_per_view
    return torch.tensor([PREFIX + [IMG_ID] * (tpv * T) + SUFFIX])  # (1, S)


@torch.no_grad()
def prefill_logits(model: SleighVL, pv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits of one prompt, the whole sequence at once (no KV cache)."""
    vis = model.encode_images(pv)
    ids = prompt_ids(pv.shape[0])
    emb = model.embed(ids, vis.image_embeds.reshape(-1, model.cfg.llm.hidden_size))
    if bias is None:
        bias = model.attention_bias(ids, vis.gswa_weights)
    S = ids.shape[1]
    logits, _ = model.llm(emb, torch.ones(1, S, dtype=torch.int64), bias, torch.arange(S)[None],
                          model.llm.empty_cache())
    return logits[0, -1]


@pytest.mark.parametrize("apply", ["attention", "scale"])
def test_alpha_zero_model_equals_model_without_gswa(state, pixel_values, apply):
    with_gswa, without = make_model(state, apply, alpha=0.0), make_model(state, None)
    with torch.no_grad():
        a, b = with_gswa.encode_images(pixel_values), without.encode_images(pixel_values)
    assert torch.equal(a.gswa_weights, torch.ones(3))
    assert torch.equal(a.image_embeds, b.image_embeds)
    la, lb = prefill_logits(with_gswa, pixel_values), prefill_logits(without, pixel_values)
    err = (la - lb).abs().max().item()
    assert err <= 1e-6, f"logits differ by {err:.3g}"


def test_scale_mode_scales_the_projected_rows(state, pixel_values):
    model, plain = make_model(state, "scale"), make_model(state, None)
    with torch.no_grad():
        out, ref = model.encode_images(pixel_values), plain.encode_images(pixel_values)
        w = model.gswa(out.last_hidden[:, 0])
    assert torch.equal(out.gswa_weights, w)
    assert (w[:-1] - 1).abs().max().item() > 1e-3, "GSWA weights are all 1: nothing is being tested"
    assert torch.equal(out.projected, ref.image_embeds)  # mlp1 output, independent of GSWA
    assert torch.allclose(out.image_embeds, w[:, None, None] * ref.image_embeds, rtol=0, atol=1e-6)
    assert model.attention_bias(prompt_ids(3), w).abs().max().item() == 0.0  # scale mode: no decoder bias


def test_attention_mode_leaves_rows_and_biases_the_image_keys(state, pixel_values):
    model, plain = make_model(state, "attention"), make_model(state, None)
    with torch.no_grad():
        out, ref = model.encode_images(pixel_values), plain.encode_images(pixel_values)
    w = out.gswa_weights
    assert (w[:-1] - 1).abs().max().item() > 1e-3, "GSWA weights are all 1: nothing is being tested"
    assert torch.equal(out.image_embeds, out.projected)
    assert torch.equal(out.image_embeds, ref.image_embeds)

    ids = prompt_ids(3)
    bias = model.attention_bias(ids, w)
    assert bias.shape == ids.shape and bias.dtype == torch.float32
    tpv = model.cfg.vision.tokens_per_view
    expected = torch.zeros(ids.shape[1])
    for t in range(3):
        start = len(PREFIX) + t * tpv
        expected[start:start + tpv] = math.log(max(w[t].item(), model.cfg.gswa.min_weight))
    assert torch.allclose(bias[0], expected, rtol=0, atol=1e-6)
    assert bias[0, :len(PREFIX)].abs().max() == 0 and bias[0, -len(SUFFIX):].abs().max() == 0
    assert bias[0, len(PREFIX) + 2 * tpv:len(PREFIX) + 3 * tpv].abs().max() == 0  # thumbnail: log 1


def test_attention_bias_clamps_tiny_weights(state):
    model = make_model(state, "attention")
    w = torch.tensor([0.0, 2.0, 1.0])
    bias = model.attention_bias(prompt_ids(3), w)[0]
    tpv, p = model.cfg.vision.tokens_per_view, len(PREFIX)
    assert torch.isfinite(bias).all()
    assert torch.allclose(bias[p:p + tpv], torch.full((tpv,), math.log(model.cfg.gswa.min_weight)))
    assert torch.allclose(bias[p + tpv:p + 2 * tpv], torch.full((tpv,), math.log(2.0)))


def test_alpha_changes_the_logits_in_attention_mode(state, pixel_values):
    alphas = (0.0, 1.0, 4.0)
    models = {a: make_model(state, "attention", alpha=a) for a in alphas}
    with torch.no_grad():
        embeds = {a: m.encode_images(pixel_values).image_embeds for a, m in models.items()}
    assert all(torch.equal(embeds[0.0], e) for e in embeds.values())  # any change below comes through the bias
    logits = {a: prefill_logits(m, pixel_values) for a, m in models.items()}
    for a, b in [(0.0, 1.0), (1.0, 4.0)]:
        diff = (logits[a] - logits[b]).abs().max().item()
        assert diff > 1e-4, f"alpha {a} vs {b}: logits differ by only {diff:.3g}"


def test_attention_bias_acts_on_keys_in_every_layer(state, pixel_values):
    """A huge negative bias on view 0's keys must equal dropping those positions from the sequence
    (keeping every other token's position id): nothing may read them, in any layer."""
    model = make_model(state, None)
    tpv, p = model.cfg.vision.tokens_per_view, len(PREFIX)
    with torch.no_grad():
        rows = model.encode_images(pixel_values).image_embeds.reshape(-1, model.cfg.llm.hidden_size)
        ids = prompt_ids(3)
        S = ids.shape[1]
        emb = model.embed(ids, rows)
        bias = torch.zeros(1, S)
        bias[0, p:p + tpv] = -1e4
        ones = torch.ones(1, S, dtype=torch.int64)
        masked, _ = model.llm(emb, ones, bias, torch.arange(S)[None], model.llm.empty_cache())
        keep = torch.cat([torch.arange(p), torch.arange(p + tpv, S)])
        dropped, _ = model.llm(emb[:, keep], ones[:, keep], torch.zeros(1, len(keep)), keep[None],
                               model.llm.empty_cache())
        unbiased, _ = model.llm(emb, ones, torch.zeros(1, S), torch.arange(S)[None], model.llm.empty_cache())
    err = (masked[0, -1] - dropped[0, -1]).abs().max().item()
    assert err <= 1e-4, f"masked vs dropped: {err:.3g}"
    assert (masked[0, -1] - unbiased[0, -1]).abs().max().item() > 1e-3  # view 0 mattered


def test_gswa_config_needs_thumbnails_and_divisible_heads():
    from sleigh.errors import SleighError
    from sleigh.sleighvl.config import PRESETS, GSWAConfig, ImageConfig, SleighVLConfig

    base = PRESETS["tiny"]
    with pytest.raises(SleighError, match="thumbnail"):
        SleighVLConfig(vision=base.vision, llm=base.llm, gswa=base.gswa, image=ImageConfig(thumbnail=False))
    SleighVLConfig(vision=base.vision, llm=base.llm, gswa=None, image=ImageConfig(thumbnail=False))  # fine without GSWA
    with pytest.raises(SleighError, match="divisible"):
        SleighVLConfig(vision=base.vision, llm=base.llm, gswa=GSWAConfig(hidden_size=0, num_heads=5))
