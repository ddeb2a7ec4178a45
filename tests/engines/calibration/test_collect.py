"""Calibration: ranges and the TensorRT cache stored in the package, unreadable images, user errors,
and the three methods against each other and against a loop-for-loop entropy reference."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from sleigh.engines.calibration.collect import calibrate_package, ranges_from_stats
from sleigh.engines.calibration.int8 import CACHE_FILE, RANGES_FILE, activation_tensors
from sleigh.engines.calibration.stats import RunningStats, amax_percentile, entropy_clip_bin, entropy_divergences
from sleigh.engines.calibration.trt_cache import TRT_CACHE_VERSION, format_calibration_cache, write_calibration_cache
from sleigh.errors import SleighError
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.package import VERIFIED, verify_files

from tests.engines.helpers import NUM_CALIBRATION_IMAGES, make_variants, read_calibration_cache
from tests.helpers import is_root, run_cli, snapshot

def test_calibration_stores_ranges_cache_and_manifest_entry(calibrated, calib_images):
    pkg, result = calibrated
    assert result.method == "entropy"
    assert result.num_images == NUM_CALIBRATION_IMAGES and result.skipped == 0
    assert list(result.images) == sorted(p.name for p in calib_images.iterdir())
    assert {"created_by", "seconds"} <= result.record.keys()

    manifest = read_manifest(pkg)
    assert manifest.calibration == result  # read back as written
    assert manifest.json["calibration"] == json.loads(json.dumps(result.to_json()))
    assert {RANGES_FILE, CACHE_FILE} <= manifest.files.keys()
    assert verify_files(pkg, manifest) == []  # hashes of the new files (and all the old ones) hold

    ranges = json.loads((pkg / RANGES_FILE).read_text())
    assert ranges["method"] == "entropy" and ranges["num_images"] == NUM_CALIBRATION_IMAGES and ranges["skipped"] == 0
    expected = activation_tensors(onnx.load(str(pkg / "vision.onnx"), load_external_data=False))
    assert list(ranges["tensors"]) == expected
    assert "pixel_values" in expected  # the Conv's input is a graph input: taken from the feed
    for name, r in ranges["tensors"].items():
        assert r.keys() == {"min", "max", "amax", "scale"}
        assert r["min"] <= r["max"] and 0 < r["amax"] <= max(-r["min"], r["max"]), name
        assert r["scale"] == float(np.float32(r["amax"] / 127)), name


def test_cache_has_the_trt10_header_and_exactly_the_stored_scales(calibrated):
    pkg, _ = calibrated
    head, scales = read_calibration_cache(pkg / CACHE_FILE)
    assert head == f"TRT-{TRT_CACHE_VERSION}-EntropyCalibration2" == "TRT-100300-EntropyCalibration2"
    ranges = json.loads((pkg / RANGES_FILE).read_text())["tensors"]
    assert scales == {name: r["scale"] for name, r in ranges.items()}  # exact: scales are float32 values
    lines = (pkg / CACHE_FILE).read_text().splitlines()[1:]
    for line in lines:
        name, hex_scale = line.split(": ")
        assert len(hex_scale) == 8 and hex_scale == hex_scale.lower()
        assert struct.unpack("!f", bytes.fromhex(hex_scale))[0] == ranges[name]["scale"]


def test_cache_round_trips_float32_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(-4, 3, 200), [1e-38, 3.4e38, 1.0, 2.0**-20]]).astype(np.float32)
    scales = {f"/layer.{i}/tensor: odd name": float(v) for i, v in enumerate(values)}
    path = tmp_path / "c.cache"
    write_calibration_cache(path, scales, version="100900")
    head, back = read_calibration_cache(path)
    assert head == "TRT-100900-EntropyCalibration2" and back == scales
    # third-party writers drop leading zeros ('3c010a14' -> 'c010a14' for small scales): still read
    (tmp_path / "short.cache").write_text("TRT-8601-EntropyCalibration2\nx: 3c010a14\ny: c010a14\n")
    _, short = read_calibration_cache(tmp_path / "short.cache")
    assert short["x"] == struct.unpack("!f", bytes.fromhex("3c010a14"))[0]
    assert short["y"] == struct.unpack("!f", bytes.fromhex("0c010a14"))[0]


@pytest.mark.parametrize("text", ["", "not a cache\nx: 3c010a14\n", "TRT-100300-EntropyCalibration2\nx 3c010a14\n",
                                  "TRT-100300-EntropyCalibration2\nx: zz\n"])
def test_bad_caches_are_user_errors(tmp_path, text):
    path = tmp_path / "bad.cache"
    path.write_text(text)
    with pytest.raises(SleighError):
        read_calibration_cache(path)
    with pytest.raises(SleighError, match="on one line"):
        format_calibration_cache({"a\nb": 1.0})


def test_unreadable_images_are_skipped_and_counted(pkg_copy, tmp_path):
    folder = tmp_path / "imgs"
    good = make_variants(folder, 3)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    result = calibrate_package(pkg_copy, folder, method="minmax", max_tiles=2, quiet=True)
    assert result.num_images == 3 and list(result.images) == [p.name for p in good]
    assert result.skipped == 3
    assert sorted(s["file"] for s in result.skipped_files) == ["empty.jpg", "text.png", "truncated.jpg"]
    ranges = json.loads((pkg_copy / RANGES_FILE).read_text())
    assert ranges["method"] == "minmax" and ranges["skipped"] == 3
    assert read_manifest(pkg_copy).calibration.max_tiles == 2


def test_num_images_stops_at_the_first_usable_ones(pkg_copy, calib_images):
    result = calibrate_package(pkg_copy, calib_images, num_images=2, max_tiles=1, method="percentile", quiet=True)
    assert list(result.images) == sorted(p.name for p in calib_images.iterdir())[:2]
    assert result.views == 2  # max_tiles 1: one view per image, no thumbnail
    manifest = read_manifest(pkg_copy)
    assert manifest.calibration.method == "percentile" and verify_files(pkg_copy, manifest) == []


def _assert_uncalibrated(pkg):
    assert read_manifest(pkg).calibration is None
    assert not (pkg / RANGES_FILE).exists() and not (pkg / CACHE_FILE).exists()


def test_folder_errors(pkg_copy, tmp_path, calib_images):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(SleighError, match="contains no image files"):
        calibrate_package(pkg_copy, empty, quiet=True)
    with pytest.raises(SleighError, match="no such folder"):
        calibrate_package(pkg_copy, tmp_path / "missing", quiet=True)
    with pytest.raises(SleighError, match="not a folder"):
        calibrate_package(pkg_copy, empty / "readme.txt", quiet=True)
    with pytest.raises(SleighError, match="unknown calibration method.*entropy, minmax, percentile"):
        calibrate_package(pkg_copy, calib_images, method="kl", quiet=True)
    with pytest.raises(SleighError, match="--num-images 1"):
        calibrate_package(pkg_copy, calib_images, num_images=1, quiet=True)
    with pytest.raises(SleighError, match=r"nope \| not found"):  # the package itself, missing
        calibrate_package(tmp_path / "nope", calib_images, quiet=True)
    _assert_uncalibrated(pkg_copy)


def test_too_few_usable_images(pkg_copy, tmp_path):
    folder = tmp_path / "imgs"
    make_variants(folder, 1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(SleighError, match=r"only 1 usable image \(1 unreadable: broken.png\).*at least 2"):
        calibrate_package(pkg_copy, folder, max_tiles=1, quiet=True)
    _assert_uncalibrated(pkg_copy)
    calibrate_package(pkg_copy, folder, max_tiles=1, quiet=True, min_images=1)  # a single image when allowed
    assert read_manifest(pkg_copy).calibration.num_images == 1


def test_methods_clip_at_most_to_max_abs(collected):
    by_method = {m: ranges_from_stats(collected.stats, m) for m in ("minmax", "percentile", "entropy")}
    clipped = Counter()
    for name, mm in by_method["minmax"].items():
        absmax = max(-mm["min"], mm["max"])
        assert mm["amax"] == pytest.approx(absmax, rel=1e-7)
        for m in ("percentile", "entropy"):
            amax = by_method[m][name]["amax"]
            assert 0 < amax <= mm["amax"], (m, name)
            clipped[m] += amax < mm["amax"]
    # the histogram methods do clip something (softmax probabilities above all)
    assert clipped["entropy"] > 0 and clipped["percentile"] > 0


def _entropy_reference(hist, quant_bins, start_bin):
    """pytorch-quantization's `_compute_amax_entropy`, loop for loop (stride 1)."""
    bins = np.asarray(hist, np.float64).copy()
    bins[0] = bins[1]
    candidates, divergences = [], []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=quant_bins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        counts = np.zeros(quant_bins)
        for idx, d in enumerate(digitized):
            if d != -1:
                counts[d] += bins[idx]
        for key, n in Counter(digitized).items():
            if key != -1:
                counts[key] /= n
        q = np.array([counts[d] if d != -1 else 0.0 for d in digitized])
        q = q / q.sum() if q.sum() else q
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p /= p.sum()
        m = p > 0
        with np.errstate(divide="ignore"):
            divergences.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
        candidates.append(i)
    return np.array(candidates), np.array(divergences)


