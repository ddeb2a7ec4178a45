"""`sleigh build-engine`: one engine folder per backend and precision, listed in the manifest.

    PKG/engines/<name>/{vision,embed,decoder}.onnx   ONNX Runtime: converted, optimised offline
    PKG/engines/<name>/*.plan                         TensorRT: built from the same converted ONNX
    PKG/engines/<name>/plugin/<library>               TensorRT with --plugin-library: the GSWA plugin

Each module is converted by the function `CONVERSIONS` holds for it and its precision
(`EngineOptions.module_precisions`; what each precision means: DESIGN.md, "Precision"). With
--kv-dtype float16 on a decoder that is not FP16, float16 cache slots around its float32 attention
(`kv_slots_fp16`); the entry's `kv_dtype` says what the decoder's slots are.
Every build ends with the accuracy gate against the FP32 modules, and with --eval-data a task-accuracy
gate (engines/accuracy.py); failing either, the build fails (nothing is registered) unless --allow-degraded.
"""

from __future__ import annotations

import errno
import gc
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from sleigh import staging
from sleigh.onnx_files import versions
from sleigh.engines.calibration.int8 import INT8_MAX, ORT_WEIGHT_MAX, RANGES_FILE
from sleigh.engines.calibration.qdq import quantize_vision_qdq
from sleigh.engines.options import EngineOptions, max_views
from sleigh.errors import SleighError
from sleigh.onnx_files import save_onnx
from sleigh.progress import progress
from sleigh.runtime.compat import older_than, trim_heap
from sleigh.runtime.cpu_features import cpu_features
from sleigh.runtime.kv_cache import LOGITS, NEW, PAST
from sleigh.runtime.manifest import EngineEntry, FileEntry, Manifest, parse_engine, read_manifest, update_manifest
from sleigh.runtime.package import (MODULE_NAMES, check_folder_slot, check_sources, file_entry, ordinary_modes, read_json,
                                    write_bytes_atomic)

WEIGHT_ONLY_BLOCK = 32
# MatMulNBits' accuracy level 4 computes with int8 activations on the CPU: measured on the small
# preset, INT8 weights decode at ~350 tokens/s with it and ~24 without (FP32: ~190), logits cosine
# unchanged (0.9998); see benchmarks/RESULTS.md. Other providers ignore the hint.
WEIGHT_ONLY_ACCURACY_LEVEL = 4
# Ops that keep FP32 inside FP16 modules: normalisation statistics and softmax accumulate in FP32,
# and so does the decoder's log-sum-exp over the cache slots (Exp, ReduceSum, Log: the other half of
# its softmax, sleighvl/llm.py cache_attention).
FP16_KEEP_FP32 = ["GSWA", "LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Range",
                  "CumSum", "Cos", "Sin", "Exp", "ReduceSum", "Log"]
KV_PREFIXES = (PAST + ".", NEW + ".")  # FP16 in an FP16 decoder: a cast of the cache per step otherwise
CPU_FALLBACK_CAST = "InsertedPrecisionFreeCast"  # ONNX Runtime's name for casts around CPU-less float16 kernels


# -- ONNX conversions ----------------------------------------------------------------------------------

def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _without_repeated_nodes(model):
    """Drop a node that repeats an earlier one exactly (same op, inputs, outputs and attributes).

    onnxruntime <= 1.31's float16 converter inserts one Cast for every blocked consumer of an FP16
    initializer, all with the same output name (e.g. `...norm1.weight_cast_to_fp32`, read by the
    LayerNormalization and by the GSWA node); a name defined twice is invalid ONNX and onnx_ir refuses
    it ("redeclared in the current graph scope"). The copies compute the same tensor, so one stays.
    Nodes that define a name twice differently are left for onnx_ir to refuse."""
    seen, kept = set(), []
    for node in model.graph.node:
        key = (node.domain, node.op_type, tuple(node.input), tuple(node.output),
               tuple(a.SerializeToString() for a in node.attribute))
        if key not in seen:
            seen.add(key)
            kept.append(node)
    if len(kept) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return model


