"""The runtime's slot KV cache: in-place writes, growth in chunks, mask and bias kept per slot."""

import ctypes
import mmap
import sys

import numpy as np
import pytest

from sleigh.errors import SleighError
from sleigh.runtime.kv_cache import KV_CHUNK, LAZY_SLOTS_BYTES, PAST, DeviceSlots, HostSlots, SlotCache, grown_capacity
from tests.helpers import HostCuda


def test_grown_capacity_rounds_up_to_chunks():
    assert [grown_capacity(n) for n in (1, KV_CHUNK, KV_CHUNK + 1, 3 * KV_CHUNK)] == [KV_CHUNK, KV_CHUNK, 2 * KV_CHUNK, 3 * KV_CHUNK]
    assert grown_capacity(0) == 0 and grown_capacity(5, chunk=4) == 8


def test_slots_are_written_in_place_and_grow_by_chunks():
    names = [f"{PAST}.0.key", f"{PAST}.0.value"]
    cache = SlotCache(names, batch=2, kv_heads=3, head_dim=4, chunk=8)
    rng = np.random.default_rng(0)
    written = {n: [] for n in names}

    def append(S, mask=None, bias=None):
        new = {n: rng.standard_normal((2, 3, S, 4)).astype(np.float32) for n in names}
        for n in names:
            written[n].append(new[n])
        mask = np.ones((2, S), np.int64) if mask is None else mask
        cache.append(new, mask, np.full((2, S), 0.5, np.float32) if bias is None else bias)

    assert cache.capacity == 0 and cache.length == 0
    feeds = cache.feeds(np.ones((2, 5), np.int64), np.zeros((2, 5), np.float32))
    assert feeds["attention_mask"].shape == (2, 5) and feeds[names[0]].shape == (2, 3, 0, 4)  # a prefill: no slots

    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0  # left padding in row 1 stays masked in its slots
    append(5, mask=mask)
    assert (cache.length, cache.capacity) == (5, 8)
    before = dict(cache.slots)
    append(1)
    append(1)
    append(1)
    assert (cache.length, cache.capacity) == (8, 8)
    assert all(cache.slots[n] is before[n] for n in names)  # no reallocation within the capacity
    append(1)
    assert (cache.length, cache.capacity) == (9, 16)
    for n in names:  # everything written so far, in order, in the first slots
        np.testing.assert_array_equal(cache.slots[n][:, :, :9], np.concatenate(written[n], axis=2))
        assert not cache.slots[n][:, :, 9:].any()  # unused slots are zeros (finite), masked

    feeds = cache.feeds(np.ones((2, 1), np.int64), np.full((2, 1), 0.25, np.float32))
    assert feeds["attention_mask"].shape == (2, 17) and feeds[names[0]].shape == (2, 3, 16, 4)
    expected_mask = np.zeros((2, 17), np.int64)
    expected_mask[:, :9] = 1
    expected_mask[1, :2] = 0
    expected_mask[:, 16] = 1  # the new position
    np.testing.assert_array_equal(feeds["attention_mask"], expected_mask)
    np.testing.assert_array_equal(feeds["attention_bias"][0, :9], np.full(9, 0.5, np.float32))
    assert feeds["attention_bias"][0, 16] == 0.25 and not feeds["attention_bias"][0, 9:16].any()


def test_chunk_of_one_keeps_every_slot_in_use_and_close_is_final():
    """chunk=1 (the torch reference's cache) grows to exactly the positions held: a concatenated cache.
    A mask of another batch, or any use after close(), is a one-line SleighError."""
    import pytest

    from sleigh.errors import SleighError

    names = [f"{PAST}.0.key"]
    cache = SlotCache(names, batch=1, kv_heads=2, head_dim=3, chunk=1)
    parts = [np.full((1, 2, S, 3), S, np.float32) for S in (4, 1, 1)]
    for part in parts:
        cache.append({names[0]: part}, np.ones((1, part.shape[2]), np.int64), np.zeros((1, part.shape[2]), np.float32))
        assert cache.capacity == cache.length
    np.testing.assert_array_equal(cache.slots[names[0]], np.concatenate(parts, axis=2))
    with pytest.raises(SleighError, match="batch of 1"):
        cache.feeds(np.ones((2, 1), np.int64), np.zeros((2, 1), np.float32))
    cache.close()
    cache.close()
    assert cache.slots == {}
    with pytest.raises(SleighError, match=r"^kv cache \| used after close\(\)"):
        cache.feeds(np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32))