@pytest.mark.parametrize("case", range(5))
def test_entropy_matches_the_reference_loop(case):
    rng = np.random.default_rng(case)
    x = np.abs(rng.standard_t(3, 20000) if case % 2 else rng.normal(size=5000))
    hist = np.histogram(x, bins=256, range=(0, x.max()))[0]
    if case == 3:
        hist[150:170] = 0  # empty bins inside
    if case == 4:
        hist[-3:-1] = 0  # empty bins before the last: +inf candidates
    ref_i, ref_kl = _entropy_reference(hist, 16, 16)
    i, kl = entropy_divergences(hist, 16, 16)
    assert np.array_equal(i, ref_i)
    assert np.array_equal(np.isinf(kl), np.isinf(ref_kl))
    finite = np.isfinite(ref_kl)
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    assert entropy_clip_bin(hist, 16, 16) == ref_i[len(ref_kl) - 1 - np.argmin(ref_kl[::-1])]


def test_running_histogram_rebins_exactly():
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, s, 4000).astype(np.float32) for s in (0.5, 0.4, 3.0, 40.0, 1.0)]
    stats = RunningStats(bins=256)
    for b in batches:
        stats.update(b)
    everything = np.concatenate(batches)
    assert stats.count == everything.size == stats.hist.sum()
    assert stats.min == everything.min() and stats.max == everything.max()
    assert stats.absmax >= np.abs(everything).max() - 1e-6
    assert stats.hist_max >= stats.absmax
    assert math.log2(stats.hist_max / np.abs(batches[0]).max()).is_integer()  # grew by powers of two
    direct = np.bincount(np.minimum((np.abs(everything) / stats.bin_width).astype(int), 255), minlength=256)
    assert np.abs(direct - stats.hist).sum() <= 4  # only float rounding at exact bin edges may differ
    p = amax_percentile(stats, 99.0)
    assert abs(p - np.percentile(np.abs(everything), 99.0)) <= 2 * stats.bin_width


