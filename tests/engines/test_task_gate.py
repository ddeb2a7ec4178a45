"""build-engine --eval-data: the task-accuracy gate (per question type, engine vs FP32, in points).

The tiny model answers at random, so these tests check the mechanics on an FP32 engine (whose answers
are the package's): a tolerance that must pass, a negative one that must refuse (nothing registered,
nothing left behind), and the options' own errors. The reference numbers are `sleigh eval`'s on the
installed engine and on the package's modules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sleigh.engines.build_engine import build_engine
from sleigh.engines.options import EngineOptions
from sleigh.errors import SleighError
from sleigh.evaluate import evaluate
from sleigh.runtime.manifest import read_manifest
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    from sleigh.data.synth import SynthSpec, write_split

    return write_split(tmp_path_factory.mktemp("task-data"), 1, seed=5, spec=SynthSpec(min_size=224, max_size=448))


def _agreement_gate_passes(monkeypatch):
    """The agreement gate has its own tests (test_build_engine.py); here it passes at no cost."""
    import sleigh.engines.accuracy as accuracy

    monkeypatch.setattr(accuracy, "run_gate", lambda *args, **kwargs: {"passed": True, "checks": [], "pairs": []})


@pytest.mark.slow
def test_an_engine_within_tolerance_passes_and_records_both_accuracies(tiny_pkg, tmp_path, eval_data, monkeypatch):
    import sleigh.evaluate

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    _agreement_gate_passes(monkeypatch)
    evaluated = []  # the engine each `sleigh eval` ran: "package" is the FP32 modules
    real = sleigh.evaluate.evaluate
    monkeypatch.setattr(sleigh.evaluate, "evaluate", lambda *a, **k: (evaluated.append(k["engine"]), real(*a, **k))[1])
    entry = build_engine(pkg, EngineOptions(precision="fp32", eval_data=eval_data, quiet=True))
    assert evaluated.count("package") == 1
    task = read_manifest(pkg).engines["onnxruntime-fp32"].task_accuracy
    assert entry.accuracy_passed and task["passed"] and task["tolerance_points"] == 1.0
    assert entry.build_options["eval_data"] == str(eval_data) and entry.build_options["eval_tolerance"] is None
    fp32 = evaluate(pkg, eval_data, engine="package", quiet=True)["types"]
    engine = evaluate(pkg, eval_data, engine="onnxruntime-fp32", quiet=True)["types"]
    assert set(task["types"]) == set(fp32) == {"colour", "shape", "position"}
    for t, v in task["types"].items():
        assert (v["n"], v["fp32"], v["engine"]) == (fp32[t]["n"], fp32[t]["accuracy"], engine[t]["accuracy"])
        drop = 100 * (fp32[t]["accuracy"] - engine[t]["accuracy"])
        assert v["drop_points"] == drop and v["ok"]

    # FP32's numbers are measured once per data: a second engine on the same data reuses them...
    evaluated.clear()
    again = build_engine(pkg, EngineOptions(precision="fp32", name="again", eval_data=eval_data, quiet=True))
    assert "package" not in evaluated and len(evaluated) == 1  # the engine's own run only
    assert again.task_accuracy["types"] == task["types"]
    # ...and data that changed (one answer) is evaluated again
    lines = [json.loads(line) for line in eval_data.read_text().splitlines()]
    lines[0]["answer"] += " indeed"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**q, "image": str(eval_data.parent / q["image"])}) + "\n" for q in lines))
    evaluated.clear()
    build_engine(pkg, EngineOptions(precision="fp32", name="changed", eval_data=changed, quiet=True))
    assert evaluated.count("package") == 1


@pytest.mark.slow
def test_a_drop_beyond_tolerance_refuses_in_one_line_and_registers_nothing(tiny_pkg, tmp_path, eval_data, monkeypatch,
                                                                          capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    _agreement_gate_passes(monkeypatch)
    import sleigh.evaluate

    real = sleigh.evaluate.evaluate

    def engine_two_points_short(pkg, data, **kw):  # the engine's report: every type 2 points below its own score
        report = real(pkg, data, **kw)
        if kw.get("engine") != "package":
            for r in report["types"].values():
                r["accuracy"] -= 0.02
        return report

    monkeypatch.setattr(sleigh.evaluate, "evaluate", engine_two_points_short)
    code, err = run_cli(monkeypatch, capsys, "build-engine", pkg, "--precision", "fp32", "--eval-data", eval_data,
                        "--eval-tolerance", "1.5")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: engine onnxruntime-fp32 | task accuracy fell more than 1.5 points below FP32's: colour")
    assert "--eval-tolerance" in err[0] and "--allow-degraded" in err[0]
    assert read_manifest(pkg).engines == {}
    assert list((pkg / "engines").iterdir()) == []

    entry = build_engine(pkg, EngineOptions(precision="fp32", eval_data=eval_data, eval_tolerance=1.5,
                                            allow_degraded=True, quiet=True))
    assert entry.degraded and not entry.accuracy_passed and not entry.task_accuracy["passed"]


@pytest.mark.slow
def test_with_eval_data_the_task_accuracy_decides_and_the_agreement_gate_is_a_record(tiny_pkg, tmp_path, eval_data,
                                                                                   monkeypatch):
    """An agreement gate that fails (as INT8 vision of a trained model does on its random-weight
    thresholds) refuses without eval data and is kept as a record with it, the task gate deciding."""
    import sleigh.engines.accuracy as accuracy
    from sleigh.engines.build_engine import GateFailed

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    failed = {"passed": False, "checks": [{"metric": "gswa_weight_max_abs", "value": 0.9, "threshold": 0.1,
                                           "margin": -0.8, "ok": False}], "pairs": []}
    monkeypatch.setattr(accuracy, "run_gate", lambda *args, **kwargs: failed)
    with pytest.raises(GateFailed):
        build_engine(pkg, EngineOptions(precision="fp32", quiet=True))
    entry = build_engine(pkg, EngineOptions(precision="fp32", eval_data=eval_data, quiet=True))
    assert entry.accuracy_passed and not entry.degraded and not entry.accuracy["passed"]
    assert read_manifest(pkg).engines["onnxruntime-fp32"].task_accuracy["passed"]


def test_bad_task_gate_options_are_one_line(tiny_pkg, tmp_path, monkeypatch, capsys):
    with pytest.raises(SleighError, match="^--eval-tolerance .*--eval-data"):
        EngineOptions(eval_tolerance=1.0)
    with pytest.raises(SleighError, match="^--eval-tolerance nan"):
        EngineOptions(eval_data=tmp_path / "x.jsonl", eval_tolerance=float("nan"))
    with pytest.raises(SleighError, match="^--eval-tolerance -5 | out of range"):  # every type failed, whatever the engine
        EngineOptions(eval_data=tmp_path / "x.jsonl", eval_tolerance=-5.0)
    code, err = run_cli(monkeypatch, capsys, "build-engine", tiny_pkg, "--eval-data", tmp_path / "none.jsonl")
    assert code == 2 and len(err) == 1 and "none.jsonl" in err[0] and "not found" in err[0], err
    assert not (tiny_pkg / "engines").exists()  # refused before anything was built


def test_an_engine_that_skips_lines_fp32_scored_fails_and_says_so(monkeypatch):
    """A TensorRT engine's shorter context makes `sleigh eval` skip lines the FP32 modules scored:
    the accuracies are then over different lines, so the type fails, naming how many it scored."""
    from types import SimpleNamespace

    import sleigh.engines.accuracy as accuracy
    import sleigh.evaluate
    from sleigh.engines.build_engine import TaskGateFailed

    ref = {"data": "d.jsonl", "types": {"colour": {"n": 4, "accuracy": 0.5}, "shape": {"n": 4, "accuracy": 0.5}},
           "skipped": {}}
    got = {"types": {"colour": {"n": 2, "accuracy": 0.5}, "shape": {"n": 4, "accuracy": 0.5}},
           "skipped": {"prompt past the context": 2}}
    monkeypatch.setattr(accuracy, "fp32_task_accuracy", lambda pkg, data, max_tiles: ref)
    monkeypatch.setattr(sleigh.evaluate, "evaluate", lambda *args, **kwargs: got)
    report = accuracy.run_task_gate(Path("pkg"), SimpleNamespace(backend="tensorrt", max_views=None), Path("d.jsonl"), 5.0)
    assert not report["passed"] and report["types"]["shape"]["ok"]
    assert report["types"]["colour"]["engine_n"] == 2 and report["engine_skipped"] == got["skipped"]
    rows = dict((t, verdict) for t, *_, verdict in accuracy.task_rows(report))
    assert rows["colour"] == "FAIL: the engine scored 2 of these 4 lines (it skipped the others)"
    assert "colour: the engine scored 2 of 4 lines" in str(TaskGateFailed("trt-fp16", report))


def test_a_cached_fp32_record_of_an_older_scoring_is_measured_again(tiny_pkg, tmp_path, eval_data, monkeypatch):
    """The FP32 task accuracy is kept in the manifest; one from before untyped lines were 'untyped'
    (they were 'all') and refused lines were skipped is measured again, not compared to a new one."""
    import sleigh.evaluate
    from sleigh.engines.accuracy import fp32_task_accuracy
    from sleigh.runtime.manifest import update_manifest

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    calls = []
    fake = {"data": str(eval_data), "types": {"colour": {"n": 1, "accuracy": 1.0}}, "skipped": {}}
    monkeypatch.setattr(sleigh.evaluate, "evaluate", lambda *args, **kwargs: calls.append(1) or fake)
    fp32_task_accuracy(pkg, eval_data)
    fp32_task_accuracy(pkg, eval_data)
    assert len(calls) == 1  # kept

    def as_older(manifest: dict) -> None:
        for record in manifest["parity"]["task_accuracy"].values():
            del record["version"]
    update_manifest(pkg, as_older)
    fp32_task_accuracy(pkg, eval_data)
    assert len(calls) == 2


def test_the_fp32_side_reads_the_tiles_the_engine_reads(tiny_pkg, tmp_path, eval_data, monkeypatch):
    """An engine built for 1 tile: its task gate once compared it with FP32 reading the model's 12."""
    import sleigh.evaluate

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    _agreement_gate_passes(monkeypatch)
    asked = []  # (engine, max_tiles) of each `sleigh eval`
    real = sleigh.evaluate.evaluate
    monkeypatch.setattr(sleigh.evaluate, "evaluate",
                        lambda *a, **k: (asked.append((getattr(k["engine"], "name", k["engine"]), k.get("max_tiles"))),
                                         real(*a, **k))[1])
    build_engine(pkg, EngineOptions(precision="fp32", name="one", max_tiles=1, eval_data=eval_data, quiet=True))
    assert asked == [("package", 1), ("one", None)]  # the engine's own pipeline holds it to 1 tile
    cached = read_manifest(pkg).parity["task_accuracy"]
    assert [k.endswith("-tiles-1") for k in cached] == [True]  # not the record a full-tile engine reuses
