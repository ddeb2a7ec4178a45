"""TensorRT engine building, everything that needs no libnvinfer: optimisation profiles from a real
package's manifest, the file plan and the manifest entry's TensorRT part, source checks, the GSWA
plugin (the copy of gswa.onnx without the function, the library copied into the engine), and the
one-line error where TensorRT is not installed. The options are tested in test_options.py.

Nothing here imitates TensorRT: building and running engines is unverified on these machines.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sleigh.engines.options import EngineOptions
from sleigh.errors import SleighError
from sleigh.engines.tensorrt_build import (
    GSWA_DOMAIN, GSWA_OP, GSWA_PLUGIN_NAMESPACE, _parse_path, build_engines, copy_plugin, decoder_profiles, embed_profile,
    engine_plan, gswa_profile, parser_errors, profile_to_json, require_tensorrt, source_problems, strip_gswa_function,
    vision_profile)
from sleigh.runtime.backends.tensorrt_backend import DECODER_PROFILES, TENSORRT_EXPECTED
from sleigh.runtime.kv_cache import KV_CHUNK, grown_capacity
from sleigh.runtime.manifest import Manifest, parse_manifest, read_manifest
from tests.helpers import heavy_imports

MODULES = ("vision", "gswa", "embed", "decoder")
TENSORRT_IMPORTABLE = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="session")
def trt_pkg(tiny_pkg) -> tuple[Path, Manifest]:
    """The shared tiny package and its manifest (`.json`: as on disk, the tests' reference). Read-only."""
    return tiny_pkg, read_manifest(tiny_pkg)


def TRT(**kwargs) -> EngineOptions:
    return EngineOptions(backend="tensorrt", **kwargs)


def profile_from_json(data: dict):
    """The reverse of profile_to_json, written here from the entry's documented layout."""
    return {name: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for name, v in data.items()}


def package_sources(pkg: Path) -> dict[str, Path]:
    return {m: pkg / f"{m}.onnx" for m in MODULES}


def all_profiles(manifest, opts) -> dict[str, list]:
    return {"vision": [vision_profile(manifest, opts)], "gswa": [gswa_profile(manifest, opts)],
            "embed": [embed_profile(manifest, opts)], "decoder": decoder_profiles(manifest, opts)}


def onnx_inputs(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}


def assert_one_line_error(err: SleighError):
    text = str(err)
    assert "\n" not in text and " | " in text and ". Expected: " in text, text


# -- profiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [TRT(), TRT(precision="int8", max_tiles=4, max_batch=2,
                                                                     max_context=2048, opt_context=300)])
def test_profiles_name_every_input_with_ordered_ranges(trt_pkg, opts):
    pkg, manifest = trt_pkg
    for module, profiles in all_profiles(manifest, opts).items():
        declared = {i["name"]: i["shape"] for i in manifest.json["modules"][module]["inputs"]}
        assert onnx_inputs(pkg / manifest.json["modules"][module]["file"]) == declared  # the manifest tells the truth
        for prof in profiles:
            assert list(prof) == list(declared), module  # every input, by its exact name, nothing else
            for name, (lo, opt, hi) in prof.items():
                shape = declared[name]
                assert len(lo) == len(opt) == len(hi) == len(shape), name
                for axis, dim in enumerate(shape):
                    assert 0 <= lo[axis] <= opt[axis] <= hi[axis], (module, name, axis)
                    if isinstance(dim, int):
                        assert lo[axis] == opt[axis] == hi[axis] == dim, (module, name, axis)
                    else:  # a dynamic dim holds at least one element, but a prefill has no cache slots
                        assert hi[axis] >= (0 if dim == "cache_slots" else 1), (module, name, dim)


