"""sleigh build-engine on ONNX Runtime: every precision builds, runs and is gated; INT8 is symmetric
Q/DQ; a broken engine trips the gate; TensorRT says plainly when it is missing."""

import errno
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image, ImageOps

from sleigh.engines.calibration.collect import calibrate_package
from sleigh.engines.calibration.int8 import ORT_WEIGHT_MAX
from sleigh.errors import SleighError
from sleigh.engines.accuracy import LLM_GATES, run_gate
from sleigh.engines.build_engine import _install, build_engine, int8_weight_max
from sleigh.engines.options import EngineOptions
from sleigh.runtime.cpu_features import KERNEL_FEATURES, cpu_features
from sleigh.runtime.kv_cache import HostSlots, SlotCache
from sleigh.runtime.manifest import parse_engine, read_manifest, update_manifest
from sleigh.runtime.package import MODULE_NAMES, file_entry, verify_files
from sleigh.runtime.pipeline import Pipeline

from tests.engines.helpers import check_symmetric, read_calibration_cache, scale_activation_scales
from tests.helpers import EXAMPLES, ORACLE, is_root, run_cli, snapshot


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("calib")
    cat, astro = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB"), Image.open(ORACLE / "astronaut.png").convert("RGB")
    for i, im in enumerate([cat, ImageOps.mirror(cat), astro, ImageOps.flip(astro), cat.rotate(90, expand=True),
                            astro.crop((0, 0, 300, 512))]):
        im.save(d / f"calib{i}.jpg")
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def engine_pkg(tiny_pkg, tmp_path_factory, calib_images) -> Path:
    pkg = tmp_path_factory.mktemp("engines") / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    calibrate_package(pkg, calib_images, quiet=True)
    # A random tiny model has near-flat logits, so greedy tokens flip under INT8/INT4 and the gate may
    # call those engines degraded; they are kept (allow_degraded) so every precision is built and run.
    for opts in (EngineOptions(precision="fp16", quiet=True), EngineOptions(precision="int8", allow_degraded=True, quiet=True),
                 EngineOptions(precision="fp32", llm_weights="int8", allow_degraded=True, quiet=True),
                 EngineOptions(precision="fp32", llm_weights="int4", allow_degraded=True, quiet=True, max_memory=8 * GiB),
                 EngineOptions(precision="fp32", kv_dtype="float16", allow_degraded=True, quiet=True)):
        build_engine(pkg, opts)
    return pkg


GiB = 1024**3
ENGINES = ("onnxruntime-fp16", "onnxruntime-int8", "onnxruntime-fp32-llm-int8", "onnxruntime-fp32-llm-int4")


def test_every_onnxruntime_precision_builds_registers_and_runs(engine_pkg):
    manifest = read_manifest(engine_pkg)
    assert set(ENGINES) <= set(manifest.engines)
    assert verify_files(engine_pkg, manifest) == []
    ref = Pipeline.load(engine_pkg, engine="package").generate(EXAMPLES / "coffee.jpg", max_new_tokens=6, ignore_eos=True).result
    for name in ENGINES:
        entry = manifest.engines[name]
        assert entry.accuracy["pairs"] and len(entry.accuracy["pairs"]) >= 5
        assert {"versions", "build_options", "shapes", "files"} <= set(entry.json)
        res = Pipeline.load(engine_pkg, engine=name).generate(EXAMPLES / "coffee.jpg", max_new_tokens=6, ignore_eos=True).result
        assert name in res.backend and len(res.token_ids) == 6
        np.testing.assert_allclose(res.gswa_weights, ref.gswa_weights, atol=0.25)  # INT8 vision moves them most
    assert manifest.engines["onnxruntime-fp16"].accuracy_passed  # FP16 must pass its gate outright
    fp16 = manifest.engines["onnxruntime-fp16"]
    assert fp16.build_options == EngineOptions(precision="fp16").to_json()  # as given, recorded once
    assert fp16.versions == {k: v for k, v in manifest.created_by.items() if k != "torch"}  # one versions(): the export's less torch
    assert fp16.json["shapes"] == {"max_views": 13, "max_context": manifest.contract.generation.context_length}  # 12 tiles + thumbnail
    for name in ENGINES:
        assert manifest.engines[name].degraded == (not manifest.engines[name].accuracy["passed"])