def test_non_finite_activations_are_refused():
    stats = RunningStats()
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.array([1.0, np.nan], np.float32))
    zeros = RunningStats()
    zeros.update(np.zeros(10, np.float32))
    assert zeros.absmax == 0 and zeros.hist[0] == 10
    zeros.update(np.array([2.0], np.float32))  # first non-zero data after zeros
    assert zeros.hist_max == 2.0 and zeros.hist[0] == 10 and zeros.hist[-1] == 1


def test_calibrating_again_replaces_the_previous_calibration(pkg_copy, calib_images):
    calibrate_package(pkg_copy, calib_images, num_images=2, max_tiles=1, method="minmax", quiet=True)
    first = read_manifest(pkg_copy).files[CACHE_FILE]
    calibrate_package(pkg_copy, calib_images, num_images=3, max_tiles=1, method="entropy", quiet=True)
    manifest = read_manifest(pkg_copy)
    assert manifest.calibration.method == "entropy" and manifest.calibration.num_images == 3
    assert manifest.files[CACHE_FILE] != first and verify_files(pkg_copy, manifest) == []
    assert not _hidden(pkg_copy), "no temporary files left behind"


def test_one_view_at_a_time_equals_all_views_at_once(tiny_pkg, calib_images, monkeypatch):
    """Views are independent in every quantized op, so running them one by one (to bound memory)
    must give the statistics of the batched run."""
    from sleigh.engines.calibration import collect
    from sleigh.runtime.image import tile_image

    views = tile_image(sorted(calib_images.iterdir())[0], max_tiles=6).pixel_values
    assert views.shape[0] > 1
    results = []
    for per_run in (1, views.shape[0]):
        monkeypatch.setattr(collect, "VIEWS_PER_RUN", per_run)
        collector = collect.VisionCollector(tiny_pkg / "vision.onnx")
        collector.add(views)
        results.append(collector.stats)
    for name, one in results[0].items():
        batched = results[1][name]
        assert one.count == batched.count
        np.testing.assert_allclose([one.min, one.max], [batched.min, batched.max], rtol=1e-5, atol=1e-6, err_msg=name)


