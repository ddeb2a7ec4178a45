"""sleigh export: ONNX validity, the GSWA custom node and function, parity, manifest, errors."""

import json
import shutil
import subprocess
import sys


import numpy as np
import onnx
import pytest
import torch

from sleigh.errors import SleighError
from sleigh.export import gswa_op
from sleigh.export.exporter import ExportOptions, export_package
from sleigh.export.parity import verify_package
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.package import verify_files
from sleigh.runtime.pipeline import Pipeline
from sleigh.sleighvl.checkpoint import load_checkpoint
from sleigh.sleighvl.config import SleighVLConfig

from tests.helpers import EXAMPLES, ORACLE, one_error_line

MODULES = ("vision", "gswa", "embed", "decoder")


def test_every_module_passes_the_full_onnx_checker(tiny_pkg):
    for m in MODULES:
        onnx.checker.check_model(str(tiny_pkg / f"{m}.onnx"), full_check=True)


def test_io_names_and_symbolic_shapes_match_the_design(tiny_ckpt, tiny_pkg):
    manifest = read_manifest(tiny_pkg)
    dec = manifest.modules["decoder"]
    names = dec.names("inputs")
    assert names[:4] == ["inputs_embeds", "attention_mask", "attention_bias", "position_ids"]
    assert names[4:6] == ["past_key_values.0.key", "past_key_values.0.value"]
    ins = {i.name: i.shape for i in dec.inputs}
    assert ins["past_key_values.0.key"][2] == "cache_slots"
    outs = {o.name: o.shape for o in dec.outputs}
    vocab = SleighVLConfig.load(tiny_ckpt / "config.json").llm.vocab_size
    assert outs["logits"] == ("batch", 1, vocab)  # the last position only
    assert outs["new_key_values.0.key"][2] == "sequence"  # the new positions only, never the whole cache
    kv = manifest.contract.kv_cache
    assert kv.past == tuple(names[4:]) and kv.new == tuple(dec.names("outputs")[1:])  # new[i] goes into past[i]
    assert manifest.schema_version == 7
    vis, gswa = manifest.modules["vision"], manifest.modules["gswa"]
    assert vis.inputs[0].shape[0] == "views"
    assert vis.names("outputs") == ["image_embeds", "cls_tokens"]  # per view: the runtime may chunk the views
    assert gswa.names("inputs") == ["cls_tokens"] and gswa.names("outputs") == ["gswa_weights"]
    assert gswa.inputs[0].shape[0] == "views"
    assert manifest.modules["embed"].inputs[1].shape[0] == "image_rows"


def test_gswa_is_one_custom_node_with_a_standard_function(tiny_pkg):
    assert not [n for n in onnx.load(str(tiny_pkg / "vision.onnx")).graph.node if n.op_type == "GSWA"]
    model = onnx.load(str(tiny_pkg / "gswa.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "GSWA"]
    assert len(nodes) == 1
    node = nodes[0]
    assert node.domain == "sleigh"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"sleigh" and attrs["heads"] == 2 and attrs["num_blocks"] == 1
    assert attrs["eps"] == pytest.approx(1e-6)
    assert len(node.input) == 1 + len(gswa_op.input_names(1))
    fns = [f for f in model.functions if f.name == "GSWA" and f.domain == "sleigh"]
    assert len(fns) == 1
    fn = fns[0]
    assert {n.domain for n in fn.node} <= {""}, "function body must use default-domain ops only"
    model_opset = {o.domain: o.version for o in model.opset_import}
    assert {o.domain: o.version for o in fn.opset_import}[""] == model_opset[""]
    assert model_opset["sleigh"] == 1
    # no other node of the main graph is custom
    assert {n.domain for n in model.graph.node if n.op_type != "GSWA"} <= {""}


def test_gswa_function_alone_matches_torch(tmp_path):
    """The function body, run by ONNX Runtime in a one-node model, equals gswa_weights() in PyTorch."""
    import onnxruntime as ort

    from sleigh.sleighvl.config import GSWAConfig
    from sleigh.sleighvl.gswa import GSWA

    torch.manual_seed(0)
    g = GSWA(GSWAConfig(hidden_size=48, num_layers=3, num_heads=4), vision_hidden=24)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.3)
        g.alpha.fill_(0.7)
    names = gswa_op.input_names(len(g.blocks))
    params = dict(g.named_parameters())
    opset = 18
    inputs = [onnx.helper.make_tensor_value_info("cls", onnx.TensorProto.FLOAT, ["T", 24])]
    inits = [onnx.numpy_helper.from_array(params[n].detach().numpy(), n.replace(".", "_")) for n in names]
    node = onnx.helper.make_node("GSWA", ["cls"] + [n.replace(".", "_") for n in names], ["w"], domain="sleigh",
                                 **{k: v for k, v in gswa_op.attributes(g).items()})
    graph = onnx.helper.make_graph([node], "g", inputs, [onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, ["T"])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid("sleigh", 1)],
                                   functions=[gswa_op.build_function(len(g.blocks), opset)],
                                   ir_version=10)  # what the exporter writes; onnx's default outruns older onnxruntimes
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for T in (1, 2, 5, 13):
        cls = torch.randn(T, 24)
        got = sess.run(None, {"cls": cls.numpy()})[0]
        with torch.no_grad():
            ref = g(cls).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
        if T > 2:
            assert np.abs(ref[:-1] - 1).max() > 1e-3  # weights really vary: the test can tell
            assert ref[-1] == 1.0