def test_an_engine_keeps_its_memory_budget_and_refuses_one_it_cannot_load(engine_pkg, tiny_pkg, tmp_path, monkeypatch,
                                                                          capsys):
    from sleigh.runtime.backends import rebuild_command

    name = "onnxruntime-fp32-llm-int4"
    entry = read_manifest(engine_pkg).engines[name]
    assert entry.max_memory == 8 * GiB and json.loads(json.dumps(entry.to_json()))["max_memory"] == 8 * GiB
    assert "--max-memory 8G " in rebuild_command(engine_pkg, entry)  # as the flag reads it, not in bytes
    with Pipeline.load(engine_pkg, engine=name) as own, Pipeline.load(engine_pkg, engine=name, max_memory="64G") as given, \
            Pipeline.load(engine_pkg, engine="onnxruntime-fp32-llm-int8") as without:
        assert (own.budget.limit, given.budget.limit, without.budget) == (8 * GiB, 64 * GiB, None)
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    before = snapshot(pkg)
    code, err = run_cli(monkeypatch, capsys, "build-engine", pkg, "--precision", "fp32", "--max-memory", "100M")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --max-memory 0.10 GB | the model alone needs"), err
    assert snapshot(pkg) == before  # nothing registered, nothing left behind


def test_precision_really_changes_the_files(engine_pkg):
    manifest = read_manifest(engine_pkg)
    ops = lambda rel: {n.op_type for n in onnx.load(str(engine_pkg / rel), load_external_data=False).graph.node}  # noqa: E731
    fp16 = onnx.load(str(engine_pkg / manifest.engines["onnxruntime-fp16"].modules["vision"]))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [onnx.TensorProto.FLOAT]  # FP32 I/O
    # the FP16 decoder keeps FP32 I/O except the KV cache, FP16 in and out (no cast of the cache per step)
    dec = onnx.load(str(engine_pkg / manifest.engines["onnxruntime-fp16"].modules["decoder"]), load_external_data=False)
    io = {v.name: v.type.tensor_type.elem_type for v in (*dec.graph.input, *dec.graph.output)}
    kv = {n: t for n, t in io.items() if n.startswith(("past_key_values.", "new_key_values."))}
    assert kv and set(kv.values()) == {onnx.TensorProto.FLOAT16}
    assert io["inputs_embeds"] == io["attention_bias"] == io["logits"] == onnx.TensorProto.FLOAT
    assert not [n for n in dec.graph.node if n.op_type == "Cast" and set(n.input) & set(kv)]
    # INT4 decoder: every weight MatMul 4-bit but the one producing the logits, 8-bit (LM_HEAD_BITS)
    int4 = onnx.load(str(engine_pkg / manifest.engines["onnxruntime-fp32-llm-int4"].modules["decoder"]),
                     load_external_data=False)
    producers = {o: n for n in int4.graph.node for o in n.output}
    head = producers["logits"]
    while head.op_type != "MatMulNBits":
        head = producers[head.input[0]]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in int4.graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop(head.name) == 8 and bits and set(bits.values()) == {4}
    assert not [n for n in int4.graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in int4.graph.initializer}]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(manifest.engines["onnxruntime-int8"].modules["vision"])
    sizes = {n: manifest.engines[n].files_bytes for n in ENGINES}
    assert sizes["onnxruntime-fp32-llm-int4"] < sizes["onnxruntime-fp32-llm-int8"]


class Float16RoundedSlots(HostSlots):
    """float32 slots that hold each key/value rounded to float16: the FP32 package computing on what
    float16 slots keep (the reference for an engine with --kv-dtype float16)."""

    def copy(self, layout, dst, dst_capacity, dst_slot, src, src_capacity, src_slot, count):
        dst[:, :, dst_slot:dst_slot + count] = src[:, :, src_slot:src_slot + count].astype(np.float16)


