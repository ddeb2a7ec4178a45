"""InternViT, pixel shuffle (v2) and the `mlp1` projector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sleigh.sleighvl.config import SleighVLConfig, VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # (T, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (T, g*g, C), patches row-major
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding  # (T, 1 + g*g, C)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, N, C = x.shape
        qkv = self.qkv(x).reshape(T, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (T, nh, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # scale hd^-0.5, no mask
        return self.proj(out.transpose(1, 2).reshape(T, N, C))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # erf GELU, as InternViT


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """InternViT: pixel_values (T, 3, S, S) -> last hidden state (T, 1 + g*g, C), CLS first."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return x


def pixel_shuffle(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """InternVL's pixel shuffle v2 at ratio 0.5, as one reshape.

    Output token t = r*(g/2) + c holds patches [2r][2c], [2r][2c+1], [2r+1][2c], [2r+1][2c+1]
    concatenated on channels (patches row-major): (T, g*g, C) -> (T, g*g/4, 4C).
    """
    T, _, C = patches.shape
    h = grid // 2
    x = patches.reshape(T, h, 2, h, 2, C)  # (T, r, dr, c, dc, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (T, r, c, dr, dc, C)
    return x.reshape(T, h * h, 4 * C)


class Projector(nn.Module):
    """InternVL's `mlp1`: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: SleighVLConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.projector_in, eps=cfg.projector_layer_norm_eps)
        self.fc1 = nn.Linear(cfg.projector_in, cfg.llm.hidden_size)
        self.fc2 = nn.Linear(cfg.llm.hidden_size, cfg.llm.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
