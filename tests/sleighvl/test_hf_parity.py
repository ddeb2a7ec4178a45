"""SleighVL against Hugging Face's own InternVL (`transformers.models.internvl`) on the same random weights.

HF's `InternVLForConditionalGeneration` is an implementation nobody here wrote: InternViT
(`InternVLVisionModel`), InternVL's pixel shuffle, the `mlp1` projector (`InternVLMultiModalProjector`)
and, as the text model, a `LlamaModel` (InternLM2 in Llama form). With GSWA absent (`gswa=None`) or
the identity (alpha = 0, every weight exactly 1) SleighVL must compute what HF computes: projected
image features, prefill logits of a full prompt for T = 1 and T = 3 views, the KV cache, and the
logits of one decode step on that cache, all within 1e-4 max abs in float32.

How the HF side is configured, and why (transformers 5.x):
- `use_mean_pooling=True`. The name is misleading: in HF's `InternVLVisionModel` this flag only decides
  whether a final `layernorm` follows the encoder (`nn.Identity()` if True, `nn.LayerNorm` if False);
  `get_image_features` never pools. InternViT has no final norm, so True is the matching setting
  (`test_hf_use_mean_pooling_false_adds_a_final_norm` pins the difference down).
- `tie_word_embeddings=False` on both configs: InternLM2's output head is untied, while
  `InternVLConfig` ties by default.
- `attention_bias=True` on the vision config is InternViT's qkv bias; the Llama text config has no bias.
- eager attention everywhere, float32.

Our fused `attn.qkv` (rows [q | k | v], each head-major) is split into HF's `q_proj/k_proj/v_proj`;
every other tensor maps one to one (`hf_key_map`). GSWA has no HF counterpart and is left out.
Pixel shuffle needs no permutation: HF's `InternVLModel.pixel_shuffle` is InternVL's v2 code and is
checked here element for element against ours and against an explicit patch-label layout.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
from transformers import InternVLConfig, InternVLForConditionalGeneration, LlamaConfig  # noqa: E402
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig  # noqa: E402

from sleigh.sleighvl.config import PRESETS, SleighVLConfig  # noqa: E402
from sleigh.sleighvl.init import init_weights  # noqa: E402
from sleigh.sleighvl.llm import extend_cache  # noqa: E402
from sleigh.sleighvl.model import SleighVL  # noqa: E402
from sleigh.sleighvl.vision import pixel_shuffle  # noqa: E402
from tests.sleighvl.helpers import image_rows

TOL = 1e-4
SEED = 1234
BASE = PRESETS["tiny"]
# The tiny preset keeps InternLM2's special ids, which lie beyond its 1024-token vocabulary: put
# <IMG_CONTEXT> on the last id so HF's `image_token_id` is a valid embedding row.
IMG_ID = BASE.llm.vocab_size - 1
BOS = BASE.prompt.bos_token_id


def sleigh_config(gswa_mode: str) -> SleighVLConfig:
    cfg = replace(BASE, prompt=replace(BASE.prompt, img_context_token_id=IMG_ID))
    return replace(cfg, gswa=None) if gswa_mode == "none" else cfg


def hf_config(cfg: SleighVLConfig, *, use_mean_pooling: bool = True) -> InternVLConfig:
    v, t = cfg.vision, cfg.llm
    vision = InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
        attention_bias=v.qkv_bias, layer_norm_eps=v.layer_norm_eps, norm_type="layer_norm", use_qk_norm=False,
        hidden_act="gelu", use_absolute_position_embeddings=True, use_mask_token=False,
        use_mean_pooling=use_mean_pooling,
    )
    text = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        max_position_embeddings=t.max_position_embeddings, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False, bos_token_id=cfg.prompt.bos_token_id,
        eos_token_id=cfg.prompt.eos_token_id,
    )
    hf = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=cfg.prompt.img_context_token_id,
        image_seq_length=v.tokens_per_view, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    hf._attn_implementation = "eager"
    return hf


def hf_key_map(cfg: SleighVLConfig) -> dict[str, tuple[str, slice | None]]:
    """HF key -> (our key, row slice of it or None). Explicit, one entry per HF tensor."""
    m: dict[str, tuple[str, slice | None]] = {}
    V, C = "model.vision_tower.", cfg.vision.hidden_size
    m[V + "embeddings.cls_token"] = ("vision.embeddings.class_embedding", None)
    m[V + "embeddings.position_embeddings"] = ("vision.embeddings.position_embedding", None)
    for p in ("weight", "bias"):
        m[V + f"embeddings.patch_embeddings.projection.{p}"] = (f"vision.embeddings.patch_embedding.{p}", None)
    for i in range(cfg.vision.num_layers):
        h, o = f"{V}encoder.layer.{i}.", f"vision.layers.{i}."
        m[h + "lambda_1"] = (o + "ls1", None)
        m[h + "lambda_2"] = (o + "ls2", None)
        for p in ("weight", "bias"):
            m[h + f"layernorm_before.{p}"] = (o + f"norm1.{p}", None)
            m[h + f"layernorm_after.{p}"] = (o + f"norm2.{p}", None)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):  # fused qkv rows: [q | k | v]
                m[h + f"attention.{name}.{p}"] = (o + f"attn.qkv.{p}", slice(j * C, (j + 1) * C))
            m[h + f"attention.projection_layer.{p}"] = (o + f"attn.proj.{p}", None)
            m[h + f"mlp.fc1.{p}"] = (o + f"mlp.fc1.{p}", None)
            m[h + f"mlp.fc2.{p}"] = (o + f"mlp.fc2.{p}", None)
    P = "model.multi_modal_projector."
    for p in ("weight", "bias"):
        m[P + f"layer_norm.{p}"] = (f"projector.norm.{p}", None)
        m[P + f"linear_1.{p}"] = (f"projector.fc1.{p}", None)
        m[P + f"linear_2.{p}"] = (f"projector.fc2.{p}", None)
    L = "model.language_model."
    m[L + "embed_tokens.weight"] = ("llm.embed_tokens.weight", None)
    for i in range(cfg.llm.num_layers):
        h, o = f"{L}layers.{i}.", f"llm.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            m[h + f"{n}.weight"] = (o + f"{n}.weight", None)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[h + f"self_attn.{n}.weight"] = (o + f"self_attn.{n}.weight", None)
        for n in ("gate_proj", "up_proj", "down_proj"):
            m[h + f"mlp.{n}.weight"] = (o + f"mlp.{n}.weight", None)
    m[L + "norm.weight"] = ("llm.norm.weight", None)
    m["lm_head.weight"] = ("llm.lm_head.weight", None)
    return m


def to_hf_state(ours: dict[str, torch.Tensor], key_map) -> dict[str, torch.Tensor]:
    return {hk: (ours[ok] if rows is None else ours[ok][rows]).clone() for hk, (ok, rows) in key_map.items()}


@torch.no_grad()
def build_pair(gswa_mode: str):
    cfg = sleigh_config(gswa_mode)
    torch.manual_seed(SEED)
    ours = SleighVL(cfg).eval()
    init_weights(ours, SEED)
    # init_weights leaves biases at 0, norms at 1 and layer scales at 0.5: jitter every 1-D tensor so a
    # swapped or dropped bias / norm / layer scale in the key map cannot go unnoticed.
    g = torch.Generator().manual_seed(SEED + 1)
    for name, p in ours.named_parameters():
        if p.dim() == 1 and not name.startswith("gswa."):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    if gswa_mode == "identity":
        ours.gswa.alpha.fill_(0.0)

    torch.manual_seed(SEED + 2)
    hf = InternVLForConditionalGeneration(hf_config(cfg)).eval()
    key_map = hf_key_map(cfg)
    hf_keys = set(hf.state_dict())
    assert set(key_map) == hf_keys, (sorted(hf_keys - set(key_map)), sorted(set(key_map) - hf_keys))
    missing, unexpected = hf.load_state_dict(to_hf_state(ours.state_dict(), key_map), strict=True)
    assert not missing and not unexpected
    return cfg, ours, hf


@pytest.fixture(scope="module", params=["none", "identity"])
def pair(request):
    return build_pair(request.param)


def pixel_values(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, 448, 448, generator=g)


def prompt_ids(T: int, cfg: SleighVLConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, IMG_ID, (n,), generator=g)  # noqa: E731 -- never BOS/EOS/<IMG_CONTEXT>
    ids = torch.cat([torch.tensor([BOS]), text(9), torch.full((cfg.vision.tokens_per_view * T,), IMG_ID), text(6)])
    return ids[None]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_setup(pair):
    """Same weights on both sides, nothing left at HF's random init, eager float32, untied head."""
    cfg, ours, hf = pair
    key_map = hf_key_map(cfg)
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    for hk, (ok, rows) in key_map.items():
        want = our_state[ok] if rows is None else our_state[ok][rows]
        assert torch.equal(hf_state[hk], want), hk
    used = {ok for ok, _ in key_map.values()}
    assert {k for k in our_state if k not in used} == {k for k in our_state if k.startswith("gswa.")}
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()
    for c in (hf.config, hf.config.text_config, hf.config.vision_config):
        assert c._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    assert isinstance(hf.model.vision_tower.layernorm, torch.nn.Identity)
    assert hf.model.multi_modal_projector.layer_norm.eps == cfg.projector_layer_norm_eps
    assert hf.model.vision_tower.encoder.layer[0].layernorm_before.eps == cfg.vision.layer_norm_eps
    assert hf.model.language_model.norm.variance_epsilon == cfg.llm.rms_norm_eps