def _sorted(model):
    """Topologically sort (the float16 converter appends its input casts at the end)."""
    import onnx_ir as ir

    m = ir.serde.deserialize_model(_without_repeated_nodes(model))
    m.graph.sort()
    return ir.serde.serialize_model(m)


def to_fp16(src: Path, dst: Path) -> list[str]:
    """Float16 inside, FP32 inputs and outputs, except the KV cache slots and new keys/values: they
    are FP16 (the runtimes read the cache dtype from the graph), or every step would cast the whole
    cache in every layer."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _with_shapes(src)
    io = [v.name for v in (*model.graph.input, *model.graph.output)]
    keep = [n for n in io if not n.startswith(KV_PREFIXES)]
    model = convert_float_to_float16(model, keep_io_types=True if keep == io else keep, op_block_list=FP16_KEEP_FP32,
                                     disable_shape_infer=True)
    return save_onnx(_sorted(model), dst)


def _with_shapes(src: Path):
    """The module with ONNX's shape inference run on its graph before its external weights are read in:
    inference takes a serialized model, and protobuf serializes 2 GB at most (a full-size decoder's
    weights are 7.6 GB; convert_float_to_float16 given the whole model failed there: "EncodeError:
    Failed to serialize proto"). It reads only the weights' shapes, which the graph holds."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    onnx.load_external_data_for_model(model, str(src.parent))
    return model


# An INT4 decoder keeps its LM head (the MatMul that produces the logits) at 8 bits. On the trained
# demo model (benchmarks/RESULTS.md, "The demo model") an all-INT4 decoder lost 3.0 points of shape
# accuracy, the same decoder with an INT8 head stays within 0.6 points of FP32; the logits' margins
# between close answers are what 4-bit head weights blur. At full size the head is 2048 x 92553: INT8
# costs ~95 MB more than INT4 (190 MB against 95 MB).
LM_HEAD_BITS = 8


def lm_head(model) -> str:
    """The name of the MatMul that produces the decoder's `logits` (through its Reshape/Cast, if any)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(LOGITS)
    while node is not None and node.op_type != "MatMul":
        node = producers.get(node.input[0]) if node.input else None
    if node is None:
        raise SleighError("decoder.onnx", "no MatMul produces its logits", "a decoder exported by `sleigh export`")
    return node.name


def weight_only(src: Path, dst: Path, bits: int) -> list[str]:
    """MatMul weights to symmetric blockwise INT8/INT4 (MatMulNBits); attention MatMuls stay float,
    an INT4 decoder's LM head is INT8 (LM_HEAD_BITS)."""
    import logging

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = _load(src)
    head = lm_head(model)
    # the body at `bits`, then whatever weight MatMul is left (the head) at LM_HEAD_BITS
    passes = [(bits, [head]), (LM_HEAD_BITS, [])] if bits < LM_HEAD_BITS else [(bits, [])]
    for b, exclude in passes:
        cfg = DefaultWeightOnlyQuantConfig(block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True, bits=b,
                                           accuracy_level=WEIGHT_ONLY_ACCURACY_LEVEL, quant_format=QuantFormat.QOperator)
        q = MatMulNBitsQuantizer(model, bits=b, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                 accuracy_level=WEIGHT_ONLY_ACCURACY_LEVEL, nodes_to_exclude=exclude, algo_config=cfg)
        q.process()
        model = q.model.model
    if "input_ids" in {i.name for i in model.graph.input}:  # a fused decoder's table: as the embed module's
        table_int8(model, str(src))
    return save_onnx(model, dst)


def kv_slots_fp16(path: Path) -> None:
    """Float16 KV cache slots for a float32 decoder, in place: the cache inputs and new-position outputs
    become float16, with a Cast at each, so the attention still computes in float32 and the runtime's
    slots take half the bytes. Only the graph is rewritten (external weights stay where they are).

        past_key_values.i.key (fp16) -> Cast(to fp32) -> past_key_values.i.key_fp32 -> [layer i as before]
        [layer i as before] -> new_key_values.i.key_fp32 -> Cast(to fp16) -> new_key_values.i.key (fp16)

    Each input Cast is placed just before the first node that reads it, so that ONNX Runtime, which
    frees a tensor after its last reader, holds one layer's float32 slots at a time, not the cache's
    (measured: benchmarks/RESULTS.md, FP16 KV slots).

    A fused decoder's GroupQueryAttention writes into the cache buffer itself and takes the cache in
    its own dtype, so there the attention itself computes in float16 (`_attention_fp16`)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    past = {v.name: v for v in g.input if v.name.startswith(PAST + ".")}
    new = {v.name: v for v in g.output if v.name.startswith(NEW + ".")}
    for v in (*past.values(), *new.values()):
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise SleighError(str(path), f"its cache tensor {v.name} is not float32", "a float32 decoder for --kv-dtype float16")
    fused = any(n.op_type == "GroupQueryAttention" for n in g.node)
    nodes = _attention_fp16(g.node) if fused else _slot_casts(g.node, past, new)
    del g.node[:]
    g.node.extend(nodes)
    kept = [v for v in g.value_info if not v.name.startswith(KV_PREFIXES)]  # types the rewrite changed
    del g.value_info[:]
    g.value_info.extend(kept)
    for v in (*past.values(), *new.values()):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    if not fused:  # ONNX's checker knows no SimplifiedLayerNormalization (ONNX Runtime's, in the default domain)
        onnx.checker.check_model(model)  # the graph alone: its weights may lie in external data
    write_bytes_atomic(path, model.SerializeToString())


def _slot_casts(graph_nodes, past: dict, new: dict) -> list:
    """The standard form: a Cast from each float16 slot to float32 before its first reader, and from
    each new key/value to float16 after its producer."""
    from onnx import TensorProto, helper

    fp32 = {name: f"{name}_fp32" for name in (*past, *new)}  # what the attention reads and writes now
    nodes, cast = [], set()
    for node in graph_nodes:
        for name in node.input:
            if name in past and name not in cast:
                cast.add(name)
                nodes.append(helper.make_node("Cast", [name], [fp32[name]], to=TensorProto.FLOAT, name=f"/kv/{name}/Cast"))
        node.input[:] = [fp32.get(n, n) for n in node.input]
        produced = [o for o in node.output if o in new]
        node.output[:] = [fp32.get(o, o) for o in node.output]
        nodes.append(node)
        nodes += [helper.make_node("Cast", [fp32[o]], [o], to=TensorProto.FLOAT16, name=f"/kv/{o}/Cast") for o in produced]
    return nodes


# GroupQueryAttention's float inputs besides its cache: query, key, value (0-2), the cos and sin caches
# where it turns q and k itself (7, 8) and attention_bias (10)
GQA_FLOAT_INPUTS = (0, 1, 2, 7, 8, 10)


def _attention_fp16(graph_nodes) -> list:
    """The fused form: each GroupQueryAttention takes its float inputs (GQA_FLOAT_INPUTS) cast to float16 and
    its output is cast back to float32; the cache buffers pass through as float16 (measured on the dev
    CPU, a float16 GroupQueryAttention runs no slower than a float32 one: benchmarks/RESULTS.md)."""
    from onnx import TensorProto, helper

    nodes, fp16 = [], {}
    for node in graph_nodes:
        if node.op_type == "GroupQueryAttention":
            for i in GQA_FLOAT_INPUTS:
                name = node.input[i] if i < len(node.input) else ""
                if name and name not in fp16:  # the bias and the caches are one tensor for every layer: cast once
                    fp16[name] = f"{name}_fp16"
                    nodes.append(helper.make_node("Cast", [name], [fp16[name]], to=TensorProto.FLOAT16, name=f"/kv/{name}/Cast"))
                if name:
                    node.input[i] = fp16[name]
            out = node.output[0]
            node.output[0] = f"{out}_fp16"
            nodes += [node, helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT, name=f"/kv/{out}/Cast")]
        else:
            nodes.append(node)
    return nodes


def embed_int8(src: Path, dst: Path) -> list[str]:
    """The embed module with its table as INT8 rows (`table_int8`)."""
    model = _load(src)
    table_int8(model, str(src))
    return save_onnx(model, dst)


def table_int8(model, where: str) -> None:
    """The embedding table, in place, as INT8 rows with one float32 scale per row (symmetric: max |w|
    / 127): the float Gather becomes a Gather of the int8 rows and one of their scales, a Cast and a
    Mul, with the same output. A quarter of the FP32 table's bytes, half of FP16's (0.19 GB against
    0.38 GB at full size), and the table is what an INT4 decoder's engine holds most of besides the
    decoder itself. The embed module's table, and a fused decoder's copy of it (schema 6), are
    quantized alike, so a token's embedding is the same in a prefill and in a decode step."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    tables = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]
    if len(gathers) != 1:
        raise SleighError(where, f"{len(gathers)} Gathers read a weight table (one expected: the token embedding)",
                          "a module exported by `sleigh export`")
    gather = gathers[0]
    name, ids, out = gather.input[0], gather.input[1], gather.output[0]
    table = numpy_helper.to_array(tables[name]).astype(np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0  # an all-zero row stays zero
    rows = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    graph.initializer.remove(tables[name])
    graph.initializer.extend([numpy_helper.from_array(rows, f"{name}_int8"), numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")])
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for i, node in enumerate([helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_int8"], name=f"{gather.name}_int8"),
                              helper.make_node("Cast", [f"{out}_int8"], [f"{out}_float"], name=f"{gather.name}_cast", to=TensorProto.FLOAT),
                              helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_scale"], name=f"{gather.name}_scale"),
                              helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out], name=f"{gather.name}_dequantize")]):
        graph.node.insert(at + i, node)


def copy(src: Path, dst: Path) -> list[str]:
    written = [dst.name]
    shutil.copyfile(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        shutil.copyfile(data, dst.with_name(dst.name + ".data"))
        written.append(dst.name + ".data")
    return written


def int8_weight_max(backend: str) -> int:
    """The largest |integer| of INT8 vision weights: 7 bits for ONNX Runtime, whose int8 kernels on
    CPUs without VNNI saturate with 8 (calibration/int8.py, ORT_WEIGHT_MAX); 8 bits for TensorRT."""
    return ORT_WEIGHT_MAX if backend == "onnxruntime" else INT8_MAX


def vision_int8(src: Path, dst: Path, manifest: Manifest, weight_max: int) -> list[str]:
    pkg = manifest.root
    if not manifest.calibration or not (pkg / RANGES_FILE).is_file():
        raise SleighError(str(pkg), "INT8 needs calibration ranges and the package has none",
                          f"run `sleigh calibrate {pkg} --images DIR` first")
    quantize_vision_qdq(src, dst, read_json(pkg / RANGES_FILE, "calibration ranges from `sleigh calibrate`"), weight_max=weight_max)
    data = dst.with_name(dst.name + ".data")
    return [dst.name] + ([data.name] if data.exists() else [])


# (module, what it is converted to: EngineOptions.module_precisions) -> conversion(src, dst, manifest, opts),
# which returns the files it wrote. "int8" means Q/DQ for vision, weight-only MatMulNBits for the decoder.
Conversion = Callable[[Path, Path, Manifest, EngineOptions], list[str]]
CONVERSIONS: dict[tuple[str, str], Conversion] = {
    **{(m, "fp32"): lambda src, dst, manifest, opts: copy(src, dst) for m in MODULE_NAMES},
    **{(m, "fp16"): lambda src, dst, manifest, opts: to_fp16(src, dst) for m in MODULE_NAMES},
    ("vision", "int8"): lambda src, dst, manifest, opts: vision_int8(src, dst, manifest, int8_weight_max(opts.backend)),
    ("embed", "int8"): lambda src, dst, manifest, opts: embed_int8(src, dst),
    ("decoder", "int8"): lambda src, dst, manifest, opts: weight_only(src, dst, 8),
    ("decoder", "int4"): lambda src, dst, manifest, opts: weight_only(src, dst, 4),
}


def convert_module(module: str, opts: EngineOptions, dst: Path, manifest: Manifest) -> list[str]:
    """Convert the package's `module` into `dst`; returns the files written."""
    src = manifest.module_path(module)
    return CONVERSIONS[module, opts.module_precisions[module]](src, dst, manifest, opts)


def optimize_offline(path: Path) -> None:
    """ONNX Runtime's provider-independent graph optimizations (constant folding, redundant-node
    elimination, ...), done once here and saved over the module. Level BASIC on purpose: it keeps
    standard ops and the Q/DQ pairs, so the same file runs on the CPU and CUDA providers and TensorRT
    reads the same quantization; the provider-specific fusions happen when a session opens it.

    Where the CPU provider lacks a float16 kernel it inserts casts to float32 even at level BASIC
    ("InsertedPrecisionFreeCast" nodes): such a result is CPU-specific (it would cast the KV cache
    and run those nodes in float32 on a GPU too), so it is dropped and the module stays as converted."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    tmp = path.with_name(f".{path.name}.opt")
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3
    data = path.with_name(path.name + ".data")
    if data.exists():
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{path.name}.opt.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own types: its failed write of the optimized copy is no OSError
        needed = sum(p.stat().st_size for p in (path, data) if p.exists())
        if shutil.disk_usage(path.parent).free < needed:  # the copy cannot have fit: name the cause
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.parent)) from None
        raise
    if any(n.name.startswith(CPU_FALLBACK_CAST) for n in onnx.load(str(tmp), load_external_data=False).graph.node):
        tmp.unlink()
        path.with_name(f"{path.name}.opt.data").unlink(missing_ok=True)
        return
    if data.exists():
        # the optimized graph refers to <name>.onnx.opt.data: keep that reference valid under the final name
        model = _without_new_default_attributes(onnx.load(str(tmp), load_external_data=True))
        tmp.unlink()
        path.with_name(f"{path.name}.opt.data").unlink(missing_ok=True)
        data.unlink()
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(_without_new_default_attributes(onnx.load(str(tmp))), str(path))
        tmp.unlink()


# Attributes that newer onnxruntimes write at their default value and older ones reject as unknown
# ("Unrecognized attribute: weight_prepacked for operator MatMulNBits" on 1.20-1.23 for an engine
# optimised by 1.32; the fused decoder's GroupQueryAttention gains six on 1.32 that 1.22 lacks):
# dropped, so an engine runs on every supported onnxruntime (README "Tested versions").
NEW_DEFAULT_ATTRIBUTES = {
    ("com.microsoft", "MatMulNBits"): {"weight_prepacked": 0},
    ("com.microsoft", "GroupQueryAttention"): {"k_quant_type": "NONE", "v_quant_type": "NONE", "qk_output": 0,
                                               "sliding_window_cache": 0, "causal": 1, "qk_norm_epsilon": 1e-6},
}


def _is_default(attribute, default) -> bool:
    from onnx.helper import get_attribute_value

    value = get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode() == default
    if isinstance(value, float):
        return bool(np.isclose(value, default, rtol=1e-6, atol=0.0))
    return value == default


def _without_new_default_attributes(model):
    for node in model.graph.node:
        defaults = NEW_DEFAULT_ATTRIBUTES.get((node.domain, node.op_type), {})
        keep = [a for a in node.attribute if not (a.name in defaults and _is_default(a, defaults[a.name]))]
        if len(keep) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    return model


# -- the build -----------------------------------------------------------------------------------------

# The oldest onnxruntime whose weight-only quantizer build-engine is tested with (README "Tested
# versions"); 1.22's MatMulNBitsQuantizer takes other arguments.
WEIGHT_ONLY_ORT_MIN = (1, 31, 0)


def _check_weight_only_quantizer() -> None:
    import onnxruntime

    if older_than(onnxruntime.__version__, WEIGHT_ONLY_ORT_MIN):
        floor = ".".join(map(str, WEIGHT_ONLY_ORT_MIN))
        raise SleighError(f"onnxruntime {onnxruntime.__version__}", f"INT8/INT4 decoder weights are built with "
                          f"onnxruntime's weight-only quantizer, tested from {floor} on",
                          f"pip install 'onnxruntime>={floor}' to build (the engine then runs on onnxruntime 1.22 and newer)")


def build_engine(pkg: Path, opts: EngineOptions) -> EngineEntry:
    """Build, gate and register one engine; returns its entry as listed in the manifest."""
    pkg = Path(pkg)
    manifest = read_manifest(pkg)
    given, opts = opts, opts.for_package(manifest)
    name = opts.name
    existing = manifest.engines.get(name)
    if existing is not None and existing.backend != opts.backend:
        raise SleighError(f"--name {name}", f"the package already has a {existing.backend!r} engine of that name",
                          "another --name")
    if opts.module_precisions["decoder"] in ("int8", "int4"):
        _check_weight_only_quantizer()
    if opts.backend == "tensorrt":  # fail before converting anything
        from sleigh.engines.tensorrt_build import require_tensorrt

        require_tensorrt()
    final = pkg / "engines" / name
    if existing is not None and not opts.force:
        raise SleighError(f"engine {name}", "already built", "--force to rebuild it")
    staging.check_apart(final, {"--images": opts.gate_images, "--eval-data": opts.eval_data})
    check_folder_slot(pkg / "engines")
    from sleigh.engines.accuracy import check_gate_fits

    check_gate_fits(manifest, opts.max_tiles, opts.max_context)
    ranges = {}
    if opts.module_precisions["vision"] == "int8" and RANGES_FILE in manifest.files:  # the ranges it quantizes with
        ranges[RANGES_FILE] = f"the ranges as calibrated: run `sleigh calibrate {pkg} --images DIR` again"
    check_sources(pkg, manifest, MODULE_NAMES, ranges)  # before converting anything
    if opts.eval_data is not None:  # a missing or empty JSONL fails before the build, not after it
        from sleigh.data.qa import read_qa

        read_qa(opts.eval_data)
    (pkg / "engines").mkdir(exist_ok=True)
    staging.clean_stale(pkg / "engines")  # what killed builds left behind (never a running build's)
    tmp = staging.make(pkg / "engines", name)
    try:
        with progress(f"build {name}", len(MODULE_NAMES) + 5, opts.quiet) as bar:
            files: dict[str, list[str]] = {}
            for module in MODULE_NAMES:
                bar.advance(0, description=f"{name}: {module}")
                files[module] = convert_module(module, opts, tmp / f"{module}.onnx", manifest)
                if module == "decoder" and opts.kv_cast:
                    kv_slots_fp16(tmp / "decoder.onnx")
                if opts.backend == "onnxruntime":
                    optimize_offline(tmp / f"{module}.onnx")
                # the module's protobufs are garbage now; the heap hands them back, or the gate's pipelines
                # come on top (full-size FP16 on the dev CPU: 13 GB still resident after the decoder, 23 GB peak)
                gc.collect()
                trim_heap()
                bar.advance()
            if opts.max_memory is not None:  # an engine its own budget cannot load is refused before the gate
                _check_fits(opts.max_memory, manifest, opts.kv, {m: tmp / f[0] for m, f in files.items()},
                            stages=opts.backend == "onnxruntime")
            staged = f"engines/{tmp.name}"  # gated from here; renamed to engines/<name> only once it passes
            staged_files = {f"{staged}/{f}" for fs in files.values() for f in fs}
            ort = opts.backend == "onnxruntime"
            features = cpu_features() if ort else None
            entry = EngineEntry(
                name=name, backend=opts.backend, precision=opts.precision, llm_weights=opts.weights,
                kv_dtype=opts.kv,  # the decoder's cache slots (the runtime allocates them so)
                max_memory=opts.max_memory, calibration=_calibration_used(manifest, opts),
                dir=staged, modules={m: f"{staged}/{f[0]}" for m, f in files.items()},
                build_options=given.to_json(), versions=versions(),
                # the gate's verdict holds for the kernels it ran: ONNX Runtime's CPU kernels follow these
                cpu_machine=platform.machine() if ort else None, cpu_features=None if features is None else tuple(features),
                record={"shapes": {"max_views": max_views(manifest, opts.max_tiles), "max_context": opts.max_context},
                        "offline_optimization": "ORT_ENABLE_BASIC" if ort else None,
                        "int8_weight_max": int8_weight_max(opts.backend) if opts.precision == "int8" else None})
            if opts.backend == "tensorrt":
                from sleigh.engines.tensorrt_build import build_engines

                trt = build_engines(pkg, manifest, {m: tmp / f[0] for m, f in files.items()}, opts, quiet=opts.quiet, out_dir=tmp)
                entry = replace(entry, modules=trt["modules"],  # the plans, not the converted ONNX they were built from
                                versions=entry.versions | trt["versions"],  # tensorrt, compute_capability, device
                                plugin_library=(trt["gswa"] or {}).get("plugin_library"),
                                record={**entry.record, **{k: trt[k] for k in ("sources", "profiles", "timing_cache", "gswa",
                                                                               "source_checks")}})
                staged_files |= set(trt["files"])
            ordinary_modes(tmp)

            bar.advance(0, description=f"{name}: accuracy gate")
            from sleigh.engines.accuracy import run_gate

            entry = parse_engine(pkg, name, entry.to_json())  # checked as the runtime will read it
            report = run_gate(pkg, entry, images=opts.gate_images, progress=bar)
            entry = replace(entry, accuracy=report)
            # With eval data the task accuracy is the gate's own check and the agreement numbers are a
            # record: their thresholds are set for random weights, and a trained model's quantized
            # GSWA weights and embeddings can move past them while every answer stays (issue 10).
            if not report["passed"] and not opts.allow_degraded and opts.eval_data is None:
                raise GateFailed(name, report)  # the staged folder goes; an older engine of this name stays
            passed = report["passed"]
            if opts.eval_data is not None:
                from sleigh.engines.accuracy import run_task_gate

                bar.advance(0, description=f"{name}: task accuracy vs FP32")
                task = run_task_gate(pkg, entry, opts.eval_data, opts.task_tolerance)
                entry = replace(entry, task_accuracy=task)
                if not task["passed"] and not opts.allow_degraded:
                    raise TaskGateFailed(name, task)
                passed = task["passed"]
            entry = replace(entry, accuracy_passed=passed, degraded=not passed)
            installed = _install(pkg, tmp, final, name, entry, staged, sorted(staged_files))
            tmp = None
            return installed.engines[name]
    except OSError as e:  # a full disk or a read-only package: the CLI names it; say where
        e.filename = e.filename or str(pkg / "engines")
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _calibration_used(manifest: Manifest, opts: EngineOptions):
    """INT8 vision: the package's calibration as this engine reads it, its ranges' sha256 beside it
    (what the gate holds out, whatever calibration the package holds later)."""
    if opts.module_precisions["vision"] != "int8" or manifest.calibration is None:
        return None
    ranges = manifest.files.get(RANGES_FILE)
    extra = {"ranges_sha256": ranges.sha256} if ranges is not None else {}
    return replace(manifest.calibration, record={**manifest.calibration.record, **extra})


def _check_fits(limit: int, manifest: Manifest, kv_dtype: str, module_files: dict[str, Path], stages: bool) -> None:
    """--max-memory: the engine's weights (its largest stage, where the runtime can hold its modules a
    stage at a time) and the runtime must fit in it (runtime/memory.py); a generation's chunks are
    planned per run."""
    from sleigh.runtime.memory import MemoryBudget, Shapes, module_sizes, stage_bytes

    sizes = module_sizes(module_files)  # the files' bytes: no session is open to measure
    try:
        MemoryBudget(limit, Shapes.from_contract(manifest.contract, kv_dtype), sum(sizes.values()),
                     stage_bytes(sizes) if stages else None)
    except SleighError as e:
        raise SleighError(e.what.replace("max_memory=", "--max-memory ", 1), e.problem, e.expected) from None


def _install(pkg: Path, tmp: Path, final: Path, name: str, entry: EngineEntry, staged: str,
             staged_files: list[str]) -> Manifest:
    """Move the gated folder into place and list it in the manifest (last). An older engine of the
    same name is moved aside first and put back if anything fails before the manifest is written.
    Every path of the entry that points into the staging folder moves with it."""
    old = staging.aside_name(final) if final.exists() else None
    if old is not None:
        final.replace(old)
    try:
        tmp.replace(final)

        def relocate(rel: str) -> str:
            return f"engines/{name}/" + rel[len(staged) + 1:] if rel.startswith(staged + "/") else rel

        record = dict(entry.record)
        if "sources" in record:
            record["sources"] = {m: relocate(rel) for m, rel in record["sources"].items()}
        entry = replace(entry, dir=f"engines/{name}", modules={m: relocate(rel) for m, rel in entry.modules.items()},
                        plugin_library=entry.plugin_library and relocate(entry.plugin_library), record=record,
                        files={relocate(rel): FileEntry(**file_entry(pkg, relocate(rel))) for rel in staged_files})
        written = entry.to_json()

        def register(manifest: dict) -> None:  # on the manifest as it is now: keep what others (calibrate) wrote
            previous = manifest.get("engines", {}).get(name, {})
            files = {k: v for k, v in manifest["files"].items() if k not in previous.get("files", {})}
            manifest["engines"] = {**manifest.get("engines", {}), name: written}
            manifest["files"] = {**files, **written["files"]}

        installed = update_manifest(pkg, register)  # last: the engine exists once it is listed
    except BaseException:
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        if old is not None:
            old.replace(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return installed


class GateFailed(SleighError):
    def __init__(self, name: str, report: dict):
        self.report = report
        bad = [f"{c['metric']} {c['value']:.4f} vs {c['threshold']} (off by {abs(c['margin']):.4f})"
               for c in report["checks"] if not c["ok"]]
        super().__init__(f"engine {name}", "accuracy gate failed: " + "; ".join(bad),
                         "the thresholds of the precision's gate, or --allow-degraded to keep it anyway")


class TaskGateFailed(SleighError):
    def __init__(self, name: str, report: dict):
        self.report = report
        tol = report["tolerance_points"]
        bad = [f"{t}: the engine scored {v['engine_n']} of {v['n']} lines (it skipped the others)" if v["drop_points"] is None
               else f"{t} {100 * v['engine']:.1f} % vs FP32 {100 * v['fp32']:.1f} % ({v['drop_points']:.1f} points below)"
               for t, v in report["types"].items() if not v["ok"]]
        super().__init__(f"engine {name}", f"task accuracy fell more than {tol:g} points below FP32's: " + "; ".join(bad),
                         f"at most {tol:g} points below FP32 on every question type (--eval-tolerance), "
                         "or --allow-degraded to keep it anyway")



