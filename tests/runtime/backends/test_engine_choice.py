"""Which engine a run opens: the best gated one whose files are all there (falling back, with one
warning line, when its folder is gone), a named one or nothing, with messages that say to rebuild
an engine and to re-export a package. The engines here are the package's own FP32 modules copied
under engines/ and registered as build-engine registers them."""

from __future__ import annotations

import logging
import shutil

import pytest

from sleigh.errors import SleighError
from sleigh.runtime.backends import ranked_engines
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.pipeline import Pipeline
from tests.helpers import one_error_line, run_sleigh
from tests.runtime.package_copies import add_engine, copy_package, load, save


@pytest.fixture
def pkg(tiny_pkg, tmp_path):
    pkg = copy_package(tiny_pkg, tmp_path)
    add_engine(pkg, "onnxruntime-int8", "int8")
    add_engine(pkg, "onnxruntime-fp32", "fp32")
    return pkg


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("sleigh")]


def test_auto_takes_the_best_gated_engine_and_falls_back_when_its_files_are_gone(pkg, caplog):
    manifest = read_manifest(pkg)
    assert ranked_engines(manifest, "onnxruntime", "cpu") == ["onnxruntime-int8", "onnxruntime-fp32"]  # ENGINE_PREFERENCE
    assert "onnxruntime-int8" in Pipeline.load(pkg).backend.describe()
    assert _warnings(caplog) == []

    shutil.rmtree(pkg / "engines" / "onnxruntime-int8")  # the engine folder deleted, the manifest unchanged
    pipe = Pipeline.load(pkg)
    assert "onnxruntime-fp32" in pipe.backend.describe()
    warned = _warnings(caplog)
    assert len(warned) == 1 and warned[0].startswith("engine onnxruntime-int8") and "running engine onnxruntime-fp32" in warned[0]
    assert "sleigh build-engine" in warned[0] and "--precision int8" in warned[0]
    assert pipe.generate(None, "hi", max_new_tokens=2).result.token_ids

    caplog.clear()
    (pkg / "engines" / "onnxruntime-fp32" / "decoder.onnx").unlink()  # one file of the next one gone too
    assert "package fp32" in Pipeline.load(pkg).backend.describe()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "engines onnxruntime-int8, onnxruntime-fp32" in warned[0] and "package modules" in warned[0]


def test_a_cli_run_falls_back_with_one_warning_line(pkg):
    shutil.rmtree(pkg / "engines" / "onnxruntime-int8")
    proc = run_sleigh("run", "--model", pkg, "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "onnxruntime-int8" in warnings[0], proc.stderr
    assert "[onnxruntime [onnxruntime-fp32]" in proc.stderr


@pytest.mark.parametrize("damage", ["folder", "file"])
def test_a_named_engine_without_its_files_says_rebuild(pkg, damage):
    if damage == "folder":
        shutil.rmtree(pkg / "engines" / "onnxruntime-int8")
    else:
        (pkg / "engines" / "onnxruntime-int8" / "vision.onnx").unlink()
    line = one_error_line(run_sleigh("run", "--model", pkg, "--engine", "onnxruntime-int8", "--max-new-tokens", "2"))
    assert "engines/onnxruntime-int8/" in line and "is missing" in line
    assert "sleigh build-engine" in line and "--precision int8" in line and "export" not in line


def test_a_damaged_engine_file_says_rebuild(pkg):
    path = pkg / "engines" / "onnxruntime-fp32" / "embed.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(data)
    with pytest.raises(SleighError, match="sha256 differs") as err:
        Pipeline.load(pkg, engine="onnxruntime-fp32")
    assert "rebuild the engine" in str(err.value) and "sleigh export" not in str(err.value)


def test_a_degraded_engine_runs_with_one_warning(pkg, caplog):
    manifest = load(pkg)
    manifest["engines"]["onnxruntime-int8"].update(accuracy_passed=False, degraded=True)
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "onnxruntime", "cpu") == ["onnxruntime-fp32"]  # never picked by auto
    Pipeline.load(pkg)
    assert _warnings(caplog) == []
    pipe = Pipeline.load(pkg, engine="onnxruntime-int8")
    assert "onnxruntime-int8" in pipe.backend.describe()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "onnxruntime-int8 did not pass its accuracy gate" in warned[0]

    proc = run_sleigh("run", "--model", pkg, "--engine", "onnxruntime-int8", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("warning:")] == [f"warning: {w}" for w in warned]  # the same one line


