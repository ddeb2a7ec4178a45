"""The decoder's KV cache, one abstraction for every backend: preallocated slots, written in place.

What the decoder reads and returns, and how the slots are reserved and grown: README, "The decoder's
KV cache". A `SlotCache` holds one sequence's slots (B, KV, C, hd) per past_key_values name and
writes each step's new positions into the next free ones; `reserve(n)` sizes them before the prefill.

The per-slot mask and bias (GSWA's log-weights of image positions) live beside the slots, always on
the host (they are small, and every backend feeds them from there), so a step is given the mask and
bias of its new positions only.

Where the slots live is the storage's business, one adapter per kind of memory:

- `HostSlots`: numpy arrays (ONNX Runtime's CPU provider reads them where they lie).
- `DeviceSlots`: raw device pointers through runtime/backends/cuda.Cuda (TensorRT); one pitched
  device-to-device copy per tensor writes the new positions. onnxruntime_backend.OrtValueSlots
  keeps device OrtValues the same way; sleighvl/torch_backend.TorchSlots keeps torch tensors.

Each generation owns its cache (`Backend.new_cache`); `close()` frees its slots (idempotent).
"""

from __future__ import annotations

import mmap
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from sleigh.errors import SleighError

PAST, NEW = "past_key_values", "new_key_values"  # the decoder's cache-slot inputs and new-position outputs
LOGITS = "logits"  # the decoder's first output: next-token scores
# The slots' dtypes a decoder may take (its manifest says which: an engine entry's kv_dtype, or the
# package decoder's inputs); float16 halves the cache (build-engine --kv-dtype: the standard form's attention
# stays float32, a fused decoder's GroupQueryAttention computes in float16).
KV_DTYPES = ("float32", "float16")

# Slots added per growth: few enough that attention over unused (masked) slots costs little, many
# enough that the copy made at each growth is rare (once per 256 decoded tokens).
KV_CHUNK = 256


# Lazy host slot buffers from this size on are mapped anonymously (HostSlots): the kernel hands out
# zeroed pages as they are first written. Where mmap takes no flags (Windows), np.zeros.
LAZY_SLOTS_BYTES = 1 << 20
PRIVATE_MAP = getattr(mmap, "MAP_PRIVATE", None)


