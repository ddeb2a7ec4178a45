"""The exported decoder as ONNX Runtime optimizes it: RMSNorm must reach its fused kernel."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort


def optimized_op_counts(src, dst) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(dst)).graph.node)


def test_every_rmsnorm_fuses_into_simplified_layer_normalization(tiny_pkg, tiny_ckpt, tmp_path):
    """x / sqrt(mean(x²) + eps) · w is the pattern ONNX Runtime's SimplifiedLayerNormFusion matches
    (x · rsqrt(...) exports as Sqrt, Reciprocal, Mul and stays 5 nodes per norm)."""
    import json

    layers = json.loads((tiny_ckpt / "config.json").read_text())["llm"]["num_layers"]
    ops = optimized_op_counts(tiny_pkg / "decoder.onnx", tmp_path / "opt.onnx")
    assert ops["SimplifiedLayerNormalization"] == 2 * layers + 1  # two per layer, and the final norm
    assert ops["Reciprocal"] == 0 and ops["Pow"] == 0
