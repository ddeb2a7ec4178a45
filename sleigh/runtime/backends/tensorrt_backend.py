"""TensorRT backend: runs the `.plan` engines that `sleigh build-engine` lists in the manifest.

No PyTorch: device memory, copies and the stream come from cuda-python (`cuda.bindings.runtime`),
and each module runs through the TensorRT 10 tensor API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3` on a non-default stream). `tensorrt` and `cuda` are imported only when a backend
is opened, so `sleigh --help` and the ONNX Runtime path never need them.

Each generation owns its cache (`new_cache`: a SlotCache on `DeviceSlots`, runtime/kv_cache.py and
README "The decoder's KV cache"); nothing comes back to the host but the last position's logits. The
decoder engine has two optimisation profiles (prefill: no slots; decode: one new token), chosen per
step with `set_optimization_profile_async` on one execution context.

The execution contexts, the scratch buffers and the stream are shared by every generation and are
not thread-safe: `run` and `step` hold the backend's lock, so concurrent generations take turns per
call (each keeps its own cache, so their tokens stay their own). `close()` releases the execution
contexts, engines and runtime, frees every device buffer (every cache's slots included) and the stream.

UNVERIFIED: TensorRT cannot be installed on the machines this was written on (no GPU; the package
index carries only a stub). The pure helpers here (profile selection, compatibility checks, error
messages) are tested on CPU; the TensorRT and CUDA calls follow the TensorRT 10.3 / 11.1 Python
bindings and cuda-python's runtime API, and have never been executed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from sleigh.errors import SleighError, first_line
from sleigh.runtime.backends.base import Backend, module_files
from sleigh.runtime.backends.cuda import CUDA_PYTHON_EXPECTED, Cuda, check as _check, import_cudart
from sleigh.runtime.compat import parse_version
from sleigh.runtime.kv_cache import LOGITS, DeviceSlots, SlotCache
from sleigh.runtime.manifest import EngineEntry, KVCacheSection, Manifest
from sleigh.runtime.package import MODULE_NAMES, inside

MIN_TENSORRT = (10, 3)  # JetPack 6 ships TensorRT 10.3
TENSORRT_EXPECTED = ("TensorRT 10.3+ (pip install 'sleigh[tensorrt]' on a machine with an NVIDIA GPU; "
                     "JetPack 6 ships 10.3)")
GPU_EXPECTED = ("an NVIDIA GPU with its driver (TensorRT engines run on the GPU only; "
                "the onnxruntime backend runs on the CPU)")
DECODER_PROFILES = ("prefill", "decode")  # the decoder engine's optimisation profiles, in this order

# A profile maps each input name to (min, opt, max) shapes.
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) when a usable TensorRT Python package imports; else (False, one-line problem)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or an OSError from a missing libnvinfer
        return False, f"the TensorRT Python package is not installed ({first_line(e)})"
    version = getattr(trt, "__version__", "")
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        return False, f"the TensorRT Python package is not installed (`import tensorrt` found a stub, version {version or '?'})"
    try:
        too_old = parse_version(version)[:2] < MIN_TENSORRT
    except ValueError:  # no version at all
        too_old = True
    if too_old:
        return False, f"TensorRT {version} is too old"
    return True, version


def runtime_status() -> tuple[bool, str, str, str]:
    """(ok, what, problem, expected): whether TensorRT, cuda-python and a GPU are all present."""
    ok, problem = tensorrt_status()
    if not ok:
        return False, "tensorrt", problem, TENSORRT_EXPECTED
    try:
        cudart = import_cudart()
    except Exception as e:
        return False, "cuda-python", f"the cuda-python package is not installed ({first_line(e)})", CUDA_PYTHON_EXPECTED
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as e:  # a missing libcudart raises here, not at import
        return False, "GPU", f"the CUDA runtime cannot be loaded ({first_line(e)})", GPU_EXPECTED
    if int(err) != 0 or count < 1:
        return False, "GPU", f"no CUDA device is visible (cudaGetDeviceCount: {err}, {count} devices)", GPU_EXPECTED
    return True, "", "", ""


def fits(profile: Profile, shapes: dict[str, Shape]) -> bool:
    """Whether every input of `profile` is given in `shapes`, with min <= shape <= max in every dim."""
    for name, (lo, _, hi) in profile.items():
        s = shapes.get(name)
        if s is None or len(s) != len(lo):
            return False
        if any(not a <= x <= b for a, x, b in zip(lo, s, hi)):
            return False
    return True


def select_profile(profiles: list[Profile], shapes: dict[str, Shape]) -> int | None:
    """Index of the tightest profile that holds `shapes` (the smallest total max-min range), or None.

    Tightest, because a narrow profile (decode: one token) gets kernels tuned for that shape.
    """
    best, best_width = None, None
    for i, prof in enumerate(profiles):
        if not fits(prof, shapes):
            continue
        width = sum(b - a for lo, _, hi in prof.values() for a, b in zip(lo, hi))
        if best_width is None or width < best_width:
            best, best_width = i, width
    return best


def describe_ranges(profile: Profile) -> str:
    """'pixel_values (1..13, 3, 448, 448)'-style text of a profile's shape ranges."""
    def dim(a, b):
        return str(a) if a == b else f"{a}..{b}"

    return "; ".join(f"{name} ({', '.join(dim(a, b) for a, b in zip(lo, hi))})" for name, (lo, _, hi) in profile.items())


