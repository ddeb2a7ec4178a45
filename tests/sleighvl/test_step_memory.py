"""`sleigh train`'s memory guard (sleigh/sleighvl/step_memory.py): the bound stays below what a real
step takes, measured in a fresh process; a --batch past what the machine has is one line before
anything is trained or written; one near it trains with a warning; the suggested batch is the largest
that the rule lets through; views are counted as the runtime's tiler cuts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.image import tile_image
from sleigh.sleighvl.config import PRESETS
from sleigh.sleighvl.step_memory import (LEAST_OVER, OVER_BOUND, _most_images, check_step_memory, costliest, run_views,
                                         step_bytes_at_least, views_of)
from tests.helpers import cli_env, one_error_line, run_sleigh

TINY = PRESETS["tiny"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size", [(448, 448), (359, 311), (700, 200), (1598, 1309), (1773, 557), (30, 2000)])  # 2, 3: other views turned
@pytest.mark.parametrize("orientation", [1, 6])  # 6: EXIF's quarter turn, which the runtime applies before tiling
@pytest.mark.parametrize("kind", ["jpg", "png", "png-exif-last"])  # a PNG's EXIF is read without decoding it,
def test_views_are_what_the_runtimes_tiler_makes_of_the_size_read_from_the_header(size, orientation, kind, tmp_path):
    from sleigh.data.qa import read_qa                                 # also from an eXIf chunk after its pixels

    exif = Image.Exif()
    exif[0x0112] = orientation
    image = tmp_path / f"a.{kind.split('-')[0]}"
    Image.new("RGB", size, (90, 120, 30)).save(image, exif=exif)
    if kind == "png-exif-last":
        _move_png_chunk_last(image, b"eXIf")
    (tmp_path / "d.jsonl").write_text(f'{{"image": "{image.name}", "question": "Colour?", "answer": "green"}}\n')
    read = read_qa(tmp_path / "d.jsonl").sizes[image]
    assert views_of(read, TINY) == tile_image(image, size=TINY.vision.image_size, max_tiles=TINY.image.max_tiles).num_views


def _move_png_chunk_last(path: Path, kind: bytes) -> None:
    """Rewrite a PNG with its chunk `kind` just before IEND (Pillow writes eXIf before the pixels)."""
    data, chunks, at = path.read_bytes(), [], 8
    while at < len(data):
        end = at + 12 + int.from_bytes(data[at:at + 4], "big")
        chunks.append(data[at:end])
        at = end
    moved = [c for c in chunks if c[4:8] == kind]
    assert len(moved) == 1 and chunks[-1][4:8] == b"IEND"
    path.write_bytes(data[:8] + b"".join(c for c in chunks[:-1] if c[4:8] != kind) + moved[0] + chunks[-1])


def test_the_views_of_a_run_count_the_curriculum_and_not_what_never_trains():
    from sleigh.runtime.image import default_max_pixels

    small = {Path("a.png"): (448, 448), Path("b.png"): (900, 500)}
    assert run_views(TINY, small, curriculum=False) == (3, "image b.png", 1)
    assert run_views(TINY, small, curriculum=True) == (5, "a curriculum sample of 4 tiles", 1)  # 4 tiles + thumbnail
    side = int(default_max_pixels(TINY.image.max_tiles, TINY.vision.image_size) ** 0.5) + 10
    assert run_views(TINY, {**small, Path("huge.png"): (side, side)}, curriculum=False)[1] == "image b.png"
    assert run_views(TINY, {}, curriculum=False) == (0, "", 0)


def test_the_most_images_that_fit_is_solved_as_a_scan_would_find_it():
    import random

    rng = random.Random(0)
    for _ in range(300):
        a, c, times = rng.randint(1, 10**6), rng.randint(0, 10**7), rng.choice([1.0, 1.5, 1.25])

        def need(b):
            return int(times * (a * b + c))

        most, available = rng.randint(0, 500), rng.randint(0, 10**9)
        scanned = next((b for b in range(most, 0, -1) if need(b) <= available), 0)
        assert _most_images(need, available, most) == scanned


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
@pytest.mark.parametrize("lines", ["short lines, 13-view images", "long answers, one view"])
def test_a_real_step_takes_more_than_the_bound_and_not_far_more(tiny_ckpt, tmp_path, lines):
    """One training step of the tiny preset (448-px views, 256 tokens each) in a fresh process
    (benchmarks/train_step_memory.py): its peak over the loaded model against the bound for its batch.
    Below LEAST_OVER x the bound, the guard would refuse steps that fit; far above the bound, it would
    be no guard. Long answers: the rows' text costs more than the image (a bound that counted the
    image alone was 18x under such a step)."""
    from sleigh.sleighvl.checkpoint import load_checkpoint

    short = lines.startswith("short")
    for i, size in enumerate([(1200, 900), (900, 1200)] if short else [(448, 448)] * 2):  # 3x4 / 4x3 tiles: 10-13 views
        Image.new("RGB", size, (40 * i, 90, 160)).save(tmp_path / f"{i}.png")
    answer = "blue" if short else " ".join(["a red circle at the top left"] * 90)
    (tmp_path / "d.jsonl").write_text("".join(f'{{"image": "{i}.png", "question": "What is it?", "answer": "{answer}"}}\n'
                                              for i in range(2) for _ in range(1 if short else 3)))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step_memory.py"), tiny_ckpt, tmp_path / "d.jsonl",
                           "--batch", "2", "--threads", "1"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    grew, bound = map(int, proc.stdout.splitlines()[-1].split())
    if short:
        assert bound > 500 * 2**20  # the square term: 3 x 2 images x 4 heads x ~3,000^2 floats
    else:
        trained = sum(p.numel() for n, p in load_checkpoint(tiny_ckpt)[0].named_parameters() if n.startswith("gswa."))
        image_alone = step_bytes_at_least(TINY, ("gswa",), 1, 2, trained)
        assert bound > 2 * image_alone, (bound, image_alone)  # the text's rows are most of it
    assert LEAST_OVER * bound <= grew <= 2 * bound, (grew, bound)  # refused only where it would not have fitted


def test_an_images_lines_are_counted_as_a_step_runs_them():
    """train.answer_logits runs the question tokens an image's lines all start with once, with its
    prompt; each line's row holds the rest of its question, its answer and <|im_end|>."""
    from sleigh.sleighvl.step_memory import line_tokens

    assert line_tokens([([5, 6, 7], 10)]) == (1, 3, 11)  # one line: its question in the prompt
    assert line_tokens([([5, 6, 7], 10), ([5, 6, 7], 2)]) == (2, 3, 11)  # one question, two answers
    assert line_tokens([([5, 6, 7], 10), ([5, 6, 9, 9], 2), ([5], 1)]) == (3, 1, 13)  # they share [5]
    assert line_tokens([([1, 2], 4), ([3, 4], 4)]) == (2, 0, 7)


