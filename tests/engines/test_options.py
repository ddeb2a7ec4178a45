"""`EngineOptions`, the one options object of `sleigh build-engine`: validation (one-line errors
that name the flag), defaults resolved from a real package's manifest, the engine's name, what the
manifest records, and one CLI flag for every option."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sleigh.engines.options import EngineOptions, flag
from sleigh.errors import SleighError
from sleigh.runtime.manifest import Manifest, read_manifest


@pytest.fixture(scope="module")
def manifest(tiny_pkg) -> Manifest:
    return read_manifest(tiny_pkg)  # .json: as on disk, the tests' reference


def one_line(err: SleighError) -> str:
    text = str(err)
    assert "\n" not in text and " | " in text and ". Expected: " in text, text
    return text


@pytest.mark.parametrize("kwargs, needles", [
    ({"backend": "tvm"}, ("--backend tvm", "onnxruntime | tensorrt")),
    ({"precision": "best"}, ("--precision best", "fp32 | fp16 | int8")),
    ({"precision": "FP16"}, ("--precision FP16",)),
    ({"llm_weights": "int2"}, ("--llm-weights int2",)),
    ({"precision": "fp32", "llm_weights": "fp16"}, ("--llm-weights fp16", "--precision fp16")),
    ({"backend": "tensorrt", "llm_weights": "int4"}, ("--llm-weights int4", "MatMulNBits")),
    ({"kv_dtype": "int8"}, ("--kv-dtype int8", "float32 | float16")),
    ({"kv_dtype": "float32"}, ("--kv-dtype float32", "FP16 decoder")),  # the default precision is fp16
    ({"backend": "tensorrt", "kv_dtype": "float16"}, ("--kv-dtype float16", "ONNX Runtime engines")),
    ({"name": "../escape"}, ("--name '../escape'", "folder name")),
    ({"name": ""}, ("--name ''",)),
    ({"max_tiles": 0}, ("--max-tiles 0", ">= 1")),
    ({"max_context": -3}, ("--max-context -3",)),
    ({"backend": "tensorrt", "max_tiles": 4, "opt_tiles": 5}, ("--opt-tiles 5", "1..4")),
    ({"backend": "tensorrt", "max_context": 1024, "opt_context": 2048}, ("--opt-context 2048", "1..1024")),
    ({"backend": "tensorrt", "max_batch": 0}, ("--max-batch 0", "1..64")),
    ({"backend": "tensorrt", "max_batch": 65}, ("--max-batch 65", "1..64")),
    ({"backend": "tensorrt", "max_batch": True}, ("--max-batch True", "1..64")),
    ({"backend": "tensorrt", "workspace_gb": 0}, ("--workspace-gb 0", "(0, 1024]")),
    ({"backend": "tensorrt", "builder_optimization_level": 6}, ("--builder-optimization-level 6", "0..5")),
    ({"backend": "tensorrt", "builder_optimization_level": -1}, ("--builder-optimization-level -1", "0..5")),
    # TensorRT's options say so on ONNX Runtime instead of being ignored
    ({"workspace_gb": 8}, ("--workspace-gb", "TensorRT engines only", "--backend tensorrt")),
    ({"max_batch": 2, "plugin_library": Path("libgswa.so")}, ("--max-batch --plugin-library", "apply to TensorRT")),
])
def test_validation_names_the_flag(kwargs, needles):
    with pytest.raises(SleighError) as e:
        EngineOptions(**kwargs)
    text = one_line(e.value)
    for needle in needles:
        assert needle in text


def test_names():
    assert EngineOptions().engine_name == "onnxruntime-fp16"
    assert EngineOptions(precision="int8").engine_name == "onnxruntime-int8"
    assert EngineOptions(precision="fp32", llm_weights="int4").engine_name == "onnxruntime-fp32-llm-int4"
    assert EngineOptions(precision="fp16", llm_weights="fp16").engine_name == "onnxruntime-fp16"  # the default, said
    assert EngineOptions(backend="tensorrt", precision="int8").engine_name == "tensorrt-int8"  # decoder fp16 by default
    assert EngineOptions(backend="tensorrt", precision="int8").weights == "fp16"
    assert EngineOptions(backend="tensorrt", precision="fp16", llm_weights="fp32").engine_name == "tensorrt-fp16-llm-fp32"
    assert EngineOptions(name="orin.fp16_v2", backend="tensorrt").engine_name == "orin.fp16_v2"
    assert EngineOptions(precision="int8", llm_weights="int4", kv_dtype="float16").engine_name == \
        "onnxruntime-int8-llm-int4-kv-fp16"
    assert EngineOptions(kv_dtype="float16").engine_name == "onnxruntime-fp16"  # an FP16 decoder's slots are float16 anyway
    assert (EngineOptions().kv, EngineOptions(precision="int8").kv) == ("float16", "float32")


def test_module_precisions():
    assert EngineOptions(precision="int8").module_precisions == {"vision": "int8", "gswa": "fp32", "embed": "int8", "decoder": "int8"}
    assert EngineOptions(backend="tensorrt", precision="int8").module_precisions == \
        {"vision": "int8", "gswa": "fp32", "embed": "fp16", "decoder": "fp16"}
    assert EngineOptions(precision="fp32", llm_weights="int4").module_precisions == \
        {"vision": "fp32", "gswa": "fp32", "embed": "int8", "decoder": "int4"}
    assert EngineOptions(precision="fp16").module_precisions == {"vision": "fp16", "gswa": "fp32", "embed": "fp16", "decoder": "fp16"}


def test_for_package_fills_the_defaults(manifest):
    tiles, ctx = manifest.json["image"]["max_tiles"], manifest.json["generation"]["context_length"]
    tpv = manifest.json["prompt"]["tokens_per_view"]
    ort = EngineOptions().for_package(manifest)
    assert (ort.name, ort.llm_weights, ort.max_tiles, ort.max_context) == ("onnxruntime-fp16", "fp16", tiles, ctx)
    assert all(getattr(ort, k) is None for k in ("opt_tiles", "opt_context", "max_batch", "workspace_gb",
                                                 "builder_optimization_level"))
    trt = EngineOptions(backend="tensorrt").for_package(manifest)
    assert trt.max_context == min(4096, ctx)
    assert (trt.opt_tiles, trt.max_batch, trt.workspace_gb, trt.builder_optimization_level) == (min(6, tiles), 1, 4.0, 3)
    assert trt.opt_context == min(tpv * (min(6, tiles) + 1) + 64, trt.max_context)  # 6 tiles + thumbnail + text
    assert trt.for_package(manifest) == trt  # resolving twice changes nothing
    assert EngineOptions(backend="tensorrt", max_tiles=4).for_package(manifest).opt_tiles == 4


def test_for_package_checks_against_the_package(manifest, tmp_path):
    tiles, ctx = manifest.json["image"]["max_tiles"], manifest.json["generation"]["context_length"]
    cases = [
        (EngineOptions(max_tiles=tiles + 1), (f"--max-tiles {tiles + 1}", f"1..{tiles}")),
        (EngineOptions(max_context=ctx + 1), (f"--max-context {ctx + 1}", f"1..{ctx}")),
        # 13 views x 256 tokens do not fit 2048 positions; 7 views x 256 = 1792 do
        (EngineOptions(backend="tensorrt", max_context=2048), ("--max-context 2048", "--max-tiles <= 6")),
        (EngineOptions(backend="tensorrt", max_tiles=2, opt_context=5000), ("--opt-context 5000", "1..4096")),
        (EngineOptions(backend="tensorrt", plugin_library=tmp_path / "absent.so"), ("--plugin-library", "no such file")),
    ]
    for opts, needles in cases:
        with pytest.raises(SleighError) as e:
            opts.for_package(manifest)
        text = one_line(e.value)
        for needle in needles:
            assert needle in text
    lib = tmp_path / "libgswa.so"
    lib.write_bytes(b"")
    with pytest.raises(SleighError, match="no GSWA node"):
        EngineOptions(backend="tensorrt", plugin_library=lib).for_package(
            dataclasses.replace(manifest, contract=dataclasses.replace(manifest.contract, gswa=None)))


def test_recorded_as_given(tmp_path):
    opts = EngineOptions(backend="tensorrt", max_batch=2, plugin_library=tmp_path / "lib.so", gate_images=tmp_path,
                         force=True, quiet=True)
    recorded = opts.to_json()
    assert json.loads(json.dumps(recorded)) == recorded  # manifest-ready: no Path objects
    assert recorded["plugin_library"] == str(tmp_path / "lib.so") and recorded["max_batch"] == 2
    assert recorded["max_tiles"] is None  # a default stays a default: a rebuild takes the package's again
    assert "force" not in recorded and "quiet" not in recorded  # how it was built, not what


def test_every_option_is_a_build_engine_flag():
    import typer.main

    from sleigh.cli import app

    command = typer.main.get_command(app).commands["build-engine"]
    flags = {o for p in command.params for o in p.opts}
    fields = [f.name for f in dataclasses.fields(EngineOptions) if f.name != "quiet"]  # quiet: --json
    assert [f for f in fields if flag(f) not in flags] == []
    assert "--json" in flags


def test_every_valid_option_set_has_its_conversions():
    """build-engine converts each module through CONVERSIONS[(module, module_precisions[module])]."""
    from sleigh.engines.build_engine import CONVERSIONS
    from sleigh.engines.options import BACKENDS, LLM_WEIGHTS, PRECISIONS

    built = 0
    for backend in BACKENDS:
        for precision in PRECISIONS:
            for weights in (None, *LLM_WEIGHTS):
                try:
                    opts = EngineOptions(backend=backend, precision=precision, llm_weights=weights)
                except SleighError:
                    continue
                built += 1
                assert [m for m, p in opts.module_precisions.items() if (m, p) not in CONVERSIONS] == [], opts
    assert built >= 12
    assert ("gswa", "int8") not in CONVERSIONS  # GSWA stays FP32 in every engine


def test_the_rebuild_command_repeats_the_options_as_given(tmp_path):
    """What the runtime tells users to run for a missing engine file: the options recorded in the entry."""
    import shlex

    from sleigh.runtime.backends import rebuild_command
    from sleigh.runtime.manifest import EngineEntry

    opts = EngineOptions(backend="tensorrt", precision="int8", name="orin", max_batch=2, workspace_gb=8.0,
                         allow_degraded=True, gate_images=tmp_path)
    command = shlex.split(rebuild_command(Path("pkg"), EngineEntry("orin", "tensorrt", "int8", {}, build_options=opts.to_json())))
    assert command[:3] == ["sleigh", "build-engine", "pkg"] and command[-1] == "--force"
    args = dict(zip(command[3:-1:2], command[4:-1:2]))
    assert args == {"--backend": "tensorrt", "--precision": "int8", "--name": "orin", "--max-batch": "2", "--workspace-gb": "8.0"}