def test_pixel_shuffle_order_matches_hf():
    """HF's pixel shuffle (InternVL's v2 code) and ours agree exactly, and both give the documented layout."""
    g, C = 8, 3
    hf = InternVLForConditionalGeneration(hf_config(sleigh_config("none")))
    x = torch.randn(2, g * g, C)
    theirs = hf.model.pixel_shuffle(x.reshape(2, g, g, C), scale_factor=0.5).reshape(2, -1, 4 * C)
    assert torch.equal(pixel_shuffle(x, g), theirs)
    # Label each patch (row-major) by (row, col): token r*(g/2)+c holds [2r][2c], [2r][2c+1], [2r+1][2c], [2r+1][2c+1].
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    labels = torch.stack([rows, cols], -1).reshape(1, g * g, 2).float()
    out = pixel_shuffle(labels, g).reshape(g // 2, g // 2, 4, 2)
    for r in range(g // 2):
        for c in range(g // 2):
            want = [[2 * r, 2 * c], [2 * r, 2 * c + 1], [2 * r + 1, 2 * c], [2 * r + 1, 2 * c + 1]]
            assert out[r, c].tolist() == want


@torch.no_grad()
def test_image_features(pair):
    cfg, ours, hf = pair
    pv = pixel_values(3, seed=7)
    out = ours.encode_images(pv)
    feats = hf.model.get_image_features(pixel_values=pv, return_dict=True)
    assert maxdiff(out.last_hidden, feats.last_hidden_state) < TOL
    assert maxdiff(out.projected, feats.pooler_output) < TOL
    assert out.projected.abs().max() > 0.1  # not a degenerate comparison
    assert torch.equal(out.gswa_weights, torch.ones(3))
    assert torch.equal(out.image_embeds, out.projected)


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 3])
def test_prefill_and_decode_logits(pair, T):
    cfg, ours, hf = pair
    pv = pixel_values(T, seed=10 + T)
    ids = prompt_ids(T, cfg, seed=20 + T)
    S, D = ids.shape[1], cfg.llm.hidden_size

    vis = ours.encode_images(pv)
    bias = ours.attention_bias(ids, vis.gswa_weights)
    assert torch.equal(bias, torch.zeros(1, S))  # identity / no GSWA: the decoder sees no bias
    embeds = ours.embed(ids, image_rows(vis, D))
    logits, new = ours.llm(embeds, torch.ones(1, S, dtype=torch.int64), bias,
                           torch.arange(S)[None], past=ours.llm.empty_cache(1))

    ref = hf(input_ids=ids, pixel_values=pv, use_cache=True)
    assert maxdiff(logits, ref.logits[:, -1:]) < TOL  # ours computes the last position's logits alone
    assert logits.std() > 0.1
    for (k, v), layer in zip(new, ref.cache.layers, strict=True):
        assert maxdiff(k, layer.keys) < TOL
        assert maxdiff(v, layer.values) < TOL

    # One decode step on each side's own cache: greedy next token (never <IMG_CONTEXT>).
    nxt = logits[:, -1, :IMG_ID].argmax(-1, keepdim=True)  # (1, 1)
    step, _ = ours.llm(ours.embed(nxt, image_rows(None, D)), torch.ones(1, S + 1, dtype=torch.int64),
                       torch.zeros(1, S + 1), torch.tensor([[S]]), past=extend_cache(ours.llm.empty_cache(1), new))
    ref_step = hf(input_ids=nxt, cache=ref.cache, use_cache=True)
    assert maxdiff(step, ref_step.logits) < TOL

    # The same step on a slot cache as a runtime keeps it: 5 unused slots of garbage, masked out.
    g = torch.Generator().manual_seed(T)
    slots = [tuple(torch.cat([t, 50 * torch.randn(1, t.shape[1], 5, t.shape[3], generator=g)], dim=2) for t in kv) for kv in new]
    mask = torch.cat([torch.ones(1, S, dtype=torch.int64), torch.zeros(1, 5, dtype=torch.int64), torch.ones(1, 1, dtype=torch.int64)], 1)
    slot_step, _ = ours.llm(ours.embed(nxt, image_rows(None, D)), mask, torch.zeros(1, S + 6),
                            torch.tensor([[S]]), past=slots)
    assert maxdiff(slot_step, ref_step.logits) < TOL
    assert ref.cache.get_seq_length() == S + 1


@torch.no_grad()
@pytest.mark.parametrize("damage", ["swap_q_k", "swap_layernorms", "swap_layer_scales", "pixel_shuffle_v1", "rope_theta"])
def test_comparison_has_power(damage, monkeypatch):
    """Negative controls: plausible key-map or convention mistakes move the logits far beyond TOL."""
    cfg, ours, hf = build_pair("none")
    layer = hf.model.vision_tower.encoder.layer[0]
    if damage == "swap_q_k":
        q, k = layer.attention.q_proj, layer.attention.k_proj
        q.weight.data, k.weight.data = k.weight.data.clone(), q.weight.data.clone()
    elif damage == "swap_layernorms":
        a, b = layer.layernorm_before, layer.layernorm_after
        a.weight.data, b.weight.data = b.weight.data.clone(), a.weight.data.clone()
    elif damage == "swap_layer_scales":
        layer.lambda_1.data, layer.lambda_2.data = layer.lambda_2.data.clone(), layer.lambda_1.data.clone()
    elif damage == "pixel_shuffle_v1":  # InternVL's ps_version v1: no final height/width swap
        def v1(x, scale_factor=0.5):
            n, w, h, c = x.shape
            x = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
            return x.view(n, h // 2, w // 2, c * 4)
        monkeypatch.setattr(hf.model, "pixel_shuffle", v1)
    elif damage == "rope_theta":
        rot = hf.model.language_model.rotary_emb
        hd = cfg.llm.head_dim
        rot.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    pv, ids = pixel_values(1, seed=11), prompt_ids(1, cfg, seed=21)
    S = ids.shape[1]
    vis = ours.encode_images(pv)
    logits, _ = ours.llm(ours.embed(ids, image_rows(vis, cfg.llm.hidden_size)),
                         torch.ones(1, S, dtype=torch.int64), torch.zeros(1, S), torch.arange(S)[None],
                         past=ours.llm.empty_cache(1))
    assert maxdiff(logits, hf(input_ids=ids, pixel_values=pv).logits[:, -1:]) > 100 * TOL


def test_hf_use_mean_pooling_false_adds_a_final_norm():
    """With use_mean_pooling=False HF's vision tower ends in a LayerNorm that InternViT does not have."""
    cfg = sleigh_config("none")
    hf = InternVLForConditionalGeneration(hf_config(cfg, use_mean_pooling=False))
    extra = set(hf.state_dict()) - set(hf_key_map(cfg))
    assert extra == {"model.vision_tower.layernorm.weight", "model.vision_tower.layernorm.bias"}
    assert isinstance(hf.model.vision_tower.layernorm, torch.nn.LayerNorm)