def test_the_image_that_sets_the_cost_is_the_one_with_most_views_or_lines_or_text():
    sizes = {Path(f"{n}.png"): s for n, s in [("a", (1598, 1309)), ("b", (448, 448)), ("c", (448, 448)), ("d", (900, 500))]}
    texts = {Path("a.png"): (1, 5, 5), Path("b.png"): (3, 0, 4000), Path("c.png"): (2, 0, 100), Path("d.png"): (1, 0, 5)}
    assert sorted(costliest(TINY, sizes, texts, curriculum=False)) == [(1, 3, 4000, 0, "image b.png"),
                                                                        (13, 1, 5, 5, "image a.png")]
    parts, trained = ("gswa",), 10_000
    with_text = step_bytes_at_least(TINY, parts, 1, 1, trained, rows=3, text=4000)
    assert with_text > 2 * step_bytes_at_least(TINY, parts, 13, 1, trained)  # b sets the cost
    with pytest.raises(SleighError, match=r"^--batch 1 \| with image b\.png \(1 views, 256 image tokens, 3 lines of up to "
                                          r"4,000 tokens of question and answer, .*Expected: a machine with more memory, or "
                                          r"shorter questions and answers than 4,000 tokens, or fewer lines per image$"):
        check_step_memory(TINY, parts, sizes, 1, None, trained, int(with_text), texts=texts)
    assert check_step_memory(TINY, parts, sizes, 1, None, trained, int(with_text), texts=None) is None  # text not counted


