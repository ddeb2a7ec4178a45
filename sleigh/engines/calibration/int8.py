"""What INT8 means for the vision module, shared by calibration (collect.py), the Q/DQ rewrite
(qdq.py) and build-engine: which tensors are quantized, the integer range, where the ranges live.

Small and free of onnx/onnxruntime imports, so every module of engines/ can import it at the top
and the imports inside engines/ run one way.
"""

from __future__ import annotations

QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Conv")
CALIBRATION_DIR = "calibration"
RANGES_FILE = f"{CALIBRATION_DIR}/vision_ranges.json"
CACHE_FILE = f"{CALIBRATION_DIR}/vision.calib.cache"
INT8_MAX = 127  # symmetric int8: scale = amax / 127, zero point 0

# ONNX Runtime's x86 int8 GEMM (MLAS u8s8: int8 activations shifted to uint8) on AVX2 without VNNI
# multiplies with VPMADDUBSW, which adds two uint8 x int8 products in int16: 2 x 255 x 127 = 64770
# overflows 32767 and saturates. |w| <= 63 keeps every pair within it (2 x 255 x 63 = 32130), so the
# fused kernels compute exactly on any CPU (onnxruntime's quantization docs: `reduce_range`, 7-bit
# weights for CPUs without VNNI). Tiny preset, entropy, held-out photo, on an AVX2-only EPYC:
# image_embeds cosine vs FP32 0.99663 with 127 (0.99971 with the fusions off), 0.99945 with 63, fused
# or not (tests/engines/calibration/test_qdq.py). Turning the fusions off instead cost about 1.6x in
# vision latency (benchmarks/RESULTS.md). Still symmetric int8 with zero point 0.
ORT_WEIGHT_MAX = 63


def is_quantized_op(node, probabilities: frozenset[str] = frozenset()) -> bool:
    """Whether a main-graph node gets Q/DQ inputs (and so needs calibrated ranges).

    Not the MatMuls that read attention probabilities (`probabilities`: Softmax outputs): entropy
    calibration clips them at ~0.35-0.42 where they reach 1, and one per-tensor int8 scale cannot
    hold both the peaks and the many small weights. On the trained demo model (100 held-out
    images, ONNX Runtime CPU) quantizing them gave image_embeds cosine 0.965 vs FP32 and moved
    GSWA weights by up to 1.58; left in float: 0.9997 and 0.25 (a fixed [0, 1] range: 0.9995, 1.07).
    So attention's probabilities x values product stays float; QK^T (activations of ordinary range) is int8."""
    if node.op_type == "MatMul" and node.input and node.input[0] in probabilities:
        return False
    return node.op_type in QUANTIZED_OP_TYPES and node.domain in ("", "ai.onnx")  # GSWA is gswa.onnx: FP32


def attention_probabilities(model) -> frozenset[str]:
    """The main graph's Softmax outputs (see is_quantized_op)."""
    return frozenset(o for n in model.graph.node if n.op_type == "Softmax" for o in n.output)


def activation_tensors(model) -> list[str]:
    """Names of the activations (not initializers, not constants) that feed MatMul/Gemm/Conv in the
    main graph, in graph order: the tensors that get Q/DQ and therefore need a range."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    probabilities = attention_probabilities(model)
    names: dict[str, None] = {}
    for node in model.graph.node:
        if is_quantized_op(node, probabilities):
            inputs = node.input[:2] if node.op_type != "MatMul" else node.input  # Gemm/Conv input 2 is the bias
            for name in inputs:
                if name and name not in constants:
                    names[name] = None
    return list(names)
