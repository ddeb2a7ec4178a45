"""`sleigh inspect`: an engine whose files are gone is shown as missing, not as passed; a manifest
that points outside the package is refused before anything is read or hashed."""

from __future__ import annotations

import json
import shutil

import pytest

from sleigh.engines.inspect import inspect_package, print_report
from tests.helpers import one_error_line, run_sleigh
from tests.runtime.package_copies import add_engine, copy_package, load, save


@pytest.fixture
def pkg(tiny_pkg, tmp_path):
    pkg = copy_package(tiny_pkg, tmp_path)
    add_engine(pkg, "onnxruntime-int8", "int8")
    return pkg


def test_a_deleted_engine_is_listed_as_missing(pkg, capsys):
    pytest.importorskip("onnx")
    report = inspect_package(pkg)
    assert report["engines"]["onnxruntime-int8"]["missing_files"] == []
    shutil.rmtree(pkg / "engines" / "onnxruntime-int8")
    report = inspect_package(pkg)
    entry = report["engines"]["onnxruntime-int8"]
    assert entry["accuracy_passed"] and len(entry["missing_files"]) == 4  # vision, gswa, embed, decoder
    print_report(report)
    row = next(line for line in capsys.readouterr().out.splitlines() if "onnxruntime-int8" in line)
    assert "MISSING 4" in row and "rebuild" in row


def test_the_decoder_cache_is_one_row_per_side(tiny_pkg, capsys):
    """The KV tensors are the manifest's kv_cache names, folded into one row each way."""
    pytest.importorskip("onnx")
    kv = load(tiny_pkg)["kv_cache"]
    print_report(inspect_package(tiny_pkg))
    out = capsys.readouterr().out
    for side in ("past", "new"):
        assert out.count(f"kv_cache.{side} ({len(kv[side])} tensors, {kv[side][0]} .., form slots)") == 1, out
        assert not any(name in out for name in kv[side][1:])  # no row of their own


def test_inspect_json_shows_missing_engine_files(pkg):
    shutil.rmtree(pkg / "engines" / "onnxruntime-int8")
    proc = run_sleigh("inspect", pkg, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["engines"]["onnxruntime-int8"]["missing_files"]


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.bin"])
def test_verify_never_reads_a_file_outside_the_package(pkg, target):
    """`inspect --verify` once printed the size of /etc/shadow for a manifest listing it."""
    (pkg.parent / "outside.bin").write_bytes(b"secret" * 100)
    manifest = load(pkg)
    manifest["files"][target] = {"sha256": "0" * 64, "bytes": 1}
    save(pkg, manifest)
    line = one_error_line(run_sleigh("inspect", pkg, "--verify"))
    assert repr(target) in line and ("absolute path" in line or "outside the folder" in line)
    assert "600" not in line  # no size of the file outside