def test_kv_dtype_float16_halves_the_slots_and_keeps_the_fp32_tokens(engine_pkg):
    manifest, name = read_manifest(engine_pkg), "onnxruntime-fp32-kv-fp16"
    kv_dtypes = {n: manifest.engines[n].kv_dtype for n in (name, "onnxruntime-fp16", "onnxruntime-fp32-llm-int8")}
    assert kv_dtypes == {name: "float16", "onnxruntime-fp16": "float16", "onnxruntime-fp32-llm-int8": "float32"}
    dec = onnx.load(str(engine_pkg / manifest.engines[name].modules["decoder"]), load_external_data=False)
    io = {v.name: v.type.tensor_type.elem_type for v in (*dec.graph.input, *dec.graph.output)}
    kv = {n for n in io if n.startswith(("past_key_values.", "new_key_values."))}
    assert kv and {io[n] for n in kv} == {onnx.TensorProto.FLOAT16}
    assert {t for n, t in io.items() if n not in kv} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert not [t for t in dec.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]  # weights stay float32

    image, prompt, chunk = EXAMPLES / "coffee.jpg", "Describe the image in detail.", 40  # later chunks read the slots
    with Pipeline.load(engine_pkg, engine="package") as ref, Pipeline.load(engine_pkg, engine=name) as eng:
        ref.prefill_chunk = eng.prefill_chunk = chunk
        got = eng.prefill(image, prompt)
        assert len(got.ids) > 2 * chunk
        assert {b.dtype for b in got.cache.slots.values()} == {np.dtype(np.float16)}  # the slots hold half the bytes
        want = ref.prefill(image, prompt)
        kv_cache = manifest.contract.kv_cache
        ref.backend.new_cache = lambda batch=1: SlotCache(list(kv_cache.past), batch, kv_cache.num_kv_heads,
                                                          kv_cache.head_dim, storage=Float16RoundedSlots())
        rounded = ref.prefill(image, prompt)
        del ref.backend.new_cache
        # the same float32 arithmetic on the same float16-rounded slots: equal up to float32 reordering
        np.testing.assert_allclose(got.logits, rounded.logits, rtol=1e-4, atol=1e-4 * np.abs(rounded.logits).max())
        # against the float32 slots: the FP32 gate's own logits threshold, and the same top-1
        cos = float((got.logits.ravel() @ want.logits.ravel()) / (np.linalg.norm(got.logits) * np.linalg.norm(want.logits)))
        assert cos >= LLM_GATES["fp32"]["logits_cos_min"] and got.logits.argmax() == want.logits.argmax()
        assert np.abs(got.logits - want.logits).max() > 0  # the slots really were rounded
        tokens = [p.generate(image, prompt, max_new_tokens=12, ignore_eos=True).result.token_ids for p in (ref, eng)]
        assert tokens[0] == tokens[1]
    with Pipeline.load(engine_pkg, engine=name, max_memory="64G") as budgeted:  # the memory model counts these slots
        assert budgeted.budget.shapes.kv_bytes(len(got.ids)) == sum(b.nbytes for b in got.cache.slots.values())


