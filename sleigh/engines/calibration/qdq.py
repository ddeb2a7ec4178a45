"""A symmetric Q/DQ INT8 copy of vision.onnx from calibration ranges: one ONNX for ONNX Runtime and
TensorRT 10.x / 11.x (explicit quantization; TensorRT needs every zero point to be 0).

Only the inputs of MatMul / Gemm / Conv in the main graph are quantized (not attention's
probabilities x values MatMul: int8.is_quantized_op), each consumer with its own
Q/DQ pair (TensorRT fuses a DQ into the op that follows it; a shared pair would also quantize every
other consumer of the tensor). Outputs stay float, so LayerNormalization, Softmax, residual Adds,
and GELU (Erf) run in floating point (GSWA is gswa.onnx, FP32 in every engine).

    x ─QuantizeLinear(s_x, 0)─► int8 ─DequantizeLinear(s_x, 0)─────────────────┐
    W_int8 (initializer) ─DequantizeLinear(s_w[C], 0[C], axis = output channel)─┴─► MatMul/Gemm/Conv ─► y (float)
    bias (float, untouched) ──────────────────────────────────────────────────────┘

s_x = amax / 127 from the ranges (`calibration/vision_ranges.json`); s_w = max|W| over the other axes
/ weight_max per output channel: 127 for TensorRT, ORT_WEIGHT_MAX (63, 7 bits) for ONNX Runtime,
whose int8 kernels on x86 CPUs without VNNI saturate with full-range weights (see int8.py, ORT_WEIGHT_MAX).
Written with onnx directly: onnxruntime.quantization's QDQQuantizer rewires
every consumer of a quantized tensor (Shape, residual Add) to the DequantizeLinear output and leaves
the graph unsorted for the checker.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from sleigh.engines.calibration.int8 import (INT8_MAX, QUANTIZED_OP_TYPES, activation_tensors, attention_probabilities,
                                             is_quantized_op)
from sleigh.errors import SleighError
from sleigh.onnx_files import save_onnx


def weight_axis(node, input_index: int, ndim: int) -> int | None:
    """The output-channel axis of a constant weight input, or None where per-channel does not apply.

    MatMul B [.., K, N] -> last axis (N); Gemm B -> 0 when transB ([N, K]) else 1; Conv W [M, C/g, k..] -> 0.
    """
    if node.op_type == "MatMul" and input_index == 1 and ndim >= 2:
        return ndim - 1
    if node.op_type == "Gemm" and input_index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "Conv" and input_index == 1:
        return 0
    return None


def _quantized_inputs(node) -> range:
    return range(len(node.input)) if node.op_type == "MatMul" else range(min(2, len(node.input)))  # not the bias


def _quantize_weight(w: np.ndarray, axis: int | None, qmax: int = INT8_MAX) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights in [-qmax, qmax], float32 scale): symmetric, per channel along `axis` (None: one scale)."""
    w = w.astype(np.float32)
    if axis is None:
        amax = np.abs(w).max(initial=0.0)
    else:
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1, initial=0.0)  # (C,)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)  # an all-zero channel keeps scale 1
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def _activation_scales(ranges: dict) -> dict[str, float]:
    tensors = ranges.get("tensors", ranges)
    out = {}
    for name, r in tensors.items():
        scale = r["scale"] if isinstance(r, dict) else float(r)
        if not np.isfinite(scale) or scale <= 0:
            raise SleighError(f"range of {name!r}", f"scale {scale!r}", "a positive finite scale (re-run calibration)")
        out[name] = float(scale)
    return out


