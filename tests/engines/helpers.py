"""Calibration images made from the example photos, and the vision module run on ONNX Runtime's CPU
provider: what the engine tests share that is not a fixture (those are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from tests.helpers import EXAMPLES, ORACLE, ROOT

PHOTOS = (EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg", ORACLE / "astronaut.png")
HELD_OUT = ROOT / "sleigh" / "assets" / "parity.jpg"  # never among the calibration images
NUM_CALIBRATION_IMAGES = 6


def make_variants(dst: Path, count: int = NUM_CALIBRATION_IMAGES) -> list[Path]:
    """`count` images from the example photos: crops, mirror images, colour and brightness shifts,
    some small (one tile), some wide (several tiles)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        photo = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = photo.size
        if i % 2:
            photo = ImageOps.mirror(photo)
        box = (w // 8 * (i % 3), h // 10 * (i % 2), w - w // 10 * (i % 4), h - h // 12 * (i % 3))
        photo = photo.crop(box)
        photo = ImageEnhance.Color(photo).enhance(0.5 + 0.3 * i)
        photo = ImageEnhance.Brightness(photo).enhance(0.8 + 0.08 * i)
        if i % 3 == 0:
            photo = photo.resize((photo.width // 2, photo.height // 2))
        path = dst / f"calib_{i:02d}.{'png' if i % 2 else 'jpg'}"
        photo.save(path)
        out.append(path)
    return out


def run_vision(path: Path, pixel_values: np.ndarray, fused: bool = True) -> dict[str, np.ndarray]:
    """The vision module's outputs on ONNX Runtime's CPU provider: with its default graph
    optimisations (fused int8 kernels), or none (`fused=False`: every Q/DQ op run as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixel_values": pixel_values}), strict=True))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