def profile_error(module: str, profiles: list[Profile], shapes: dict[str, Shape], names: list[str] | None = None) -> SleighError:
    """The SleighError for shapes that no profile of `module` holds."""
    got = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
    labels = names or [f"profile {i}" for i in range(len(profiles))]
    ranges = " | ".join(f"{label}: {describe_ranges(p)}" for label, p in zip(labels, profiles))
    return SleighError(f"tensorrt {module}", f"input shapes {got} are outside the engine's optimisation profiles",
                       f"shapes within {ranges} (rebuild with a larger --max-tiles / --max-context / --max-batch)")


def check_engine_compat(entry: EngineEntry, tensorrt_version: str, compute_capability: str | None) -> None:
    """A plan runs only on the TensorRT version and GPU architecture that built it: say so before
    TensorRT fails to deserialize it with a long log."""
    if entry.backend != "tensorrt":
        raise SleighError("engine", f"backend {entry.backend!r} is not a TensorRT engine",
                          "an engine entry with backend 'tensorrt' (or backend onnxruntime for this one)")
    versions = entry.versions or {}
    built_trt, built_cc = versions.get("tensorrt"), versions.get("compute_capability")
    if not built_trt:
        raise SleighError("engine", "the manifest entry has no TensorRT version (the build did not finish)",
                          "an engine written by a completed `sleigh build-engine`")
    if built_trt != tensorrt_version:
        raise SleighError("engine", f"built with TensorRT {built_trt}, this machine has TensorRT {tensorrt_version}",
                          "the same TensorRT version, or rebuild on this machine with `sleigh build-engine`")
    if built_cc and compute_capability and built_cc != compute_capability:
        raise SleighError("engine", f"built for a GPU of compute capability {built_cc}, this GPU is {compute_capability}",
                          "rebuild on this machine's GPU with `sleigh build-engine`")


def compute_capability(cudart, device: int = 0) -> str:
    """'8.7' for Jetson Orin, '9.0' for H100/H200."""
    attr = cudart.cudaDeviceAttr
    err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
    _check(err, "cudaDeviceGetAttribute")
    err, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
    _check(err, "cudaDeviceGetAttribute")
    return f"{major}.{minor}"


def device_name(cudart, device: int = 0) -> str:
    err, props = cudart.cudaGetDeviceProperties(device)
    _check(err, "cudaGetDeviceProperties")
    name = props.name
    return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)


