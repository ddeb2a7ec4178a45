"""InternLM2 in Llama form: RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU.

`LLM.forward` has the exported decoder's signature (package schema 2, README "The decoder's KV
cache"), so the reference and `decoder.onnx` are one function:

    inputs_embeds (B, S, D), attention_mask (B, C+S) int64, attention_bias (B, C+S) float,
    position_ids (B, S), past [(key, value) (B, KV, C, hd)] * L
    -> logits (B, 1, V) of the last position, new [(key, value) (B, KV, S, hd)] * L

Why only the last position's logits, and why `past` is C slots that take part only where
attention_mask[:, c] is 1 (never concatenated with the new keys): README, "The decoder's KV cache".
A plain growing cache is the special case of every slot in use (`extend_cache`).

`attention_bias` is added to the attention logits of every key, in every layer: it carries GSWA's
log-weights for image positions (0 elsewhere).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sleigh.sleighvl.config import LLMConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(...) rather than x * rsqrt(...): ONNX Runtime fuses this form into one
        # SimplifiedLayerNormalization node (its pattern wants Div; rsqrt exports as Sqrt, Reciprocal, Mul)
        xf = x.float()
        xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, S) -> cos, sin (B, 1, S, hd), rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[:, :, None] * inv_freq[None, None, :]  # (B, S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, terms: SlotTerms, past_k, past_v):
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.nh, self.hd).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).reshape(B, S, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).reshape(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(cache_attention(q, k, v, past_k, past_v, terms)), k, v


# The additive logit of a masked key and the floor of the slots' log-sum-exp: finite in float16 too,
# with room below it (finfo.min plus a negative logit overflows float16 to -inf, and -inf * 0 in the
# summary-key product is NaN), and far enough down that exp() of it is 0 in every float dtype.
MASKED_LOGIT = -1.0e4


class SlotTerms(NamedTuple):
    """What `cache_attention` needs that depends only on the shapes and the mask, built once per
    forward (`slot_terms`) instead of once per layer. Query rows are the grouped ones: g*S."""

    past: torch.Tensor  # (B, 1, 1, C) additive mask of the slots (the same for every query)
    new: torch.Tensor  # (B, 1, g*S, S+1) additive mask of the new keys, then 0 for the slots' summary key
    floor: torch.Tensor  # (B, nkv, g*S, 1) MASKED_LOGIT (so a max over the slots exists when C = 0)
    key_pad: torch.Tensor  # (B, nkv, S, 1) zeros: the new keys' extra dimension
    summary_key: torch.Tensor  # (B, nkv, 1, hd+1) [0, ..., 0, 1]
    value_pad: torch.Tensor  # (B, nkv, 1, hd) zeros: the summary key's value (its output enters separately)
    slot_ones: torch.Tensor  # (B, 1, C, 1) ones: sums over the slots as a MatMul (see cache_attention)


def slot_terms(attention_mask: torch.Tensor, attention_bias: torch.Tensor, seq_len: int, dtype: torch.dtype,
               kv_heads: int, groups: int, head_dim: int) -> SlotTerms:
    """(B, C+S) mask and bias -> the SlotTerms of every layer: padding (mask 0), causality among
    the new positions (every slot is earlier than every new position), plus the GSWA bias.

    Masked keys get MASKED_LOGIT, not -inf, so nothing in the attention is ever -inf or NaN (a
    fully masked query row, e.g. a padded one, gets some finite average). The slots' mask is one row
    per batch, (B, 1, 1, C), broadcast over the queries: a decode step builds nothing of size C x S.
    """
    B, total = attention_mask.shape
    S, C = seq_len, total - seq_len
    bias = attention_bias.to(dtype)
    past = torch.where(attention_mask[:, :C] > 0, bias[:, :C], MASKED_LOGIT)[:, None, None, :]  # (B, 1, 1, C)
    pos = torch.arange(S, device=attention_mask.device)
    causal = (pos[None, :] <= pos[:, None])[None]  # (1, S, S): key <= query
    new = torch.where(causal & (attention_mask[:, None, C:] > 0), bias[:, None, C:], MASKED_LOGIT)  # (B, S, S)
    new = torch.cat([new, torch.zeros_like(new[..., :1])], dim=-1)  # + the slots' summary key
    new = new[:, None, None].expand(B, 1, groups, S, S + 1).reshape(B, 1, groups * S, S + 1)  # row gi*S + s = query s
    floor = torch.full_like(new[..., :1], MASKED_LOGIT).expand(B, kv_heads, groups * S, 1)
    zeros = torch.zeros_like(new[:, :, :1, :1]).expand(B, kv_heads, 1, 1)  # (B, nkv, 1, 1)
    summary_key = torch.cat([zeros.expand(B, kv_heads, 1, head_dim), zeros + 1], dim=-1)
    # (B, 1, C, 1) without a Transpose: ONNX Runtime <= 1.31 fuses a transposed MatMul operand into
    # FusedMatMul, which leaves its output uninitialised when the inner dimension is 0 (NaN seen at C = 0)
    slot_ones = torch.ones_like(past[:, :, 0, :, None])
    return SlotTerms(past, new, floor, zeros.expand(B, kv_heads, S, 1), summary_key, zeros.expand(B, kv_heads, 1, head_dim),
                     slot_ones)


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                    terms: SlotTerms) -> torch.Tensor:
    """Grouped-query attention over C cache slots and S new positions, equal to one softmax over
    all C+S keys but without concatenating the cache with the new keys.

    q (B, nh, S, hd), k/v (B, nkv, S, hd) the new positions, past_k/past_v (B, nkv, C, hd) the slots,
    `terms` from `slot_terms` -> (B, S, nh*hd).

    The slots are reduced first, per query, to their attention output `past_out` and the log-sum-exp
    `lse` of their logits. They then enter the softmax over the new keys as one more key whose logit
    is `lse` (through one extra dimension: [q, lse]·[k, 0] = q·k and [q, lse]·[0, 1] = lse) and whose
    value is `past_out`. So the large S x S softmax of a prefill stays one fused softmax, and a decode
    step reads each slot once and copies none.

    GQA without repeating the cache: the query heads sharing a KV head are stacked along the
    sequence (query head h uses KV head h // groups, as a repeat-interleave of the KV heads would).
    Masked slots contribute exactly nothing as long as their logits q·k stay small against
    |MASKED_LOGIT| = 1e4 (zeros, or stale keys of the scale of real ones: the runtimes zero new
    slots); their values may be anything finite. With C = 0 the slots contribute nothing. The
    log-sum-exp is spelled out (max, exp, sum, log) rather than ReduceLogSumExp, which some ONNX
    backends compute without subtracting the max (overflowing float16 at logits above ~11).

    No reduction runs over the slot axis alone, which is empty when C = 0: ONNX Runtime up to 1.31
    returns the input unchanged when reducing an empty axis ((.., 0) instead of (.., 1)), which broke
    every first prefill there. The max runs over the slots plus the floor (never empty), and the sum
    of the exponentials is a MatMul with a column of ones (an empty inner dimension gives 0, as it should).
    """
    B, nh, S, hd = q.shape
    nkv = past_k.shape[1]
    qg = q.reshape(B, nkv, nh // nkv * S, hd) * (hd ** -0.5)  # (B, nkv, g*S, hd)

    slot_logits = qg @ past_k.transpose(2, 3) + terms.past  # (B, nkv, g*S, C)
    top = torch.cat([slot_logits, terms.floor], dim=-1).amax(-1, keepdim=True)
    e = (slot_logits - top).exp()  # every exponent <= 0: no overflow, also in float16
    z = e @ terms.slot_ones  # (B, nkv, g*S, 1): the sum over the slots, >= 1 when C > 0, 0 when C = 0
    past_out = (e @ past_v) / z.clamp(min=1.0)  # (B, nkv, g*S, hd)
    lse = (top + z.log()).clamp(min=MASKED_LOGIT)  # C = 0: -inf, kept finite (-inf * 0 is NaN)

    q1 = torch.cat([qg, lse], dim=-1)  # (B, nkv, g*S, hd+1)
    k1 = torch.cat([torch.cat([k, terms.key_pad], dim=-1), terms.summary_key], dim=2)  # (B, nkv, S+1, hd+1)
    probs = (q1 @ k1.transpose(2, 3) + terms.new).softmax(-1)  # (B, nkv, g*S, S+1)
    out = probs @ torch.cat([v, terms.value_pad], dim=2) + probs[..., S:] * past_out  # (B, nkv, g*S, hd)
    return out.reshape(B, nh, S, hd).transpose(1, 2).reshape(B, S, nh * hd)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, terms, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, terms, past_k, past_v)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


def extend_cache(past: KVCache, new: KVCache) -> KVCache:
    """A growing cache (every slot in use): the new positions appended to each layer's slots."""
    return [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)) for (pk, pv), (k, v) in zip(past, new, strict=True)]


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def empty_cache(self, batch: int = 1, dtype=torch.float32, device=None) -> KVCache:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.cfg.num_layers)]

    def forward(self, inputs_embeds, attention_mask, attention_bias, position_ids, past: KVCache,
                logits_at: torch.Tensor | None = None):
        """-> logits (B, 1, V) of the last position, or with `logits_at` (B, S) bool, which training
        passes, those positions' logits (N, V) in row-major order; and the new positions' (key, value)
        per layer (module docstring)."""
        S = inputs_embeds.shape[1]
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        cfg = self.cfg
        terms = slot_terms(attention_mask, attention_bias, S, inputs_embeds.dtype, cfg.num_kv_heads,
                           cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        new: KVCache = []
        for layer, (pk, pv) in zip(self.layers, past):
            x, k, v = layer(x, cos, sin, terms, pk, pv)
            new.append((k, v))
        return self.lm_head(self.norm(x[:, -1:] if logits_at is None else x[logits_at])), new