def test_int8_vision_is_symmetric_per_channel_qdq(engine_pkg):
    manifest = read_manifest(engine_pkg)
    path = engine_pkg / manifest.engines["onnxruntime-int8"].modules["vision"]
    assert check_symmetric(path) == []
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(np.all(z == 0) for z in zero_points)
    per_channel = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in inits and inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1]
    assert per_channel, "weights should carry one scale per output channel"
    ln_inputs = {i for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax") for i in n.input}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert not any(producers.get(i) == "DequantizeLinear" for i in ln_inputs), "norms and softmax stay in float"


def test_calibration_cache_is_in_the_manifest(engine_pkg):

    cal = read_manifest(engine_pkg).calibration
    assert cal.skipped == 1 and cal.num_images == 6
    header, scales = read_calibration_cache(engine_pkg / "calibration" / "vision.calib.cache")
    assert header.startswith("TRT-") and header.endswith("EntropyCalibration2") and scales


def test_inspect_shows_the_calibration_and_what_each_engine_was_built_for(engine_pkg, capsys):
    from sleigh.engines.inspect import inspect_package, print_report
    from sleigh.runtime.image import max_views

    image = read_manifest(engine_pkg).contract.image
    report = inspect_package(engine_pkg)
    assert report["calibration"]["method"] == "entropy"
    assert (report["calibration"]["num_images"], report["calibration"]["skipped"]) == (6, 1)  # calib_images: one is broken
    int4 = report["engines"]["onnxruntime-fp32-llm-int4"]
    assert int4["max_memory"] == 8 * GiB and int4["built_for"]["max_views"] == max_views(image.max_tiles, image.thumbnail)
    assert report["engines"]["onnxruntime-fp16"]["max_memory"] is None
    assert report["engines"]["onnxruntime-int8"]["build_record"]["int8_weight_max"] == ORT_WEIGHT_MAX
    print_report(report)
    out = capsys.readouterr().out
    assert "calibration: entropy on 6 images (1 skipped)" in out
    assert re.search(r"\b8G\b", out) and "8.00" not in out, out  # --max-memory 8G, as given (it read 8.6 GB, then 8.00 GB)


@pytest.mark.slow
def test_the_gate_trips_on_a_broken_engine(engine_pkg, tmp_path):
    from sleigh.engines.accuracy import VISION_GATES

    pkg = tmp_path / "pkg"
    shutil.copytree(engine_pkg, pkg)
    rel = read_manifest(pkg).engines["onnxruntime-int8"].modules["vision"]
    scale_activation_scales(pkg / rel, pkg / rel, 1 / 100)

    def as_built(manifest: dict) -> None:  # as if the build had written it so: runs pass the integrity check
        manifest["files"][rel] = manifest["engines"]["onnxruntime-int8"]["files"][rel] = file_entry(pkg, rel)

    update_manifest(pkg, as_built)
    report = run_gate(pkg, "onnxruntime-int8", num_pairs=1)  # broken on any image; `compare` below runs all pairs
    assert not report["passed"]
    failed = {c["metric"] for c in report["checks"] if not c["ok"]}
    assert "embeddings_cos_min" in failed
    good = read_manifest(engine_pkg).engines["onnxruntime-int8"].accuracy  # its build's gate run
    assert good["metrics"]["embeddings_cos_min"] >= VISION_GATES["int8"]["embeddings_cos_min"]  # within the INT8 gate
    assert report["metrics"]["embeddings_cos_min"] < good["metrics"]["embeddings_cos_min"] - 0.05
    proc = subprocess.run([sys.executable, "-m", "sleigh.cli", "compare", str(pkg), "--engine", "onnxruntime-int8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "FAIL" in proc.stdout


def test_the_decoder_is_judged_no_tighter_than_the_vision_engine_it_reads():
    """INT8 vision with FP32 decoder weights: the decoder's outputs carry INT8 vision's drift, so its
    token floor is INT8's, not FP32's; an FP32 engine keeps FP32's."""
    from sleigh.engines.accuracy import LLM_GATES, PairResult, summarize

    pair = PairResult("a.jpg", "hi", 3, 0.9995, 0.9995, 0.2, 0.99998, True, 12)  # 12 of NUM_TOKENS (32) agree
    tokens = {(p, w): next(c for c in summarize([pair], p, w)["checks"] if c["metric"] == "tokens")
              for p, w in (("int8", "fp32"), ("fp32", "fp32"), ("int8", "int4"))}
    assert tokens["int8", "fp32"]["threshold"] == LLM_GATES["int8"]["tokens"] and tokens["int8", "fp32"]["ok"]
    assert tokens["fp32", "fp32"]["threshold"] == LLM_GATES["fp32"]["tokens"] and not tokens["fp32", "fp32"]["ok"]
    assert tokens["int8", "int4"]["threshold"] == min(LLM_GATES["int8"]["tokens"], LLM_GATES["int4"]["tokens"])


def one_pair_gate(monkeypatch):
    """The gate on one image/prompt pair: enough to fail it on purpose, a fifth of its time."""
    import sleigh.engines.accuracy as accuracy

    gate = accuracy.run_gate
    monkeypatch.setattr(accuracy, "run_gate", lambda *args, **kwargs: gate(*args, **{**kwargs, "num_pairs": 1}))


def test_a_failed_gate_registers_nothing(tiny_pkg, tmp_path, monkeypatch):
    import sleigh.engines.accuracy as accuracy

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    monkeypatch.setitem(accuracy.VISION_GATES, "fp16", {"embeddings_cos_min": 1.01, "gswa_max_abs": 0.0})
    one_pair_gate(monkeypatch)
    with pytest.raises(SleighError, match="accuracy gate failed"):
        build_engine(pkg, EngineOptions(precision="fp16", quiet=True))
    assert read_manifest(pkg).engines == {}
    assert not (pkg / "engines" / "onnxruntime-fp16").exists()
    assert not [p for p in (pkg / "engines").iterdir()] if (pkg / "engines").exists() else True


def test_install_moves_every_staged_path_and_lists_the_plugin_library(tiny_pkg, tmp_path):
    """A TensorRT entry names its plans, sources and GSWA plugin library in the staging folder while it
    is gated; once installed, each is under engines/<name>/ and listed with its sha256."""
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    tmp = pkg / "engines" / ".trt.tmp-1"
    (tmp / "plugin").mkdir(parents=True)
    plans = [f"{m}.plan" for m in MODULE_NAMES]
    for rel, data in (*((p, b"plan") for p in plans), ("vision.onnx", b"onnx"), ("plugin/libgswa.so", b"\x7fELF")):
        (tmp / rel).write_bytes(data)
    staged = "engines/.trt.tmp-1"
    entry = parse_engine(pkg, "trt", {"name": "trt", "backend": "tensorrt", "precision": "fp16", "dir": staged,
                                      "modules": {m: f"{staged}/{m}.plan" for m in MODULE_NAMES},
                                      "sources": {"vision": f"{staged}/vision.onnx", "embed": "embed.onnx"},
                                      "gswa": {"via": "plugin", "plugin_library": f"{staged}/plugin/libgswa.so"}})
    files = [*(f"{staged}/{p}" for p in plans), f"{staged}/vision.onnx", f"{staged}/plugin/libgswa.so"]
    _install(pkg, tmp, pkg / "engines" / "trt", "trt", entry, staged, files)
    installed = read_manifest(pkg).engines["trt"]
    assert installed.modules == {m: f"engines/trt/{m}.plan" for m in MODULE_NAMES}
    assert installed.json["sources"] == {"vision": "engines/trt/vision.onnx", "embed": "embed.onnx"}  # outside: unchanged
    assert installed.plugin_library == "engines/trt/plugin/libgswa.so"
    assert installed.json["files"]["engines/trt/plugin/libgswa.so"] == file_entry(pkg, "engines/trt/plugin/libgswa.so")
    assert verify_files(pkg, read_manifest(pkg)) == [] and not tmp.exists()


def test_int8_without_calibration_and_bad_options_are_clear(tiny_pkg, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    with pytest.raises(SleighError, match="sleigh calibrate"):
        build_engine(pkg, EngineOptions(precision="int8", quiet=True))
    with pytest.raises(SleighError, match="fp32 \\| fp16 \\| int8"):
        EngineOptions(precision="int3")
    with pytest.raises(SleighError, match="max-tiles"):
        build_engine(pkg, EngineOptions(precision="fp16", max_tiles=99, quiet=True))


def test_auto_picks_the_best_gated_engine(engine_pkg):
    from sleigh.runtime.backends import ranked_engines

    best_engine = lambda m, backend, device: next(iter(ranked_engines(m, backend, device)), None)  # noqa: E731

    manifest = read_manifest(engine_pkg)
    passed = replace(manifest, engines={n: replace(e, accuracy_passed=True) for n, e in manifest.engines.items()})
    assert best_engine(passed, "onnxruntime", "cpu") == "onnxruntime-int8"
    assert best_engine(passed, "onnxruntime", "cuda") == "onnxruntime-fp16"
    only_fp16 = replace(manifest, engines={n: replace(e, accuracy_passed=n == "onnxruntime-fp16")
                                           for n, e in manifest.engines.items()})
    assert best_engine(only_fp16, "onnxruntime", "cpu") == "onnxruntime-fp16"  # degraded engines are never picked
    assert best_engine(replace(manifest, engines={}), "onnxruntime", "cpu") is None
    expected = best_engine(manifest, "onnxruntime", "cpu")
    assert expected in Pipeline.load(engine_pkg).backend.describe()
    with pytest.raises(SleighError, match="^--name onnxruntime-fp16 .* 'onnxruntime' engine of that name"):
        build_engine(engine_pkg, EngineOptions(backend="tensorrt", name="onnxruntime-fp16"))  # refused before building


def test_tensorrt_missing_is_one_line(tiny_pkg, tmp_path):
    pytest.importorskip("sleigh.engines.tensorrt_build")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "sleigh.cli", "build-engine", str(tiny_pkg), "--backend", "tensorrt"],
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "TensorRT" in lines[0] and "Traceback" not in proc.stderr


def test_weight_only_under_an_onnxruntime_too_old_to_build_them_is_one_line(tiny_pkg, monkeypatch):
    """INT8/INT4 decoder weights need the quantizer of onnxruntime >= 1.31 (1.22's takes other
    arguments and failed with a TypeError deep inside); an FP16 build is not refused."""
    import onnxruntime

    from sleigh.engines import build_engine as be

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    for weights in ("int4", "int8"):
        with pytest.raises(SleighError, match=r"onnxruntime 1\.22\.1 \| INT8/INT4 decoder weights .* pip install 'onnxruntime>=1\.31\.0'"):
            be.build_engine(tiny_pkg, EngineOptions(precision="fp32", llm_weights=weights, quiet=True))
    monkeypatch.setattr(onnxruntime, "__version__", "1.31.1")
    be._check_weight_only_quantizer()  # the floor itself builds


def test_inspect_lists_engines(engine_pkg):
    proc = subprocess.run([sys.executable, "-m", "sleigh.cli", "inspect", str(engine_pkg), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(ENGINES) <= set(report["engines"])
    # the slots `auto` weighs (DESIGN, "Precision"): float16 in an FP16 decoder, float32 in the others
    assert {n: report["engines"][n]["kv_dtype"] for n in ENGINES} == {
        "onnxruntime-fp16": "float16", "onnxruntime-int8": "float32", "onnxruntime-fp32-llm-int8": "float32",
        "onnxruntime-fp32-llm-int4": "float32"}


def test_a_failed_rebuild_keeps_the_engine_that_was_there(engine_pkg, tmp_path, monkeypatch):
    import sleigh.engines.accuracy as accuracy

    pkg = tmp_path / "pkg"
    shutil.copytree(engine_pkg, pkg)  # its FP16 engine passed its gate when it was built
    first = read_manifest(pkg).engines["onnxruntime-fp16"]
    engines = sorted(p.name for p in (pkg / "engines").iterdir())
    monkeypatch.setitem(accuracy.VISION_GATES, "fp16", {"embeddings_cos_min": 1.01, "gswa_max_abs": 0.0})
    one_pair_gate(monkeypatch)
    with pytest.raises(SleighError, match="accuracy gate failed"):
        build_engine(pkg, EngineOptions(precision="fp16", force=True, quiet=True))
    manifest = read_manifest(pkg)
    assert manifest.engines["onnxruntime-fp16"].json["files"] == first.json["files"]
    assert verify_files(pkg, manifest) == []
    assert sorted(p.name for p in (pkg / "engines").iterdir()) == engines


def test_int8_passes_its_gate_and_says_what_it_assumes(engine_pkg):
    """calibrate, then build-engine --precision int8: its embeddings and LLM checks pass on any x86
    CPU with AVX2 (7-bit weights keep ONNX Runtime's u8s8 kernels from saturating without VNNI).
    GSWA's weights may fail it: on this random model (seed 1) they moved by up to 0.14 from FP32 even
    with exact 8-bit arithmetic (measured with the fusions off, against the gate's earlier 0.1),
    because the views' CLS features are nearly alike; the floor is now set on the trained demo model."""
    entry = read_manifest(engine_pkg).engines["onnxruntime-int8"]
    failed = [c for c in entry.accuracy["checks"] if not c["ok"]]
    assert {c["metric"] for c in failed} <= {"gswa_max_abs"}, failed
    assert entry.json["cpu"] == {"machine": platform.machine(), "features": cpu_features()}
    assert entry.json["int8_weight_max"] == int8_weight_max("onnxruntime") == 63
    model = onnx.load(str(engine_pkg / entry.modules["vision"]))
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
               and t.dims]  # the quantized weights (zero points are scalars or int8 zeros)
    assert weights and max(int(abs(w.astype(int)).max()) for w in weights) == 63


def test_the_runtime_warns_once_when_this_cpu_lacks_a_gated_feature(engine_pkg, tmp_path, caplog):
    pkg = tmp_path / "pkg"
    shutil.copytree(engine_pkg, pkg)
    lacking = next(f for f in KERNEL_FEATURES if f not in (cpu_features() or []))
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["engines"]["onnxruntime-int8"]["cpu"]["features"].append(lacking)
    (pkg / "manifest.json").write_text(json.dumps(manifest))

    def cpu_warnings() -> list[str]:  # the engine may also be warned about as degraded: not this test's concern
        return [r.getMessage() for r in caplog.records
                if r.name == "sleigh" and r.levelno == logging.WARNING and "on a CPU with" in r.getMessage()]

    Pipeline.load(engine_pkg, engine="onnxruntime-int8")  # gated here: nothing to say
    assert cpu_warnings() == []
    Pipeline.load(pkg, engine="onnxruntime-int8")
    warned = cpu_warnings()
    assert len(warned) == 1 and warned[0].startswith("engine onnxruntime-int8") and lacking in warned[0]


@pytest.fixture(scope="module")
def external_pkg(tiny_pkg, tmp_path_factory) -> Path:
    """An FP16 engine whose modules keep their weights in .onnx.data files (as at full size), built
    under umask 027."""
    import sleigh.onnx_files as onnx_files

    pkg = tmp_path_factory.mktemp("external") / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    mp = pytest.MonkeyPatch()
    mp.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 0)
    one_pair_gate(mp)  # these tests are about the files, not the gate
    old = os.umask(0o027)
    try:
        build_engine(pkg, EngineOptions(precision="fp16", allow_degraded=True, quiet=True))
    finally:
        os.umask(old)
        mp.undo()
    return pkg


def test_engine_files_get_the_umask_mode_external_data_included(external_pkg):
    folder = external_pkg / "engines" / "onnxruntime-fp16"
    data = sorted(p.name for p in folder.glob("*.onnx.data"))
    assert data, "the fixture should have written external data"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o640}, modes  # onnx writes .onnx.data 0600 by itself
    assert stat.S_IMODE((external_pkg / "manifest.json").stat().st_mode) == 0o640


def test_an_unreadable_module_is_a_permission_error_not_corruption(external_pkg, monkeypatch):
    import onnxruntime as ort

    entry = read_manifest(external_pkg).engines["onnxruntime-fp16"]
    module = external_pkg / entry.modules["vision"]
    data = module.with_name(module.name + ".data")
    assert data.is_file()
    if is_root():  # root reads through chmod: make ONNX Runtime fail as it does for another user
        real_access, real_session = os.access, ort.InferenceSession
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != data and real_access(p, mode, **kw))

        def session(path, *args, **kwargs):
            if Path(path) == module:
                raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : open file {data} failed: Permission denied")
            return real_session(path, *args, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", session)
    else:
        data.chmod(0)
    try:
        with pytest.raises(SleighError, match="permission denied") as err:
            Pipeline.load(external_pkg, engine="onnxruntime-fp16")
    finally:
        data.chmod(0o640)
    assert str(data) in str(err.value) and "intact" not in str(err.value) and "verify" not in str(err.value)


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))  # as write() raises it on a full disk: no file name
    return fail


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                        (errno.EROFS, "read-only file system (EROFS)"),
                                        (errno.EACCES, "permission denied")])
