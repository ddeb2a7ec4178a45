"""The accuracy gate's held-out images: a folder's images that calibration did not use, judged by
content, since names repeat across folders (every `sleigh data synth` split is 000000.jpg, ...)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
from PIL import Image

from sleigh.engines.accuracy import gate_images
from sleigh.errors import SleighError
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.package import sha256_file


def test_held_out_images_are_those_calibration_did_not_see(calibrated, calib_images, tmp_path):
    pkg, _ = calibrated
    calibration = read_manifest(pkg).calibration
    seen = sorted(calib_images.iterdir())
    assert calibration.image_sha256 == tuple(sha256_file(calib_images / name) for name in calibration.images)
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(seen[0], held / "renamed-copy.png")  # a calibration image under another name: out
    Image.new("RGB", (64, 48), (10, 200, 90)).save(held / seen[1].name)  # another image under a calibration name: in
    assert [p.name for p in gate_images(held, calibration)] == [seen[1].name]
    # a calibration made before sha256 were recorded: by name, as it was
    assert [p.name for p in gate_images(held, replace(calibration, image_sha256=()))] == ["renamed-copy.png"]
    (held / seen[1].name).unlink()
    with pytest.raises(SleighError, match="all 1 images were used for calibration"):
        gate_images(held, calibration)


def test_an_int8_engine_keeps_the_calibration_it_was_built_from(calibrated, calib_images, tmp_path):
    """Calibrated on A, built INT8, recalibrated on B: `compare --images A` judged the engine on its own
    calibration images and called them held out. The entry now records its calibration (and its
    ranges' sha256), and the gate holds out those images whatever the package holds later."""
    from sleigh.engines.accuracy import run_gate
    from sleigh.engines.build_engine import build_engine
    from sleigh.engines.calibration.collect import calibrate_package
    from sleigh.engines.calibration.int8 import RANGES_FILE
    from sleigh.engines.options import EngineOptions

    pkg = tmp_path / "pkg"
    shutil.copytree(calibrated[0], pkg)
    first = read_manifest(pkg)
    entry = build_engine(pkg, EngineOptions(precision="int8", name="i8", allow_degraded=True, quiet=True))
    assert entry.calibration.image_sha256 == first.calibration.image_sha256
    assert entry.calibration.record["ranges_sha256"] == first.files[RANGES_FILE].sha256
    assert read_manifest(pkg).engines["i8"].calibration == entry.calibration  # as written, read back
    other = tmp_path / "other"
    other.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (320, 240), colour).save(other / f"o{i}.png")
    calibrate_package(pkg, other, quiet=True)  # the package's calibration moves on; the engine's does not
    with pytest.raises(SleighError, match="images were used for calibration"):
        run_gate(pkg, "i8", images=calib_images)
    fp16 = build_engine(pkg, EngineOptions(precision="fp16", name="f16", allow_degraded=True, quiet=True))
    assert fp16.calibration is None  # no INT8: no ranges read
