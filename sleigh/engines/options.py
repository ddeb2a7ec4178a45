"""What `sleigh build-engine` can be told: one frozen dataclass, one field per CLI flag, validated here.

A field's flag is its name with dashes (`max_batch` -> `--max-batch`; `FLAGS` lists the exceptions),
so every message below names a flag the CLI has. None means "the default": the package's, the
model's or the backend's, filled in by `for_package` once the manifest is read. The options as given
are recorded once, as the engine entry's `build_options` (what `sleigh build-engine ... --force`
repeats); what they resolved to is in the entry's `shapes` and, for TensorRT, its profiles.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sleigh import errors
from sleigh.errors import SleighError
from sleigh.runtime.backends import PACKAGE_MODULES
from sleigh.runtime.image import max_views as image_max_views
from sleigh.runtime.kv_cache import KV_DTYPES
from sleigh.runtime.manifest import BACKENDS, LLM_WEIGHTS, PRECISIONS, Manifest
# The decoder's weights when --llm-weights is not given, per backend and precision. TensorRT parses no
# MatMulNBits (an ONNX Runtime contrib op): its decoder is FP16 or FP32.
DEFAULT_LLM_WEIGHTS = {"onnxruntime": {"fp32": "fp32", "fp16": "fp16", "int8": "int8"},
                       "tensorrt": {"fp32": "fp32", "fp16": "fp16", "int8": "fp16"}}
ENGINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name under PKG/engines

# TensorRT only
TENSORRT_DEFAULT_CONTEXT = 4096  # the runtime preallocates KV buffers for the whole profile
DEFAULT_OPT_TILES = 6  # a typical photo: 6 tiles + thumbnail = 7 views
OPT_TEXT_TOKENS = 64  # text around the image tokens in a typical prompt (template, system message, question)
MAX_BATCH = 64  # the exporter's batch Dim upper bound
DEFAULT_WORKSPACE_GB = 4.0  # builder scratch memory (MemoryPoolType.WORKSPACE)
MAX_WORKSPACE_GB = 1024
BUILDER_OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's 0..5
DEFAULT_BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default
TENSORRT_ONLY = ("opt_tiles", "opt_context", "max_batch", "workspace_gb", "builder_optimization_level", "plugin_library")
NOT_RECORDED = ("force", "quiet")  # how to build, not what was built
# The task-accuracy gate (--eval-data): an engine may lose at most this many points of exact-match
# accuracy against FP32 on any question type (issue 10's target for INT8 vision + INT4 decoder).
DEFAULT_EVAL_TOLERANCE = 1.0

FLAGS = {"gate_images": "--images"}  # fields whose flag is not their name with dashes


def flag(field: str) -> str:
    return errors.flag(field, FLAGS)


def max_views(manifest: Manifest, tiles: int) -> int:
    """Views for `tiles` tiles: a thumbnail is appended when there is more than one tile."""
    return image_max_views(tiles, manifest.contract.image.thumbnail)


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "onnxruntime"
    precision: str = "fp16"  # TensorRT: what the source ONNX holds (TensorRT 11 has no precision flags)
    llm_weights: str | None = None  # None: the backend's default for the precision
    kv_dtype: str | None = None  # None: float16 for an FP16 decoder, else float32 (`kv`)
    name: str | None = None  # None: `default_name`
    max_tiles: int | None = None  # None: the package's
    max_context: int | None = None  # None: the model's context (TensorRT: at most TENSORRT_DEFAULT_CONTEXT)
    max_memory: int | None = None  # bytes: the budget runs on this engine keep by default (run --max-memory overrides)
    # TensorRT only
    opt_tiles: int | None = None  # the shape TensorRT tunes kernels for; None: min(DEFAULT_OPT_TILES, max_tiles)
    opt_context: int | None = None  # None: the tokens of opt_tiles views + OPT_TEXT_TOKENS
    max_batch: int | None = None  # None: 1
    workspace_gb: float | None = None  # None: DEFAULT_WORKSPACE_GB
    builder_optimization_level: int | None = None  # None: DEFAULT_BUILDER_OPTIMIZATION_LEVEL
    plugin_library: Path | None = None  # GSWA through the sleigh::GSWA IPluginV3 this library registers
    # the build
    allow_degraded: bool = False
    gate_images: Path | None = None
    eval_data: Path | None = None  # a JSONL (sleigh data synth): also gate on task accuracy against FP32
    eval_tolerance: float | None = None  # points an engine may lose per question type; None: DEFAULT_EVAL_TOLERANCE
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        for key, allowed in (("backend", BACKENDS), ("precision", PRECISIONS), ("llm_weights", LLM_WEIGHTS + (None,))):
            if getattr(self, key) not in allowed:
                raise SleighError(f"{flag(key)} {getattr(self, key)}", "not supported", " | ".join(a for a in allowed if a))
        if self.kv_dtype not in KV_DTYPES + (None,):
            raise SleighError(f"--kv-dtype {self.kv_dtype}", "not supported", " | ".join(KV_DTYPES))
        if self.llm_weights == "fp16" and self.precision == "fp32":
            raise SleighError("--llm-weights fp16", "an fp32 engine keeps the decoder's activations in fp32",
                              "--precision fp16 for an FP16 decoder, or --llm-weights int8/int4")
        if self.backend == "tensorrt" and self.llm_weights in ("int8", "int4"):
            raise SleighError(f"--llm-weights {self.llm_weights}", "weight-only decoders use MatMulNBits, which "
                              "TensorRT's ONNX parser does not read", "--llm-weights fp16 or fp32 with --backend tensorrt")
        if self.kv_dtype is not None and self.backend == "tensorrt":
            raise SleighError(f"--kv-dtype {self.kv_dtype}", "applies to ONNX Runtime engines (a TensorRT engine's cache "
                              "follows its decoder: float16 with --llm-weights fp16)", "--backend onnxruntime, or leave it out")
        if self.kv_dtype == "float32" and self.weights == "fp16":
            raise SleighError("--kv-dtype float32", "an FP16 decoder keeps its KV cache in float16",
                              "--kv-dtype float16 or leave it out, or --llm-weights fp32/int8/int4")
        if self.name is not None and not (isinstance(self.name, str) and ENGINE_NAME.match(self.name)):
            raise SleighError(f"--name {self.name!r}", "not a usable engine name", "letters, digits, '.', '_' and '-' (a folder name)")
        if self.name == PACKAGE_MODULES:  # `--engine package` would always pick the exported modules
            raise SleighError(f"--name {self.name}", "is reserved for the exported modules (--engine package)",
                              "another name, e.g. fp32-cpu")
        if self.backend != "tensorrt":
            given = [flag(k) for k in TENSORRT_ONLY if getattr(self, k) is not None]
            if given:
                raise SleighError(" ".join(given), f"{'applies' if len(given) == 1 else 'apply'} to TensorRT engines only",
                                  "--backend tensorrt, or leave it out")
        for key in ("max_tiles", "max_context", "opt_tiles", "opt_context"):
            _need_int(self, key, 1, None)
        if self.opt_tiles is not None and self.max_tiles is not None:
            _need_int(self, "opt_tiles", 1, self.max_tiles)
        if self.opt_context is not None and self.max_context is not None:
            _need_int(self, "opt_context", 1, self.max_context)
        _need_int(self, "max_batch", 1, MAX_BATCH)
        _need_int(self, "max_memory", 1, None)
        _need_int(self, "builder_optimization_level", BUILDER_OPTIMIZATION_LEVELS.start, BUILDER_OPTIMIZATION_LEVELS.stop - 1)
        tol = self.eval_tolerance
        if tol is not None:
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol):
                raise SleighError(f"--eval-tolerance {tol!r}", "not a number", "points of accuracy, e.g. 1.0")
            if not 0 <= tol <= 100:  # below 0 every question type fails, whatever the engine
                raise SleighError(f"--eval-tolerance {tol:g}", "out of range", "points of accuracy from 0 to 100, e.g. 1.0")
            if self.eval_data is None:
                raise SleighError("--eval-tolerance", "applies to the task-accuracy gate only", "--eval-data JSONL with it")
        gb = self.workspace_gb
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 < gb <= MAX_WORKSPACE_GB):
            raise SleighError(f"--workspace-gb {gb!r}", "out of range", f"a number of GiB in (0, {MAX_WORKSPACE_GB}]")

    @property
    def task_tolerance(self) -> float:
        """Points of accuracy per question type the engine may lose against FP32 (--eval-data)."""
        return DEFAULT_EVAL_TOLERANCE if self.eval_tolerance is None else float(self.eval_tolerance)

    @property
    def weights(self) -> str:
        """The decoder's weights: --llm-weights, or the backend's default for the precision."""
        return self.llm_weights or DEFAULT_LLM_WEIGHTS[self.backend][self.precision]

    @property
    def kv(self) -> str:
        """The KV cache slots' dtype: float16 for an FP16 decoder, else --kv-dtype or float32."""
        return "float16" if self.weights == "fp16" else self.kv_dtype or "float32"

    @property
    def kv_cast(self) -> bool:
        """Whether the decoder gets casts between float16 slots and its float32 attention."""
        return self.kv == "float16" and self.weights != "fp16"

    @property
    def default_name(self) -> str:
        default = DEFAULT_LLM_WEIGHTS[self.backend][self.precision]
        return (f"{self.backend}-{self.precision}" + ("" if self.weights == default else f"-llm-{self.weights}")
                + ("-kv-fp16" if self.kv_cast else ""))

    @property
    def engine_name(self) -> str:
        return self.name or self.default_name

    @property
    def module_precisions(self) -> dict[str, str]:
        """What each module is converted to: an INT8 engine has a Q/DQ vision, and its decoder's weights
        follow --llm-weights. The embedding table (a lookup) follows the decoder's weights on ONNX Runtime:
        INT8 rows where they are INT8/INT4 (build_engine.table_int8), else the engine's float precision
        (FP16 in an INT8 engine). GSWA (small matrices over the views' CLS tokens, whose weights steer the
        answer) stays FP32 in every engine."""
        embed = "fp32" if self.precision == "fp32" else "fp16"
        if self.backend == "onnxruntime" and self.weights in ("int8", "int4"):
            embed = "int8"
        return {"vision": self.precision, "gswa": "fp32", "embed": embed, "decoder": self.weights}

    def for_package(self, manifest: Manifest) -> EngineOptions:
        """These options with every default filled in from the package, checked against it (one-line
        SleighErrors naming the flag). Resolving resolved options changes nothing."""
        exported, ctx = manifest.contract.image.max_tiles, manifest.contract.generation.context_length
        tiles = self.max_tiles or exported
        if not 1 <= tiles <= exported:
            raise SleighError(f"--max-tiles {tiles}", f"the package was exported for at most {exported}", f"1..{exported}")
        if self.max_context is not None and not 1 <= self.max_context <= ctx:
            raise SleighError(f"--max-context {self.max_context}", f"the model's context is {ctx}", f"1..{ctx}")
        resolved = replace(self, name=self.engine_name, llm_weights=self.weights, max_tiles=tiles,
                           max_context=self.max_context or (min(TENSORRT_DEFAULT_CONTEXT, ctx) if self.backend == "tensorrt" else ctx))
        _check_image_tokens(manifest, resolved.max_tiles, resolved.max_context)  # runs hold to both (Pipeline)
        if self.backend != "tensorrt":
            return resolved
        if manifest.contract.kv_cache.form != "slots":  # a fused decoder (export --decoder fused / fused-cuda)
            raise SleighError("--backend tensorrt", "this package's decoder is the fused form (ONNX Runtime's operators)",
                              "a package exported with --decoder standard for TensorRT")
        if self.plugin_library is not None:
            if manifest.contract.gswa is None:
                raise SleighError(f"--plugin-library {self.plugin_library}", "the package has no GSWA node for the plugin",
                                  "no --plugin-library for a model without GSWA")
            if not Path(self.plugin_library).is_file():
                raise SleighError(f"--plugin-library {self.plugin_library}", "no such file",
                                  "the shared library that registers the sleigh::GSWA TensorRT plugin")
        opt_tiles = min(DEFAULT_OPT_TILES, tiles) if self.opt_tiles is None else self.opt_tiles
        tokens = manifest.contract.prompt.tokens_per_view * max_views(manifest, opt_tiles) + OPT_TEXT_TOKENS
        resolved = replace(resolved, opt_tiles=opt_tiles,
                           opt_context=min(tokens, resolved.max_context) if self.opt_context is None else self.opt_context,
                           max_batch=self.max_batch or 1,
                           workspace_gb=DEFAULT_WORKSPACE_GB if self.workspace_gb is None else self.workspace_gb,
                           builder_optimization_level=(DEFAULT_BUILDER_OPTIMIZATION_LEVEL if self.builder_optimization_level is None
                                                       else self.builder_optimization_level))
        _need_int(resolved, "opt_tiles", 1, resolved.max_tiles)
        _need_int(resolved, "opt_context", 1, resolved.max_context)
        return resolved

    def to_json(self) -> dict:
        """The options as given, manifest-ready (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in NOT_RECORDED}


def _need_int(opts: EngineOptions, field: str, lo: int, hi: int | None) -> None:
    v = getattr(opts, field)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        expected = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise SleighError(f"{flag(field)} {v!r}", "out of range", expected)


def _check_image_tokens(manifest: Manifest, tiles: int, context: int) -> None:
    """An engine's context must hold the image tokens of `tiles` tiles plus some text (a run tiles up to
    the engine's tiles and holds prompt + answer to its context)."""
    tpv = manifest.contract.prompt.tokens_per_view
    image_tokens = tpv * max_views(manifest, tiles)
    if image_tokens >= context:
        fit = max((t for t in range(1, tiles + 1) if tpv * max_views(manifest, t) < context), default=0)
        raise SleighError(f"--max-context {context}",
                          f"cannot hold {max_views(manifest, tiles)} views x {tpv} image tokens ({image_tokens}) plus text",
                          f"--max-context > {image_tokens}" + (f" or --max-tiles <= {fit}" if fit else ""))

