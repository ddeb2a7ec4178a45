"""One small function per exported module, chosen through `MODULES` (STYLE 5).

Each entry wraps the reference model's piece in an `nn.Module` whose forward has the package's
named inputs and outputs (DESIGN.md, "The model package"), gives example inputs with every dynamic
dimension >= 2 (so nothing is specialised), and names the dynamic dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.export import Dim

from sleigh.export import gswa_op
from sleigh.runtime.kv_cache import LOGITS, NEW, PAST
from sleigh.runtime.manifest import kv_names
from sleigh.sleighvl.model import SleighVL


@dataclass
class ModuleSpec:
    name: str
    wrapper: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    has_gswa_node: bool = False


class VisionModule(nn.Module):
    """pixel_values (T, 3, S, S) -> image_embeds (T, 256, D), cls_tokens (T, Cv). Each view alone, so
    the runtime may run the views in chunks; GSWA, which reads every view's CLS token, is `GswaModule`.
    The embeddings are mlp1's: with gswa.apply == "scale" the runtime scales them by the weights."""

    def __init__(self, model: SleighVL):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        hidden = self.model.vision(pixel_values)  # (T, 1 + g*g, Cv)
        return self.model.project(hidden), hidden[:, 0]


class GswaModule(nn.Module):
    """cls_tokens (T, Cv), all views of one image with the thumbnail last -> gswa_weights (T,): one
    `sleigh::GSWA` node (export/gswa_op.py), or ones for a model without GSWA."""

    def __init__(self, model: SleighVL):
        super().__init__()
        self.model = model

    def forward(self, cls_tokens):
        if self.model.gswa is None:
            return torch.ones_like(cls_tokens[:, 0])
        return gswa_op.gswa_call(self.model.gswa, cls_tokens)


class EmbedModule(nn.Module):
    """input_ids (B, S), image_embeds (M, D) -> inputs_embeds (B, S, D)."""

    def __init__(self, model: SleighVL):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_embeds):
        return self.model.embed(input_ids, image_embeds)


class DecoderModule(nn.Module):
    """inputs_embeds, attention_mask, attention_bias, position_ids, cache slots k/v per layer
    -> logits, the new positions' k/v per layer (sleighvl/llm.py: the slot cache)."""

    def __init__(self, model: SleighVL):
        super().__init__()
        self.llm = model.llm

    def forward(self, inputs_embeds, attention_mask, attention_bias, position_ids, *past):
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, new = self.llm(inputs_embeds, attention_mask, attention_bias, position_ids, cache)
        return (logits, *[t for kv in new for t in kv])


def vision_spec(model: SleighVL, views: int = 2) -> ModuleSpec:
    s = model.cfg.vision.image_size
    T = Dim("views", min=1, max=64)
    return ModuleSpec("vision", VisionModule(model), (torch.randn(views, 3, s, s),), ["pixel_values"],
                      ["image_embeds", "cls_tokens"], ({0: T},))


def gswa_spec(model: SleighVL, views: int = 3) -> ModuleSpec:
    T = Dim("views", min=1, max=64)
    return ModuleSpec("gswa", GswaModule(model), (torch.randn(views, model.cfg.vision.hidden_size),), ["cls_tokens"],
                      ["gswa_weights"], ({0: T},), has_gswa_node=model.gswa is not None)


def embed_spec(model: SleighVL) -> ModuleSpec:
    cfg = model.cfg
    B, S, M = Dim("batch", min=1, max=64), Dim("sequence", min=1, max=cfg.llm.max_position_embeddings), Dim("image_rows", min=0)
    ids = torch.randint(0, cfg.llm.vocab_size, (2, 7))
    ids[0, 2:4] = cfg.prompt.img_context_token_id
    return ModuleSpec("embed", EmbedModule(model), (ids, torch.randn(3, cfg.llm.hidden_size)),
                      ["input_ids", "image_embeds"], ["inputs_embeds"], ({0: B, 1: S}, {0: M}))


def decoder_spec(model: SleighVL) -> ModuleSpec:
    cfg = model.cfg.llm
    batch, seq, slots = 2, 3, 4
    B = Dim("batch", min=1, max=64)
    S = Dim("sequence", min=1, max=cfg.max_position_embeddings)
    C = Dim("cache_slots", min=0, max=cfg.max_position_embeddings)
    total = Dim("total_sequence", min=1, max=2 * cfg.max_position_embeddings)
    kv = [torch.randn(batch, cfg.num_kv_heads, slots, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    example = (torch.randn(batch, seq, cfg.hidden_size), torch.ones(batch, slots + seq, dtype=torch.int64),
               torch.zeros(batch, slots + seq), torch.arange(slots, slots + seq).expand(batch, seq).clone(), *kv)
    dyn = ({0: B, 1: S}, {0: B, 1: total}, {0: B, 1: total}, {0: B, 1: S}, tuple({0: B, 2: C} for _ in kv))  # *past is one tuple
    return ModuleSpec("decoder", DecoderModule(model), example,
                      ["inputs_embeds", "attention_mask", "attention_bias", "position_ids", *kv_names(cfg.num_layers, PAST)],
                      [LOGITS, *kv_names(cfg.num_layers, NEW)], dyn)


MODULES: dict[str, Callable[[SleighVL], ModuleSpec]] = {
    "vision": vision_spec,
    "gswa": gswa_spec,
    "embed": embed_spec,
    "decoder": decoder_spec,
}
