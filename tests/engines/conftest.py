"""Shared fixtures for the engine tests: a folder of calibration images made from the example photos,
the tiny package calibrated once, its collected statistics, and a held-out image's views.

Built once per session under pytest's tmp folder; tests that change a package work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.engines.helpers import HELD_OUT, make_variants


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