def test_a_batch_past_what_the_machine_has_is_one_line_before_training(demo_ckpt, tmp_path):
    from sleigh.data.synth import SynthSpec, write_split

    data = write_split(tmp_path / "data", 2, seed=0, spec=SynthSpec(min_size=224, max_size=336))
    out = tmp_path / "out"
    line = one_error_line(run_sleigh("train", demo_ckpt, "--data", data, "-o", out, "--steps", "1", "--batch", "1000000"))
    assert line.startswith("error: --batch 1000000 | with image ")
    assert "available. Expected: --batch " in line and " or less, or a machine with more memory" in line  # its pixels alone
    assert not out.exists()


def test_the_rule_refuses_warns_and_suggests_the_largest_micro_batch_it_lets_through():
    sizes = {Path("a.png"): (1598, 1309), Path("b.png"): (1309, 1598)}  # 13 views each
    parts, trained = ("gswa",), 10_000

    def need(b, batch=8):  # b images at once, the rest of the batch waiting as pixels
        return step_bytes_at_least(TINY, parts, 13, b, trained, rest=batch - b, rest_views=13)

    def most(available, size, batch=8):  # the largest part where the most steps have taken fits
        return max((b for b in range(1, size) if OVER_BOUND * need(b, batch) <= available), default=0)

    def check(batch, available, micro=None):
        return check_step_memory(TINY, parts, sizes, batch, micro, trained, available)

    assert check(8, None) is None  # memory unknown: not checked
    assert check_step_memory(TINY, parts, {}, 8, None, trained, 1) is None  # no sizes (no header check): not checked
    assert check(8, int(OVER_BOUND * need(8)) + 1) is None
    available = int(LEAST_OVER * need(8)) + 1
    warning = check(8, available)
    assert warning.startswith("--batch 8 may not fit: with image a.png (13 views, 3,328 image tokens")
    assert "), 8 images at once need at least " in warning and ", and steps have taken up to " in warning
    assert most(available, 8) >= 4 and warning.endswith(f"; --micro-batch {most(available, 8)} would fit")
    for available in (int(LEAST_OVER * need(8)) - 1, int(OVER_BOUND * need(3)) + 1):
        fits = most(available, 8)
        with pytest.raises(SleighError, match=rf"Expected: --micro-batch {fits} \(the same update, {fits} images at a "
                                              rf"time, where the most steps have taken fits\), --batch {fits} or less, or a"):
            check(8, available)
    assert check(64, int(OVER_BOUND * need(8, 64)) + 1, micro=8) is None  # the part run at once is what counts
    available = int(LEAST_OVER * need(8, 64)) - 1
    with pytest.raises(SleighError, match=rf"^--micro-batch 8 \| with .* 8 images at once .*Expected: --micro-batch "
                                          rf"{most(available, 8, 64)} \(.*\), --batch \d+ or less, or a"):
        check(64, available, micro=8)
    with pytest.raises(SleighError, match=r"Expected: --micro-batch 1 \(which may still not fit\)"):
        check(8, int(LEAST_OVER * need(1)) + 1)
    with pytest.raises(SleighError, match=r"one image at a time needs at least .* Expected: a machine with more memory, "
                                          r"or images that tile into fewer than 13 views"):
        check(8, int(LEAST_OVER * need(1)) - 1)
    with pytest.raises(SleighError, match=r"^--batch 1 \| with image a\.png .*, one image needs at least .*available\. "
                                          r"Expected: a machine"):
        check(1, int(LEAST_OVER * need(1, 1)) - 1)
    with pytest.raises(SleighError, match=r"with a curriculum sample of 4 tiles \(5 views.*Expected: a machine with more "
                                          r"memory, or --curriculum off"):
        check_step_memory(TINY, parts, {Path("c.png"): (448, 448)}, 1, None, trained, 1000, curriculum=True)


def test_on_a_gpu_the_memory_left_is_the_gpus(monkeypatch):
    """A run on CUDA trains on the GPU's memory: what torch says is free there, not the host's."""
    import torch

    from sleigh.sleighvl.step_memory import available_for

    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: seen.append(device) or (5 << 30, 80 << 30))
    assert available_for(torch.device("cuda", 1)) == (5 << 30, "the GPU") and seen == [torch.device("cuda", 1)]
    assert available_for(torch.device("cpu"))[1] == "this machine"
