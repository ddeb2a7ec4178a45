"""TensorRT engines from a package's ONNX modules: `sleigh build-engine --backend tensorrt`.

Precision comes from the ONNX (an FP16 or symmetric Q/DQ ONNX, or the FP32 modules), never from
builder flags, which TensorRT 11 removed: the network is STRONGLY_TYPED (README, "TensorRT").
Everything that does not need libnvinfer is pure and tested on CPU; `build_engines` imports
`tensorrt` when it runs, and has never run (UNVERIFIED, README "TensorRT").

GSWA: TensorRT's ONNX parser inlines gswa.onnx's `sleigh::GSWA` local function, matching by name
only; from 10.7 it prefers a plugin registered under the node's name, version and namespace (the
builder registers none, so the function body is parsed). With `--plugin-library LIB` it parses a copy
of gswa.onnx without the function, so every parser version maps the node to LIB's IPluginV3.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

from sleigh.engines.options import EngineOptions, max_views
from sleigh.errors import SleighError
from sleigh.progress import progress
from sleigh.runtime.backends.cuda import import_cudart
from sleigh.runtime.backends.tensorrt_backend import (
    DECODER_PROFILES, GPU_EXPECTED, TENSORRT_EXPECTED, Profile, compute_capability, device_name, load_plugin_library,
    make_logger, tensorrt_status)
from sleigh.runtime.multimodal import GSWA_DOMAIN, GSWA_OP, GSWA_PLUGIN_NAMESPACE, GSWA_PLUGIN_VERSION
from sleigh.runtime.kv_cache import KV_CHUNK, grown_capacity
from sleigh.runtime.manifest import Manifest
from sleigh.runtime.package import MODULE_NAMES, write_bytes_atomic

PLUGIN_DIR = "plugin"  # in the engine folder: the copy of --plugin-library that the runtime loads

# ONNX Runtime's QOperator / dynamic quantization ops: TensorRT wants Q/DQ (QDQ format) instead.
QOPERATOR_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QLinearAdd"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
COMPUTE_OPS = {"MatMul", "Gemm", "Conv"}  # modules with these must carry Q/DQ for int8 (embed has none)


def require_tensorrt() -> None:
    """A one-line SleighError where TensorRT cannot build (checked before anything is converted)."""
    ok, problem = tensorrt_status()
    if not ok:
        raise SleighError("tensorrt", problem, TENSORRT_EXPECTED)


# -- profiles -----------------------------------------------------------------------------------


def _profile(manifest: Manifest, module: str, dims: dict[str, tuple[int, int, int]]) -> Profile:
    """(min, opt, max) for every input of `module`, by name: symbolic dims from `dims`, static dims as exported."""
    prof: Profile = {}
    for inp in manifest.modules[module].inputs:
        lo, opt, hi = [], [], []
        for d in inp.shape:
            if isinstance(d, int) and d > 0:
                rng = (d, d, d)
            elif isinstance(d, str) and d in dims:
                rng = dims[d]
            else:
                raise SleighError(f"{module}.onnx input {inp.name}", f"dimension {d!r} has no range in the TensorRT profiles",
                                  f"static dims or one of {', '.join(sorted(dims))} (a package from this version of sleigh)")
            for acc, v in zip((lo, opt, hi), rng):
                acc.append(v)
        prof[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return prof


def _expect_static(manifest: Manifest, module: str, name: str, axis: int, value: int, what: str) -> None:
    shape = next((i.shape for i in manifest.modules[module].inputs if i.name == name), None)
    if shape is None or shape[axis] != value:
        raise SleighError(f"{module}.onnx input {name}", f"{what} is {None if shape is None else shape[axis]!r}, "
                          f"the model config says {value}", "a package whose modules match its manifest (re-export it)")


def vision_profile(manifest: Manifest, opts: EngineOptions) -> Profile:
    """pixel_values (views, 3, S, S): 1 .. max_tiles + thumbnail views, tuned for opt_tiles + thumbnail."""
    opts = opts.for_package(manifest)
    size = manifest.contract.image.size
    _expect_static(manifest, "vision", "pixel_values", 2, size, "image height")
    _expect_static(manifest, "vision", "pixel_values", 3, size, "image width")
    return _profile(manifest, "vision", {"views": _views(manifest, opts)})


def gswa_profile(manifest: Manifest, opts: EngineOptions) -> Profile:
    """cls_tokens (views, Cv): every view of one image at once, as many as the vision profile's."""
    opts = opts.for_package(manifest)
    return _profile(manifest, "gswa", {"views": _views(manifest, opts)})


