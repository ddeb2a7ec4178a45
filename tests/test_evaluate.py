"""`sleigh eval`: accuracy per question type with its standard error, and GSWA's top-tile check.

The end-to-end test takes the model's own greedy answers from `Pipeline.generate` (the public API)
as the reference: half the lines carry that answer, half a wrong one, so every type must score 50 %.
"""

from __future__ import annotations

import json
import math

import pytest

from sleigh.errors import SleighError
from sleigh.evaluate import evaluate, proportion, top_tile_holds_object
from tests.helpers import one_error_line, run_sleigh


def test_standard_error_of_a_proportion():
    r = proportion(50, 100)
    assert r["accuracy"] == 0.5 and math.isclose(r["se"], 0.05)
    assert proportion(10, 10)["se"] == 0.0


@pytest.mark.parametrize("centre, top, expected", [
    ((250, 150), 5, True),  # row 1, column 2 of a 3x2 grid over 300x200
    ((250, 150), 0, False),
    ((50, 50), 0, True),
    ((150, 99), 1, True),
    ((150, 101), 1, False),
])
def test_top_tile_holds_object(centre, top, expected):
    weights = [1.0] * 6 + [1.0]
    weights[top] = 2.0
    box = (centre[0] - 5, centre[1] - 5, centre[0] + 5, centre[1] + 5)
    assert top_tile_holds_object(weights, (3, 2), (300, 200), box) is expected


@pytest.mark.slow
def test_accuracy_per_type_against_the_pipelines_own_answers(demo_ckpt, tmp_path):
    from sleigh.data.synth import SynthSpec, write_split
    from sleigh.runtime.pipeline import Pipeline

    path = write_split(tmp_path, 4, seed=0, spec=SynthSpec(min_size=224, max_size=400))
    pipe = Pipeline.load(demo_ckpt)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for i, line in enumerate(lines):
        said = pipe.generate(str(tmp_path / line["image"]), line["question"], max_new_tokens=8).result.text
        line["answer"] = said if i // 3 % 2 == 0 else said + " not"  # images 0 and 2 right, 1 and 3 wrong
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = evaluate(demo_ckpt, path, quiet=True)
    assert set(report["types"]) == {"colour", "shape", "position"}
    for r in report["types"].values():
        assert (r["n"], r["correct"]) == (4, 2) and math.isclose(r["se"], 0.25)
    top = report.get("gswa_top_tile")
    assert top is None or 0 <= top["holds_object"] <= top["images"] <= 4


def test_cli_bad_data_one_line(tmp_path, demo_ckpt):
    line = one_error_line(run_sleigh("eval", demo_ckpt, "--data", tmp_path / "none.jsonl"))
    assert "none.jsonl" in line and "not found" in line
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    line = one_error_line(run_sleigh("eval", demo_ckpt, "--data", tmp_path))
    assert "2 .jsonl files" in line


