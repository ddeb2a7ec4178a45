"""ONNX Runtime backend: one session per module, named feeds, the KV cache kept in slots.

CPU provider by default; the CUDA provider when onnxruntime-gpu offers it (`providers` in order of
preference). The decoder reads preallocated cache slots and returns only the new positions' keys
and values, which are written into the next free slots in place (runtime/kv_cache.py):

- CPU: the slots are numpy arrays that the session reads where they lie; a step writes one
  position per layer with a slice assignment.
- CUDA: the slots are device OrtValues bound through IOBinding; the new keys/values stay on the
  device and one cudaMemcpy2DAsync per tensor writes them into the slots (cuda-python, or the CUDA
  runtime that onnxruntime-gpu loaded, through ctypes). Only the logits come back to the host.
  UNVERIFIED: this path has not run on a GPU yet (scripts/gpu_check.sh is the prepared check).

Each generation owns its cache (`new_cache`); the sessions are shared, and ONNX Runtime's `run` is
thread-safe. The one CUDA stream that writes slots is shared too, so its copies are serialised by a lock.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from sleigh.errors import SleighError, first_line
from sleigh.runtime.backends.base import Backend
from sleigh.runtime.compat import import_onnxruntime
from sleigh.runtime.kv_cache import KV_CHUNK, SlotCache, grown_capacity
from sleigh.runtime.manifest import KVCacheSection, Manifest
from sleigh.runtime.package import MODULE_NAMES, REEXPORT, check_module_io

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def session_options(threads: int | None = None, *, arena: bool = True):
    """Sleigh's ONNX Runtime session settings: quiet logs, `threads` intra-op threads when given,
    and no CPU memory arena where a caller opens large modules one after another (an arena keeps its peak)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, files: dict[str, Path], kv: KVCacheSection, threads: int | None = None, providers: list[str] | None = None, label: str = "fp32",
                 manifest_modules: dict | None = None):
        ort = import_onnxruntime()  # an onnxruntime older than the tested range: one line, here

        self.ort = ort
        self.providers = providers or ([CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU])
        opts = session_options(threads)
        self.sessions = {}
        for module, path in files.items():
            try:
                self.sessions[module] = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types
                denied = [p for p in (Path(path), Path(f"{path}.data")) if p.exists() and not os.access(p, os.R_OK)]
                if denied:  # not corruption: say so
                    raise SleighError(str(denied[0]), "permission denied: this user may not read it",
                                      "read permission for this user (e.g. chmod a+r on the package's files)") from None
                raise SleighError(str(path), f"ONNX Runtime cannot load it ({first_line(e)})",
                                  "an intact package module (check with `sleigh inspect --verify`)") from None
            if manifest_modules is not None:  # names as the manifest lists them: a swapped file stops here
                sess = self.sessions[module]
                check_module_io(manifest_modules, module, path, [i.name for i in sess.get_inputs()],
                                [o.name for o in sess.get_outputs()])
        self.num_layers, self.num_kv_heads, self.head_dim = kv.num_layers, kv.num_kv_heads, kv.head_dim
        self.label = label
        decoder = self.sessions["decoder"]
        self._new_names, self._past_names = list(kv.new), list(kv.past)  # new[i] is written into past[i]
        absent = sorted(set(self._past_names) - {i.name for i in decoder.get_inputs()}) + \
            sorted(set(self._new_names) - {o.name for o in decoder.get_outputs()})
        if absent:
            raise SleighError(str(files["decoder"]), f"the decoder lacks the cache tensors {absent[:2]} the manifest names",
                              f"the package's own decoder; {REEXPORT}")
        self._kv_dtype = self._input_dtype("decoder", self._past_names[0])
        new_dtypes = {self._output_dtype("decoder", n) for n in self._new_names}
        if new_dtypes != {self._kv_dtype}:
            raise SleighError(str(files["decoder"]), f"its new keys/values are {sorted(map(str, new_dtypes))} and its cache "
                              f"slots {np.dtype(self._kv_dtype)}", "one float dtype for the KV cache in and out")
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        self._cuda = None  # the CUDA helper (one stream), made for the first cache on the CUDA provider
        self._cuda_lock = threading.Lock()  # the copier's stream is shared by every generation's cache

    @classmethod
    def from_package(cls, pkg: Path, manifest: Manifest, threads: int | None = None, providers: list[str] | None = None,
                     engine: dict | None = None) -> OnnxRuntimeBackend:
        if engine is None:
            files = {m: manifest.module_path(m) for m in MODULE_NAMES}
            label = "package fp32"
        else:
            files = {m: manifest.path(f, f"manifest.json: engine modules.{m}") for m, f in engine["modules"].items()}
            label = engine.get("name") or engine["precision"]
        backend = cls(files, manifest.contract.kv_cache, threads=threads, providers=providers, label=label,
                      manifest_modules=manifest.modules)
        if engine is not None and backend.device == "cpu":
            from sleigh.runtime.cpu_features import warn_if_missing

            warn_if_missing(engine)  # its gate ran on another CPU's kernels
        return backend

    def _input_dtype(self, module: str, name: str):
        return _dtype(self.sessions[module].get_inputs(), name)

    def _output_dtype(self, module: str, name: str):
        return _dtype(self.sessions[module].get_outputs(), name)

    def run(self, module, feeds):
        sess = self.sessions[module]
        outs = sess.run(None, feeds)
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    def new_cache(self, batch=1) -> SlotCache | _DeviceSlots:
        args = (self._past_names, batch, self.num_kv_heads, self.head_dim, self._kv_dtype)
        if self.device == "cpu":
            return SlotCache(*args)
        with self._cuda_lock:
            if self._cuda is None:
                self._cuda = _device_copier()
        return _DeviceSlots(self.ort, self._cuda, *args)

    def step(self, cache, inputs_embeds, attention_mask, attention_bias, position_ids):
        sess = self.sessions["decoder"]
        feeds = {"inputs_embeds": inputs_embeds.astype(np.float32, copy=False), "position_ids": position_ids}
        if isinstance(cache, SlotCache):
            feeds.update(cache.feeds(attention_mask, attention_bias))
            logits, *new = sess.run(["logits", *self._new_names], feeds)
            cache.append(dict(zip(self._past_names, new)), attention_mask, attention_bias)
            return logits[:, -1].astype(np.float32)
        binding = sess.io_binding()
        feeds.update(cache.host.feeds(attention_mask, attention_bias))  # mask and bias: small, from the host
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0))
        for name, value in cache.slots.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the sampler reads logits on the host
        for name in self._new_names:
            binding.bind_output(name, self.device)  # the new keys/values stay on the device
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the slot copies run on another stream
        logits, *new = binding.get_outputs()
        with self._cuda_lock:
            cache.append(dict(zip(self._past_names, new)), attention_mask, attention_bias)
        return logits.numpy()[:, -1].astype(np.float32)

    def describe(self):
        return f"onnxruntime [{self.label}] ({self.providers[0].removesuffix('ExecutionProvider')})"


