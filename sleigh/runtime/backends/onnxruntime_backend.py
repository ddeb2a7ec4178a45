"""ONNX Runtime backend: one session per module, named feeds, the KV cache kept in slots.

CPU provider by default; the CUDA provider when onnxruntime-gpu offers it (`providers` in order of
preference). The cache slots (runtime/kv_cache.py) are numpy arrays on the CPU, and on CUDA device
OrtValues (`OrtValueSlots`) bound through IOBinding, written by one cudaMemcpy2DAsync per tensor
(cuda-python, or onnxruntime-gpu's CUDA runtime through ctypes). On an H200 (onnxruntime-gpu 1.31.1,
session 27, benchmarks/RESULTS.md) bias-form packages with CUDA first gave the CPU provider's greedy
tokens (their decoder on the CPU); a decoder whose slots are on the device, an FP16 engine of the
weighted-values form, is UNVERIFIED there (scripts/gpu_check.sh checks it). A fused decoder writes its new positions
into the slots itself: each slot tensor is bound as its layer's input and output (`_step_shared`),
nothing is copied. Its bias form (kv_cache.form "shared") runs on the CPU provider only, also where
CUDA is there for the other modules (FUSED_NOT_ON_CUDA); its weighted-values form ("weighted") runs on
CUDA with a float16 cache (an FP16 engine), on the CPU with a float32 one (FLOAT32_NOT_ON_CUDA).

Each generation owns its cache (`new_cache`, a SlotCache whose storage is `slot_storage`); the
sessions are shared, and ONNX Runtime's `run` is thread-safe. The one CUDA stream that writes slots
is shared too, so its copies take turns (the storage's lock). `close()` drops the sessions and
destroys that stream. `release()` closes some sessions (a memory budget's stages): each opens again
when next run; a run already under way keeps its session until it returns.
"""

from __future__ import annotations

import gc
import os
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from sleigh.errors import SleighError, first_line
from sleigh.runtime.backends.base import Backend, module_files, warn
from sleigh.runtime.backends.static_steps import (CUDA_GRAPH_ENV, NO_GRAPH, STATIC_SLOTS, StaticSteps, bind_in_place,
                                                  graph_run_options)
from sleigh.runtime.compat import import_onnxruntime, session_options, trim_heap
from sleigh.runtime.kv_cache import KV_DTYPES, LOGITS, DeviceSlots, HostSlots, SlotCache
from sleigh.runtime.manifest import EngineEntry, KVCacheSection, Manifest
from sleigh.runtime.memory import resident_bytes
from sleigh.runtime.package import REEXPORT, check_module_io

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# A run option: at the end of the run, free the arena's chunks that are not in use, so the peak of a
# vision call or a prefill chunk does not stay resident for the rest of the generation (the arena
# itself stays on: decode steps reuse it without going back to the system allocator).
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"
# A fused decoder on the CPU prefills fastest in calls of this many positions: GroupQueryAttention's CPU
# kernel scores every query of a call against all of the call's keys (a square per head, the causal half
# zeroed after), so a prompt in chunks scores about half as much and holds chunk x context scores, not
# context^2. 16-22 % less prefill time at 2,000 and 3,500 tokens on the small preset, FP32 and INT4,
# flat from 192 to 384, identical logits (benchmarks/RESULTS.md, "Prefill in chunks").
PREFILL_CHUNK = 256


# Why a fused decoder (kv_cache.form "shared") runs on the CPU provider where CUDA is there for the
# other modules. Read in ONNX Runtime's source (contrib_ops/cuda/bert/group_query_attention.cc): its
# CUDA kernel is registered for float16 and bfloat16 only, and returned INVALID_ARGUMENT whenever
# attention_bias was given, which carries GSWA's log-weights and the padding mask. On an H200 with
# onnxruntime-gpu 1.31.1 (session 27, benchmarks/gqa_cuda_probe.py) a float16 node WITH attention_bias
# ran on CUDA; whether it computes what the CPU kernel does is not checked yet, so the form stays here.
FUSED_NOT_ON_CUDA = ("this form's attention bias (GSWA's weights and the mask) is not checked on ONNX Runtime's CUDA "
                     "GroupQueryAttention", "export with `sleigh export --decoder fused-cuda`")