def make_logger(trt, echo: bool):
    """A TensorRT logger that keeps the errors (for one-line SleighErrors) and echoes warnings to stderr."""
    import sys

    severity = trt.ILogger.Severity
    errors = (severity.ERROR, severity.INTERNAL_ERROR)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            if sev in errors:
                self.errors.append(str(msg))
            if echo and (sev in errors or sev == severity.WARNING):
                sys.stderr.write(f"[TensorRT] {msg}\n")

        def last_error(self) -> str:
            return first_line(self.errors[-1]) if self.errors else "no message from TensorRT"

    return _Logger()


def load_plugin_library(trt, logger, library: Path) -> None:
    """Register TensorRT's own plugins and the ones `library` provides (the sleigh::GSWA IPluginV3),
    before a network that uses them is parsed or a plan deserialized."""
    trt.init_libnvinfer_plugins(logger, "")
    if trt.get_plugin_registry().load_library(str(library)) is None:
        raise SleighError(str(library), f"TensorRT cannot load the plugin library ({logger.last_error()})",
                          "a shared library built for this TensorRT version that registers the sleigh::GSWA plugin")


def gswa_plugin_path(pkg: Path, engine_entry: EngineEntry) -> Path | None:
    """The engine folder's copy of the GSWA plugin library when the gswa plan calls the plugin, else
    None. Only a file inside the package that the entry lists (with its sha256; manifest.py checks it)
    is ever loaded: a manifest must not make the runtime load an arbitrary shared library."""
    if engine_entry.plugin_library is None:
        return None
    path = inside(pkg, engine_entry.plugin_library, "manifest.json: gswa.plugin_library")
    if not path.is_file():
        raise SleighError(str(path), "the GSWA plugin library of the engine is missing",
                          "the engine's files as built (rebuild it with `sleigh build-engine`)")
    return path


class _Scratch:
    """Device buffers by key that grow on demand (sized by use, not by the profile's maximum)."""

    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        self._buf: dict[str, tuple[int, int]] = {}

    def get(self, key: str, nbytes: int) -> int:
        ptr, size = self._buf.get(key, (0, -1))
        if nbytes > size:
            if ptr:
                self.cuda.sync()  # an enqueued kernel may still read the old buffer
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), max(nbytes, 256)
            self._buf[key] = (ptr, size)
        return ptr

    def close(self) -> None:
        for ptr, _ in self._buf.values():
            self.cuda.free(ptr)
        self._buf.clear()