def test_weights_in_an_external_data_file(tiny_pkg, calib_images, tmp_path):
    """Large encoders keep their weights in vision.onnx.data: the augmented model is saved beside the
    original so the relative data path still resolves, and nothing is left behind."""
    from sleigh.engines.calibration.collect import VisionCollector
    from sleigh.engines.calibration.qdq import quantize_vision_qdq
    from sleigh.runtime.image import tile_image

    model = onnx.load(str(tiny_pkg / "vision.onnx"))
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(model, str(folder / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data")
    views = tile_image(sorted(calib_images.iterdir())[1], max_tiles=2).pixel_values
    stats = []
    for src in (tiny_pkg / "vision.onnx", folder / "vision.onnx"):
        collector = VisionCollector(src)
        collector.add(views)
        stats.append(collector.stats)
    assert sorted(p.name for p in folder.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert (folder / "vision.onnx").stat().st_size < (folder / "vision.onnx.data").stat().st_size
    for name, s in stats[0].items():
        assert (s.min, s.max, s.count) == (stats[1][name].min, stats[1][name].max, stats[1][name].count)
    summary = quantize_vision_qdq(folder / "vision.onnx", tmp_path / "q" / "vision.int8.onnx",
                                  ranges_from_stats(stats[1], "minmax"))
    assert summary["files"] == ["vision.int8.onnx"]  # small enough to keep its weights inside


DISK_ERRORS = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EROFS: "read-only file system (EROFS)",
               errno.EACCES: "permission denied"}


@pytest.mark.parametrize("code", sorted(DISK_ERRORS))
def test_a_full_disk_or_a_read_only_package_is_one_user_error_and_changes_nothing(pkg_copy, calib_images, monkeypatch,
                                                                                    capsys, code):
    """The second of calibrate's three files fails (the ranges are written by then): one error line,
    rc 2, and the package byte for byte as it was, previous calibration included."""
    from sleigh.engines.calibration import trt_cache

    calibrate_package(pkg_copy, calib_images, num_images=2, quiet=True)
    before = snapshot(pkg_copy)

    def fail(path, data):
        raise OSError(code, os.strerror(code))  # as a write() on a full disk raises it: no file name

    monkeypatch.setattr(trt_cache, "write_bytes_atomic", fail)
    rc, lines = run_cli(monkeypatch, capsys, "calibrate", pkg_copy, "--images", calib_images, "--method", "minmax")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {pkg_copy / 'calibration'} | ") and DISK_ERRORS[code] in lines[0]
    assert snapshot(pkg_copy) == before
    assert read_manifest(pkg_copy).calibration.method == "entropy"


def test_a_full_disk_while_preparing_the_collector_is_named(pkg_copy, calib_images, monkeypatch, capsys):
    """The collector's temporary model (beside vision.onnx) hits the full disk: ENOSPC, not "corrupt"."""
    import onnx as onnx_module

    before = snapshot(pkg_copy)
    monkeypatch.setattr(onnx_module, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    rc, lines = run_cli(monkeypatch, capsys, "calibrate", pkg_copy, "--images", calib_images)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {pkg_copy} | no space left on device (ENOSPC)")
    assert "intact" not in lines[0] and snapshot(pkg_copy) == before


def test_a_read_only_package_for_real(pkg_copy, calib_images, monkeypatch, capsys):
    """Without monkeypatching where permissions hold (not for root, which writes through chmod)."""
    if is_root():
        pytest.skip("root ignores permission bits; the simulated EACCES/EROFS cases above cover it")
    before = snapshot(pkg_copy)
    for p in (pkg_copy, *pkg_copy.rglob("*")):
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        rc, lines = run_cli(monkeypatch, capsys, "calibrate", pkg_copy, "--images", calib_images)
    finally:
        for p in (pkg_copy, *pkg_copy.rglob("*")):
            p.chmod(p.stat().st_mode | 0o200)
    assert rc == 2 and len(lines) == 1 and "permission denied (EACCES)" in lines[0], lines
    assert snapshot(pkg_copy) == before


def test_calibration_files_get_the_umask_mode(pkg_copy, calib_images):
    old = os.umask(0o027)
    try:
        calibrate_package(pkg_copy, calib_images, num_images=2, quiet=True)
    finally:
        os.umask(old)
    for rel in (RANGES_FILE, CACHE_FILE, "manifest.json"):
        assert stat.S_IMODE((pkg_copy / rel).stat().st_mode) == 0o640, rel
    assert not _hidden(pkg_copy)  # no staged file left behind


def _hidden(pkg: Path) -> list[str]:
    """Hidden files in a package but the runtime's record of verified hashes (written whenever a test
    before this one, on the same worker, loaded the shared tiny package)."""
    return [p.name for p in pkg.rglob(".*") if p.name != VERIFIED]