def _storages():
    """Every storage adapter, with a reader of its slots as numpy: numpy, device pointers (TensorRT) and
    OrtValues (ONNX Runtime's CUDA provider), the last two on host memory through the CUDA stand-in."""
    def device_reader(cache, name):
        shape = cache.layout.shape(cache.capacity)
        raw = (ctypes.c_float * int(np.prod(shape))).from_address(cache.slots[name])
        return np.ctypeslib.as_array(raw).reshape(shape)

    yield "numpy", HostSlots(), lambda cache, name: cache.slots[name]
    yield "device", DeviceSlots(HostCuda()), device_reader
    ort = pytest.importorskip("onnxruntime")
    from sleigh.runtime.backends.onnxruntime_backend import OrtValueSlots

    yield "ortvalue", OrtValueSlots(ort, HostCuda(), device="cpu"), lambda cache, name: cache.slots[name].numpy()


@pytest.mark.parametrize("kind", ["numpy", "device", "ortvalue"])
def test_reserved_slots_never_move_and_growth_past_them_keeps_what_was_written(kind):
    """reserve() sizes the slots once, on every storage: an empty cache still feeds no slots (a
    prefill attends over its own positions only), appends within the reservation write in place into
    the same buffers, and an append past it grows by whole chunks and keeps every written position."""
    storage, read = next((s, r) for k, s, r in _storages() if k == kind)
    names, B, KVH, hd = [f"{PAST}.0.key", f"{PAST}.0.value"], 2, 3, 4
    new_buffer = (lambda a: a.ctypes.data) if kind == "device" else \
        (lambda a: storage.ort.OrtValue.ortvalue_from_numpy(a)) if kind == "ortvalue" else (lambda a: a)
    cache = SlotCache(names, B, KVH, hd, chunk=8, storage=storage)
    cache.reserve(10)
    assert (cache.length, cache.capacity, cache.fed) == (0, 16, 0)
    feeds = cache.feeds(np.ones((B, 5), np.int64), np.zeros((B, 5), np.float32))
    assert feeds["attention_mask"].shape == (B, 5)
    if kind != "device":  # a pointer has no shape: the backend binds it with `fed` slots
        assert all(tuple(getattr(v, "shape", lambda: None)() if kind == "ortvalue" else v.shape) == (B, KVH, 0, hd)
                   for v in cache.past().values())
    rng, written, reserved = np.random.default_rng(0), {n: [] for n in names}, dict(cache.slots)
    keep = []  # the new positions' arrays stay alive until their copy is read back

    def append(S):
        new = {n: rng.standard_normal((B, KVH, S, hd)).astype(np.float32) for n in names}
        keep.append(new)
        for n in names:
            written[n].append(new[n])
        cache.append({n: new_buffer(new[n]) for n in names}, np.ones((B, S), np.int64), np.full((B, S), 0.5, np.float32))

    append(5)
    for _ in range(11):
        append(1)
    assert (cache.length, cache.capacity, cache.fed) == (16, 16, 16)
    assert all(cache.slots[n] is reserved[n] for n in names)  # written in place: never reallocated
    cache.reserve(12)  # already there: nothing moves
    assert all(cache.slots[n] is reserved[n] for n in names)
    append(3)  # past the reservation: one growth
    assert (cache.length, cache.capacity) == (19, 24) and all(cache.slots[n] is not reserved[n] for n in names)
    for n in names:
        slots = read(cache, n)
        np.testing.assert_array_equal(slots[:, :, :19], np.concatenate(written[n], axis=2))
        assert not slots[:, :, 19:].any()
    feeds = cache.attention(np.ones((B, 1), np.int64), np.zeros((B, 1), np.float32))
    assert feeds["attention_mask"].shape == (B, 25) and feeds["attention_mask"][:, :19].all()
    assert not feeds["attention_mask"][:, 19:24].any()
    cache.close()
    if kind == "device":
        assert not storage.cuda.buffers  # the reserved and the grown buffers were freed


def test_lent_slots_are_given_back_on_close_or_growth_and_never_freed():
    """`adopt`: a backend's fixed buffers (runtime/backends/static_steps.py) lent to an empty cache.
    Closing the cache gives them back instead of freeing them; a growth past them copies what was
    written into buffers of the cache's own and gives the lent ones back then."""
    storage = DeviceSlots(HostCuda())
    names, returned = [f"{PAST}.0.key", f"{PAST}.0.value"], []

    def lend(cache, capacity=8):
        lent = {n: storage.alloc(cache.layout, capacity) for n in names}
        cache.adopt(lent, capacity, on_close=returned.append)
        return lent

    cache = SlotCache(names, 1, 2, 4, chunk=8, storage=storage)
    lent = lend(cache)
    assert cache.slots == lent and cache.capacity == 8 and cache.length == 0
    cache.close()
    assert returned == [cache] and all(ptr in storage._live for ptr in lent.values())  # not freed

    cache, returned[:] = SlotCache(names, 1, 2, 4, chunk=8, storage=storage), []
    lent = lend(cache)
    layout = cache.layout
    ones = np.ones((1, 2, 8, 4), np.float32)
    for n in names:
        ctypes.memmove(lent[n], ones.ctypes.data, ones.nbytes)
    cache.advance(np.ones((1, 8), np.int64), np.zeros((1, 8), np.float32))
    cache.reserve(9)  # past the lent capacity
    assert returned == [cache] and cache.capacity == 16 and set(cache.slots.values()).isdisjoint(lent.values())
    raw = (ctypes.c_float * (2 * 16 * 4)).from_address(cache.slots[names[0]])
    assert (np.ctypeslib.as_array(raw).reshape(layout.shape(16))[:, :, :8] == 1).all()
    cache.close()
    assert returned == [cache] and all(ptr in storage._live for ptr in lent.values())
    filled = SlotCache(names, 1, 2, 4, storage=storage)
    filled.reserve(1)
    filled.advance(np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32))
    with pytest.raises(SleighError, match="only an empty cache takes lent slots"):
        filled.adopt(lent, 8, on_close=returned.append)


