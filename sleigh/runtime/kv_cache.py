"""The decoder's KV cache as the runtime keeps it: preallocated slots, written in place.

The decoder (package schema 2, sleighvl/llm.py) reads C cache slots, uses a slot only where its
attention mask is 1, and returns the keys and values of the S new positions alone. `SlotCache` keeps
the slots in host memory (the CPU provider reads them where they lie, no copy) and writes each
step's new positions into the next free slots. Capacity grows in chunks of `KV_CHUNK` slots, with one
copy of the used slots per growth: a decode step copies one position per layer, never the cache.

The per-slot mask and bias (GSWA's log-weights of image positions) live beside the slots, so a step
is given the mask and bias of its new positions only.
"""

from __future__ import annotations

import numpy as np

PAST, NEW = "past_key_values", "new_key_values"  # the decoder's cache-slot inputs and new-position outputs

# Slots added per growth: few enough that attention over unused (masked) slots costs little, many
# enough that the copy made at each growth is rare (once per 256 decoded tokens).
KV_CHUNK = 256


def past_name(new_name: str) -> str:
    """new_key_values.3.key -> past_key_values.3.key: the slots an output is written into."""
    return PAST + new_name[len(NEW):]


def grown_capacity(needed: int, chunk: int = KV_CHUNK) -> int:
    """The capacity to grow to so that `needed` slots fit: the next multiple of `chunk`."""
    return -(-needed // chunk) * chunk


class SlotCache:
    """Numpy slots for every past_key_values input of the decoder, with their mask and bias."""

    def __init__(self, names: list[str], batch: int, kv_heads: int, head_dim: int, dtype=np.float32,
                 chunk: int = KV_CHUNK):
        self.chunk = chunk
        self.batch, self.kv_heads, self.head_dim, self.dtype = batch, kv_heads, head_dim, np.dtype(dtype)
        self.length = 0  # slots in use: 0 .. length-1
        self.slots = {n: np.zeros((batch, kv_heads, 0, head_dim), self.dtype) for n in names}
        self.mask = np.zeros((batch, 0), np.int64)
        self.bias = np.zeros((batch, 0), np.float32)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def feeds(self, new_mask: np.ndarray, new_bias: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder's attention_mask, attention_bias (slots, then the new positions) and slots."""
        return {"attention_mask": np.concatenate([self.mask, new_mask.astype(np.int64, copy=False)], axis=1),
                "attention_bias": np.concatenate([self.bias, new_bias.astype(np.float32, copy=False)], axis=1),
                **self.slots}

    def append(self, new: dict[str, np.ndarray], new_mask: np.ndarray, new_bias: np.ndarray) -> None:
        """Write the new positions' keys/values (by past_key_values name) into the next free slots."""
        S = new_mask.shape[1]
        end = self.length + S
        if end > self.capacity:
            self._grow(grown_capacity(end, self.chunk))
        for name, array in new.items():
            self.slots[name][:, :, self.length:end] = array
        self.mask[:, self.length:end] = new_mask
        self.bias[:, self.length:end] = new_bias
        self.length = end

    def _grow(self, capacity: int) -> None:
        used = self.length
        for name, old in self.slots.items():
            grown = np.zeros((self.batch, self.kv_heads, capacity, self.head_dim), self.dtype)  # unused slots: zeros, masked
            grown[:, :, :used] = old[:, :, :used]
            self.slots[name] = grown
        mask, bias = np.zeros((self.batch, capacity), np.int64), np.zeros((self.batch, capacity), np.float32)
        mask[:, :used], bias[:, :used] = self.mask[:, :used], self.bias[:, :used]
        self.mask, self.bias = mask, bias