# Why the weighted-values form ("weighted") with a float32 cache runs on the CPU provider too: CUDA's
# GroupQueryAttention has no float32 kernel, and ONNX Runtime then ran that node on the CPU with every
# layer's cache copied to the host and back each step. Seen on an H200 (session 27, scripts/gpu_check.sh):
# 4 tokens/s at full size, 2.9 s to prefill 13 views, and the tiny package's greedy tokens were not
# the CPU provider's (cause not found: the copies give GroupQueryAttention its past and present as two
# buffers, and on the CPU that gives the in-place tokens, with onnxruntime 1.31.1 and 1.32.0).
FLOAT32_NOT_ON_CUDA = ("ONNX Runtime's CUDA GroupQueryAttention computes in float16 only, and this decoder's KV cache "
                       "is not float16", "build an FP16 engine (`sleigh build-engine --precision fp16`)")


def decoder_on_cpu(providers: list[str], kv_form: str, kv_dtype: str | None) -> tuple[str, str] | None:
    """(why, the way to a decoder on the GPU) where the decoder's session opens on the CPU provider
    although CUDA comes first, else None: a fused decoder with an attention bias ("shared",
    FUSED_NOT_ON_CUDA), and a weighted-values one whose cache is not float16 (FLOAT32_NOT_ON_CUDA; a
    dtype the manifest does not state counts as not float16). The standard decoder and an FP16 weighted
    one open on CUDA as the other modules do."""
    if not providers or providers[0] != CUDA:
        return None
    if kv_form == "shared":
        return FUSED_NOT_ON_CUDA
    if kv_form == "weighted" and kv_dtype != "float16":
        return FLOAT32_NOT_ON_CUDA
    return None


def decoder_providers(providers: list[str], kv_form: str, kv_dtype: str | None = None) -> list[str]:
    """The providers the decoder's session opens with: `providers`, or the CPU's alone where
    `decoder_on_cpu` says so (the other modules stay on CUDA)."""
    return [CPU] if decoder_on_cpu(providers, kv_form, kv_dtype) else list(providers)


def check_prompt_positions(position_ids: np.ndarray) -> None:
    """A prompt into an empty cache of a decoder whose GroupQueryAttention turns q and k itself: at
    position_ids[0, 0] + 0..S-1 in every row, where the kernel turns it (manifest.ROTARY_INSIDE_HEAD_MULTIPLE)."""
    position_ids = np.asarray(position_ids)
    if position_ids.ndim != 2 or position_ids.size == 0:
        raise SleighError("position_ids", f"has shape {position_ids.shape}", "(batch, new positions)")
    start = int(position_ids[0, 0])
    if (position_ids != start + np.arange(position_ids.shape[1])).any():
        shown = ", ".join(str(int(p)) for p in position_ids.reshape(-1)[:5]) + (", ..." if position_ids.size > 5 else "")
        raise SleighError("position_ids", f"a prompt into an empty cache is at {shown}, and this decoder's attention turns "
                          f"such a prompt at {start}, {start + 1}, ... in every row",
                          "positions one apart from the first row's first, in every row (any positions after the first call)")


def static_plan(on_cuda: bool, kv_form: str, static_capacity: int | None) -> tuple[int | None, bool]:
    """(the fixed buffers' slots or None, whether decode steps are captured as a CUDA graph), for a
    decoder on CUDA (`on_cuda`: a weighted one is there only with a float16 cache, `decoder_on_cpu`) or on
    the CPU. Only a "weighted" decoder takes fixed buffers: on CUDA for the graph, on the CPU as asked,
    uncaptured (what the tests check)."""
    capacity = static_capacity if kv_form == "weighted" else None
    return capacity, capacity is not None and on_cuda