def _views(manifest: Manifest, opts: EngineOptions) -> tuple[int, int, int]:
    return 1, max_views(manifest, opts.opt_tiles), max_views(manifest, opts.max_tiles)


def embed_profile(manifest: Manifest, opts: EngineOptions) -> Profile:
    """input_ids (B, S), image_embeds (M, D). One profile for prefill and the one-token steps (no
    image rows): the module is a gather, whose kernels hardly depend on the shape."""
    opts = opts.for_package(manifest)
    tpv = manifest.contract.prompt.tokens_per_view
    dims = {"batch": (1, 1, opts.max_batch),
            "sequence": (1, opts.opt_context, opts.max_context),
            "image_rows": (0, tpv * max_views(manifest, opts.opt_tiles), tpv * max_views(manifest, opts.max_tiles) * opts.max_batch)}
    return _profile(manifest, "embed", dims)


def decoder_profiles(manifest: Manifest, opts: EngineOptions) -> list[Profile]:
    """[prefill, decode] (DECODER_PROFILES order).

    TensorRT checks that min, opt and max each satisfy the graph's shape constraints, and the
    decoder ties total_sequence (mask, bias) to cache_slots + sequence; so at each of the three
    points total = slots + sequence:
      prefill: no slots (min = max = 0 is allowed), sequence 1..max_context, total = sequence
      decode:  sequence 1, slots 0..max_context rounded up to the runtime's growth chunk, total = slots + 1
    A multi-token step on a non-empty cache fits neither; the runtime feeds it one token at a time.
    """
    opts = opts.for_package(manifest)
    kv = manifest.contract.kv_cache
    for name in kv.past:
        _expect_static(manifest, "decoder", name, 1, kv.num_kv_heads, "the KV-head dim")
        _expect_static(manifest, "decoder", name, 3, kv.head_dim, "the head dim")
    C, opt_seq = opts.max_context, opts.opt_context
    batch = (1, 1, opts.max_batch)
    max_slots = grown_capacity(C, KV_CHUNK)  # the runtime grows its slots in chunks (runtime/kv_cache.py)
    opt_slots = grown_capacity(min(opt_seq, C), KV_CHUNK)
    prefill = {"batch": batch, "sequence": (1, opt_seq, C), "cache_slots": (0, 0, 0), "total_sequence": (1, opt_seq, C)}
    decode = {"batch": batch, "sequence": (1, 1, 1), "cache_slots": (0, opt_slots, max_slots),
              "total_sequence": (1, opt_slots + 1, max_slots + 1)}
    return [_profile(manifest, "decoder", prefill), _profile(manifest, "decoder", decode)]


def profile_to_json(profile: Profile) -> dict:
    return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in profile.items()}


# -- the plan: files, profiles, the manifest entry's TensorRT part ---------------------------------


