"""The PyTorch reference as a backend (a checkpoint folder runs here). torch is imported lazily."""

from __future__ import annotations

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
        self._cache = None
        self._mask = self._bias = None  # (B, P) of the cached positions

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

    def reset(self, batch=1):
        torch = self.torch
        self._cache = self.model.llm.empty_cache(batch)
        self._mask, self._bias = torch.zeros(batch, 0, dtype=torch.int64), torch.zeros(batch, 0)

    def step(self, inputs_embeds, attention_mask, attention_bias, position_ids):
        """The reference keeps a plain growing cache (every slot in use)."""
        from sleigh.sleighvl.llm import extend_cache

        torch = self.torch
        with torch.inference_mode():
            mask = torch.cat([self._mask, torch.from_numpy(attention_mask)], dim=1)
            bias = torch.cat([self._bias, torch.from_numpy(attention_bias)], dim=1)
            logits, new = self.model.llm(torch.from_numpy(inputs_embeds), mask, bias, torch.from_numpy(position_ids),
                                         self._cache)
            self._cache, self._mask, self._bias = extend_cache(self._cache, new), mask, bias
        return logits[:, -1].float().numpy()

    @property
    def past_length(self):
        return 0 if self._cache is None else int(self._cache[0][0].shape[2])

