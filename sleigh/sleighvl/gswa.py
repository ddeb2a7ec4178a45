"""GSWA: Global Semantic-guided Weight Allocator (DESIGN.md, "GSWA (as this project defines it)").

From the T views' CLS tokens (tiles first, thumbnail last) it derives one weight per view:
the thumbnail's attention to each tile in the last block, averaged over heads, normalised to mean 1
over the tiles and gated by a learned scalar alpha (0 = identity). The thumbnail, and a lone view,
get weight 1.

Only the attention *probabilities* of the last block are used, so its value/output projections
and MLP would never receive a gradient: the last block is built as LayerNorm + query/key
projections only (`final_norm`, `final_qk`). Blocks before it are full pre-norm transformer blocks.

The math lives in `gswa_weights`, a pure function of named tensors, so that the ONNX export can
wrap the very same code as the `sleigh::GSWA` custom op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sleigh.sleighvl.config import GSWAConfig

BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    T, D = x.shape
    return x.reshape(T, heads, D // heads).transpose(0, 1)  # (H, T, hd)


def _attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    qh, kh = _heads(q, heads), _heads(k, heads)
    scores = qh @ kh.transpose(1, 2) / math.sqrt(qh.shape[-1])  # (H, T, T)
    return scores.softmax(-1)


def gswa_weights(cls: torch.Tensor, params: dict[str, torch.Tensor], *, heads: int, eps: float) -> torch.Tensor:
    """cls (T, Cv) -> weights (T,). `params` is keyed as GSWA.state_dict()."""
    T = cls.shape[0]
    a = thumbnail_attention(cls, params, heads=heads, eps=eps)
    # Branch-free so one exported graph serves T = 1 and T > 1: tiles are views 0..T-2.
    is_tile = torch.arange(T, device=cls.device) < (T - 1)
    a_tiles = torch.where(is_tile, a, torch.zeros_like(a))
    total = a_tiles.sum()
    total = torch.where(total > 0, total, torch.ones_like(total))
    w = (T - 1) * a_tiles / total  # mean 1 over the tiles
    w = 1 + params["alpha"] * (w - 1)
    return torch.where(is_tile, w, torch.ones_like(w))


def thumbnail_attention(cls: torch.Tensor, params: dict[str, torch.Tensor], *, heads: int, eps: float) -> torch.Tensor:
    """cls (T, Cv) -> (T,): the last block's attention of the thumbnail (the last view) to every view,
    averaged over heads; the weights before the gate. Training reads it too (`sleigh train --gswa-hint`)."""
    T = cls.shape[0]
    h = F.linear(F.layer_norm(cls, cls.shape[-1:], params["norm.weight"], params["norm.bias"], eps),
                 params["proj.weight"], params["proj.bias"])  # (T, Dg)
    D = h.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in params:
        p = {n: params[f"blocks.{i}.{n}"] for n in BLOCK_PARAMS}
        x = F.layer_norm(h, (D,), p["norm1.weight"], p["norm1.bias"], eps)
        q, k, v = F.linear(x, p["attn.qkv.weight"], p["attn.qkv.bias"]).chunk(3, dim=-1)  # each (T, Dg)
        attn = _attention_probs(q, k, heads) @ _heads(v, heads)  # (H, T, hd)
        h = h + F.linear(attn.transpose(0, 1).reshape(T, D), p["attn.proj.weight"], p["attn.proj.bias"])
        x = F.layer_norm(h, (D,), p["norm2.weight"], p["norm2.bias"], eps)
        h = h + F.linear(F.gelu(F.linear(x, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        i += 1
    x = F.layer_norm(h, (D,), params["final_norm.weight"], params["final_norm.bias"], eps)
    q, k = F.linear(x, params["final_qk.weight"], params["final_qk.bias"]).chunk(2, dim=-1)
    return _attention_probs(q, k, heads)[:, -1, :].mean(0)  # (T,)


class GSWA(nn.Module):
    def __init__(self, cfg: GSWAConfig, vision_hidden: int):
        super().__init__()
        self.cfg = cfg
        D = cfg.width(vision_hidden)
        self.heads = cfg.num_heads
        self.norm = nn.LayerNorm(vision_hidden, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(vision_hidden, D)
        self.blocks = nn.ModuleList(_Block(D, cfg.layer_norm_eps) for _ in range(cfg.num_layers - 1))
        self.final_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.final_qk = nn.Linear(D, 2 * D)
        self.alpha = nn.Parameter(torch.zeros(()))  # the gate: 0 = identity at init

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """cls (T, Cv) -> weights (T,)."""
        params = dict(self.named_parameters())
        return gswa_weights(cls, params, heads=self.heads, eps=self.cfg.layer_norm_eps)

    def thumbnail_attention(self, cls: torch.Tensor) -> torch.Tensor:
        """cls (T, Cv) -> (T,): where the thumbnail looks, before normalising and gating."""
        return thumbnail_attention(cls, dict(self.named_parameters()), heads=self.heads, eps=self.cfg.layer_norm_eps)


class _Block(nn.Module):
    """Parameter holder for one full pre-norm block; the math is in `gswa_weights`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
