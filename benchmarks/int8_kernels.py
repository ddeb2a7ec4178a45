"""INT8 vision on this CPU: 8-bit vs 7-bit weights, ONNX Runtime's fused int8 kernels vs the Q/DQ
graph run without them (level BASIC), against the package's FP32 vision module.

    python benchmarks/int8_kernels.py PKG [--rounds 3]     # PKG calibrated (`sleigh calibrate`)

Prints image_embeds cosine vs FP32 (all views; worst view) and ms per view (median of the rounds,
the variants interleaved) on sleigh's shipped photo (7 views), 2 intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sleigh.engines.calibration.collect import INT8_MAX, RANGES_FILE
from sleigh.engines.calibration.qdq import ORT_WEIGHT_MAX, quantize_vision_qdq
from sleigh.runtime.cpu_features import cpu_features
from sleigh.runtime.image import tile_image
from sleigh.runtime.package import shipped_photo

ALL, BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def session(path: Path, level) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.intra_op_num_threads, opts.graph_optimization_level = 3, 2, level
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ranges = json.loads((args.package / RANGES_FILE).read_text())
    views = tile_image(shipped_photo(), max_tiles=12).pixel_values
    work = Path(tempfile.mkdtemp(prefix="sleigh-int8-"))
    files = {}
    for wmax in (INT8_MAX, ORT_WEIGHT_MAX):
        files[wmax] = work / f"vision-w{wmax}.onnx"
        quantize_vision_qdq(args.package / "vision.onnx", files[wmax], ranges, weight_max=wmax)
    variants = {"fp32": session(args.package / "vision.onnx", ALL),
                f"|w|<={INT8_MAX}, fused (default)": session(files[INT8_MAX], ALL),
                f"|w|<={INT8_MAX}, unfused (BASIC)": session(files[INT8_MAX], BASIC),
                f"|w|<={ORT_WEIGHT_MAX}, fused (default)": session(files[ORT_WEIGHT_MAX], ALL)}
    outputs, times = {}, {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, sess in variants.items():
            t = time.perf_counter()
            outputs[name] = sess.run(["image_embeds"], {"pixel_values": views})[0]
            times[name].append((time.perf_counter() - t) / len(views))
    ref = outputs["fp32"]
    print(f"CPU features: {cpu_features()}; onnxruntime {ort.__version__}; {len(views)} views")
    for name, out in outputs.items():
        worst = min(cosine(out[t], ref[t]) for t in range(len(views)))
        print(f"{name:28s} cosine {cosine(out, ref):.5f} (worst view {worst:.5f})  "
              f"{1000 * statistics.median(times[name]):.1f} ms/view")


if __name__ == "__main__":
    main()