def test_a_full_disk_or_read_only_package_is_one_user_error_and_changes_nothing(tiny_pkg, tmp_path, monkeypatch, capsys,
                                                                                  code, says):
    """The FP16 conversion's save fails (a full disk mid-build; a read-only package where the
    staging folder could still be made, as for root): one line, rc 2, nothing left behind."""
    import sleigh.engines.build_engine as be

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    (pkg / "engines").mkdir()
    before = snapshot(pkg)
    monkeypatch.setattr(be, "save_onnx", _fail_with(code))
    rc, lines = run_cli(monkeypatch, capsys, "build-engine", pkg, "--precision", "fp16")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {pkg / 'engines'} | ") and says in lines[0]
    assert snapshot(pkg) == before and list((pkg / "engines").iterdir()) == []


def test_a_full_disk_while_onnx_runtime_saves_its_optimized_copy_is_named(tiny_pkg, tmp_path, monkeypatch, capsys):
    """ONNX Runtime writes the offline-optimized module itself and fails with its own error type on a
    full disk: build-engine still says ENOSPC in one line and leaves the package as it was."""
    import collections

    import onnxruntime

    import sleigh.engines.build_engine as be

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    before = snapshot(pkg)
    real = onnxruntime.InferenceSession

    def session(path, sess_options=None, **kwargs):
        if sess_options is not None and sess_options.optimized_model_filepath:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Failed to save the optimized model")  # as ORT does
        return real(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(be.shutil, "disk_usage", lambda p: collections.namedtuple("usage", "total used free")(1, 1, 0))
    rc, lines = run_cli(monkeypatch, capsys, "build-engine", pkg, "--precision", "fp16")
    assert rc == 2 and len(lines) == 1 and "no space left on device (ENOSPC)" in lines[0], lines
    assert snapshot(pkg) == before
    assert not (pkg / "engines").exists() or list((pkg / "engines").iterdir()) == []  # no staging left behind


def test_a_read_only_package_stops_before_anything_is_built(tiny_pkg, tmp_path, monkeypatch, capsys):
    import tempfile

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    before = snapshot(pkg)
    if is_root():  # root writes through chmod: the staging folder's creation fails as it would
        monkeypatch.setattr(tempfile, "mkdtemp", _fail_with(errno.EROFS))
        says = "read-only file system (EROFS)"
    else:
        for p in (pkg, *pkg.rglob("*")):
            p.chmod(p.stat().st_mode & ~0o222)
        says = "permission denied (EACCES)"
    try:
        rc, lines = run_cli(monkeypatch, capsys, "build-engine", pkg, "--precision", "fp16")
    finally:
        for p in (pkg, *pkg.rglob("*")):
            p.chmod(p.stat().st_mode | 0o200)
    assert rc == 2 and len(lines) == 1 and says in lines[0], lines
    assert snapshot(pkg) == before


def test_an_onnxruntime_engine_keeps_the_tiles_and_context_it_was_built_for(tiny_pkg, tmp_path):
    """--max-tiles 2 --max-context 1000 were recorded and never applied: a run tiled the photo into 7
    views and took prompts past 1000 tokens. Now a run tiles within the engine's views by default,
    refuses more tiles asked for, and holds prompt + answer to its context."""
    from sleigh.runtime.pipeline import ContextExceeded

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    entry = build_engine(pkg, EngineOptions(precision="fp32", name="small", max_tiles=2, max_context=1000,
                                            allow_degraded=True, quiet=True))
    assert (entry.max_views, entry.max_context) == (3, 1000)
    photo = EXAMPLES / "chelsea.jpg"
    with Pipeline.load(pkg, engine="package") as whole:
        assert whole.generate(photo, "hi", max_new_tokens=1).result.views > 3  # the model alone cuts it finer
    with Pipeline.load(pkg, engine="small") as pipe:
        assert (pipe.max_tiles, pipe.context_length) == (2, 1000)
        assert pipe.generate(photo, "hi", max_new_tokens=1).result.views == 3  # 2 tiles and the thumbnail
        with pytest.raises(SleighError, match="max_tiles \\| got 3, above the maximum of 2 engine small was built for"):
            pipe.generate(photo, "hi", max_new_tokens=1, max_tiles=3)
        with pytest.raises(ContextExceeded, match="exceed the context of 1000 engine small was built for") as e:
            pipe.generate(None, "hi", max_new_tokens=1000).result
        assert f"(engine package), whose context is {pipe.contract.generation.context_length}" in str(e.value)


def test_a_context_too_short_for_the_gate_is_refused_before_converting(tiny_pkg, tmp_path, monkeypatch):
    """--max-tiles 2 --max-context 800 held the image tokens (768) but not the gate's prompt with them:
    the build converted every module, then failed at its gate naming Python parameters."""
    from sleigh.engines import build_engine as build_mod

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    monkeypatch.setattr(build_mod, "convert_module", lambda *a, **k: pytest.fail("converted before the check"))
    with pytest.raises(SleighError) as e:
        build_engine(pkg, EngineOptions(precision="fp16", max_tiles=2, max_context=800, quiet=True))
    assert str(e.value).startswith("--max-context 800 | the accuracy gate's prompts with 3 views take up to "), str(e.value)
    assert "a smaller --max-tiles" in str(e.value)
