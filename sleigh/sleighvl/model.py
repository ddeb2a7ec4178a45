"""SleighVL: InternViT -> pixel shuffle -> mlp1 -> GSWA, and the InternLM2 LLM.

The top-level pieces mirror the exported modules: `vision` then `project` is `vision.onnx` (per view,
so it runs in chunks of views), `weigh_views` is `gswa.onnx` (all views at once), `embed` is
`embed.onnx`, `llm` (its forward) is `decoder.onnx`. `encode_images` is vision, project and GSWA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sleigh.runtime.multimodal import image_attention_bias, scaled_embeds
from sleigh.sleighvl.config import SleighVLConfig
from sleigh.sleighvl.gswa import GSWA
from sleigh.sleighvl.llm import LLM
from sleigh.sleighvl.vision import Projector, VisionEncoder, pixel_shuffle


@dataclass
class VisionOutput:
    image_embeds: torch.Tensor  # (T, 256, D); already scaled when gswa.apply == "scale"
    gswa_weights: torch.Tensor  # (T,)
    last_hidden: torch.Tensor  # (T, 1025, Cv), CLS first
    projected: torch.Tensor  # (T, 256, D), mlp1 output before any GSWA scaling


class SleighVL(nn.Module):
    def __init__(self, cfg: SleighVLConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg)
        self.gswa = GSWA(cfg.gswa, cfg.vision.hidden_size) if cfg.gswa is not None else None
        self.llm = LLM(cfg.llm)

    def encode_images(self, pixel_values: torch.Tensor) -> VisionOutput:
        """pixel_values (T, 3, S, S), one image's views with the thumbnail last."""
        return self.encode_hidden(self.vision(pixel_values))

    def encode_hidden(self, hidden: torch.Tensor) -> VisionOutput:
        """The ViT's output for one image's views (T, 1 + g*g, Cv) -> mlp1 and GSWA."""
        return self.encode_batch(hidden, [hidden.shape[0]])[0]

    def encode_batch(self, hidden: torch.Tensor, views: list[int]) -> list[VisionOutput]:
        """Several images' views from one ViT call (training), `views[i]` of them for image i, in
        order -> per image, mlp1 and GSWA. The ViT and mlp1 read each view alone, so every view goes
        through mlp1 at once; GSWA weighs each image's views among themselves."""
        out = []
        for h, projected in zip(torch.split(hidden, views), torch.split(self.project(hidden), views), strict=True):
            weights = self.weigh_views(h[:, 0])
            embeds = projected if self.gswa is None else scaled_embeds(projected, weights, self.cfg.gswa.apply)
            out.append(VisionOutput(embeds, weights, h, projected))
        return out

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The ViT's output (T, 1 + g*g, Cv) -> mlp1's image embeddings (T, g*g/4, D), per view."""
        return self.projector(pixel_shuffle(hidden[:, 1:], self.cfg.vision.grid))

    def weigh_views(self, cls: torch.Tensor) -> torch.Tensor:
        """All views' CLS tokens (T, Cv) -> GSWA's weights (T,); ones without GSWA."""
        if self.gswa is None:
            return torch.ones(cls.shape[0], dtype=cls.dtype, device=cls.device)
        return self.gswa(cls)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """input_ids (B, S), image_embeds (M, D), M >= 0 -> inputs_embeds (B, S, D).

        The i-th <IMG_CONTEXT> (row-major over the batch) takes image row i; one past the M rows keeps
        its token-table row, as in InternVL's generate, which embeds a generated <IMG_CONTEXT> from the
        table. Text alone (a decode step) passes M = 0. Branch-free for export.
        """
        tok = self.llm.embed_tokens(input_ids)  # (B, S, D)
        is_img = input_ids == self.cfg.prompt.img_context_token_id  # (B, S)
        idx = (torch.cumsum(is_img.reshape(-1).to(torch.int64), 0) - 1).reshape(input_ids.shape)  # (B, S)
        M = image_embeds.shape[0]
        # (M + 1, D), M may be 0: a row past the image rows, which no position reads (idx >= M takes tok).
        # A token's row, not new_zeros: onnxruntime <= 1.22's float16 converter leaves ConstantOfShape's
        # value float32, and the FP16 embed module then fails to load
        padded = torch.cat([image_embeds, tok.reshape(-1, tok.shape[-1])[:1].to(image_embeds.dtype)])
        rows = padded[idx.clamp(0, M)]  # (B, S, D)
        return torch.where((is_img & (idx < M))[..., None], rows.to(tok.dtype), tok)

    def attention_bias(self, input_ids: torch.Tensor, gswa_weights: torch.Tensor) -> torch.Tensor:
        """The decoder's attention_bias row for a prompt (zeros unless GSWA acts in attention mode)."""
        if self.gswa is None or self.cfg.gswa.apply != "attention":
            return torch.zeros(input_ids.shape, dtype=torch.float32)
        bias = image_attention_bias(input_ids.cpu().numpy(), gswa_weights.detach().cpu().float().numpy(),
                                    self.cfg.prompt.img_context_token_id, self.cfg.vision.tokens_per_view,
                                    self.cfg.gswa.min_weight)
        return torch.from_numpy(bias)


