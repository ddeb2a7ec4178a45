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
