"""TensorRT backend, everything that needs no TensorRT or GPU: the one-line error where they are
missing, profile selection for prefill and decode, engine/GPU compatibility checks, and that the
module imports nothing heavy. Running engines is unverified on these machines (no TensorRT)."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sleigh.errors import SleighError
from sleigh.runtime.backends.tensorrt_backend import (
    DECODER_PROFILES, TENSORRT_EXPECTED, TensorRTBackend, check_engine_compat, describe_ranges, fits, gswa_plugin_path,
    profile_error, runtime_status, select_profile)
from sleigh.runtime.kv_cache import NEW, PAST
from sleigh.runtime.manifest import (Contract, EngineEntry, KVCacheSection, Manifest, ModuleEntry, TensorInfo, kv_names,
                                    parse_engine)
from sleigh.runtime.package import MODULE_NAMES, SCHEMA_VERSION
from tests.helpers import HostCuda, heavy_imports

TENSORRT_IMPORTABLE = importlib.util.find_spec("tensorrt") is not None
LAYERS, KV, HD, D = 2, 2, 16, 64


def decoder_inputs() -> list[dict]:
    """The decoder inputs as `describe_io` writes them into the manifest (names, symbolic dims)."""
    kv = [{"name": f"past_key_values.{i}.{k}", "dtype": "float32", "shape": ["batch", KV, "cache_slots", HD]}
          for i in range(LAYERS) for k in ("key", "value")]
    return [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", D]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
            {"name": "attention_bias", "dtype": "float32", "shape": ["batch", "total_sequence"]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]}, *kv]


def decoder_manifest() -> Manifest:
    """A manifest, typed as `read_manifest` returns it, with the decoder above and the full-size model's
    image and prompt: the parts the decoder profiles read."""
    from sleigh.sleighvl.config import PRESETS

    config = json.loads(json.dumps(PRESETS["internvl2-2b"].to_dict()))  # as config.json holds it
    contract = Contract.from_config(config, "internvl2-2b preset")
    inputs = tuple(TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in decoder_inputs())
    kv = KVCacheSection(KV, HD, tuple(kv_names(LAYERS, PAST)), tuple(kv_names(LAYERS, NEW)))
    return Manifest(root=Path("pkg"), schema_version=SCHEMA_VERSION, created_by=None, source=None, opset=None,
                    contract=replace(contract, kv_cache=kv), tokenizer="tokenizer.json",
                    modules={"decoder": ModuleEntry("decoder.onnx", (), "fp32", inputs, ())}, files={}, parity=None,
                    calibration=None, engines={}, json={})


def shapes(B, S, C) -> dict:
    """A decoder step on S new positions with C cache slots."""
    s = {"inputs_embeds": (B, S, D), "attention_mask": (B, C + S), "attention_bias": (B, C + S), "position_ids": (B, S)}
    s.update({f"past_key_values.{i}.{k}": (B, KV, C, HD) for i in range(LAYERS) for k in ("key", "value")})
    return s


@pytest.fixture(scope="module")
def profiles():
    from sleigh.engines.options import EngineOptions
    from sleigh.engines.tensorrt_build import decoder_profiles

    return decoder_profiles(decoder_manifest(), EngineOptions(backend="tensorrt", max_context=4096, max_batch=2))


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="tensorrt is importable here")
def test_from_package_without_tensorrt_is_one_line(tmp_path):
    entry = {"backend": "tensorrt", "precision": "fp16", "modules": {}, "versions": {"tensorrt": "10.3.0.26"}}
    with pytest.raises(SleighError) as e:
        TensorRTBackend.from_package(tmp_path, decoder_manifest(), entry)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith("tensorrt | the TensorRT Python package is not installed (")
    assert text.endswith(f". Expected: {TENSORRT_EXPECTED}")
    ok, what, problem, expected = runtime_status()
    assert (ok, what, expected) == (False, "tensorrt", TENSORRT_EXPECTED) and problem in text


def test_select_profile_prefill_decode_and_none(profiles):
    prefill, decode = DECODER_PROFILES.index("prefill"), DECODER_PROFILES.index("decode")
    assert select_profile(profiles, shapes(1, 300, 0)) == prefill  # the prompt, from an empty cache
    assert select_profile(profiles, shapes(1, 4096, 0)) == prefill
    assert select_profile(profiles, shapes(1, 1, 512)) == decode  # one token on a cache of 512 slots
    assert select_profile(profiles, shapes(2, 1, 4096)) == decode  # slots grow in chunks of 256: up to 4096
    assert select_profile(profiles, shapes(1, 1, 0)) in (prefill, decode)  # a one-token prompt fits both
    # no profile: more positions than the context, too large a batch, several tokens on a cache
    # (the backend feeds those one at a time), a missing input or a wrong rank
    assert select_profile(profiles, shapes(1, 4097, 0)) is None
    assert select_profile(profiles, shapes(1, 1, 4096 + 256)) is None
    assert select_profile(profiles, shapes(3, 1, 10)) is None
    assert select_profile(profiles, shapes(1, 3, 10)) is None
    partial = shapes(1, 1, 10)
    del partial["position_ids"]
    assert select_profile(profiles, partial) is None
    assert not fits(profiles[decode], {**shapes(1, 1, 10), "position_ids": (1, 1, 1)})


def test_select_profile_prefers_the_tightest():
    wide = {"x": ((1,), (8,), (100,))}
    narrow = {"x": ((1,), (1,), (1,))}
    assert select_profile([wide, narrow], {"x": (1,)}) == 1
    assert select_profile([narrow, wide], {"x": (1,)}) == 0
    assert select_profile([wide, narrow], {"x": (50,)}) == 0


def test_profile_error_names_the_ranges(profiles):
    err = profile_error("decoder", profiles, shapes(1, 1, 5120), list(DECODER_PROFILES))
    text = str(err)
    assert "\n" not in text and text.startswith("tensorrt decoder | input shapes ")
    assert "prefill: inputs_embeds (1..2, 1..4096, 64)" in text
    assert "decode: inputs_embeds (1..2, 1, 64)" in text
    assert "past_key_values.0.key (1..2, 2, 0..4096, 16)" in text
    assert describe_ranges({"pixel_values": ((1, 3, 448, 448), (7, 3, 448, 448), (13, 3, 448, 448))}) == \
        "pixel_values (1..13, 3, 448, 448)"


def test_gswa_plugin_is_loaded_only_from_the_engine_folder(tmp_path):
    """A manifest names the plugin library; the runtime loads it only from inside the package and
    only when the entry lists it among its (sha256-checked) files."""
    lib = tmp_path / "engines" / "trt" / "plugin" / "libgswa.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    outside = tmp_path.parent / f"{tmp_path.name}-libevil.so"
    outside.write_bytes(b"\x7fELF")
    rel = "engines/trt/plugin/libgswa.so"

    def entry(path, files=(rel,), via="plugin"):
        plans = {m: f"engines/trt/{m}.plan" for m in MODULE_NAMES}
        data = {"backend": "tensorrt", "precision": "fp16", "modules": plans, "gswa": {"via": via, "plugin_library": path}}
        return parse_engine(tmp_path, "trt", data if files is None else {**data, "files": dict.fromkeys(files, {"sha256": "0" * 64, "bytes": 4})})

    assert gswa_plugin_path(tmp_path, entry(None, via="function")) is None
    assert gswa_plugin_path(tmp_path, entry(rel)) == tmp_path / rel
    assert gswa_plugin_path(tmp_path, entry(rel, files=None)) == tmp_path / rel  # an entry being gated lists no files yet
    for make, needle in [(lambda: entry(str(outside), files=(rel, str(outside))), "absolute path"),
                         (lambda: entry(f"../{outside.name}", files=(f"../{outside.name}",)), "outside"),
                         (lambda: entry(rel, files=()), "not among the entry's files"),
                         (lambda: entry(None), "gswa.plugin_library is null"),
                         (lambda: gswa_plugin_path(tmp_path, entry("engines/trt/plugin/gone.so",
                                                                   files=("engines/trt/plugin/gone.so",))), "missing")]:
        with pytest.raises(SleighError) as e:
            make()
        assert needle in str(e.value) and "\n" not in str(e.value), needle


def test_check_engine_compat():
    entry = EngineEntry("trt", "tensorrt", "fp16", {}, versions={"tensorrt": "10.3.0.26", "compute_capability": "8.7"})
    check_engine_compat(entry, "10.3.0.26", "8.7")
    check_engine_compat(entry, "10.3.0.26", None)  # compute capability unknown: TensorRT checks it itself
    cases = [
        (replace(entry, backend="onnxruntime"), "10.3.0.26", "8.7", "not a TensorRT engine"),
        (replace(entry, versions={"tensorrt": None}), "10.3.0.26", "8.7", "no TensorRT version"),
        (entry, "10.8.0.43", "8.7", "built with TensorRT 10.3.0.26, this machine has TensorRT 10.8.0.43"),
        (entry, "10.3.0.26", "9.0", "compute capability 8.7, this GPU is 9.0"),
    ]
    for e, trt_version, cc, needle in cases:
        with pytest.raises(SleighError) as err:
            check_engine_compat(e, trt_version, cc)
        assert needle in str(err.value) and "\n" not in str(err.value) and ". Expected: " in str(err.value)


def test_import_is_light():
    assert heavy_imports("sleigh.runtime.backends.tensorrt_backend") == []


def test_each_cache_keeps_its_own_device_slots_across_a_growth():
    """Two TensorRT caches written alternately (host stand-in for the device): each holds exactly its
    own keys in slots 0..P-1 after growing past a chunk, zeros after, and frees what it allocated."""
    import numpy as np

    from sleigh.runtime.kv_cache import KV_CHUNK, PAST, DeviceSlots, SlotCache

    cuda, B, KVH, hd = HostCuda(), 2, KV, HD
    names = [f"{PAST}.0.key", f"{PAST}.0.value"]
    storage = DeviceSlots(cuda)  # what TensorRTBackend.new_cache gives every cache
    caches = [SlotCache(names, B, KVH, hd, np.float16, storage=storage) for _ in range(2)]
    rng = np.random.default_rng(0)
    written = [{n: [] for n in names} for _ in caches]
    for S in (KV_CHUNK - 3, 1, 1, 1, 1, 2):  # the prefill, then steps across the first growth
        for cache, mine in zip(caches, written):
            new = {n: rng.standard_normal((B, KVH, S, hd)).astype(np.float16) for n in names}
            cache.append({n: new[n].ctypes.data for n in names}, np.ones((B, S), np.int64), np.zeros((B, S), np.float32))
            for n in names:
                mine[n].append(new[n])
    for cache, mine in zip(caches, written):
        P, C = cache.length, cache.capacity
        assert (P, C) == (KV_CHUNK + 3, 2 * KV_CHUNK)
        for n in names:
            slots = np.ctypeslib.as_array((ctypes.c_uint16 * (B * KVH * C * hd)).from_address(cache.slots[n]))
            slots = slots.view(np.float16).reshape(B, KVH, C, hd)
            np.testing.assert_array_equal(slots[:, :, :P], np.concatenate(mine[n], axis=2))
            assert not slots[:, :, P:].any()
    assert len(cuda.buffers) == 2 * len(names)  # the pre-growth buffers are freed
    for cache in caches:
        cache.close()
    assert not cuda.buffers


def test_closing_the_device_storage_frees_every_cache():
    """TensorRTBackend.close() closes its DeviceSlots: the slots of caches still open are freed once,
    a later cache.close() frees nothing twice, and no cache can be made or written afterwards."""
    import numpy as np

    from sleigh.runtime.kv_cache import PAST, DeviceSlots, SlotCache

    cuda, names = HostCuda(), [f"{PAST}.0.key", f"{PAST}.0.value"]
    storage = DeviceSlots(cuda)
    caches = [SlotCache(names, 1, KV, HD, np.float32, storage=storage) for _ in range(2)]
    new = np.ones((1, KV, 3, HD), np.float32)
    caches[0].append({n: new.ctypes.data for n in names}, np.ones((1, 3), np.int64), np.zeros((1, 3), np.float32))
    assert len(cuda.buffers) == 2 * len(names)
    storage.close()
    assert not cuda.buffers
    for cache in caches:  # an open cache of a closed backend: its slots are gone, so it refuses to write
        with pytest.raises(SleighError, match="^kv cache \\| its backend was closed"):
            cache.append({n: new.ctypes.data for n in names}, np.ones((1, 3), np.int64), np.zeros((1, 3), np.float32))
        cache.close()  # HostCuda.free raises on a pointer it does not hold: nothing is freed twice
    with pytest.raises(SleighError, match="backend was closed"):
        SlotCache(names, 1, KV, HD, storage=storage)
    assert not cuda.buffers


def test_the_plans_count_as_weights_in_a_memory_budget(tmp_path, monkeypatch):
    """TensorRTBackend keeps the plans it opened as `files`, as the ONNX Runtime backend keeps its
    modules, so `max_memory` counts them (TensorRT and the GPU are stand-ins: only __init__ runs)."""
    import sys
    import types

    from sleigh.runtime.backends import tensorrt_backend
    from sleigh.runtime.memory import weights_bytes

    plans = {}
    for i, module in enumerate(("vision", "embed", "decoder")):
        plans[module] = tmp_path / f"{module}.plan"
        plans[module].write_bytes(bytes(1000 * (i + 1)))
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(tensorrt_backend, "import_cudart", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "Cuda", lambda rt, device: HostCuda())
    monkeypatch.setattr(TensorRTBackend, "_open", lambda self, *args: None)  # deserializing needs TensorRT
    backend = TensorRTBackend(plans, kv=None)
    assert {m: str(p) for m, p in backend.files.items()} == {m: str(p) for m, p in plans.items()}
    assert weights_bytes(backend.files.values()) == 6000


@pytest.mark.parametrize("version, ok", [("10.3.0.26", True), ("11.1.0", True), ("10.2.1", False), ("", False)])
def test_tensorrt_status_reads_the_version(monkeypatch, version, ok):
    import types

    from sleigh.runtime.backends.tensorrt_backend import tensorrt_status

    fake = types.SimpleNamespace(__version__=version, Builder=object, Runtime=object)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert tensorrt_status() == ((True, version) if ok else (False, f"TensorRT {version} is too old"))