def test_unknown_engine_precisions_rank_last_instead_of_failing(pkg):
    manifest = load(pkg)
    manifest["engines"]["onnxruntime-int8"]["precision"] = "bf16"  # written by some newer sleigh
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "onnxruntime", "cpu") == ["onnxruntime-fp32", "onnxruntime-int8"]


@pytest.mark.parametrize("field, value", [("precision", "bf16"), ("llm_weights", "int3")])
def test_compare_refuses_an_engine_kind_it_has_no_gate_for(pkg, field, value):
    """It was `unexpected KeyError: 'int3'` from the gate's tables."""
    manifest = load(pkg)
    manifest["engines"]["onnxruntime-int8"][field] = value
    save(pkg, manifest)
    line = one_error_line(run_sleigh("compare", pkg, "--engine", "onnxruntime-int8"))
    assert line.startswith("error: engine onnxruntime-int8 | ") and "no accuracy gate" in line and value in line, line


def test_the_package_modules_missing_say_re_export(pkg):
    (pkg / "decoder.onnx").unlink()
    with pytest.raises(SleighError, match="decoder.onnx") as err:
        Pipeline.load(pkg, engine="package")
    assert "is missing" in str(err.value) and "sleigh export" in str(err.value)


def test_between_equal_engines_auto_prefers_float32_kv_slots(tiny_pkg, tmp_path):
    pkg = copy_package(tiny_pkg, tmp_path)
    add_engine(pkg, "fp32-kv-fp16", "fp32")  # listed first: the manifest's order would pick it
    add_engine(pkg, "fp32", "fp32")
    manifest = load(pkg)
    manifest["engines"]["fp32-kv-fp16"]["kv_dtype"] = "float16"
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "onnxruntime", "cpu") == ["fp32", "fp32-kv-fp16"]
    manifest["engines"]["fp32-kv-fp16"]["kv_dtype"] = "float32"  # control: no difference in slots, the order stands
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "onnxruntime", "cpu") == ["fp32-kv-fp16", "fp32"]


def test_auto_passes_over_an_engine_built_for_less_than_the_package(tiny_pkg, tmp_path):
    """An ONNX Runtime engine built with --max-tiles 2 or a shorter --max-context was `auto`'s choice
    (first in the manifest's order, or over the package's modules), so every run of the package was cut
    to 3 views without a word. It runs only when named now; between TensorRT equals, the wider first."""
    pkg = copy_package(tiny_pkg, tmp_path)
    for name in ("narrow-tiles", "narrow-context", "wide"):
        add_engine(pkg, name, "fp32")
    manifest = load(pkg)
    context = manifest["generation"]["context_length"]
    manifest["engines"]["narrow-tiles"]["shapes"] = {"max_views": 3, "max_context": context}
    manifest["engines"]["narrow-context"]["shapes"] = {"max_views": 13, "max_context": 1024}
    manifest["engines"]["wide"]["shapes"] = {"max_views": 13, "max_context": context}
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "onnxruntime", "cpu") == ["wide"]
    del manifest["engines"]["wide"]
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "onnxruntime", "cpu") == []  # auto: the package's own modules
    with Pipeline.load(pkg, engine="narrow-tiles") as pipe:  # named, it runs, with its limits
        assert pipe.max_tiles == 2
    for name in ("narrow-tiles", "narrow-context"):
        manifest["engines"][name]["backend"] = "tensorrt"
    save(pkg, manifest)
    assert ranked_engines(read_manifest(pkg), "tensorrt", "cuda") == ["narrow-context", "narrow-tiles"]
