"""Where export, convert, calibrate, build-engine and the accuracy gate write: a new package is built
and verified in a staging folder and only then swapped in (the old one survives failures and kills),
outputs never overlap inputs, refusals come before any heavy work, and staging folders left by
killed runs are reported and cleaned (never a live run's)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sleigh import staging
from sleigh.errors import SleighError
from sleigh.export.exporter import ExportOptions, export_package, failed_dir
from sleigh.runtime.manifest import read_manifest, update_manifest
from sleigh.runtime.package import MODULE_NAMES, verify_files
from tests.helpers import cli_env, one_error_line, run_sleigh
from tests.test_staging import dead_pid, owned

ENGINE = "engines/onnxruntime-fp16/vision.onnx"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_staging(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".pkg."))


@pytest.fixture
def fast_export(tiny_pkg, monkeypatch):
    """export_module copies the session's modules, exported from the same checkpoint: these tests are
    about what happens around torch.onnx.export (staging, parity, swap), not the export itself."""
    import sleigh.export.exporter as exporter

    def copy_module(spec, out_dir, *args, **kwargs):
        shutil.copyfile(tiny_pkg / f"{spec.name}.onnx", out_dir / f"{spec.name}.onnx")
        return [f"{spec.name}.onnx"]

    monkeypatch.setattr(exporter, "export_module", copy_module)


@pytest.fixture
def old_pkg(tiny_pkg, tmp_path) -> tuple[Path, dict]:
    """A good package with an engine, and a snapshot of all its files."""
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    (pkg / ENGINE).parent.mkdir(parents=True)
    (pkg / ENGINE).write_bytes(b"an engine built earlier")
    return pkg, snapshot(pkg)


def test_force_export_with_a_parity_failure_keeps_the_old_package(fast_export, tiny_ckpt, old_pkg, monkeypatch):
    import sleigh.export.parity as parity

    pkg, before = old_pkg
    monkeypatch.setitem(parity.TOLERANCES, "fp32", {"*": (0.0, 0.0)})
    with pytest.raises(SleighError, match="parity failed") as e:
        export_package(tiny_ckpt, pkg, ExportOptions(quiet=True, force=True))
    failed = failed_dir(pkg)
    assert str(failed) in str(e.value) and "parity_report.json" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(pkg) == before  # the old package, its engine included, untouched
    assert json.loads((failed / "parity_report.json").read_text())["passed"] is False
    assert {p.name for p in failed.iterdir()} == {*(f"{m}.onnx" for m in MODULE_NAMES), "tokenizer.json", "parity_report.json"}
    assert hidden_staging(pkg.parent) == []


def test_force_export_interrupted_after_the_modules_are_written_keeps_the_old_package(fast_export, tiny_ckpt, old_pkg,
                                                                                      monkeypatch):
    import sleigh.export.parity as parity

    pkg, before = old_pkg

    def interrupted(staged, *args, **kwargs):
        assert (staged / "decoder.onnx").is_file() and staged != pkg  # the new modules exist, elsewhere
        raise KeyboardInterrupt

    monkeypatch.setattr(parity, "verify_package", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_package(tiny_ckpt, pkg, ExportOptions(quiet=True, force=True))
    assert snapshot(pkg) == before
    assert hidden_staging(pkg.parent) == [] and not failed_dir(pkg).exists()


def test_force_export_replaces_the_old_package_once_the_new_one_is_complete(fast_export, tiny_ckpt, tiny_pkg, old_pkg):
    pkg, _ = old_pkg
    update_manifest(pkg, lambda m: m["parity"].update(old_marker=True))
    result = export_package(tiny_ckpt, pkg, ExportOptions(quiet=True, force=True))
    manifest = read_manifest(pkg)
    assert manifest.parity["passed"] and "old_marker" not in manifest.parity and result.package == pkg
    assert not (pkg / ENGINE).exists() and manifest.engines == {}  # the old engines went with the old modules
    assert verify_files(pkg, manifest) == []
    assert hidden_staging(pkg.parent) == []


KILLED_EXPORT = """
import os, shutil, sys
from pathlib import Path
import sleigh.export.exporter as exporter
import sleigh.export.parity as parity
from sleigh.export.exporter import ExportOptions, export_package