def test_a_line_whose_image_or_prompt_fails_is_skipped_not_the_run(demo_ckpt, tmp_path):
    """A truncated image passes read_qa's header check and fails where the pipeline decodes it; a
    question past the context fails in the prefill's check: each is one skipped line, the rest scored."""
    from PIL import Image

    from sleigh.runtime.pipeline import Pipeline

    import numpy as np

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "ok.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.jpg")
    full = (tmp_path / "noise.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[:len(full) * 2 // 3])  # the header whole, the scan cut
    context = Pipeline.load(demo_ckpt).contract.generation.context_length
    lines = [{"image": "ok.jpg", "question": "What colour?", "answer": "red", "type": "colour"},
             {"image": "cut.jpg", "question": "What colour?", "answer": "red", "type": "colour"},
             {"image": "ok.jpg", "question": "apple " * context, "answer": "red", "type": "colour"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = evaluate(demo_ckpt, tmp_path / "d.jsonl", quiet=True)
    assert report["overall"]["n"] == 1
    assert report["skipped"] == {"image not loaded": 1, "prompt past the context": 1}
    assert report["first_skipped"]["image not loaded"].startswith(f"line 2: image '{tmp_path / 'cut.jpg'}' is corrupt")
    assert report["first_skipped"]["prompt past the context"].startswith("line 3: ")
    assert "exceed the context" in report["first_skipped"]["prompt past the context"]
    proc = run_sleigh("eval", demo_ckpt, "--data", tmp_path / "d.jsonl")  # the CLI says so in words (it printed a dict)
    assert proc.returncode == 0, proc.stderr
    assert "skipped lines: 1 image not loaded (first on line 2: image " in proc.stdout, proc.stdout
    assert ", 1 prompt past the context (first on line 3: " in proc.stdout, proc.stdout


def test_a_limit_counts_the_questions_evaluated_whatever_skipped_the_others(demo_ckpt, tiny_pkg, tmp_path):
    """--limit N: N questions evaluated. A line skipped when the file is read (a missing image) and one
    skipped when it runs (an image that does not decode) are alike not one of them (the second was)."""
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "ok.jpg")
    Image.new("RGB", (256, 256), (10, 30, 30)).save(tmp_path / "whole.jpg")
    full = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[:len(full) * 2 // 3])
    ok = {"image": "ok.jpg", "question": "What colour?", "answer": "red", "type": "colour"}
    for first in ("missing.jpg", "cut.jpg"):  # a bad line after the N questions is not counted as skipped either
        lines = [{**ok, "image": first}, {**ok, "image": first}, ok, ok, ok, {**ok, "image": first}]
        (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        report = evaluate(demo_ckpt, tmp_path / "d.jsonl", limit=2, quiet=True)
        assert report["overall"]["n"] == 2 and sum(report["skipped"].values()) == 2, (first, report)
        assert set(report["first_skipped"]) == set(report["skipped"])
        assert report["engine"] is None  # a checkpoint runs on PyTorch
    assert evaluate(tiny_pkg, tmp_path / "d.jsonl", limit=1, quiet=True)["engine"] == "package"  # not null: what ran


def test_a_skipped_line_says_why_its_image_was_not_loaded(demo_ckpt, tmp_path):
    """An image past the pixel limit (what `data synth --max-size 9500` wrote) was only `skipped:
    {'image not loaded': 3}`: the reason comes with the first line it struck, without run's remedy."""
    from PIL import Image

    from tests.runtime.test_image import huge_png

    huge_png(tmp_path / "big.png", 9500, 9500)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "ok.png")
    lines = [{"image": "big.png", "question": "What colour?", "answer": "red"},
             {"image": "ok.png", "question": "What colour?", "answer": "red"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    proc = run_sleigh("eval", demo_ckpt, "--data", tmp_path / "d.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "skipped lines: 1 image not loaded (first on line 1: image " in proc.stdout, proc.stdout
    assert "9500x9500 = 90,250,000 pixels" in proc.stdout and "--max-pixels" not in proc.stdout, proc.stdout
    (tmp_path / "d.jsonl").write_text(json.dumps(lines[0]) + "\n")
    line = one_error_line(run_sleigh("eval", demo_ckpt, "--data", tmp_path / "d.jsonl"))
    assert "no line could be evaluated (skipped 1 image not loaded (first on line 1: image " in line, line
    assert "{" not in line and "90,250,000 pixels" in line, line


def test_names_with_brackets_print_as_written(demo_ckpt, tmp_path):
    """A question type `[/x]` ran the whole eval, then failed as `unexpected MarkupError`; a folder
    `runs[v2]` lost its `[v2]` in the table (rich read both as style tags)."""
    import json

    from PIL import Image

    folder = tmp_path / "runs[v2]"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "a.png")
    (folder / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "Colour?", "answer": "red",
                                                "type": "[/x]"}) + "\n")
    proc = run_sleigh("eval", demo_ckpt, "--data", folder / "d.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "[/x]" in proc.stdout and "runs[v2]" in proc.stdout, proc.stdout


def test_an_engine_for_a_checkpoint_is_refused_as_run_refuses_it(demo_ckpt, tmp_path):
    """A checkpoint has no engines: `--engine int8` ran the torch reference, exit 0, and the report
    named engine int8."""
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "Colour?", "answer": "red"}) + "\n")
    proc = run_sleigh("eval", demo_ckpt, "--data", tmp_path / "d.jsonl", "--engine", "int8", "--json")
    line = one_error_line(proc)
    assert proc.returncode == 2 and proc.stdout == ""
    assert line.startswith("error: --engine int8 |") and "is a checkpoint" in line, line


def test_a_token_limit_past_the_context_is_refused_before_any_line(demo_ckpt, tmp_path):
    """`--max-new-tokens 100000` skipped every line as "prompt past the context" and suggested shorter
    questions; it is refused up front, naming the flag and the context, as `sleigh run` refuses it."""
    from PIL import Image

    from sleigh.runtime.pipeline import Pipeline

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "Colour?", "answer": "red"}) + "\n")
    context = Pipeline.load(demo_ckpt).context_length
    proc = run_sleigh("eval", demo_ckpt, "--data", tmp_path / "d.jsonl", "--max-new-tokens", 100000)
    line = one_error_line(proc)
    assert proc.returncode == 2 and line.startswith("error: --max-new-tokens 100000 | "), line
    assert f"+ 100000 new tokens exceed the context of {context}" in line and "smaller --max-new-tokens" in line, line
    with pytest.raises(SleighError, match="max_new_tokens"):  # a limit that fits no line, though below the context
        evaluate(demo_ckpt, tmp_path / "d.jsonl", max_new_tokens=context - 1, quiet=True)