def test_vision_profile_views(trt_pkg):
    _, manifest = trt_pkg
    size = manifest.json["image"]["size"]
    prof = vision_profile(manifest, TRT())
    assert prof == {"pixel_values": ((1, 3, size, size), (7, 3, size, size), (13, 3, size, size))}
    assert vision_profile(manifest, TRT(max_tiles=12))["pixel_values"][2][0] == 12 + 1  # + thumbnail
    assert vision_profile(manifest, TRT(max_tiles=4))["pixel_values"] == \
        ((1, 3, size, size), (5, 3, size, size), (5, 3, size, size))
    # one tile: InternVL tiling appends no thumbnail
    assert vision_profile(manifest, TRT(max_tiles=1))["pixel_values"][2][0] == 1
    hidden = manifest.json["model"]["vision_hidden_size"]  # GSWA: every view's CLS token at once
    assert gswa_profile(manifest, TRT(max_tiles=4)) == {"cls_tokens": ((1, hidden), (5, hidden), (5, hidden))}


def _image_row_width(manifest: Manifest) -> int:
    """D, as the exported embed module declares its image_embeds input [image_rows, D]."""
    return next(i["shape"][1] for i in manifest.json["modules"]["embed"]["inputs"] if i["name"] == "image_embeds")


def test_embed_profile_holds_all_image_rows_and_one_token_steps(trt_pkg):
    _, manifest = trt_pkg
    tpv, D = manifest.json["prompt"]["tokens_per_view"], _image_row_width(manifest)
    prof = embed_profile(manifest, TRT(max_batch=2))
    assert prof["input_ids"][0] == (1, 1)  # decode steps embed one token with no image rows
    assert prof["image_embeds"][0] == (0, D)
    assert prof["image_embeds"][2] == (tpv * 13 * 2, D)
    assert prof["input_ids"][2] == (2, 4096)


def test_decoder_profiles(trt_pkg):
    _, manifest = trt_pkg
    _, kv, _, hd = next(i["shape"] for i in manifest.json["modules"]["decoder"]["inputs"] if i["name"] == "past_key_values.0.key")
    C = 4096
    prefill, decode = decoder_profiles(manifest, TRT(max_context=C, max_batch=3))
    assert DECODER_PROFILES == ("prefill", "decode")
    past_names = [n for n in prefill if n.startswith("past_key_values.")]
    assert past_names == manifest.json["kv_cache"]["past"]
    for point in range(3):  # min, opt, max each satisfy the graph: total = slots + new, one batch
        for prof in (prefill, decode):
            B, S, _ = prof["inputs_embeds"][point]
            P = prof[past_names[0]][point][2]
            assert prof["attention_mask"][point] == prof["attention_bias"][point] == (B, P + S)
            assert prof["position_ids"][point] == (B, S)
            for n in past_names:
                assert prof[n][point] == (B, kv, P, hd)
        assert decode["inputs_embeds"][point][1] == 1  # decode: exactly one new token
        assert prefill[past_names[0]][point][2] == 0  # prefill: from an empty cache
        assert decode[past_names[0]][point][2] % KV_CHUNK == 0  # slots grow in chunks
    assert prefill["inputs_embeds"][2][1] == C
    # the most slots the runtime holds for C positions: C rounded up to a chunk
    assert decode[past_names[0]][2][2] == grown_capacity(C) and decode["attention_mask"][2][1] == grown_capacity(C) + 1
    assert prefill["inputs_embeds"][2][0] == decode["inputs_embeds"][2][0] == 3
    assert prefill["inputs_embeds"][0][0] == 1


def test_context_must_fit_the_model_and_the_image(trt_pkg):
    _, manifest = trt_pkg
    limit = manifest.json["generation"]["context_length"]
    with pytest.raises(SleighError) as e:
        decoder_profiles(manifest, TRT(max_context=limit + 1))
    assert_one_line_error(e.value)
    assert str(limit) in str(e.value)
    with pytest.raises(SleighError) as e:  # 13 views x 256 tokens do not fit 2048 positions
        vision_profile(manifest, TRT(max_context=2048))
    assert_one_line_error(e.value)
    assert "--max-tiles <= 6" in str(e.value)  # 7 views x 256 = 1792 < 2048
    vision_profile(manifest, TRT(max_context=2048, max_tiles=6))