tiny_pkg, ckpt, out = map(Path, sys.argv[1:4])

def copy_module(spec, out_dir, *args, **kwargs):
    shutil.copyfile(tiny_pkg / f"{spec.name}.onnx", out_dir / f"{spec.name}.onnx")
    return [f"{spec.name}.onnx"]

def killed(*args, **kwargs):
    os._exit(9)  # as SIGKILL would: no cleanup of any kind

exporter.export_module = copy_module
parity.verify_package = killed
export_package(ckpt, out, ExportOptions(quiet=True, force=True))
"""


@pytest.mark.slow
def test_a_killed_export_keeps_the_old_package_and_its_staging_is_reported_then_cleaned(tiny_ckpt, tiny_pkg, old_pkg):
    pkg, before = old_pkg
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(tiny_pkg), str(tiny_ckpt), str(pkg)],
                          env={**cli_env(), "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert snapshot(pkg) == before
    left = hidden_staging(pkg.parent)
    assert len(left) == 1 and left[0].startswith(".pkg.tmp-")
    assert (pkg.parent / left[0] / "decoder.onnx").is_file()  # gigabytes, for the 2B model

    live = staging.make(pkg.parent, "pkg")  # a running export of the same output: never touched
    inspected = run_sleigh("inspect", pkg, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["stale_staging"] == [str((pkg.parent / left[0]).resolve())]
    text = run_sleigh("inspect", pkg)
    assert "stale staging" in text.stdout and left[0] in text.stdout

    # the next export to this output removes it, even one refused for a non-empty output
    assert "not empty" in one_error_line(run_sleigh("export", tiny_ckpt, "-o", pkg))
    assert hidden_staging(pkg.parent) == [live.name]
    assert snapshot(pkg) == before


def test_a_stale_staging_folder_left_by_a_killed_build_is_cleaned_by_the_next_build(old_pkg, monkeypatch):
    import sleigh.engines.build_engine as build

    pkg, _ = old_pkg
    dead = owned(pkg / "engines", "onnxruntime-fp32", "tmp", dead_pid(), 0)
    live = staging.make(pkg / "engines", "onnxruntime-fp16")
    assert run_sleigh("inspect", pkg).stdout.count(dead.name) == 1

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "convert_module", stop)
    with pytest.raises(KeyboardInterrupt):
        build.build_engine(pkg, build.EngineOptions(precision="fp32", quiet=True))
    assert not dead.exists() and live.is_dir()
    assert sorted(p.name for p in (pkg / "engines").iterdir()) == sorted(["onnxruntime-fp16", live.name])


def test_the_gate_images_folder_is_staged_and_stale_ones_are_cleaned(tmp_path, monkeypatch):
    from sleigh.engines.accuracy import GATE_FOLDER, shipped_variants

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = owned(tmp_path, GATE_FOLDER, "tmp", dead_pid(), 0)
    paths = shipped_variants()
    assert not dead.exists()
    assert paths[0].parent.parent == tmp_path and paths[0].parent.name.startswith(f".{GATE_FOLDER}.tmp-{os.getpid()}-")
    assert staging.stale(tmp_path) == []


def test_export_into_a_non_empty_folder_fails_before_loading_the_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    import sleigh.sleighvl.checkpoint as checkpoint

    def must_not_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(checkpoint, "load_checkpoint", must_not_load)
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SleighError, match="not empty"):
        export_package(tiny_ckpt, out, ExportOptions(quiet=True))
    with pytest.raises(SleighError, match="is the checkpoint itself"):
        export_package(tiny_ckpt, tiny_ckpt, ExportOptions(quiet=True, force=True))


@pytest.mark.slow
def test_export_refuses_an_output_that_is_inside_or_around_the_checkpoint(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "notes").mkdir()
    before = snapshot(ckpt)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    cases = {ckpt: "is the checkpoint itself", link: "is the checkpoint itself", ckpt / "pkg": "is inside the checkpoint",
             ckpt / "notes": "is inside the checkpoint", tmp_path: "contains the checkpoint"}
    for out, needle in cases.items():
        line = one_error_line(run_sleigh("export", ckpt, "-o", out, "--force"))
        assert needle in line, line
    assert needle in one_error_line(run_sleigh("export", link, "-o", tmp_path, "--force"))  # the link as the input
    assert snapshot(ckpt) == before


@pytest.mark.slow
def test_convert_refuses_an_output_that_overlaps_its_inputs(tmp_path):
    from tests.helpers import ORACLE_CKPT

    src = tmp_path / "internvl"
    shutil.copytree(ORACLE_CKPT, src)
    before = snapshot(src)
    gswa = tmp_path / "gswa" / "gswa.safetensors"
    gswa.parent.mkdir()
    gswa.write_bytes(b"weights")
    cases = [((src, src, "--force"), "is the source checkpoint itself"),
             ((src, src / "out"), "is inside the source checkpoint"),
             ((src, tmp_path, "--force"), "contains the source checkpoint"),
             ((src, gswa.parent, "--gswa", gswa, "--force"), "contains the --gswa file"),
             ((src, gswa, "--gswa", gswa, "--force"), "is the --gswa file itself")]
    for args, needle in cases:
        line = one_error_line(run_sleigh("convert", *args))
        assert needle in line, line
    assert gswa.read_bytes() == b"weights"
    assert snapshot(src) == before


def test_calibrate_and_build_engine_refuse_images_that_overlap_their_outputs(old_pkg, tmp_path):
    from sleigh.engines.calibration.collect import calibrate_package
    from sleigh.engines.build_engine import EngineOptions, build_engine

    pkg, before = old_pkg
    with pytest.raises(SleighError, match="is inside the --images"):
        calibrate_package(pkg, pkg, quiet=True)
    (pkg / "calibration").mkdir()
    with pytest.raises(SleighError, match="is the --images"):
        calibrate_package(pkg, pkg / "calibration", quiet=True)
    (pkg / "calibration").rmdir()
    engine = pkg / "engines" / "onnxruntime-fp16"
    for images, needle in ((engine, "is the --images"), (pkg / "engines", "is inside the --images"),
                           (engine / "held-out", "contains the --images")):
        with pytest.raises(SleighError, match=needle):
            build_engine(pkg, EngineOptions(precision="fp16", gate_images=images, force=True, quiet=True))
    assert snapshot(pkg) == before


def test_exported_files_get_the_umask_mode_external_data_included(tiny_pkg, tiny_ckpt, tmp_path, monkeypatch):
    """onnx's save_model writes external data 0600 and the staging folder is made private: the
    package must come out as ordinary files and folders under the umask (here 027: 0640 and 0750)."""
    import sleigh.export.exporter as exporter

    def copy_module_with_private_data(spec, out_dir, *args, **kwargs):
        shutil.copyfile(tiny_pkg / f"{spec.name}.onnx", out_dir / f"{spec.name}.onnx")
        data = out_dir / f"{spec.name}.onnx.data"
        data.write_bytes(b"\0" * 16)
        data.chmod(0o600)  # as onnx.save_model leaves an external data file
        return [f"{spec.name}.onnx", data.name]

    monkeypatch.setattr(exporter, "export_module", copy_module_with_private_data)
    old = os.umask(0o027)
    try:
        export_package(tiny_ckpt, tmp_path / "pkg", ExportOptions(verify=False, quiet=True))
    finally:
        os.umask(old)
    pkg = tmp_path / "pkg"
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [pkg, *pkg.rglob("*")]}
    assert modes["pkg/vision.onnx.data"] == 0o640 and modes["pkg"] == 0o750, modes
    assert {m for name, m in modes.items() if (tmp_path / name).is_file()} == {0o640}, modes