def quantize_vision_qdq(src_onnx: Path, dst_onnx: Path, ranges: dict, *, per_channel: bool = True,
                        weight_max: int = INT8_MAX) -> dict:
    """Write a symmetric INT8 Q/DQ copy of `src_onnx` to `dst_onnx`; returns a summary.

    `ranges` is the content of calibration/vision_ranges.json (or its "tensors" dict): a "scale" for
    every activation input of a MatMul/Gemm/Conv. Weights use integers in [-weight_max, weight_max]
    (ORT_WEIGHT_MAX for ONNX Runtime engines). Local functions, if any, are kept as they are.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src_onnx, dst_onnx = Path(src_onnx), Path(dst_onnx)
    if not 1 <= weight_max <= INT8_MAX:
        raise ValueError(f"weight_max {weight_max} is outside 1..{INT8_MAX}")
    if not src_onnx.is_file():
        raise SleighError(str(src_onnx), "no such file", "the package's vision.onnx")
    model = onnx.load(str(src_onnx))
    graph = model.graph
    scales = _activation_scales(ranges)
    missing = [t for t in activation_tensors(model) if t not in scales]
    if missing:
        raise SleighError(str(src_onnx), f"no calibration range for {len(missing)} tensors ({', '.join(missing[:4])})",
                          "ranges from `sleigh calibrate` on this same vision.onnx")

    inits = {i.name: i for i in graph.initializer}
    constants = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    new_inits: list = []
    act_params: dict[str, tuple[str, str]] = {}  # tensor -> (scale, zero point) initializer names
    weight_params: dict[tuple[str, int | None], tuple[str, str, str, int | None]] = {}
    weight_scales: list[np.ndarray] = []
    nodes: list = []
    by_op: Counter = Counter()
    not_quantized: list[str] = []

    def activation(name: str) -> tuple[str, str]:
        if name not in act_params:
            s, z = f"{name}_scale", f"{name}_zero_point"
            new_inits.append(numpy_helper.from_array(np.array(scales[name], np.float32), s))
            new_inits.append(numpy_helper.from_array(np.array(0, np.int8), z))
            act_params[name] = (s, z)
        return act_params[name]

    def weight(name: str, axis: int | None) -> tuple[str, str, str, int | None]:
        key = (name, axis)
        if key not in weight_params:
            q, s = _quantize_weight(numpy_helper.to_array(inits[name]), axis, weight_max)
            tag = name if axis is None else f"{name}_axis{axis}"
            names = (f"{tag}_quantized", f"{tag}_scale", f"{tag}_zero_point")
            new_inits.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(s, names[1]),
                              numpy_helper.from_array(np.zeros(s.shape, np.int8), names[2])])
            weight_params[key] = (*names, axis)
            weight_scales.append(s.ravel())
        return weight_params[key]

    probabilities = attention_probabilities(model)
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # the graph's node list is rebuilt below
        if not is_quantized_op(node, probabilities):
            if node.op_type in QUANTIZED_OP_TYPES:
                not_quantized.append(node.name)
            nodes.append(node)
            continue
        base = node.name or f"/{node.op_type}_{len(nodes)}"
        for k in _quantized_inputs(node):
            name = node.input[k]
            if not name:
                continue
            prefix = f"{base}/input{k}"
            dq_out = f"{prefix}/DequantizeLinear_output"
            if name in inits and inits[name].data_type == TensorProto.FLOAT:
                ndim = len(inits[name].dims)
                q, s, z, axis = weight(name, weight_axis(node, k, ndim) if per_channel else None)
                attrs = {"axis": axis} if axis is not None else {}
                nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [dq_out], name=f"{prefix}/DequantizeLinear",
                                              **attrs))
            elif name in constants:  # a Constant node or a non-float initializer: leave it alone
                continue
            else:
                s, z = activation(name)
                q_out = f"{prefix}/QuantizeLinear_output"
                nodes.append(helper.make_node("QuantizeLinear", [name, s, z], [q_out], name=f"{prefix}/QuantizeLinear"))
                nodes.append(helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out], name=f"{prefix}/DequantizeLinear"))
            node.input[k] = dq_out
        nodes.append(node)
        by_op[node.op_type] += 1

    # float weights that nothing reads any more are dropped; ones still read elsewhere stay
    still_read = {i for n in nodes for i in n.input}
    kept = [_copy(i) for i in graph.initializer if i.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    model.producer_name, model.producer_version = "sleigh.engines.calibration.qdq", _sleigh_version()

    files = save_onnx(model, dst_onnx)
    act = np.array([scales[t] for t in act_params], np.float64)
    wsc = np.concatenate(weight_scales) if weight_scales else np.zeros(0)
    return {
        "quantized_nodes": sum(by_op.values()),
        "by_op": dict(by_op),
        "activations": len(act_params),
        "weights": len(weight_params),
        "per_channel": per_channel,
        "weight_max": weight_max,
        "not_quantized": not_quantized,
        "kept_float": {op: n for op, n in Counter(n.op_type for n in nodes).items()
                       if op in ("LayerNormalization", "Softmax", "Add", "Erf")},
        "activation_scale": _describe(act),
        "weight_scale": _describe(wsc),
        "files": files,
    }


def _copy(proto):
    new = type(proto)()
    new.CopyFrom(proto)
    return new


def _describe(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    return {"count": int(values.size), "min": float(values.min()), "median": float(np.median(values)),
            "max": float(values.max())}


def _sleigh_version() -> str:
    from sleigh import __version__

    return __version__