def test_unknown_symbolic_dim_is_reported(trt_pkg):
    pkg, manifest = trt_pkg
    broken = json.loads(json.dumps(manifest.json))
    broken["modules"]["vision"]["inputs"][0]["shape"][0] = "num_images"
    with pytest.raises(SleighError) as e:
        vision_profile(parse_manifest(broken, pkg, "manifest.json"), TRT())
    assert "num_images" in str(e.value) and "views" in str(e.value)


# -- the plan and the manifest entry's TensorRT part ------------------------------------------------


def test_engine_plan_layout_and_entry(trt_pkg):
    pkg, manifest = trt_pkg
    opts = TRT(precision="int8")
    plan = engine_plan(pkg, manifest, package_sources(pkg), opts)
    assert plan["name"] == "tensorrt-int8"
    assert plan["dir"] == pkg / "engines" / "tensorrt-int8"
    assert plan["timing_cache"] == pkg / "engines" / "timing.cache"  # beside the engines, shared between builds
    assert plan["plugin"] is None
    for m in MODULES:
        spec = plan["modules"][m]
        assert spec["plan_rel"] == f"engines/tensorrt-int8/{m}.plan"
        assert spec["plan"] == pkg / spec["plan_rel"]
        assert spec["source"] == pkg / f"{m}.onnx"
        assert spec["strip_gswa_function"] is False
    assert plan["modules"]["decoder"]["profile_names"] == ["prefill", "decode"]
    assert not (pkg / "engines").exists()  # planning writes nothing

    entry = plan["entry"]
    json.dumps(entry)  # goes into manifest.json as is
    assert entry["modules"] == {m: f"engines/tensorrt-int8/{m}.plan" for m in MODULES}
    assert entry["sources"] == {m: f"{m}.onnx" for m in MODULES}
    assert entry["timing_cache"] == "engines/timing.cache"
    assert entry["gswa"] == {"via": "function", "op": "sleigh::GSWA"}
    # build-engine writes the common fields (backend, precision, build_options, ...) once; this part adds its own
    assert not {"backend", "precision", "build_options", "name", "dir", "shapes"} & set(entry)
    assert entry["versions"] == {"tensorrt": None, "compute_capability": None, "device": None}  # filled on the GPU
    assert entry["files"] == [] and entry["source_checks"] is None
    for m in MODULES:  # the entry's profiles are exactly the plan's
        assert [p["name"] for p in entry["profiles"][m]] == plan["modules"][m]["profile_names"]
        assert [profile_from_json(p["shapes"]) for p in entry["profiles"][m]] == plan["modules"][m]["profiles"]


def test_profile_json_round_trip(trt_pkg):
    _, manifest = trt_pkg
    for prof in decoder_profiles(manifest, TRT(max_batch=2)):
        data = profile_to_json(prof)
        assert json.loads(json.dumps(data)) == data
        assert profile_from_json(data) == prof


def test_engine_plan_with_the_plugin_and_a_name(trt_pkg, tmp_path):
    pkg, manifest = trt_pkg
    lib = tmp_path / "build" / "libgswa_plugin.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF not really a library")
    plan = engine_plan(pkg, manifest, {m: f"{m}.onnx" for m in MODULES},  # relative to the package
                       TRT(plugin_library=lib, name="orin-fp16"))
    assert plan["modules"]["vision"]["plan_rel"] == "engines/orin-fp16/vision.plan"
    assert [m for m in MODULES if plan["modules"][m]["strip_gswa_function"]] == ["gswa"]
    gswa = plan["entry"]["gswa"]
    assert gswa == {"via": "plugin", "op": "sleigh::GSWA", "plugin_namespace": "sleigh", "plugin_version": "1",
                    "plugin_library": "engines/orin-fp16/plugin/libgswa_plugin.so"}  # in the engine, never the given path
    assert plan["plugin"]["library"] == lib and plan["plugin"]["copy"] == pkg / gswa["plugin_library"]
    assert not (pkg / "engines").exists()  # planning writes nothing


