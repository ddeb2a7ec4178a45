"""The PyTorch reference as a backend (a checkpoint folder runs here). torch is imported lazily.

The model is only read (inference mode, no module state changes in forward), so generations in
several threads share it; each one's cache is its own SlotCache (runtime/kv_cache.py) whose slots are
torch tensors (`TorchSlots`). Chunk 1: a cache the Pipeline reserved holds exactly prompt +
max_new_tokens slots, and one that grows past it grows by exactly the positions added (a plain
concatenated cache)."""

from __future__ import annotations

from pathlib import Path

from sleigh.runtime.backends.base import Backend
from sleigh.runtime.kv_cache import PAST, HostSlots, SlotCache


class TorchSlots(HostSlots):
    """Slots as torch tensors on the CPU; written with the same slice assignment as numpy's."""

    def __init__(self, torch):
        self.torch = torch

    def alloc(self, layout, capacity):
        torch = self.torch
        return torch.zeros(layout.shape(capacity), dtype=getattr(torch, layout.dtype.name))


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = model.eval()
        self.slot_storage = TorchSlots(torch)
        layers = range(model.llm.cfg.num_layers)
        self._layers = [(f"{PAST}.{i}.key", f"{PAST}.{i}.value") for i in layers]  # the decoder's slot names per layer

    @classmethod
    def from_checkpoint(cls, path: Path, threads: int | None = None) -> TorchBackend:
        from sleigh.sleighvl.checkpoint import WEIGHTS, load_checkpoint

        model, _, _ = load_checkpoint(path)
        backend = cls(model, threads)
        backend.files = {"model": Path(path) / WEIGHTS}  # what a memory budget counts as weights
        return backend

    def run(self, module, feeds):
        self._check_open()
        torch = self.torch
        with torch.inference_mode():
            if module == "vision":  # the exported modules' split (export/modules.py)
                hidden = self.model.vision(torch.from_numpy(feeds["pixel_values"]))
                return {"image_embeds": self.model.project(hidden).numpy(), "cls_tokens": hidden[:, 0].numpy()}
            if module == "gswa":
                return {"gswa_weights": self.model.weigh_views(torch.from_numpy(feeds["cls_tokens"])).numpy()}
            if module == "embed":
                emb = self.model.embed(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["image_embeds"]))
                return {"inputs_embeds": emb.numpy()}
        raise KeyError(module)

    def new_cache(self, batch=1) -> SlotCache:
        self._check_open()
        cfg = self.model.llm.cfg
        with self.torch.inference_mode():
            return SlotCache([n for pair in self._layers for n in pair], batch, cfg.num_kv_heads, cfg.head_dim,
                             chunk=1, storage=self.slot_storage)

    def step(self, cache, inputs_embeds, attention_mask, attention_bias, position_ids):
        self._check_open()
        torch = self.torch
        with torch.inference_mode():
            attn = cache.attention(attention_mask, attention_bias)
            slots = cache.past()
            past = [(slots[k], slots[v]) for k, v in self._layers]
            logits, new = self.model.llm(torch.from_numpy(inputs_embeds), torch.from_numpy(attn["attention_mask"]),
                                         torch.from_numpy(attn["attention_bias"]), torch.from_numpy(position_ids), past)
            cache.append({name: t for names, kv in zip(self._layers, new) for name, t in zip(names, kv)},
                         attention_mask, attention_bias)
        return logits[:, -1].float().numpy()

    def _release(self) -> None:
        self.model = None  # the weights go with the last reference
        self.slot_storage.close()