def test_parity_report_covers_the_required_cases_and_passes(tiny_pkg):
    parity = read_manifest(tiny_pkg).parity
    assert parity["passed"]
    cases = {c["case"] for c in parity["checks"]}
    assert {"vision random T=1", "vision random T=13", "gswa random T=1", "gswa random T=13", "decoder prefill (no cache)", "decoder decode step 1 (slots)",
            "decoder decode step 2 (slots)", "decoder prefill B=2 left padding (no cache)", "decoder random B=2 slots 8"} <= cases
    outputs = {(c["case"], c["output"]) for c in parity["checks"]}
    assert ("decoder decode step 2 (slots)", "new_key_values.1.value") in outputs
    for c in parity["checks"]:
        assert {"max_abs", "mean_abs", "cosine", "needed_atol", "atol"} <= set(c)


def test_parity_fails_when_the_onnx_and_torch_disagree(tiny_ckpt, tiny_pkg):
    model, _, _ = load_checkpoint(tiny_ckpt)
    with torch.no_grad():
        model.llm.layers[0].mlp.down_proj.weight.mul_(1.1)
        model.gswa.alpha.fill_(0.5)
    results = verify_package(tiny_pkg, model, EXAMPLES / "chelsea.jpg")
    bad = {(r.case, r.output) for r in results if not r.ok}
    assert ("decoder prefill (no cache)", "logits") in bad
    assert ("gswa random T=13", "gswa_weights") in bad
    assert ("vision random T=13", "image_embeds") not in bad
    assert ("embed random B=2", "inputs_embeds") not in bad


def test_manifest_lists_versions_hashes_and_settings(tiny_pkg, tiny_ckpt):
    import hashlib

    m = read_manifest(tiny_pkg)
    assert set(m.created_by) == {"sleigh", "torch", "onnx", "onnxruntime", "python"}
    # what it was exported from (under xdist another worker's copy of the same seed's checkpoint)
    for key, name in (("weights_sha256", "model.safetensors"), ("config_sha256", "config.json")):
        assert m.source[key] == hashlib.sha256((tiny_ckpt / name).read_bytes()).hexdigest()
    assert m.source["checkpoint"].endswith(tiny_ckpt.name) and "trained" not in m.source
    assert m.opset == 18
    assert m.contract.image.max_tiles == 12 and m.contract.image.size == 448
    assert m.contract.prompt.tokens_per_view == 256
    assert set(m.files) == {"vision.onnx", "gswa.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json"}
    assert verify_files(tiny_pkg, m) == []