def test_copy_plugin_puts_the_library_in_the_engine_folder(trt_pkg, tmp_path):
    pkg, manifest = trt_pkg
    work = tmp_path / "pkg"
    shutil.copytree(pkg, work)
    lib = tmp_path / "libgswa_plugin.so"
    lib.write_bytes(b"\x7fELF not really a library")
    staged = work / "engines" / ".tensorrt-fp16.tmp-1"
    plan = engine_plan(work, manifest, package_sources(work), TRT(plugin_library=lib), out_dir=staged)
    copy_plugin(plan)
    rel = plan["entry"]["gswa"]["plugin_library"]
    assert rel == "engines/.tensorrt-fp16.tmp-1/plugin/libgswa_plugin.so"  # moved with the folder by build-engine
    assert (work / rel).read_bytes() == lib.read_bytes()
    assert plan["entry"]["files"] == [rel]  # listed, so build-engine records its sha256
    plain = engine_plan(work, manifest, package_sources(work), TRT(), out_dir=staged)
    copy_plugin(plain)
    assert plain["entry"]["files"] == []


def test_engine_plan_into_a_temporary_folder(trt_pkg, tmp_path):
    """build-engine builds in a staging folder that it renames to engines/<name> afterwards: the
    entry names the files where they are (build-engine moves the paths with the folder)."""
    pkg, manifest = trt_pkg
    work = tmp_path / "pkg"
    shutil.copytree(pkg, work)
    tmp = work / "engines" / ".tensorrt-fp16.tmp-1"
    tmp.mkdir(parents=True)
    sources = {m: tmp / f"{m}.onnx" for m in MODULES}
    for m in MODULES:
        shutil.copyfile(work / f"{m}.onnx", sources[m])
    plan = engine_plan(work, manifest, sources, TRT(), out_dir=tmp)
    assert plan["dir"] == tmp
    for m in MODULES:
        assert plan["modules"][m]["plan"] == tmp / f"{m}.plan"
        assert plan["entry"]["modules"][m] == f"engines/.tensorrt-fp16.tmp-1/{m}.plan"
        assert plan["entry"]["sources"][m] == f"engines/.tensorrt-fp16.tmp-1/{m}.onnx"
    assert plan["timing_cache"] == work / "engines" / "timing.cache"  # outside the folder that gets renamed


def test_engine_plan_errors(trt_pkg, tmp_path):
    pkg, manifest = trt_pkg
    sources = package_sources(pkg)
    cases = [
        ({k: v for k, v in sources.items() if k != "decoder"}, {}, "decoder"),
        ({**sources, "vision": tmp_path / "absent.onnx"}, {}, "does not exist"),
        (sources, {"plugin_library": tmp_path / "absent.so"}, "--plugin-library"),
    ]
    for srcs, kw, needle in cases:
        with pytest.raises(SleighError) as e:
            engine_plan(pkg, manifest, srcs, TRT(**kw))
        assert_one_line_error(e.value)
        assert needle in str(e.value)


# -- TensorRT missing ---------------------------------------------------------------------------


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="tensorrt is importable here")
def test_require_tensorrt_says_why():
    with pytest.raises(SleighError) as e:
        require_tensorrt()
    assert_one_line_error(e.value)
    assert str(e.value).startswith("tensorrt | the TensorRT Python package is not installed (")


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="tensorrt is importable here")
def test_build_engines_without_tensorrt_is_one_line_and_writes_nothing(trt_pkg, tmp_path):
    pkg, manifest = trt_pkg
    work = tmp_path / "pkg"
    shutil.copytree(pkg, work)
    with pytest.raises(SleighError) as e:
        build_engines(work, manifest, package_sources(work), TRT(), quiet=True)
    assert_one_line_error(e.value)
    assert str(e.value).startswith("tensorrt | the TensorRT Python package is not installed (")
    assert str(e.value).endswith(f". Expected: {TENSORRT_EXPECTED}")
    assert "JetPack 6 ships 10.3" in str(e.value)
    assert not (work / "engines").exists()
    assert not list(work.rglob("*.plan")) and not list(work.rglob("*.cache"))


def test_build_engines_checks_arguments_before_tensorrt(trt_pkg):
    pkg, manifest = trt_pkg
    with pytest.raises(SleighError, match="sources"):
        build_engines(pkg, manifest, {"vision": pkg / "vision.onnx"}, TRT(), quiet=True)