# The CUDA provider's options for every session: float32 stays float32. ONNX Runtime's CUDA provider runs
# float32 MatMuls as TF32 by default (use_tf32, on from Ampere; its provider-info default), which keeps
# 10 mantissa bits: the FP32 package would not compute what its parity report checked on the CPU (and
# TF32 is the first suspect for the other tokens an H200 gave, benchmarks/RESULTS.md). An FP16 engine's
# MatMuls are float16 either way; speed on a GPU is the FP16 engine's business.
CUDA_OPTIONS = {"use_tf32": "0"}


def session_providers(providers: list[str], cuda_graph: bool = False) -> list:
    """`providers` as a session takes them: CUDA with CUDA_OPTIONS (and enable_cuda_graph where asked)."""
    options = {**CUDA_OPTIONS, **({"enable_cuda_graph": "1"} if cuda_graph else {})}
    return [(p, options) if p == CUDA else p for p in providers]


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def default_providers() -> list[str]:
    """CUDA then the CPU where onnxruntime-gpu offers CUDA, else the CPU."""
    return [CUDA, CPU] if CUDA in available_providers() else [CPU]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    releases_modules = True

    def __init__(self, files: dict[str, Path], kv: KVCacheSection, threads: int | None = None, providers: list[str] | None = None, label: str = "fp32",
                 manifest_modules: dict | None = None, kv_dtype: str | None = None, lazy: bool = False,
                 static_capacity: int | None = None):
        """`kv_dtype`: the cache slots' dtype as the manifest gives it (`manifest_kv_dtype`), checked
        against the decoder's graph; None (a decoder opened without a manifest): the graph's. `lazy`:
        every module is opened once here (checked, and measured), but only the decoder stays open: the
        others open again at their first run, so a load under a memory budget never holds every
        module at once (at full size that was a staged run's peak: benchmarks/RESULTS.md, "Session 11").
        `static_capacity`: for a "weighted" fused decoder, batch-1 decode steps run on fixed buffers of
        this many slots (static_steps.py), captured as a CUDA graph on the CUDA provider; there
        `from_package` sets it to the context length or STATIC_SLOTS, the smaller, unless
        SLEIGH_CUDA_GRAPH=0."""
        ort = import_onnxruntime()  # an onnxruntime older than the tested range: one line, here

        self.ort = ort
        self.providers = providers or default_providers()
        on_cpu = decoder_on_cpu(self.providers, kv.form, kv_dtype)  # (why, the way out), said once below
        self.decoder_providers = [CPU] if on_cpu else list(self.providers)
        self.static_capacity, self.cuda_graph = static_plan(self.decoder_providers[0] == CUDA, kv.form, static_capacity)
        self._static: StaticSteps | None = None
        self._graph_off = graph_run_options(ort, NO_GRAPH) if self.cuda_graph else None  # every other decoder run
        # one decoder run at a time on a session with CUDA graphs (UNVERIFIED whether ONNX Runtime needs it;
        # the GPU runs one after the other anyway)
        self._decoder_lock = threading.Lock() if self.cuda_graph else nullcontext()
        if on_cpu:
            warn(f"the decoder runs on the CPU, the other modules on CUDA: {on_cpu[0]}; for a decoder on the GPU, "
                 f"{on_cpu[1]}")
        self._options, self._manifest_modules = session_options(threads), manifest_modules
        self.files = dict(files)  # what a memory budget counts as weights (runtime/memory.py)
        self.sessions, self.resident = {}, {}
        self._lock = threading.Lock()  # a module opened again on first use after `release`: once
        for module in sorted(files, key=lambda m: m == "decoder"):  # the decoder last: it stays open
            self._open(module)
            if lazy and module != "decoder":
                self.release(module)
        self.num_layers, self.num_kv_heads, self.head_dim = kv.num_layers, kv.num_kv_heads, kv.head_dim
        self.in_place = kv.in_place  # a fused decoder: it writes into the cache buffers itself
        # a decoder whose GroupQueryAttention turns q and k takes a prompt into an empty cache at contiguous
        # positions only (manifest.ROTARY_INSIDE_HEAD_MULTIPLE); a package exported before that form (schema 6
        # either way) is held to the same rule
        self._contiguous_prompt = kv.rotary_in_attention
        self.label = label
        decoder = self.sessions["decoder"]
        self._new_names, self._past_names = list(kv.new), list(kv.past)  # new[i] is written into past[i]
        absent = sorted(set(self._past_names) - {i.name for i in decoder.get_inputs()}) + \
            sorted(set(self._new_names) - {o.name for o in decoder.get_outputs()})
        if absent:
            raise SleighError(str(files["decoder"]), f"the decoder lacks the cache tensors {absent[:2]} the manifest names",
                              f"the package's own decoder; {REEXPORT}")
        # a fused decoder (schema 6) embeds a decode step's token ids itself: `step_tokens` feeds them
        # with a row of zeros as inputs_embeds, `step` its embeddings with [[-1]] as input_ids
        embeds = next((i for i in decoder.get_inputs() if i.name == "inputs_embeds"), None)
        self.reads_ids = embeds is not None and "input_ids" in {i.name for i in decoder.get_inputs()}
        if self.reads_ids:
            self._no_ids = {"input_ids": np.full((1, 1), -1, np.int64)}
            self._no_embeds = {"inputs_embeds": np.zeros((1, 1, embeds.shape[-1]), np.float32)}
        self.kv_dtype = np.dtype(_dtype(decoder.get_inputs(), self._past_names[0]))
        self.vocab = next(o for o in decoder.get_outputs() if o.name == LOGITS).shape[-1]
        self._logits_dtype = np.dtype(_dtype(decoder.get_outputs(), LOGITS))
        new_dtypes = {np.dtype(_dtype(decoder.get_outputs(), n)) for n in self._new_names}
        if new_dtypes != {self.kv_dtype}:
            raise SleighError(str(files["decoder"]), f"its new keys/values are {sorted(map(str, new_dtypes))} and its cache "
                              f"slots {self.kv_dtype}", "one float dtype for the KV cache in and out")
        if kv_dtype is not None and np.dtype(kv_dtype) != self.kv_dtype:
            raise SleighError(str(files["decoder"]), f"its cache slots are {self.kv_dtype}, the manifest says {kv_dtype}",
                              f"the decoder the manifest lists; rebuild the engine (sleigh build-engine --force) or {REEXPORT}")
        self.device = "cuda" if self.decoder_providers[0] == CUDA else "cpu"  # where the decoder runs and its slots live
        self.prefill_chunk = PREFILL_CHUNK if self.in_place and self.device == "cpu" else None
        # (fixed buffers, where asked on the CPU, are lent to a cache its size: a reservation past them moves it off)
        self.reserve_is_free = self.in_place and self.device == "cpu" and self.static_capacity is None
        # where every cache's slots live: numpy arrays the CPU provider reads in place, or device OrtValues
        self.slot_storage = HostSlots(lazy=self.reserve_is_free) if self.device == "cpu" else \
            OrtValueSlots(ort, _device_copier(), self.device)
        self._shrink = None  # after a large call on the CPU the arena hands back what it grew for it
        if self.device == "cpu":
            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")

    @classmethod
    def from_package(cls, pkg: Path, manifest: Manifest, threads: int | None = None, providers: list[str] | None = None,
                     engine: EngineEntry | None = None, lazy: bool = False) -> OnnxRuntimeBackend:
        label = "package fp32" if engine is None else engine.name
        providers = providers or default_providers()
        kv, kv_dtype = manifest.contract.kv_cache, manifest_kv_dtype(manifest, engine)
        # fixed buffers for a decoder on CUDA (cuda_graph's other terms: __init__); not for one that opens on the CPU
        graphs = decoder_providers(providers, kv.form, kv_dtype)[0] == CUDA and os.environ.get(CUDA_GRAPH_ENV, "1") != "0"
        backend = cls(module_files(manifest, engine), kv, threads=threads, providers=providers, label=label,
                      manifest_modules=manifest.modules, kv_dtype=kv_dtype, lazy=lazy,
                      static_capacity=min(manifest.contract.generation.context_length, STATIC_SLOTS) if graphs else None)
        if engine is not None and backend.device == "cpu":
            from sleigh.runtime.cpu_features import warn_if_missing

            warn_if_missing(engine)  # its gate ran on another CPU's kernels
        return backend

    def _open(self, module: str):
        path = self.files[module]
        before = resident_bytes()
        try:
            providers = self.decoder_providers if module == "decoder" else self.providers
            sess = None
            if module == "decoder" and self.cuda_graph:
                sess = self._open_with_graphs(path, providers)
            if sess is None:
                sess = self.ort.InferenceSession(str(path), sess_options=self._options, providers=session_providers(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            denied = [p for p in (Path(path), Path(f"{path}.data")) if p.exists() and not os.access(p, os.R_OK)]
            if denied:  # not corruption: say so
                raise SleighError(str(denied[0]), "permission denied: this user may not read it",
                                  "read permission for this user (e.g. chmod a+r on the package's files)") from None
            raise SleighError(str(path), f"ONNX Runtime cannot load it ({first_line(e)})",
                              "an intact package module (check with `sleigh inspect --verify`)") from None
        if self._manifest_modules is not None:  # names as the manifest lists them: a swapped file stops here
            check_module_io(self._manifest_modules, module, path, {i.name: i.shape for i in sess.get_inputs()},
                            [o.name for o in sess.get_outputs()])
        after = resident_bytes()
        if module not in self.resident and before is not None and after is not None:  # first open: a fresh heap
            self.resident[module] = max(after - before, 0)
        self.sessions[module] = sess
        return sess

    def _open_with_graphs(self, path: Path, providers: list[str]):
        """The decoder's session with CUDA graphs on, or None (graphs then off for good, said once) where
        ONNX Runtime refuses (it does when a node is not on the CUDA provider)."""
        try:
            return self.ort.InferenceSession(str(path), sess_options=self._options,
                                             providers=session_providers(providers, cuda_graph=True))
        except Exception as e:  # onnxruntime's own exception types
            warn(f"decode steps run without a CUDA graph: ONNX Runtime refused one for this decoder ({first_line(e)})")
            self.cuda_graph, self.static_capacity, self._graph_off = False, None, None
            return None

    def release(self, *modules: str) -> None:
        """Close these modules' sessions (their weights and arenas go back to the system); each opens
        again when next run (a memory budget's stages: runtime/memory.py)."""
        with self._lock:
            if [m for m in modules if self.sessions.pop(m, None) is not None]:  # every one popped
                gc.collect()
                trim_heap()

    def _session(self, module: str):
        sess = self.sessions.get(module)
        if sess is None:
            self._check_open()  # closed (also by another thread, as this call began)
            if module not in self.files:
                raise KeyError(module)
            with self._lock:
                sess = self.sessions.get(module)
                if sess is None:  # not reopened by another thread meanwhile
                    sess = self._open(module)
        return sess

    def run(self, module, feeds):
        sess = self._session(module)
        options = self._shrink if module == "vision" else self._graph_off if module == "decoder" else None
        outs = sess.run(None, feeds, options)
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    def new_cache(self, batch=1) -> SlotCache:
        self._check_open()
        cache = SlotCache(self._past_names, batch, self.num_kv_heads, self.head_dim, self.kv_dtype,
                          storage=self.slot_storage)
        if batch == 1 and self.static_capacity is not None and self.reads_ids:
            decoder = self._session("decoder")  # outside the lock: reopening a session takes it
            with self._lock:
                if self._static is None:
                    hidden = self._no_embeds["inputs_embeds"].shape[-1]
                    self._static = StaticSteps(self.ort, decoder, self.device, self.slot_storage, cache.layout,
                                               self._past_names, self._new_names, self.static_capacity, hidden, self.vocab)
                self._static.lend(cache)
        return cache

    def step(self, cache, inputs_embeds, attention_mask, attention_bias, position_ids):
        sess = self._session("decoder")
        feeds = {"inputs_embeds": inputs_embeds.astype(np.float32, copy=False), "position_ids": position_ids}
        if self.in_place:
            return self._step_shared(sess, cache, feeds, attention_mask, attention_bias, self._no_ids if self.reads_ids else {})
        if not isinstance(cache.storage, OrtValueSlots):  # numpy slots: the session reads them where they lie
            feeds.update(cache.feeds(attention_mask, attention_bias))
            large = inputs_embeds.shape[1] > 1  # a prefill chunk; a decode step's arena is small and kept
            logits, *new = sess.run([LOGITS, *self._new_names], feeds, self._shrink if large else None)
            cache.append(dict(zip(self._past_names, new)), attention_mask, attention_bias)
            return logits[:, -1].astype(np.float32)
        binding = sess.io_binding()
        feeds.update(cache.attention(attention_mask, attention_bias))  # mask and bias: small, from the host
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0))
        for name, value in cache.past().items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")  # the sampler reads logits on the host
        for name in self._new_names:
            binding.bind_output(name, self.device)  # the new keys/values stay on the device
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the slot copies run on another stream
        logits, *new = binding.get_outputs()
        cache.append(dict(zip(self._past_names, new)), attention_mask, attention_bias)
        return logits.numpy()[:, -1].astype(np.float32)

    def step_tokens(self, cache, input_ids, attention_mask, attention_bias, position_ids, no_image):
        if not self.reads_ids:
            return super().step_tokens(cache, input_ids, attention_mask, attention_bias, position_ids, no_image)
        static = self._static
        if static is not None and static.sess is self.sessions.get("decoder") and static.serves(cache, attention_mask.shape[1]):
            try:
                with self._decoder_lock:
                    return static.step(cache, np.asarray(input_ids, np.int64), attention_mask, attention_bias, position_ids)
            except Exception as e:  # onnxruntime's own exception types: a capture that fails
                if not self.cuda_graph:
                    raise
                warn(f"decode steps run without a CUDA graph: capturing one failed ({first_line(e)})")
                self._static, self.cuda_graph = None, False  # this step again, and every later one, the ordinary way
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "position_ids": position_ids}
        return self._step_shared(self._session("decoder"), cache, feeds, attention_mask, attention_bias, self._no_embeds)

    def _step_shared(self, sess, cache, feeds, attention_mask, attention_bias, unused: dict):
        """A fused decoder (kv_cache.form "shared" or "weighted") reads the slots in use and writes the
        new positions into the same buffers: each slot tensor is bound as its input and as its output,
        so nothing is copied. GroupQueryAttention takes a prompt after a cache one row at a time
        (export/fused_decoder.py), so on the CPU such a step runs row by row, each row bound to its own
        part of the slots. `unused`: the input the step does not read (embeddings or token ids), bound
        whole as its (1, 1) placeholder. On CUDA (the "weighted" form) the device OrtValues are bound
        whole, and such a step is not split (UNVERIFIED: whether CUDA's kernel takes it)."""
        S = attention_mask.shape[1]
        if self._contiguous_prompt and cache.length == 0:
            check_prompt_positions(feeds["position_ids"])
        feeds.update(cache.attention(attention_mask, attention_bias, shared=True))  # it reserves the S new slots
        on_device = isinstance(cache.storage, OrtValueSlots)
        by_row = cache.batch > 1 and S > 1 and cache.length > 0 and not on_device
        logits = []
        for rows in ([slice(b, b + 1) for b in range(cache.batch)] if by_row else [slice(None)]):
            if by_row:
                binding, _, out = self._bind_slots(sess, cache, rows, on_device)
            else:  # the slots stay bound from step to step until a growth moves them (the cache forgets it)
                if cache.binding is None or cache.binding[0] is not sess:
                    cache.binding = (sess, *self._bind_slots(sess, cache, rows, on_device))
                _, binding, _, out = cache.binding
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array[rows]))
            for name, array in unused.items():
                binding.bind_cpu_input(name, array)
            with self._decoder_lock:
                sess.run_with_iobinding(binding, self._graph_off or (self._shrink if S > 1 else None))
            logits.append(out[:, -1].astype(np.float32))  # a copy: the next step writes `out` again
        cache.advance(attention_mask, attention_bias)
        return logits[0] if len(logits) == 1 else np.concatenate(logits)

    def _bind_slots(self, sess, cache, rows, on_device: bool):
        """(an IOBinding with each slot tensor (its `rows`) bound as the input and the output of its
        layer, the OrtValues bound (over the arrays' own memory on the CPU), and the host array that
        `logits`, (rows, 1, vocab), is written into: bound once, so a step neither allocates it nor
        wraps every output to find it)."""
        binding = sess.io_binding()
        out = np.empty((cache.mask[rows].shape[0], 1, self.vocab), self._logits_dtype)
        binding.bind_ortvalue_output(LOGITS, self.ort.OrtValue.ortvalue_from_numpy(out))
        buffers = cache.slots if on_device else {name: slots[rows] for name, slots in cache.slots.items()}
        return binding, bind_in_place(self.ort, binding, self._past_names, self._new_names, buffers, on_device), out

    def describe(self):
        where = self.providers[0].removesuffix("ExecutionProvider")
        if self.decoder_providers != self.providers:
            where += ", decoder on CPU"
        if self.cuda_graph:
            where += ", decode steps as a CUDA graph"
        return f"onnxruntime [{self.label}] ({where})"

    def _release(self) -> None:
        """Drop the sessions (ONNX Runtime frees a session with its last reference) and the copy stream."""
        self.sessions.clear()
        self.slot_storage.close()


