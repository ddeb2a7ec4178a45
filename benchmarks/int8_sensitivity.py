"""Which quantized nodes of an INT8 vision module cost accuracy: the package's vision.onnx quantized
with and without attention's P·V (and variants), each run in ONNX Runtime against FP32 on held-out
images. Speed: the module alone, interleaved medians.

    python benchmarks/int8_sensitivity.py PKG --data heldout.jsonl [--images 100] [--timing-views 7]

PKG needs calibration ranges (`sleigh calibrate`). The probabilities are calibrated no more; a
package calibrated before keeps their ranges, and then that variant is measured too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="JSONL whose images are used (sleigh data synth)")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--timing-views", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort

    import sleigh.engines.calibration.qdq as qdq
    from sleigh.engines.calibration import int8
    from sleigh.engines.build_engine import int8_weight_max
    from sleigh.runtime.image import tile_image
    from sleigh.runtime.manifest import read_manifest

    pkg = args.package
    manifest = read_manifest(pkg)
    image = manifest.contract.image
    ranges = json.loads((pkg / int8.RANGES_FILE).read_text())
    vision = pkg / "vision.onnx"
    model = onnx.load(str(vision), load_external_data=False)
    probabilities = int8.attention_probabilities(model)
    fixed = {"tensors": {**ranges["tensors"], **{n: {"scale": 1.0 / int8.INT8_MAX} for n in probabilities}}}
    names = sorted({json.loads(x)["image"] for x in args.data.read_text().splitlines() if x.strip()})[:args.images]
    size = manifest.modules["vision"].inputs[0].shape[-1]
    feeds = [tile_image(args.data.parent / n, max_tiles=image.max_tiles, size=size, mean=image.mean,
                        std=image.std).pixel_values for n in names]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1

    def session(path):
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    ref = [session(vision).run(None, {"pixel_values": f}) for f in feeds]
    base = int8.is_quantized_op
    variants = {  # label: (which nodes get Q/DQ, ranges)
        "P·V in float (what build-engine does)": (lambda n, p=frozenset(): base(n, probabilities), ranges),
        "P·V int8, probabilities' range [0, 1]": (lambda n, p=frozenset(): base(n), fixed),
    }
    if all(n in ranges["tensors"] for n in probabilities):  # ranges calibrated before P·V stayed float
        variants["P·V int8, probabilities' calibrated range"] = (lambda n, p=frozenset(): base(n), ranges)
    work = Path(tempfile.mkdtemp(prefix="sleigh-int8-sensitivity-"))
    paths = {}
    print("| INT8 vision variant | image_embeds cosine mean (min) | GSWA weights max abs diff (mean) | GSWA top tile same |")
    print("|---|---|---|---|")
    for label, (rule, r) in variants.items():
        qdq.is_quantized_op = rule
        out = work / f"v{len(paths)}.onnx"
        qdq.quantize_vision_qdq(vision, out, r, weight_max=int8_weight_max("onnxruntime"))
        paths[label] = out
        s = session(out)
        cos, dw, top = [], [], 0
        for f, (e0, w0) in zip(feeds, ref):
            e1, w1 = s.run(None, {"pixel_values": f})
            a, b = e0.ravel(), e1.ravel()
            cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
            dw.append(float(np.abs(w0 - w1).max()))
            tiles = slice(0, max(1, len(w0) - 1))  # the thumbnail (last) is fixed at 1
            top += int(np.argmax(w0[tiles]) == np.argmax(w1[tiles]))
        print(f"| {label} | {np.mean(cos):.5f} ({np.min(cos):.5f}) | {np.max(dw):.3f} ({np.mean(dw):.3f}) | {top}/{len(feeds)} |")
    qdq.is_quantized_op = base

    x = np.random.default_rng(0).standard_normal((args.timing_views, 3, size, size)).astype(np.float32)
    sessions = {label: session(p) for label, p in paths.items()}
    times = {label: [] for label in sessions}
    for s in sessions.values():
        s.run(None, {"pixel_values": x})
    for _ in range(args.rounds):
        for label, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"pixel_values": x})
            times[label].append(time.perf_counter() - t)
    for label, t in times.items():
        print(f"{label}: {1e3 * np.median(t):.1f} ms for {args.timing_views} views (1 thread, median of {args.rounds})")


if __name__ == "__main__":
    main()