def test_greedy_tokens_from_the_package_equal_the_reference_multi_tile_with_gswa(tiny_ckpt, tiny_pkg):
    from sleigh.export.parity import tolerance

    ref = Pipeline.load(tiny_ckpt).generate(EXAMPLES / "chelsea.jpg", max_new_tokens=16, ignore_eos=True).result
    got = Pipeline.load(tiny_pkg).generate(EXAMPLES / "chelsea.jpg", max_new_tokens=16, ignore_eos=True).result
    assert ref.views > 2
    assert max(abs(w - 1) for w in ref.gswa_weights) > 0.05, "GSWA must be active for this test to mean anything"
    np.testing.assert_allclose(got.gswa_weights, ref.gswa_weights, atol=tolerance("gswa_weights")[0])  # the parity table's
    assert got.token_ids == ref.token_ids
    assert got.backend.startswith("onnxruntime") and ref.backend == "torch"


def test_converted_oracle_exported_gives_the_oracle_tokens(tmp_path):
    from sleigh.sleighvl.convert import convert

    expected = json.loads((ORACLE / "expected.json").read_text())["astronaut"]
    convert(ORACLE / "internvl2-tiny", tmp_path / "ckpt", gswa="identity")
    export_package(tmp_path / "ckpt", tmp_path / "pkg", ExportOptions(quiet=True))
    result = Pipeline.load(tmp_path / "pkg").generate(ORACLE / "astronaut.png", "Describe the image in detail.",
                                                      max_new_tokens=12, ignore_eos=True).result
    assert result.prompt_tokens == expected["num_input_ids"]
    assert result.token_ids == expected["greedy_12_no_eos_ids"]