class _Engine:
    """One deserialized plan, its execution context and its I/O table."""

    def __init__(self, trt, runtime, path: Path, logger, module: str):
        self.module, self.path = module, path
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise SleighError(str(path), f"TensorRT cannot deserialize it ({logger.last_error()})",
                              "a plan built by `sleigh build-engine` with this TensorRT version on this GPU model")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise SleighError(str(path), f"TensorRT cannot create an execution context ({logger.last_error()})",
                              "enough free GPU memory for the engine's activations")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.static = {n: tuple(int(d) for d in self.engine.get_tensor_shape(n)) for n in names}  # -1 = dynamic
        self.profiles: list[Profile] = [
            {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, p)) for n in self.inputs}
            for p in range(self.engine.num_optimization_profiles)]
        self.profile = 0  # a new context starts on profile 0

    def close(self) -> None:
        self.context = None  # the context before its engine
        self.engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plans: dict[str, Path], *, kv: KVCacheSection, label: str = "tensorrt",
                 plugin_library: Path | None = None, device: int = 0, verbose: bool = False):
        import tensorrt as trt

        self.trt = trt
        self.files = dict(plans)  # what a memory budget counts as weights (runtime/memory.py)
        self.kv = kv  # the decoder's cache names, from the manifest
        self.label = label
        self._lock = threading.RLock()  # one execution context per engine, one stream, shared scratch
        self.engines: dict = {}
        self.cuda = Cuda(import_cudart(), device)
        self.scratch = _Scratch(self.cuda)
        self.slot_storage = DeviceSlots(self.cuda)  # every cache's slots; freed with the backend
        try:
            self._open(trt, plans, plugin_library, device, verbose)
        except BaseException:
            self.close()
            raise

    def _open(self, trt, plans, plugin_library, device, verbose) -> None:
        self.logger = make_logger(trt, echo=verbose)
        if plugin_library is not None:  # the sleigh::GSWA IPluginV3 must be registered before deserializing
            load_plugin_library(trt, self.logger, plugin_library)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {m: _Engine(trt, self.runtime, Path(p), self.logger, m) for m, p in plans.items()}
        self.device_name = device_name(self.cuda.rt, device)
        self._init_decoder()

    @classmethod
    def from_package(cls, pkg: Path, manifest: Manifest, engine_entry: EngineEntry, *, device: int = 0,
                     verbose: bool = False) -> TensorRTBackend:
        """Open the plans of one engine entry of the manifest; one-line SleighError when TensorRT,
        cuda-python or a GPU is missing, or when the plan was built for another TensorRT or GPU."""
        ok, what, problem, expected = runtime_status()
        if not ok:
            raise SleighError(what, problem, expected)
        import tensorrt as trt

        check_engine_compat(engine_entry, trt.__version__, compute_capability(import_cudart(), device))
        plans = module_files(manifest, engine_entry)
        for module in MODULE_NAMES:
            if module not in plans or not plans[module].is_file():
                raise SleighError(str(plans.get(module, Path(pkg) / f"<{module}>")), "engine plan missing",
                                  "the .plan files listed in the manifest (rebuild with `sleigh build-engine`)")
        return cls(plans, kv=manifest.contract.kv_cache, label=engine_entry.precision,
                   plugin_library=gswa_plugin_path(pkg, engine_entry), device=device, verbose=verbose)

    # -- generic execution -------------------------------------------------------------------------

    def _set_profile(self, eng: _Engine, shapes: dict[str, Shape]) -> None:
        index = select_profile(eng.profiles, shapes)
        names = list(DECODER_PROFILES) if eng.module == "decoder" and len(eng.profiles) == 2 else None
        if index is None:
            raise profile_error(eng.module, eng.profiles, shapes, names)
        if index != eng.profile:
            if not eng.context.set_optimization_profile_async(index, self.cuda.stream_handle):
                raise SleighError(f"tensorrt {eng.module}", f"cannot switch to profile {index} ({self.logger.last_error()})",
                                  "an engine built by `sleigh build-engine`")
            eng.profile = index

    def _enqueue(self, eng: _Engine, host: dict[str, np.ndarray], device: dict[str, tuple[int, Shape]],
                 outputs: dict[str, tuple[int, int]]) -> dict[str, tuple[int, Shape]]:
        """Bind inputs (host arrays are uploaded to scratch buffers; device ones are (pointer, shape)),
        bind outputs (given as (pointer, capacity in bytes), else scratch sized from the inferred
        shape), launch. Returns every output's (pointer, shape)."""
        given = set(host) | set(device)
        if given != set(eng.inputs):
            missing, extra = sorted(set(eng.inputs) - given), sorted(given - set(eng.inputs))
            raise SleighError(f"tensorrt {eng.module}", f"inputs do not match the engine (missing {missing}, unexpected {extra})",
                              ", ".join(eng.inputs))
        arrays = {n: np.ascontiguousarray(a, dtype=eng.dtypes[n]) for n, a in host.items()}
        shapes = {**{n: a.shape for n, a in arrays.items()}, **{n: tuple(s) for n, (_, s) in device.items()}}
        self._set_profile(eng, shapes)
        ctx = eng.context
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise SleighError(f"tensorrt {eng.module}", f"set_input_shape({name}, {shape}) failed ({self.logger.last_error()})",
                                  describe_ranges(eng.profiles[eng.profile]))
        addresses = {}
        for name, array in arrays.items():
            addresses[name] = self.scratch.get(f"{eng.module}/{name}", array.nbytes)
            self.cuda.upload(addresses[name], array)
        addresses.update({name: ptr for name, (ptr, _) in device.items()})
        bound = {}
        for name in eng.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise SleighError(f"tensorrt {eng.module}", f"output {name} has an unresolved shape {shape}",
                                  "an engine whose output shapes follow from its input shapes")
            nbytes = int(np.prod(shape, dtype=np.int64)) * eng.dtypes[name].itemsize
            if name in outputs:
                ptr, capacity = outputs[name]
                if nbytes > capacity:  # checked before launch: TensorRT would write past the buffer
                    raise SleighError(f"tensorrt {eng.module}", f"output {name} {shape} needs {nbytes} bytes, its buffer "
                                      f"holds {capacity}", "outputs within the engine's profiles")
            else:
                ptr = self.scratch.get(f"{eng.module}/{name}", nbytes)
            addresses[name] = ptr
            bound[name] = (ptr, shape)
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise SleighError(f"tensorrt {eng.module}", f"set_tensor_address({name}) failed ({self.logger.last_error()})",
                                  "a plan built by `sleigh build-engine`")
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise SleighError(f"tensorrt {eng.module}", f"execute_async_v3 failed ({self.logger.last_error()})",
                              "inputs within the engine's profiles")
        return bound

    def run(self, module, feeds):
        self._check_open()
        with self._lock:
            self._check_open()  # closed by another thread while this one waited
            eng = self.engines[module]
            bound = self._enqueue(eng, feeds, {}, {})
            out = {}
            for name, (ptr, shape) in bound.items():
                out[name] = np.empty(shape, eng.dtypes[name])
                self.cuda.download(out[name], ptr)
            self.cuda.sync()  # the host arrays are filled (and the uploaded inputs read) after this
        return out

    # -- decoder with the slot KV cache ------------------------------------------------------------

    def _init_decoder(self) -> None:
        eng = self.engines["decoder"]
        self.kv_names = list(self.kv.past)
        self.new_names = dict(zip(self.kv.past, self.kv.new))  # the slot input each new output is written into
        if not set(self.kv_names) <= set(eng.inputs) or not set(self.new_names.values()) <= set(eng.outputs):
            raise SleighError(str(eng.path), "the decoder engine lacks the cache inputs or outputs the manifest names",
                              "a plan built by this sleigh from this package (`sleigh build-engine` again)")
        first = self.kv_names[0]
        _, self.num_kv_heads, _, self.head_dim = eng.static[first]
        self.max_batch = max(p["inputs_embeds"][2][0] for p in eng.profiles)
        self.max_context = max(p["inputs_embeds"][2][1] for p in eng.profiles)  # the prefill's longest sequence
        self.kv_dtype = eng.dtypes[first]
        if any(eng.dtypes[n] != self.kv_dtype for n in self.new_names.values()):
            raise SleighError(str(eng.path), f"its new keys/values and its cache slots ({self.kv_dtype}) differ in dtype",
                              "one float dtype for the KV cache in and out (rebuild with `sleigh build-engine`)")

    def new_cache(self, batch=1) -> SlotCache:
        self._check_open()
        if not 1 <= batch <= self.max_batch:
            raise SleighError("batch", f"{batch} is outside the decoder engine's profile",
                              f"1..{self.max_batch} (rebuild with a larger --max-batch)")
        with self._lock:
            return SlotCache(self.kv_names, batch, self.num_kv_heads, self.head_dim, self.kv_dtype,
                             storage=self.slot_storage)

    def _decoder_shapes(self, B: int, S: int, C: int, D: int) -> dict[str, Shape]:
        shapes = {"inputs_embeds": (B, S, D), "attention_mask": (B, C + S), "attention_bias": (B, C + S),
                  "position_ids": (B, S)}
        shapes.update({n: (B, self.num_kv_heads, C, self.head_dim) for n in self.kv_names})
        return shapes

    def step(self, cache, inputs_embeds, attention_mask, attention_bias, position_ids):
        self._check_open()
        B, S, D = inputs_embeds.shape
        P, C = cache.length, cache.fed
        if B != cache.batch:
            raise SleighError("step", f"batch {B} differs from the cache's ({cache.batch})", "the batch given to new_cache()")
        if attention_mask.shape != (B, S) or attention_bias.shape != (B, S):
            raise SleighError("step", f"attention_mask {attention_mask.shape} / attention_bias {attention_bias.shape} "
                              f"do not cover the {S} new positions", f"shape ({B}, {S})")
        if P + S > self.max_context:
            raise SleighError("prompt", f"{P} cached + {S} new positions exceed the engine's context of {self.max_context}",
                              "a shorter prompt, fewer tiles, or an engine built with a larger --max-context")
        eng = self.engines["decoder"]
        if S > 1 and select_profile(eng.profiles, self._decoder_shapes(B, S, C, D)) is None:
            # Several new tokens on a non-empty cache (a second turn): no profile holds slots with
            # sequence > 1, so feed them one at a time; causal attention makes that the same computation.
            logits = None
            for i in range(S):
                logits = self._step(cache, inputs_embeds[:, i:i + 1], attention_mask[:, i:i + 1],
                                    attention_bias[:, i:i + 1], position_ids[:, i:i + 1])
            return logits
        return self._step(cache, inputs_embeds, attention_mask, attention_bias, position_ids)

    def _step(self, cache, inputs_embeds, attention_mask, attention_bias, position_ids) -> np.ndarray:
        eng = self.engines["decoder"]
        B, S, _ = inputs_embeds.shape
        with self._lock:
            self._check_open()  # closed by another thread while this one waited
            C, past = cache.fed, cache.past()  # no slots while the cache is empty: the prefill profile
            device = {n: (past[n], (B, self.num_kv_heads, C, self.head_dim)) for n in self.kv_names}
            host = {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                    **cache.attention(attention_mask, attention_bias)}
            bound = self._enqueue(eng, host, device, {})  # the new keys/values land in scratch buffers
            ptr, shape = bound[LOGITS]  # (B, 1, V): the last position's (schema 3); copy back each row's last
            rows, V, dtype = shape[1], shape[2], eng.dtypes[LOGITS]
            last = np.empty((B, V), dtype)
            for b in range(B):
                offset = ((b * rows) + rows - 1) * V * dtype.itemsize
                self.cuda.download(last[b], ptr + offset)
            for new in self.new_names.values():
                if bound[new][1] != (B, self.num_kv_heads, S, self.head_dim):
                    raise SleighError("tensorrt decoder", f"{new} has shape {bound[new][1]}",
                                      f"({B}, {self.num_kv_heads}, {S}, {self.head_dim}): the new positions only")
            cache.append({name: bound[new][0] for name, new in self.new_names.items()}, attention_mask, attention_bias)
        return last.astype(np.float32, copy=False)

    def describe(self):
        return f"tensorrt {self.label} ({self.device_name}, TensorRT {self.trt.__version__})"

    def _release(self) -> None:
        """Contexts and engines, then the runtime, then every device buffer and the stream (also after
        a failed start, and on garbage collection, best effort)."""
        with self._lock:
            cuda = getattr(self, "cuda", None)
            if cuda is not None:
                cuda.sync()  # nothing enqueued may still read what is freed below
            for eng in self.engines.values():
                eng.close()
            self.engines.clear()
            self.runtime = None
            if cuda is not None:
                self.slot_storage.close()
                self.scratch.close()
                cuda.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: cuda-python may already be gone
            pass