class OrtValueSlots(DeviceSlots):
    """Slots as OrtValues on `device` (zeroed when allocated), written through their device pointers by
    `cuda` (runtime/backends/cuda.Cuda: copy_rows, zero, sync). ONNX Runtime frees an OrtValue with its
    last reference. Tests run this storage on "cpu" OrtValues with a host copier."""

    def __init__(self, ort, cuda, device: str = "cuda"):
        super().__init__(cuda)
        self.ort, self.device = ort, device

    def pointer(self, buffer) -> int:
        return buffer.data_ptr()

    def none_of(self, layout, buffer):
        """An OrtValue's shape is its own: zero slots are a new (empty) OrtValue."""
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(layout.shape(0)), layout.dtype, self.device, 0)

    def alloc(self, layout, capacity):
        self._check_open()
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(list(layout.shape(capacity)), layout.dtype, self.device, 0)
        if capacity:  # on the copy stream, so the zeros land before the copies that follow
            self.cuda.zero(value.data_ptr(), layout.nbytes(capacity))
        return value

    def free(self, buffer) -> None:
        """The caller drops its reference (after `sync`): ONNX Runtime frees the memory."""

    def close(self) -> None:
        with self.lock:
            self.closed = True
            close = getattr(self.cuda, "close", None)  # the stream (a host stand-in has none)
            if close is not None:
                close()


