"""The one small interface every backend implements (Polygraphy-style runners).

`run(module, feeds)` runs `vision` or `embed` on a dict of named arrays and returns a dict of
named arrays. The decoder's KV cache belongs to the caller, not to the backend: `new_cache(batch)`
makes an empty one for one sequence (one per generation, as onnxruntime-genai keeps one Generator
per request over a shared Model), and `step(cache, ...)` feeds new positions, adds them to that
cache and returns the logits of the last one; `step_tokens` does the same from token ids of text. The cache keeps each position's attention mask and
bias with its keys and values, so a step is given the mask and bias of its new positions only.

A backend is shared by every generation of a Pipeline, from any thread: `run` and `step` may be
called concurrently on different caches (a backend whose execution is not thread-safe takes a lock
inside). Every cache is a `runtime/kv_cache.SlotCache`; a backend chooses only where its slots live.

A backend holds sessions, engines or device memory until `close()` (or the end of a `with` block)
releases them. Closing twice is harmless; any other call after it raises one SleighError.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

from sleigh.errors import SleighError
from sleigh.runtime.kv_cache import SlotCache
from sleigh.runtime.package import MODULE_NAMES


def warn(message: str) -> None:
    """One line on stderr through logging (the CLI prints it as `warning: ...`; a log level can silence it)."""
    logging.getLogger("sleigh").warning("%s", message)


class Backend(ABC):
    name: str = "?"
    max_context: int | None = None  # longest prompt + answer the backend was built for (None: the model's)
    max_views: int | None = None  # most views per image the backend was built for (None: the model's)
    closed: bool = False  # set by close()
    # The files the backend read its modules' weights from, by module (external data lies beside a file
    # as FILE.data): what a memory budget counts as weights (runtime/memory.py). Each backend sets its own.
    files: Mapping[str, Path] = MappingProxyType({})
    # The bytes opening each module added to the process, where the backend measures them (ONNX Runtime
    # on Linux): what a memory budget counts for it instead of its files' size (runtime/memory.module_sizes).
    resident: Mapping[str, int] = MappingProxyType({})
    # The dtype of the KV cache slots `new_cache` allocates (what a memory budget counts): the ONNX Runtime
    # and TensorRT backends set their decoder's.
    kv_dtype: np.dtype = np.dtype(np.float32)
    # The engine entry the backend runs (None: a package's FP32 modules, or a checkpoint): set by
    # open_package_backend; its defaults (max_memory) apply to runs that do not give their own.
    entry = None
    # Whether `release` closes modules (ONNX Runtime): a memory budget may then hold them a stage at a time
    releases_modules: bool = False
    # Prompt positions per decoder call that prefill fastest on this backend (None: the whole prompt in one
    # call): the Pipeline prefills in chunks of it unless told otherwise (a memory budget may go smaller).
    prefill_chunk: int | None = None
    # Whether reserving a generation's KV slots before its prefill costs this backend nothing: its decoder
    # steps read the slots in use only (a fused decoder) and its slot buffers are lazy host mappings
    # (kv_cache.HostSlots(lazy=True): resident only where written; address space is still reserved, which
    # a strict overcommit policy or RLIMIT_AS counts). The Pipeline then reserves them, and decoding never
    # grows the cache (a growth copies every slot in use, and holds old and new slots at once).
    reserve_is_free: bool = False

    @abstractmethod
    def run(self, module: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `vision` or `embed` by name."""

    @abstractmethod
    def new_cache(self, batch: int = 1) -> SlotCache:
        """An empty KV cache for one sequence of `batch` rows, for `step`."""

    @abstractmethod
    def step(self, cache: SlotCache, inputs_embeds: np.ndarray, attention_mask: np.ndarray, attention_bias: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Decoder on S new positions after those in `cache`: inputs_embeds (B, S, D), attention_mask (B, S)
        int64 and attention_bias (B, S) float32 of the new positions, position_ids (B, S) -> last logits
        (B, V) float32. The new positions' keys and values are added to `cache`. Any positions, except
        that a fused decoder whose attention turns q and k takes a prompt into an empty cache at
        contiguous positions only (runtime/manifest.ROTARY_INSIDE_HEAD_MULTIPLE)."""

    def step_tokens(self, cache: SlotCache, input_ids: np.ndarray, attention_mask: np.ndarray, attention_bias: np.ndarray,
                    position_ids: np.ndarray, no_image: np.ndarray) -> np.ndarray:
        """`step` on token ids (B, S) int64, text alone (a decode step, or a text prompt's prefill):
        here the embed module, then `step`; a backend whose decoder embeds tokens itself (a fused
        decoder of package schema 6) feeds the ids straight in. `no_image` (0, D) float32: the embed
        module's image rows, none for text (multimodal.no_image_rows)."""
        inputs_embeds = self.run("embed", {"input_ids": input_ids, "image_embeds": no_image})["inputs_embeds"]
        return self.step(cache, inputs_embeds, attention_mask, attention_bias, position_ids)

    def describe(self) -> str:
        return self.name

    def release(self, *modules: str) -> None:
        """Free these modules until they are next run (they open again then); a backend that cannot
        (`releases_modules` False) keeps them."""

    def close(self) -> None:
        """Release what the backend holds (idempotent); any later run/new_cache/step raises a SleighError."""
        if not self.closed:
            self.closed = True
            self._release()

    def _release(self) -> None:
        """What `close()` frees: sessions, engines, device memory (each backend its own)."""

    def _check_open(self) -> None:
        if self.closed:
            raise SleighError(f"backend {self.name}", "used after close()",
                              "an open model: load it again (Pipeline.load), or use it inside its `with` block")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def module_files(manifest, entry=None) -> dict[str, Path]:
    """The file each module runs from: the package's own ONNX modules (`entry` None), or those an
    engine entry of the manifest lists (ONNX or TensorRT plans). What a backend keeps as `files`."""
    if entry is None:
        return {m: manifest.module_path(m) for m in MODULE_NAMES}
    return {m: manifest.path(rel, f"manifest.json: engine modules.{m}") for m, rel in entry.modules.items()}
