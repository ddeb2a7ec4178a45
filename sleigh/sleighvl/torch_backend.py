"""The PyTorch reference as a backend (a checkpoint folder runs here). torch is imported lazily.

The model is only read (inference mode, no module state changes in forward), so generations in
several threads share it; each one's cache is its own `TorchCache`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sleigh.runtime.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = model.eval()

    @classmethod
    def from_checkpoint(cls, path: Path, threads: int | None = None) -> TorchBackend:
        from sleigh.sleighvl.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(path)
        return cls(model, threads)

    def run(self, module, feeds):
        torch = self.torch
        with torch.inference_mode():
            if module == "vision":
                out = self.model.encode_images(torch.from_numpy(feeds["pixel_values"]))
                return {"image_embeds": out.image_embeds.numpy(), "gswa_weights": out.gswa_weights.numpy()}
            if module == "embed":
                emb = self.model.embed(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["image_embeds"]))
                return {"inputs_embeds": emb.numpy()}
        raise KeyError(module)

    def new_cache(self, batch=1) -> TorchCache:
        torch = self.torch
        return TorchCache(self.model.llm.empty_cache(batch), torch.zeros(batch, 0, dtype=torch.int64),
                          torch.zeros(batch, 0))

    def step(self, cache, inputs_embeds, attention_mask, attention_bias, position_ids):
        """The reference keeps a plain growing cache (every slot in use)."""
        from sleigh.sleighvl.llm import extend_cache

        torch = self.torch
        with torch.inference_mode():
            mask = torch.cat([cache.mask, torch.from_numpy(attention_mask)], dim=1)
            bias = torch.cat([cache.bias, torch.from_numpy(attention_bias)], dim=1)
            logits, new = self.model.llm(torch.from_numpy(inputs_embeds), mask, bias, torch.from_numpy(position_ids),
                                         cache.kv)
            cache.kv, cache.mask, cache.bias = extend_cache(cache.kv, new), mask, bias
        return logits[:, -1].float().numpy()


@dataclass
class TorchCache:
    """One sequence's cache on the reference: (key, value) per layer and the mask and bias of each position."""

    kv: list
    mask: object  # (B, P) int64 tensor
    bias: object  # (B, P) float32 tensor

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])