# -- source checks ------------------------------------------------------------------------------


def test_fp32_package_modules_are_not_fp16_or_int8_sources(trt_pkg):
    pkg, manifest = trt_pkg
    for m in MODULES:
        assert any("no float16 tensors" in p for p in source_problems(m, pkg / f"{m}.onnx", "fp16", manifest)), m
    for m in ("vision", "decoder"):
        assert any("no QuantizeLinear" in p for p in source_problems(m, pkg / f"{m}.onnx", "int8", manifest)), m
    assert source_problems("embed", pkg / "embed.onnx", "int8", manifest) == []  # a gather: nothing to quantize
    for m in MODULES:  # a GPU reference engine from the exported modules
        assert source_problems(m, pkg / f"{m}.onnx", "fp32", manifest) == [], m


def _embed_like(tmp_path: Path, name: str, nodes, inits, hidden: int, opsets=None) -> Path:
    """A small graph with the embed module's inputs, to exercise the source checks."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["image_rows", hidden])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 18)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _qdq_model(tmp_path, name, zero_point: int, hidden: int) -> Path:
    w = numpy_helper.from_array(np.ones((hidden, hidden), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zero_point, np.int8), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["image_embeds", "scale", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"]),
             helper.make_node("MatMul", ["dq", "w"], ["inputs_embeds"])]
    return _embed_like(tmp_path, name, nodes, [w, scale, zp], hidden)


def test_source_checks_on_small_graphs(trt_pkg, tmp_path):
    _, manifest = trt_pkg
    D = _image_row_width(manifest)
    assert source_problems("embed", _qdq_model(tmp_path, "sym", 0, D), "int8", manifest) == []
    asym = source_problems("embed", _qdq_model(tmp_path, "asym", 3, D), "int8", manifest)
    assert any("not 0" in p and "symmetric" in p for p in asym)

    w16 = numpy_helper.from_array(np.ones((D, D), np.float16), "w16")
    fp16 = _embed_like(tmp_path, "fp16", [
        helper.make_node("Cast", ["image_embeds"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "w16"], ["y16"]),
        helper.make_node("Cast", ["y16"], ["inputs_embeds"], to=TensorProto.FLOAT)], [w16], D)
    assert source_problems("embed", fp16, "fp16", manifest) == []
    assert any("would not be the FP32 it is labelled" in p for p in source_problems("embed", fp16, "fp32", manifest))
    assert any("Q/DQ" in p for p in source_problems("embed", _qdq_model(tmp_path, "q", 0, D), "fp32", manifest))

    nbits = _embed_like(tmp_path, "nbits", [
        helper.make_node("MatMulNBits", ["image_embeds", "w16"], ["inputs_embeds"], domain="com.microsoft")], [w16], D,
        opsets=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    assert any("com.microsoft::MatMulNBits" in p for p in source_problems("embed", nbits, "int8", manifest))

    dyn = _embed_like(tmp_path, "dyn", [
        helper.make_node("DynamicQuantizeLinear", ["image_embeds"], ["q", "s", "z"]),
        helper.make_node("Identity", ["image_embeds"], ["inputs_embeds"])], [], D)
    assert any("DynamicQuantizeLinear" in p for p in source_problems("embed", dyn, "int8", manifest))

    renamed = _embed_like(tmp_path, "renamed", [helper.make_node("Identity", ["image_embeds"], ["inputs_embeds"])], [], D)
    model = onnx.load(str(renamed))
    model.graph.input[0].name = "ids"
    onnx.save(model, str(renamed))
    assert any("differ from the manifest" in p for p in source_problems("embed", renamed, "fp16", manifest))


# -- GSWA: function (default) or plugin ------------------------------------------------------------


def _gswa_nodes(model):
    return [n for n in model.graph.node if n.domain == GSWA_DOMAIN and n.op_type == GSWA_OP]


def test_use_plugin_strips_the_function_and_keeps_the_node(trt_pkg, tmp_path):
    pkg, manifest = trt_pkg
    src = tmp_path / "gswa.onnx"
    shutil.copyfile(pkg / "gswa.onnx", src)
    before = onnx.load(str(src))
    assert [f.name for f in before.functions] == [GSWA_OP] and len(_gswa_nodes(before)) == 1

    dst = tmp_path / "gswa.plugin.onnx"
    assert strip_gswa_function(src, dst) == 1
    after = onnx.load(str(dst))
    assert [f.name for f in after.functions] == []
    (node,) = _gswa_nodes(after)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == GSWA_PLUGIN_NAMESPACE.encode()
    assert list(node.input) == list(_gswa_nodes(before)[0].input)  # weights still reach the plugin as inputs
    assert len(after.graph.node) == len(before.graph.node)
    assert {o.domain: o.version for o in after.opset_import}[GSWA_DOMAIN] == 1
    assert onnx.load(str(src)).functions  # the source is untouched

    # without the function, the GSWA node needs a plugin: flagged unless the build uses one
    assert any("without its function body" in p for p in source_problems("gswa", dst, "fp16", manifest))
    assert not any("function body" in p for p in source_problems("gswa", dst, "fp16", manifest, use_plugin=True))
    assert not any("function body" in p for p in source_problems("gswa", src, "fp16", manifest))


def test_parse_path_default_keeps_function_and_plugin_uses_a_temporary_copy(trt_pkg, tmp_path):
    pkg, manifest = trt_pkg
    work = tmp_path / "pkg"
    shutil.copytree(pkg, work)
    default = engine_plan(work, manifest, package_sources(work), TRT())["modules"]["gswa"]
    with _parse_path(default) as path:
        assert path == work / "gswa.onnx"
        assert [f.name for f in onnx.load(str(path)).functions] == [GSWA_OP]

    plugin = engine_plan(work, manifest, package_sources(work), TRT(plugin_library=Path(__file__)))["modules"]["gswa"]
    with _parse_path(plugin) as path:
        assert path.parent == work and path != work / "gswa.onnx"  # beside the source: .onnx.data still resolves
        model = onnx.load(str(path))
        assert len(model.functions) == 0
        assert len(_gswa_nodes(model)) == 1
    assert not path.exists()
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in pkg.iterdir())


def test_strip_keeps_external_weights_readable(trt_pkg, tmp_path):
    pkg, _ = trt_pkg
    model = onnx.load(str(pkg / "gswa.onnx"))
    original = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    src = tmp_path / "gswa.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="gswa.onnx.data", size_threshold=0)
    dst = tmp_path / ".gswa.plugin.onnx"
    strip_gswa_function(src, dst)
    assert dst.stat().st_size <= src.stat().st_size  # the weights were not copied into the stripped file
    stripped = onnx.load(str(dst))  # loads weights from gswa.onnx.data beside it
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in stripped.graph.initializer} == original
    with pytest.raises(ValueError):
        strip_gswa_function(src, tmp_path / "elsewhere" / "v.onnx")


def test_strip_refuses_a_graph_without_gswa(trt_pkg, tmp_path):
    pkg, _ = trt_pkg
    with pytest.raises(SleighError, match="no sleigh::GSWA node"):
        strip_gswa_function(pkg / "embed.onnx", tmp_path / "x.onnx")


# -- small pieces ---------------------------------------------------------------------------------


def test_parser_errors_on_one_line():
    class Err:  # the accessors of TensorRT's IParserError that the message uses
        def __init__(self, i):
            self.i = i

        def node_name(self):
            return f"/vision/blocks.{self.i}/Attention"

        def node_operator(self):
            return "Softmax"

        def desc(self):
            return "unsupported\ndatatype"

        def local_function_stack(self):
            return ["GSWA"] if self.i == 0 else []

    class Parser:
        num_errors = 5

        def get_error(self, i):
            return Err(i)

    text = parser_errors(Parser())
    assert "\n" not in text
    assert text.startswith("GSWA > /vision/blocks.0/Attention [Softmax]: unsupported datatype; /vision/blocks.1/")
    assert text.endswith("(+2 more)")


def test_import_is_light():
    assert heavy_imports("sleigh.engines.tensorrt_build") == []
    assert "onnx" in heavy_imports("onnx")  # the check sees a heavy import