def _dtype(values, name: str):
    for v in values:
        if v.name == name:
            return np.float16 if "float16" in v.type else np.float32
    return np.float32


def manifest_kv_dtype(manifest: Manifest, engine: EngineEntry | None) -> str | None:
    """The decoder's cache-slot dtype as the manifest states it: an engine entry's `kv_dtype`
    (build-engine), or the dtype of the package decoder's first cache input (modules.decoder.inputs).
    None where it states none (an engine built before entries carried it, a tensor listed without dtype)."""
    if engine is not None:
        dtype, where = engine.kv_dtype, f"engines.{engine.name}.kv_dtype"
    else:
        first = manifest.contract.kv_cache.past[0]
        dtype = next((t.dtype for t in manifest.modules["decoder"].inputs if t.name == first and t.dtype != "?"), None)
        where = f"modules.decoder.inputs.{first}.dtype"
    if dtype is not None and dtype not in KV_DTYPES:
        raise SleighError(f"manifest.json: {where}", f"is {dtype!r:.40}", " or ".join(KV_DTYPES))
    return dtype


def _device_copier():
    """The CUDA helper that writes new keys/values into device slots (one stream per backend)."""
    from sleigh.runtime.backends.cuda import CUDA_PYTHON_EXPECTED, Cuda, any_cudart

    cudart = any_cudart()
    if cudart is None:
        raise SleighError("backend=onnxruntime (CUDA provider)", "writing the KV cache in place on the GPU needs "
                          "the CUDA runtime (libcudart) or cuda-python, and neither is found", CUDA_PYTHON_EXPECTED)
    return Cuda(cudart, 0)