def grown_capacity(needed: int, chunk: int = KV_CHUNK) -> int:
    """The capacity to grow to so that `needed` slots fit: the next multiple of `chunk`."""
    return -(-needed // chunk) * chunk


@dataclass(frozen=True)
class Layout:
    """One KV tensor's slots: (batch, kv_heads, capacity, head_dim) of `dtype`, C-contiguous, so slot c
    of every (batch, head) row sits at byte c * row_bytes of that row, and rows are capacity * row_bytes apart."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype

    def shape(self, capacity: int) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, capacity, self.head_dim)

    @property
    def rows(self) -> int:
        return self.batch * self.kv_heads

    @property
    def row_bytes(self) -> int:
        """Bytes of one position in one (batch, head) row."""
        return self.head_dim * self.dtype.itemsize

    def nbytes(self, capacity: int) -> int:
        return self.rows * capacity * self.row_bytes


class HostSlots:
    """Slots as numpy arrays; new positions are numpy arrays (B, KV, S, hd) too."""

    lock = nullcontext()  # nothing is shared between caches
    closed = False  # set by close(): no cache of this storage may be written again
    lazy = False

    def _check_open(self) -> None:
        if self.closed:
            raise SleighError("kv cache", "its backend was closed", "a cache made by an open backend (new_cache)")

    def __init__(self, lazy: bool = False):
        """`lazy`: large buffers are mapped anonymously, so slots reserved and not yet written take no
        memory (np.zeros may take a recycled heap block and clear it, which makes all of it resident).
        For caches reserved once for a whole generation: a fresh mapping faults its pages in as they
        are first written, which slows a cache that grows while decoding (RESULTS.md, "Reserved ahead")."""
        self.lazy = lazy

    def alloc(self, layout: Layout, capacity: int):
        """Zeroed slots: unused ones are masked, but must be finite (0 * NaN is NaN)."""
        self._check_open()
        shape, nbytes = layout.shape(capacity), layout.nbytes(capacity)
        if not self.lazy or not nbytes or nbytes < LAZY_SLOTS_BYTES or PRIVATE_MAP is None:
            return np.zeros(shape, layout.dtype)
        # private (the default is shared: a forked child would write the parent's slots); unmapped with its last view
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=PRIVATE_MAP), layout.dtype).reshape(shape)

    def none_of(self, layout: Layout, buffer):
        """`buffer` as zero slots (B, KV, 0, hd): what a step on an empty cache reads."""
        return buffer[:, :, :0]

    def copy(self, layout: Layout, dst, dst_capacity: int, dst_slot: int, src, src_capacity: int, src_slot: int,
             count: int) -> None:
        """Positions src_slot.. of `src` into dst_slot.. of `dst`, `count` of them, in every row."""
        dst[:, :, dst_slot:dst_slot + count] = src[:, :, src_slot:src_slot + count]

    def sync(self) -> None:
        """Wait for the copies (device storage); on the host they are done."""

    def free(self, buffer) -> None:
        """Release slots (on the host, the garbage collector does)."""

    def close(self) -> None:
        """Release every slot still held (the backend closes)."""
        self.closed = True


class DeviceSlots(HostSlots):
    """Slots as device pointers (ints) through `cuda` (runtime/backends/cuda.Cuda: malloc, free, zero,
    copy_rows, sync, or a host stand-in with the same calls). New positions are device buffers
    (B, KV, S, hd). Every buffer it allocated and did not free is freed by `close()`, so closing
    the backend frees the slots of every cache it made. One stream is shared: its copies take turns."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.lock = threading.RLock()
        self._live: set[int] = set()

    def pointer(self, buffer) -> int:
        return int(buffer)

    def none_of(self, layout, buffer):
        """A pointer carries no shape: the backend binds it with the cache's `fed` slots (0)."""
        return buffer

    def alloc(self, layout: Layout, capacity: int):
        self._check_open()
        ptr = self.cuda.malloc(layout.nbytes(capacity))  # 0 slots: a small real buffer (TensorRT wants an address)
        self.cuda.zero(ptr, layout.nbytes(capacity))  # on the copy stream, before the copies that follow
        self._live.add(ptr)
        return ptr

    def copy(self, layout, dst, dst_capacity, dst_slot, src, src_capacity, src_slot, count):
        row = layout.row_bytes
        self.cuda.copy_rows(self.pointer(dst) + dst_slot * row, dst_capacity * row, self.pointer(src) + src_slot * row,
                            src_capacity * row, count * row, layout.rows)

    def sync(self) -> None:
        self.cuda.sync()

    def free(self, buffer) -> None:
        if buffer in self._live:  # after close() every buffer is already freed
            self._live.discard(buffer)
            self.cuda.free(buffer)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for ptr in list(self._live):
                self.free(ptr)


class SlotCache:
    """One sequence's KV cache: slots for every past_key_values input of the decoder (in `storage`,
    numpy arrays by default), with the attention mask and bias of every slot (host numpy arrays)."""

    def __init__(self, names: list[str], batch: int, kv_heads: int, head_dim: int, dtype=np.float32,
                 chunk: int = KV_CHUNK, storage: HostSlots | None = None):
        storage = HostSlots() if storage is None else storage
        self.storage, self.chunk = storage, chunk
        self.layout = Layout(batch, kv_heads, head_dim, np.dtype(dtype))
        self.length = 0  # slots in use: 0 .. length-1
        self.closed = False
        # what a backend bound to these slots and may reuse while they stay where they are (the ONNX
        # Runtime backend's IOBinding for a fused decoder); None after a growth moves them
        self.binding = None
        with storage.lock:
            self.slots = {n: storage.alloc(self.layout, 0) for n in names}
        self.mask = np.zeros((batch, 0), np.int64)  # per slot, capacity wide
        self.bias = np.zeros((batch, 0), np.float32)
        self._on_close = None  # slots lent by their owner (`adopt`): given back, not freed, on close

    @property
    def batch(self) -> int:
        return self.layout.batch

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def fed(self) -> int:
        """The slots a step reads: none while the cache is empty (however many are reserved), else all."""
        return self.capacity if self.length else 0

    def attention(self, new_mask: np.ndarray, new_bias: np.ndarray, shared: bool = False) -> dict[str, np.ndarray]:
        """The decoder's attention_mask and attention_bias (B, fed + S): the slots', then the new positions'.
        `shared` (a decoder that writes into the slots itself, kv_cache.form "shared" or "weighted"): the
        slots in use only, and the new positions written ahead into their own slots' columns (room
        reserved for them), so both are views of the cache's arrays; `advance` counts them after the step."""
        self._check_open()
        if new_mask.ndim != 2 or new_mask.shape[0] != self.batch or new_bias.shape != new_mask.shape:
            raise SleighError("step", f"attention_mask {new_mask.shape} / attention_bias {new_bias.shape} do not match "
                              f"the cache's batch of {self.batch}", "both (batch, new positions), batch as given to new_cache()")
        if shared:  # the new positions written ahead into their slots' columns: views, no copy
            P, S = self.length, new_mask.shape[1]
            self.reserve(P + S)
            self.mask[:, P:P + S], self.bias[:, P:P + S] = new_mask, new_bias
            return {"attention_mask": self.mask[:, :P + S], "attention_bias": self.bias[:, :P + S]}
        C = self.fed
        return {"attention_mask": np.concatenate([self.mask[:, :C], new_mask.astype(np.int64, copy=False)], axis=1),
                "attention_bias": np.concatenate([self.bias[:, :C], new_bias.astype(np.float32, copy=False)], axis=1)}

    def past(self) -> dict:
        """The slots by past_key_values name as a step reads them (`fed` of them)."""
        if self.length:
            return dict(self.slots)
        return {name: self.storage.none_of(self.layout, buffer) for name, buffer in self.slots.items()}

    def feeds(self, new_mask: np.ndarray, new_bias: np.ndarray) -> dict:
        """`attention(...)` and `past()`: every cache input of one decoder step."""
        return {**self.attention(new_mask, new_bias), **self.past()}

    def adopt(self, slots: dict, capacity: int, on_close) -> None:
        """Use `slots` (a buffer of `capacity` slots per name, owned by the caller: a backend's fixed
        buffers, runtime/backends/static_steps.py) in place of this empty cache's own; `close()` calls
        `on_close(self)` instead of freeing them. A growth past `capacity` would move to buffers of its own."""
        self._check_open()
        if self.length or set(slots) != set(self.slots):
            raise SleighError("kv cache", "only an empty cache takes lent slots, one per cache tensor", "a new cache")
        with self.storage.lock:
            for buffer in self.slots.values():
                self.storage.free(buffer)
        self.slots, self.binding, self._on_close = dict(slots), None, on_close
        self.mask, self.bias = np.zeros((self.batch, capacity), np.int64), np.zeros((self.batch, capacity), np.float32)

    def reserve(self, positions: int) -> None:
        """Slots for `positions` in all, in whole chunks; nothing moves when they are there already.
        Otherwise the used slots are copied into larger buffers (old and new are held meanwhile)."""
        self._check_open()
        P, C = self.length, self.capacity
        if positions <= C:
            return
        grown = grown_capacity(positions, self.chunk)
        st, layout = self.storage, self.layout
        with st.lock:
            old = {}
            for name, buffer in self.slots.items():  # re-lay the used slots for the larger C
                old[name], self.slots[name] = buffer, st.alloc(layout, grown)
                st.copy(layout, self.slots[name], grown, 0, buffer, C, 0, P)
            st.sync()  # the copies have read the old slots
            lent, self._on_close = self._on_close, None  # lent slots go back to their owner, not freed
            for buffer in old.values():
                if lent is None:
                    st.free(buffer)
            if lent is not None:
                lent(self)
        self.binding = None  # the slots moved
        mask, bias = np.zeros((self.batch, grown), np.int64), np.zeros((self.batch, grown), np.float32)
        mask[:, :P], bias[:, :P] = self.mask[:, :P], self.bias[:, :P]
        self.mask, self.bias = mask, bias

    def append(self, new: dict, new_mask: np.ndarray, new_bias: np.ndarray) -> None:
        """Write the new positions' keys/values (by past_key_values name, in the storage's kind of
        buffer, (B, KV, S, hd)) into the next free slots, growing by whole chunks where they do not fit."""
        S, P = new_mask.shape[1], self.length
        self.reserve(P + S)
        st, layout, C = self.storage, self.layout, self.capacity
        with st.lock:
            for name, buffer in new.items():
                st.copy(layout, self.slots[name], C, P, buffer, S, 0, S)
            st.sync()  # the copies have read the new positions; the next step reads these slots
        self.advance(new_mask, new_bias)

    def advance(self, new_mask: np.ndarray, new_bias: np.ndarray) -> None:
        """Count S new positions that the decoder wrote into slots length.. itself (kv_cache.form
        "shared" or "weighted"; `reserve` made room for them before the step)."""
        P, S = self.length, new_mask.shape[1]
        self.mask[:, P:P + S] = new_mask
        self.bias[:, P:P + S] = new_bias
        self.length = P + S

    def close(self) -> None:
        """Free the slots now (device memory); idempotent. The cache cannot be used afterwards."""
        if self.closed:
            return
        self.closed = True
        self.binding = None  # its OrtValues would keep the slots alive
        with self.storage.lock:
            slots, self.slots = self.slots, {}
            if self._on_close is not None:
                self._on_close(self)
                return
            for buffer in slots.values():
                self.storage.free(buffer)

    def _check_open(self) -> None:
        if self.closed:
            raise SleighError("kv cache", "used after close()", "a new cache from backend.new_cache()")
        self.storage._check_open()  # its slots may have been freed with the backend

    def __del__(self):  # an abandoned cache (a prefill never continued) frees its device slots too
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass
