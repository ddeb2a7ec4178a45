"""calibrate and build-engine read the package's own files to make new ones: each source is checked
against the manifest (size and sha256) first, so a damaged module is one line naming it (it was an
"unexpected DecodeError" from onnx.load), a changed module or edited calibration ranges never make
an engine or ranges, and a file standing where the package keeps a folder is named before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sleigh.engines.build_engine import build_engine
from sleigh.engines.calibration.collect import calibrate_package
from sleigh.engines.calibration.int8 import RANGES_FILE
from sleigh.engines.options import EngineOptions
from sleigh.errors import SleighError
from tests.helpers import EXAMPLES
from tests.runtime.package_copies import copy_package


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("calib")
    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")
    for i in range(3):
        photo.rotate(90 * i, expand=True).save(d / f"c{i}.jpg")
    return d


def _flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_module_stops_build_engine_and_calibrate(tiny_pkg, tmp_path, images):
    pkg = copy_package(tiny_pkg, tmp_path)
    _flip_a_byte(pkg / "vision.onnx")
    with pytest.raises(SleighError, match=r"vision\.onnx \| its sha256 differs") as e:
        build_engine(pkg, EngineOptions(precision="fp16", quiet=True))
    assert "re-export" in str(e.value)
    assert not (pkg / "engines").exists() or not any((pkg / "engines").iterdir())  # nothing converted
    with pytest.raises(SleighError, match=r"vision\.onnx \| its sha256 differs"):
        calibrate_package(pkg, images, quiet=True)
    assert json.loads((pkg / "manifest.json").read_text())["calibration"] is None and not (pkg / "calibration").exists()


def test_a_truncated_decoder_stops_build_engine(tiny_pkg, tmp_path):
    pkg = copy_package(tiny_pkg, tmp_path)
    with open(pkg / "decoder.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SleighError, match=r"decoder\.onnx \| is 1000 bytes and the manifest lists"):
        build_engine(pkg, EngineOptions(precision="fp16", quiet=True))


def test_edited_calibration_ranges_make_no_int8_engine(tiny_pkg, tmp_path, images):
    pkg = copy_package(tiny_pkg, tmp_path)
    calibrate_package(pkg, images, quiet=True)
    ranges = pkg / RANGES_FILE
    data = json.loads(ranges.read_text())
    first = next(iter(data["tensors"].values()))
    first["scale"] *= 1.5
    ranges.write_text(json.dumps(data))
    with pytest.raises(SleighError, match=r"vision_ranges\.json \|.*sleigh calibrate"):
        build_engine(pkg, EngineOptions(precision="int8", allow_degraded=True, quiet=True))
    build_engine(pkg, EngineOptions(precision="fp16", allow_degraded=True, quiet=True))  # no INT8: the ranges unread


@pytest.mark.parametrize("folder", ["engines", "calibration"])
def test_a_file_where_the_package_keeps_a_folder(tiny_pkg, tmp_path, images, folder):
    pkg = copy_package(tiny_pkg, tmp_path)
    (pkg / folder).write_text("")
    with pytest.raises(SleighError, match=rf"{folder} \| is a file where the package keeps a folder"):
        if folder == "engines":
            build_engine(pkg, EngineOptions(precision="fp16", quiet=True))
        else:
            calibrate_package(pkg, images, quiet=True)