def test_inspect_verify_names_a_changed_file(tiny_pkg, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    with open(pkg / "embed.onnx", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    proc = _sleigh("inspect", str(pkg), "--verify")
    assert proc.returncode != 0
    assert "embed.onnx" in proc.stderr and "Traceback" not in proc.stderr
    ok = _sleigh("inspect", str(tiny_pkg), "--verify")
    assert ok.returncode == 0, ok.stderr
    assert "GSWA" in ok.stdout and "all match" in ok.stdout


def _sleigh(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sleigh.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)



@pytest.mark.parametrize("case", ["missing", "corrupt", "opset", "nonempty", "unwritable"])
def test_bad_input_gives_one_line_and_no_partial_package(case, tiny_ckpt, tmp_path):
    ckpt, out, extra = tiny_ckpt, tmp_path / "pkg", []
    if case == "missing":
        ckpt = tmp_path / "nope"
    elif case == "corrupt":
        ckpt = tmp_path / "bad"
        shutil.copytree(tiny_ckpt, ckpt)
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "opset":
        extra = ["--opset", "23"]
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "pkg"
    line = one_error_line(_sleigh("export", str(ckpt), "-o", str(out), *extra))
    expect = {"missing": "nope | not found", "corrupt": "safetensors", "opset": "18..20", "nonempty": "not empty",
              "unwritable": "cannot create"}[case]
    assert expect in line
    if case == "nonempty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    elif case != "unwritable":
        assert not out.exists()
    assert not list(tmp_path.glob(".pkg.tmp-*"))


@pytest.mark.parametrize("decoder", ["standard", "fused"])
def test_a_failed_export_leaves_no_manifest(tiny_ckpt, tmp_path, monkeypatch, decoder):
    import sleigh.export.exporter as exporter
    import sleigh.export.fused_decoder as fused_decoder

    real = exporter.export_module

    def fail_on_decoder(spec, *a, **k):
        if spec.name == "decoder":
            raise KeyboardInterrupt
        return real(spec, *a, **k)

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_module", fail_on_decoder)
    monkeypatch.setattr(fused_decoder, "write", fail)
    with pytest.raises(KeyboardInterrupt):
        export_package(tiny_ckpt, tmp_path / "pkg", ExportOptions(quiet=True, decoder=decoder))
    assert not (tmp_path / "pkg").exists()
    assert not list(tmp_path.glob(".pkg.tmp-*"))


def test_a_parity_failure_writes_no_package_and_keeps_the_failed_one_aside(tiny_ckpt, tmp_path, monkeypatch):
    import sleigh.export.parity as parity

    monkeypatch.setitem(parity.TOLERANCES, "fp32", {"*": (0.0, 0.0)})
    with pytest.raises(SleighError, match="parity failed.*pkg.parity-failed"):
        export_package(tiny_ckpt, tmp_path / "pkg", ExportOptions(quiet=True))
    assert not (tmp_path / "pkg").exists()
    failed = tmp_path / "pkg.parity-failed"
    assert not (failed / "manifest.json").exists() and (failed / "decoder.onnx").is_file()
    assert json.loads((failed / "parity_report.json").read_text())["passed"] is False
    with pytest.raises(SleighError, match="no manifest"):
        Pipeline.load(failed)
    assert not list(tmp_path.glob(".pkg.*"))


def test_decoder_reads_the_cache_slots_without_copying_them(tiny_pkg, tmp_path):
    """No node copies the cache (Concat, Transpose, Slice, Expand, ...): in the graph ONNX Runtime
    actually runs, the slots feed only the attention MatMuls (and Shape)."""
    import onnxruntime as ort

    exported = onnx.load(str(tiny_pkg / "decoder.onnx"))
    past = {i.name for i in exported.graph.input if i.name.startswith("past_key_values.")}
    assert past and not [n.op_type for n in exported.graph.node if n.op_type == "Concat" and past & set(n.input)]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "decoder.opt.onnx")
    ort.InferenceSession(str(tiny_pkg / "decoder.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(opts.optimized_model_filepath)
    readers = {n.op_type for n in optimized.graph.node if past & set(n.input)}
    assert readers <= {"MatMul", "FusedMatMul", "Shape"}, readers
    outputs = {o.name: o for o in exported.graph.output}
    new = [n for n in outputs if n.startswith("new_key_values.")]
    assert len(new) == len(past)


@pytest.mark.slow
def test_an_isolated_export_writes_the_same_files_and_its_errors_cross_back_whole(tiny_ckpt, tiny_pkg, tmp_path):
    """Modules exported in a child process (what a checkpoint over ISOLATE_BYTES gets) are byte for
    byte those of an export in one process, and a user error raised in the child is the same error
    here. Two modules (GSWA's custom node among them): the decoder alone takes 20 s there."""
    from sleigh.export.exporter import _module_writer

    opts = ExportOptions(decoder="standard")
    with _module_writer(None, tiny_ckpt, tmp_path, opts, isolate=True) as write:
        files = write("gswa") + write("embed")
    assert files == ["gswa.onnx", "embed.onnx"]
    for name in files:
        assert (tmp_path / name).read_bytes() == (tiny_pkg / name).read_bytes(), name
    with pytest.raises(SleighError) as err, _module_writer(None, tmp_path / "nope", tmp_path, opts, True) as write:
        write("vision")
    assert (err.value.what, err.value.problem) == (str(tmp_path / "nope"), "not found")


@pytest.mark.parametrize("case", ["tokenizer", "std", "stop_ids"])
def test_what_the_runtime_reads_of_the_checkpoint_is_checked_before_the_export(case, tiny_ckpt, tmp_path, monkeypatch):
    """Found after the whole export (a bad tokenizer named the vanished staging folder; std 0 failed
    parity with atol inf, or said "re-export" under --no-verify) or never (stop ids past the
    vocabulary: an answer that can never stop). Now one line naming the checkpoint's file, before any
    module is exported."""
    from sleigh.export import exporter

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    if case == "tokenizer":
        (ckpt / "tokenizer.json").write_text("xx")
    elif case == "std":
        config["image"]["std"] = [0, 0, 0]
    else:
        config["prompt"]["stop_token_ids"] = [config["llm"]["vocab_size"] + 5]
    (ckpt / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(exporter, "_module_writer", lambda *a, **k: pytest.fail("exported before the checks"))
    with pytest.raises(SleighError) as e:
        export_package(ckpt, tmp_path / "pkg", ExportOptions(quiet=True, verify=False))
    line = str(e.value)
    assert line.startswith(str(ckpt / ("tokenizer.json" if case == "tokenizer" else "config.json"))), line
    assert {"tokenizer": "tokenizer", "std": "std > 0", "stop_ids": "prompt.stop_token_ids holds"}[case] in line, line
    assert not (tmp_path / "pkg").exists()