def _rel(pkg: Path, path: Path) -> str:
    """A path relative to the package where it lies inside it, else absolute."""
    try:
        return Path(path).resolve().relative_to(Path(pkg).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def engine_plan(pkg: Path, manifest: Manifest, sources: dict[str, Path], opts: EngineOptions, *,
                out_dir: Path | None = None) -> dict:
    """What a build will read and write, and the TensorRT part of the manifest entry (no TensorRT
    needed). `sources`: the ONNX per module (absolute, or relative to the package). `out_dir`: where
    the plans go (default PKG/engines/<name>; build-engine's staging folder). Entry paths are relative
    to the package."""
    pkg = Path(pkg)
    opts = opts.for_package(manifest)
    name = opts.name
    missing = [m for m in MODULE_NAMES if m not in sources]
    unknown = sorted(set(sources) - set(MODULE_NAMES))
    if missing or unknown:
        raise SleighError("sources", f"missing {missing}, unknown {unknown}", f"one ONNX for each of {', '.join(MODULE_NAMES)}")
    resolved = {}
    for m in MODULE_NAMES:
        src = Path(sources[m])
        src = src if src.is_absolute() else pkg / src
        if not src.is_file():
            raise SleighError(str(src), f"the {m} source ONNX does not exist",
                              f"an {opts.precision.upper()} ONNX of the {m} module (e.g. from an ONNX Runtime engine folder of the package)")
        resolved[m] = src
    profiles = {"vision": [vision_profile(manifest, opts)], "gswa": [gswa_profile(manifest, opts)],
                "embed": [embed_profile(manifest, opts)], "decoder": decoder_profiles(manifest, opts)}
    names = {"vision": ["default"], "gswa": ["default"], "embed": ["default"], "decoder": list(DECODER_PROFILES)}
    engine_dir = Path(out_dir) if out_dir is not None else pkg / "engines" / name
    timing_cache = pkg / "engines" / "timing.cache"  # shared by every engine of the package, outside the staging folder
    use_plugin = opts.plugin_library is not None
    modules = {}
    for m in MODULE_NAMES:
        plan = engine_dir / f"{m}.plan"
        modules[m] = {"source": resolved[m], "plan": plan, "plan_rel": _rel(pkg, plan), "profiles": profiles[m],
                      "profile_names": names[m], "strip_gswa_function": use_plugin and m == "gswa"}
    plugin = None
    if manifest.contract.gswa is None:
        gswa = None
    elif use_plugin:
        library = Path(opts.plugin_library)
        plugin = {"library": library, "copy": engine_dir / PLUGIN_DIR / library.name,
                  "rel": _rel(pkg, engine_dir / PLUGIN_DIR / library.name)}
        gswa = {"via": "plugin", "op": f"{GSWA_DOMAIN}::{GSWA_OP}", "plugin_namespace": GSWA_PLUGIN_NAMESPACE,
                "plugin_version": GSWA_PLUGIN_VERSION, "plugin_library": plugin["rel"]}
    else:
        gswa = {"via": "function", "op": f"{GSWA_DOMAIN}::{GSWA_OP}"}
    entry = {
        "modules": {m: modules[m]["plan_rel"] for m in MODULE_NAMES},
        "sources": {m: _rel(pkg, resolved[m]) for m in MODULE_NAMES},
        "profiles": {m: [{"name": n, "shapes": profile_to_json(p)} for n, p in zip(names[m], profiles[m])] for m in MODULE_NAMES},
        "timing_cache": _rel(pkg, timing_cache),
        "gswa": gswa,
        "versions": {"tensorrt": None, "compute_capability": None, "device": None},
        "source_checks": None,
        "files": [],  # what the build wrote, relative to the package: the plans and the plugin's copy
    }
    return {"name": name, "dir": engine_dir, "timing_cache": timing_cache, "plugin": plugin, "modules": modules, "entry": entry}


def copy_plugin(plan: dict) -> None:
    """Copy --plugin-library into the engine folder (PLUGIN_DIR): the build registers that copy, the
    entry lists it with its sha256, and the runtime loads nothing else."""
    plugin = plan["plugin"]
    if plugin is None:
        return
    write_bytes_atomic(plugin["copy"], Path(plugin["library"]).read_bytes())
    plan["entry"]["files"].append(plugin["rel"])


# -- source checks and the plugin copy of gswa.onnx (need onnx, imported lazily) ------------------


def _all_nodes(model):
    yield from model.graph.node
    for fn in model.functions:
        yield from fn.node


def _constant_values(model, base_dir: Path) -> dict:
    """name -> numpy array for initializers and Constant outputs (external data read from base_dir)."""
    from onnx import numpy_helper

    values = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = a.t
    return {k: (lambda t=t: numpy_helper.to_array(t, base_dir=str(base_dir))) for k, t in values.items()}


def source_problems(module: str, path: Path, precision: str, manifest: Manifest, *, use_plugin: bool = False) -> list[str]:
    """What would make TensorRT parse `path` into something other than a `precision` engine of `module`
    (an empty list: none found). Reads the graph; loads external data only for Q/DQ zero points."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    inits = {t.name for t in model.graph.initializer}
    got = sorted(i.name for i in model.graph.input if i.name not in inits)
    expected = sorted(manifest.modules[module].names("inputs"))
    if got != expected:
        problems.append(f"inputs {got} differ from the manifest's {expected}")
    nodes = list(_all_nodes(model))
    ops = {(n.domain or "", n.op_type) for n in nodes}
    function_names = {f.name for f in model.functions}
    foreign = sorted(f"{d}::{o}" for d, o in ops if d not in ("", "ai.onnx", GSWA_DOMAIN) and o not in function_names)
    if foreign:
        problems.append(f"contains {', '.join(foreign)}, which TensorRT's ONNX parser does not know")
    qop = sorted(o for d, o in ops if d in ("", "ai.onnx") and o in QOPERATOR_OPS)
    if qop:
        problems.append(f"contains {', '.join(qop)} (ONNX Runtime QOperator/dynamic quantization); TensorRT needs Q/DQ nodes")
    if precision == "int8":
        qdq = [n for n in nodes if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx")]
        if not qdq and any(o in COMPUTE_OPS for _, o in ops):
            problems.append("has no QuantizeLinear/DequantizeLinear nodes, so the strongly typed engine would not be INT8")
        consts = _constant_values(model, path.parent)
        asymmetric = []
        for n in qdq:
            zp = n.input[2] if len(n.input) > 2 else ""
            if zp and zp in consts and consts[zp]().astype("int64").any():
                asymmetric.append(zp)
        if asymmetric:
            problems.append(f"zero points {sorted(set(asymmetric))[:3]} are not 0 (TensorRT needs symmetric Q/DQ)")
    if precision == "fp16" and not _has_float16(model, nodes):
        problems.append("has no float16 tensors, so the strongly typed engine would run in FP32")
    if precision == "fp32":
        labels = [what for what, found in (("float16 tensors", _has_float16(model, nodes)),
                                           ("Q/DQ nodes", any(o in QDQ_OPS for _, o in ops))) if found]
        if labels:
            problems.append(f"has {' and '.join(labels)}, so the engine would not be the FP32 it is labelled")
    gswa_nodes = [n for n in model.graph.node if n.domain == GSWA_DOMAIN and n.op_type == GSWA_OP]
    if gswa_nodes and not use_plugin and GSWA_OP not in function_names:
        problems.append("has the sleigh::GSWA node without its function body, so TensorRT would need the plugin "
                        "(use --plugin-library, or the package's gswa.onnx)")
    return problems


def _has_float16(model, nodes) -> bool:
    from onnx import TensorProto

    f16 = TensorProto.FLOAT16
    if any(t.data_type == f16 for t in model.graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type == f16 for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]):
        return True
    for n in nodes:
        for a in n.attribute:
            if (n.op_type == "Cast" and a.name == "to" and a.i == f16) or (a.name == "value" and a.t.data_type == f16):
                return True
    return False


def strip_gswa_function(src: Path, dst: Path) -> int:
    """Write `dst`: `src` without the GSWA local function, the sleigh::GSWA node kept (so every
    TensorRT parser maps it to the plugin of its `plugin_namespace`). Returns the number of GSWA
    nodes. External weights stay where they are: `dst` must lie in `src`'s folder when it has any."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == GSWA_DOMAIN and n.op_type == GSWA_OP]
    if not nodes:
        raise SleighError(str(src), "has no sleigh::GSWA node", "the gswa module of a package with GSWA (or no --plugin-library)")
    for n in nodes:
        ns = next((a.s.decode() for a in n.attribute if a.name == "plugin_namespace"), None)
        if ns != GSWA_PLUGIN_NAMESPACE:
            raise SleighError(str(src), f"the GSWA node's plugin_namespace is {ns!r}",
                              f"{GSWA_PLUGIN_NAMESPACE!r} (re-export with this version of sleigh)")
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external and dst.resolve().parent != src.resolve().parent:
        raise ValueError("strip_gswa_function: dst must be beside src when src has external data")
    keep = [f for f in model.functions if f.name != GSWA_OP]  # the parser matches by name, whatever the domain
    del model.functions[:]
    model.functions.extend(keep)
    onnx.save(model, str(dst))  # tensors still point at src's .onnx.data by relative location
    return len(nodes)


@contextmanager
def _parse_path(spec: dict):
    """The file to hand to the parser: the source, or a stripped copy beside it (removed afterwards)."""
    src = spec["source"]
    if not spec["strip_gswa_function"]:
        yield src
        return
    tmp = src.parent / f".{src.stem}.gswa-plugin.{os.getpid()}.onnx"
    try:
        strip_gswa_function(src, tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


# -- the build (needs TensorRT) ---------------------------------------------------------------------


def parser_errors(parser, limit: int = 3) -> str:
    """The parser's errors on one line, each with its node name and operator."""
    def get(err, attr):
        try:
            return getattr(err, attr)()
        except Exception:  # older bindings lack some accessors
            return None

    parts = []
    for i in range(min(parser.num_errors, limit)):
        err = parser.get_error(i)
        node = get(err, "node_name") or f"node #{get(err, 'node')}"
        op = get(err, "node_operator")
        stack = get(err, "local_function_stack")
        where = f"{' > '.join(stack)} > " if stack else ""
        parts.append(f"{where}{node}{f' [{op}]' if op else ''}: {' '.join(str(get(err, 'desc')).split())}")
    more = parser.num_errors - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _register_plugin(trt, logger, library: Path) -> None:
    """Register the engine folder's copy of the plugin library and check that it provides sleigh::GSWA."""
    load_plugin_library(trt, logger, library)
    if trt.get_plugin_registry().get_creator(GSWA_OP, GSWA_PLUGIN_VERSION, GSWA_PLUGIN_NAMESPACE) is None:
        raise SleighError("--plugin-library", f"the library registers no {GSWA_OP} plugin (version {GSWA_PLUGIN_VERSION}, "
                          f"namespace {GSWA_PLUGIN_NAMESPACE!r}) with TensorRT",
                          "the library that registers it, or no --plugin-library (the GSWA function is parsed)")


def _build_module(trt, logger, module: str, spec: dict, opts: EngineOptions, cache_bytes: bytes):
    """Parse, profile and build one module; returns (serialized engine, serialized timing cache)."""
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # pybind raises when the factory returns null (no CUDA device)
        raise SleighError("GPU", f"TensorRT cannot create a builder ({logger.last_error() if logger.errors else e})",
                          GPU_EXPECTED) from None
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with _parse_path(spec) as path:
        if not parser.parse_from_file(str(path)):  # from a file, so <name>.onnx.data is found beside it
            raise SleighError(f"{module} ({spec['source']})", f"TensorRT's ONNX parser failed: {parser_errors(parser)}",
                              "an ONNX that TensorRT 10.3+ parses (opset 18-20, standard ops, Q/DQ for INT8)")
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for label, prof in zip(spec["profile_names"], spec["profiles"]):
            if set(prof) != inputs:
                raise SleighError(f"{module} ({spec['source']})", f"network inputs {sorted(inputs)} differ from the "
                                  f"{label} profile's {sorted(prof)}", "a source ONNX with the manifest's input names")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
        config.builder_optimization_level = opts.builder_optimization_level
        for label, prof in zip(spec["profile_names"], spec["profiles"]):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.items():
                profile.set_shape(name, lo, opt, hi)
            if config.add_optimization_profile(profile) < 0:
                raise SleighError(f"{module} profile {label}", f"TensorRT rejects it ({logger.last_error()})",
                                  "profiles with min <= opt <= max (a bug in sleigh: please report it)")
        cache = config.create_timing_cache(cache_bytes)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            # a cache from another GPU or TensorRT version: start a fresh one rather than mix timings
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SleighError(f"{module} ({spec['source']})", f"TensorRT could not build the engine ({logger.last_error()})",
                              "enough GPU memory (a larger --workspace-gb, smaller --max-context) and a supported graph")
        return serialized, config.get_timing_cache().serialize()


def build_engines(pkg: Path, manifest: Manifest, sources: dict[str, Path], opts: EngineOptions, *,
                  quiet: bool = False, out_dir: Path | None = None) -> dict:
    """Build the vision, gswa, embed and decoder plans into PKG/engines/<name>/ (or `out_dir`, see
    `engine_plan`) and return the TensorRT part of the manifest entry, with "files": the files it
    wrote (the caller lists them with their sha256 and writes the manifest last). Never writes a
    plan without TensorRT. Each source is checked as what `opts.module_precisions` says it holds."""
    pkg = Path(pkg)
    opts = opts.for_package(manifest)
    plan = engine_plan(pkg, manifest, sources, opts, out_dir=out_dir)
    require_tensorrt()
    entry = copy.deepcopy(plan["entry"])
    try:
        import onnx  # noqa: F401  (the export extra; a Jetson may build without it)
    except ImportError:
        entry["source_checks"] = "skipped: onnx is not installed"
    else:
        for m, spec in plan["modules"].items():
            want = opts.module_precisions[m]
            problems = source_problems(m, spec["source"], want, manifest, use_plugin=plan["plugin"] is not None)
            if problems:
                raise SleighError(f"{m} source {spec['source']}", "; ".join(problems[:3]),
                                  f"an {want.upper()} ONNX of the {m} module that TensorRT can parse")
        entry["source_checks"] = "passed"
    import tensorrt as trt

    logger = make_logger(trt, echo=not quiet)
    if plan["plugin"] is not None:
        copy_plugin(plan)
        _register_plugin(trt, logger, plan["plugin"]["copy"])
    cache_path = plan["timing_cache"]
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    with progress("build-engine", len(plan["modules"]), quiet) as bar:
        for m, spec in plan["modules"].items():
            bar.advance(0, description=f"tensorrt {m}")
            serialized, cache = _build_module(trt, logger, m, spec, opts, cache_bytes)
            write_bytes_atomic(spec["plan"], serialized)
            write_bytes_atomic(cache_path, cache)  # kept after every module: an interrupted build keeps its timings
            cache_bytes = bytes(memoryview(cache))
            del serialized
            bar.advance()
            entry["files"].append(spec["plan_rel"])
    entry["versions"]["tensorrt"] = trt.__version__
    try:
        cudart = import_cudart()
        entry["versions"]["compute_capability"] = compute_capability(cudart)
        entry["versions"]["device"] = device_name(cudart)
    except Exception:  # cuda-python missing: the runtime then checks the TensorRT version only
        pass
    return entry
