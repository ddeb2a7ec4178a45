"""Shared fixtures for the calibration tests: one tiny exported package, a folder of calibration
images made from the example photos, that package calibrated once, and its Q/DQ vision model.

Built once per session under pytest's tmp folder; tests that change a package work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps


from tests.conftest import ORACLE

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
PHOTOS = (ROOT / "examples" / "chelsea.jpg", ROOT / "examples" / "coffee.jpg",
          ROOT / "tests" / "fixtures" / "oracle" / "astronaut.png")
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


@pytest.fixture(scope="session")
def calib_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calib-images")
    make_variants(folder)
    return folder


@pytest.fixture()
def pkg_copy(tiny_pkg, tmp_path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, dst)
    return dst


@pytest.fixture(scope="session")
def calibrated(tiny_pkg, calib_images, tmp_path_factory):
    """(package folder, calibration dict): the tiny package calibrated with the default (entropy)."""
    from sleigh.engines.calibration.collect import calibrate_package

    pkg = tmp_path_factory.mktemp("calibrated") / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    return pkg, calibrate_package(pkg, calib_images, quiet=True)


@pytest.fixture(scope="session")
def collected(tiny_pkg, calib_images):
    """A VisionCollector fed the calibration images: the statistics behind every method."""
    from sleigh.engines.calibration.collect import VisionCollector, list_images
    from sleigh.runtime.image import tile_image

    collector = VisionCollector(tiny_pkg / "vision.onnx")
    for path in list_images(calib_images):
        collector.add(tile_image(path, max_tiles=12).pixel_values)
    return collector


@pytest.fixture(scope="session")
def held_out_views() -> np.ndarray:
    from sleigh.runtime.image import tile_image

    return tile_image(HELD_OUT, max_tiles=12).pixel_values


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


def run_cli(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """`sleigh ARGS...` through sleigh.cli.main() in this process, so that a test's monkeypatches
    (a full disk, a read-only folder) apply: (exit code, non-empty stderr lines)."""
    import sys

    from sleigh.cli import main

    monkeypatch.setattr(sys, "argv", ["sleigh", *map(str, args)])
    monkeypatch.delenv("SLEIGH_DEBUG", raising=False)
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes: to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0  # root writes through any chmod