class _DeviceSlots:
    """SlotCache on the CUDA provider: the slots are device OrtValues (zeroed when allocated), the
    mask and bias stay in a host SlotCache, and each step's new keys/values (device OrtValues) are
    copied into slots P..P+S-1 with one pitched device-to-device copy per tensor. `cuda` is the
    copier (runtime/backends/cuda.Cuda: copy_rows, zero, sync); tests run this class on "cpu"
    OrtValues with a host copier."""

    def __init__(self, ort, cuda, names: list[str], batch: int, kv_heads: int, head_dim: int, dtype, chunk: int = KV_CHUNK,
                 device: str = "cuda"):
        self.ort, self.cuda, self.device = ort, cuda, device
        self.host = SlotCache([], batch, kv_heads, head_dim, dtype, chunk)  # mask, bias, length, capacity
        self.shape, self.dtype, self.chunk = (batch, kv_heads, head_dim), np.dtype(dtype), chunk
        self.slots = {n: self._zeros(0) for n in names}

    @property
    def length(self) -> int:
        return self.host.length

    def _zeros(self, capacity: int):
        """A device buffer for `capacity` slots, zeroed on the copy stream (so the zeros land before
        the copies that follow on the same stream; unused slots must be finite)."""
        B, KV, hd = self.shape
        value = self.ort.OrtValue.ortvalue_from_shape_and_type([B, KV, capacity, hd], self.dtype, self.device, 0)
        if capacity:
            self.cuda.zero(value.data_ptr(), B * KV * capacity * hd * self.dtype.itemsize)
        return value

    def _copy(self, dst, dst_capacity: int, dst_slot: int, src, src_capacity: int, src_slot: int, count: int) -> None:
        B, KV, hd = self.shape
        row = hd * self.dtype.itemsize  # bytes per position
        self.cuda.copy_rows(dst.data_ptr() + dst_slot * row, dst_capacity * row, src.data_ptr() + src_slot * row,
                            src_capacity * row, count * row, B * KV)

    def append(self, new: dict, new_mask: np.ndarray, new_bias: np.ndarray) -> None:
        S, used, capacity = new_mask.shape[1], self.host.length, self.host.capacity
        end = used + S
        if end > capacity:
            grown = grown_capacity(end, self.chunk)
            old = dict(self.slots)
            for name, value in old.items():
                self.slots[name] = self._zeros(grown)
                self._copy(self.slots[name], grown, 0, value, capacity, 0, used)
            capacity = grown
            self.cuda.sync()  # the copies have read the old buffers: now they may be released
            del old
        for name, value in new.items():
            self._copy(self.slots[name], capacity, used, value, S, 0, S)
        self.cuda.sync()  # ONNX Runtime reads the slots on its own stream at the next step
        self.host.append({}, new_mask, new_bias)


def _dtype(values, name: str):
    for v in values:
        if v.name == name:
            return np.float16 if "float16" in v.type else np.float32
    return np.float32


def _device_copier():
    """The CUDA helper that writes new keys/values into device slots (one stream per backend)."""
    from sleigh.runtime.backends.cuda import CUDA_PYTHON_EXPECTED, Cuda, any_cudart

    cudart = any_cudart()
    if cudart is None:
        raise SleighError("--backend onnxruntime (CUDA provider)", "writing the KV cache in place on the GPU needs "
                          "the CUDA runtime (libcudart) or cuda-python, and neither is found", CUDA_PYTHON_EXPECTED)
    return Cuda(cudart, 0)
