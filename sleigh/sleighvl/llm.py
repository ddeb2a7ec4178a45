"""InternLM2 in Llama form: RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU.

`LLM.forward` has the exported decoder's signature (DESIGN.md, "The model package"), so the
reference and `decoder.onnx` are one function:

    inputs_embeds (B, S, D), attention_mask (B, P+S) int64, attention_bias (B, P+S) float,
    position_ids (B, S), past [(key, value) (B, KV, P, hd)] * L
    -> logits (B, S, V), present [(key, value) (B, KV, P+S, hd)] * L

`attention_bias` is added to the attention logits of every key, in every layer: it carries GSWA's
log-weights for image positions (0 elsewhere).
"""

from __future__ import annotations

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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
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

    def forward(self, x, cos, sin, mask, past_k, past_v):
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.nh, self.hd).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).reshape(B, S, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).reshape(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # (B, nkv, P+S, hd)
        v = torch.cat([past_v, v], dim=2)
        return self.o_proj(grouped_attention(q, k, v, mask)), k, v


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GQA without repeating the KV cache: the query heads sharing a KV head are stacked along the
    sequence, so each step reads the cache once instead of copying it `groups` times.

    q (B, nh, S, hd), k/v (B, nkv, L, hd), mask (B, 1, S, L) additive -> (B, S, nh*hd).
    Query head h uses KV head h // groups, as a repeat-interleave of the KV heads would.
    """
    B, nh, S, hd = q.shape
    nkv, L = k.shape[1], k.shape[2]
    groups = nh // nkv
    qg = q.reshape(B, nkv, groups * S, hd)  # (B, nkv, g*S, hd)
    scores = (qg @ k.transpose(2, 3)) * (hd ** -0.5)  # (B, nkv, g*S, L)
    scores = scores.reshape(B, nkv, groups, S, L) + mask[:, :, None]  # mask (B, 1, 1, S, L)
    probs = scores.softmax(-1).reshape(B, nkv, groups * S, L)
    out = (probs @ v).reshape(B, nh, S, hd)  # (B, nh, S, hd)
    return out.transpose(1, 2).reshape(B, S, nh * hd)


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

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


def attention_logit_bias(attention_mask: torch.Tensor, attention_bias: torch.Tensor, seq_len: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """(B, P+S) mask and bias -> additive (B, 1, S, P+S): causal, padding, plus the GSWA bias.

    Masked keys get the dtype's lowest finite value rather than -inf, so a fully padded row gives a
    uniform softmax instead of NaN.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    q_pos = torch.arange(seq_len, device=attention_mask.device)[:, None] + past  # (S, 1)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+S)
    allowed = (k_pos <= q_pos)[None] & (attention_mask[:, None, :] > 0)  # (B, S, P+S)
    bias = attention_bias.to(dtype)[:, None, :].expand(-1, seq_len, -1)
    low = torch.full_like(bias, torch.finfo(dtype).min)
    return torch.where(allowed, bias, low)[:, None]  # (B, 1, S, P+S)


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

    def forward(self, inputs_embeds, attention_mask, attention_bias, position_ids, past: KVCache):
        S = inputs_embeds.shape[1]
        mask = attention_logit_bias(attention_mask, attention_bias, S, inputs_embeds.dtype)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        present: KVCache = []
        for layer, (pk, pv) in zip(self.layers, past):
            x, k, v = layer(x, cos, sin, mask, pk, pv)
            present.append((k, v))
        return self.lm_head(self.norm(x)), present