def test_a_shared_step_reads_the_slots_in_use_and_its_new_positions_as_views_of_the_cache():
    """kv_cache.form "shared"/"weighted": `attention(shared=True)` reserves the new positions' slots,
    writes their mask and bias ahead into the cache's columns and returns views of them (no copy per
    step); the cache counts them only at `advance`, and a step that never ran leaves nothing counted."""
    cache = SlotCache([f"{PAST}.0.key"], 2, 1, 4)
    first_mask, first_bias = np.array([[0, 1, 1], [1, 1, 1]]), np.array([[0, 0.5, 0], [0, 0, -1]], np.float32)
    feeds = cache.attention(first_mask, first_bias, shared=True)
    assert cache.capacity == KV_CHUNK and cache.length == 0  # reserved, not counted
    np.testing.assert_array_equal(feeds["attention_mask"], first_mask)
    np.testing.assert_array_equal(feeds["attention_bias"], first_bias)
    assert np.shares_memory(feeds["attention_mask"], cache.mask) and np.shares_memory(feeds["attention_bias"], cache.bias)
    cache.advance(first_mask, first_bias)
    abandoned = cache.attention(np.zeros((2, 1), np.int64), np.full((2, 1), 9, np.float32), shared=True)
    assert abandoned["attention_mask"].shape == (2, 4) and cache.length == 3  # a step that failed: not counted
    step_mask, step_bias = np.ones((2, 1), np.int64), np.full((2, 1), 0.25, np.float32)
    feeds = cache.attention(step_mask, step_bias, shared=True)
    np.testing.assert_array_equal(feeds["attention_mask"], np.concatenate([first_mask, step_mask], axis=1))
    np.testing.assert_array_equal(feeds["attention_bias"], np.concatenate([first_bias, step_bias], axis=1))
    cache.advance(step_mask, step_bias)
    assert cache.length == 4 and not cache.mask[:, 4:].any()


def _resident_pages(array: np.ndarray) -> np.ndarray:
    """1 for each page of `array`'s memory that is resident (Linux mincore), else 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-array.nbytes // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes), vec) == 0, ctypes.get_errno()
    return np.frombuffer(vec, np.uint8) & 1


@pytest.mark.skipif(sys.platform != "linux", reason="mincore: Linux")
def test_large_host_slots_take_memory_only_where_written():
    """Lazy host slot buffers from LAZY_SLOTS_BYTES on are anonymous mappings (never a recycled heap
    block that np.zeros clears), so slots reserved for a whole generation are resident only as they fill."""
    names = [f"{PAST}.0.key", f"{PAST}.0.value"]
    assert not HostSlots().lazy  # a cache that grows while decoding: np.zeros (a fresh mapping per growth faults)
    cache = SlotCache(names, batch=1, kv_heads=2, head_dim=64, storage=HostSlots(lazy=True))  # 512 B a slot
    cache.reserve(8192)
    buffer = cache.slots[names[0]]
    owner = buffer
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert buffer.nbytes >= LAZY_SLOTS_BYTES and isinstance(owner.obj, mmap.mmap)
    assert _resident_pages(buffer).sum() == 0
    buffer[:, :, :300] = 1.0  # 300 slots of each row: 75 KB of each 2 MB row
    resident = _resident_pages(buffer)
    assert 0 < resident.sum() <= 2 * (300 * 256 // mmap.PAGESIZE + 2)
    assert buffer[:, :, 300:].max() == 0 and buffer.flags.writeable
    small = SlotCache(names, batch=1, kv_heads=2, head_dim=64, storage=HostSlots(lazy=True))
    small.reserve(256)  # 128 KB: an ordinary array
    assert small.slots[names[0]].nbytes < LAZY_SLOTS_BYTES and not small.slots[names[0]].any()
