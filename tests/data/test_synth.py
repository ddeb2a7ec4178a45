"""`sleigh data synth`: deterministic per seed, splits by seed, labels that match the pixels, and
one-line refusals of bad options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sleigh.data.synth import SynthSpec, render, rng_for, write_split
from sleigh.errors import SleighError
from tests.helpers import one_error_line, run_sleigh

SMALL = SynthSpec(min_size=224, max_size=400)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_same_seed_same_files_and_image_i_does_not_depend_on_n(tmp_path):
    a = write_split(tmp_path / "a", 3, seed=7, spec=SMALL)
    b = write_split(tmp_path / "b", 5, seed=7, spec=SMALL)
    write_split(tmp_path / "c", 3, seed=8, spec=SMALL)
    assert lines(a) == lines(b)[:9]
    for i in range(3):
        name = f"train/{i:06d}.jpg"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/train/000000.jpg").read_bytes() != (tmp_path / "c/train/000000.jpg").read_bytes()


def test_one_line_per_question_type_with_relative_paths(tmp_path):
    path = write_split(tmp_path, 2, seed=0, split="heldout", spec=SMALL)
    got = lines(path)
    assert [x["type"] for x in got] == ["colour", "shape", "position"] * 2
    for x in got:
        assert (tmp_path / x["image"]).is_file() and not Path(x["image"]).is_absolute()
        assert x["answer"] == x["meta"][x["type"]]


# The answer words, checked against the pixels by rules written from the words, not from the code's table.
COLOUR_RULES = {
    "red": lambda r, g, b: r > g + 100 and r > b + 100,
    "green": lambda r, g, b: g > r + 60 and g > b + 60,
    "blue": lambda r, g, b: b > r + 100 and b > g + 80,
    "yellow": lambda r, g, b: r > b + 120 and g > b + 120,
    "purple": lambda r, g, b: r > g + 50 and b > g + 50,
    "orange": lambda r, g, b: r > g + 60 and g > b + 60,
}


@pytest.mark.parametrize("index", range(12))
def test_labels_match_the_pixels(index):
    s = render(rng_for(3, index), SynthSpec(min_object=14, max_object=24))
    w, h = s.image.size
    x0, y0, x1, y1 = s.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r, g, b = (int(v) for v in np.asarray(s.image)[int(cy) + 2, int(cx)])  # a little below centre: inside a triangle too
    assert COLOUR_RULES[s.colour](r, g, b), (s.colour, (r, g, b))
    row = ("top", "middle", "bottom")[int(3 * cy / h)]
    col = ("left", "center", "right")[int(3 * cx / w)]
    words = s.position.split()
    assert (row in words or row == "middle") and (col in words or col == "center")
    # the shape: fill fraction of its box (circle ~pi/4, square 1, triangle 1/2)
    box = np.asarray(s.image)[y0:y1, x0:x1].astype(int)
    fill = np.mean([COLOUR_RULES[s.colour](*px) for px in box.reshape(-1, 3)])
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[s.shape]
    assert abs(fill - expected) < 0.12, (s.shape, fill)


@pytest.mark.slow
def test_canvas_sizes_give_one_to_twelve_tiles():
    from sleigh.runtime.image import find_grid

    tiles = {np.prod(find_grid(*render(rng_for(0, i)).image.size)) for i in range(40)}
    assert min(tiles) >= 1 and max(tiles) <= 12 and len(tiles) >= 3


def test_existing_split_is_refused_and_left_alone(tmp_path):
    path = write_split(tmp_path, 1, seed=0, spec=SMALL)
    before = path.read_bytes()
    with pytest.raises(SleighError, match="already exists"):
        write_split(tmp_path, 2, seed=1, spec=SMALL)
    assert path.read_bytes() == before
    write_split(tmp_path, 2, seed=1, spec=SMALL, force=True)
    assert len(lines(path)) == 6
    (tmp_path / "x").write_text("a file where the split's images go")  # --force replaces it too
    assert len(lines(write_split(tmp_path, 1, seed=0, split="x", spec=SMALL, force=True))) == 3
    assert (tmp_path / "x").is_dir()


@pytest.mark.parametrize("args, needle", [
    (["--n", "0"], "--n"),
    (["--n", "2", "--split", "../x"], "--split"),
    (["--n", "2", "--split", "ev.jsonl"], "--split"),  # it would write ev.jsonl.jsonl
    (["--n", "2", "--min-size", "600", "--max-size", "500"], "image size range"),
    (["--n", "2", "--max-object", "300"], "object size range"),
    (["--n", "1", "--min-size", "9500", "--max-size", "9500"], "max size <= 8778 px"),  # past eval's 77 Mpx: it wrote them
    (["--n", "1", "--max-size", "100000"], "max size <= 8778 px"),  # ran past a minute
])
def test_bad_options_one_line_and_nothing_written(tmp_path, args, needle):
    r = run_sleigh("data", "synth", str(tmp_path / "d"), *args)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_an_output_where_no_folder_can_be_made_is_one_line_before_any_image(tmp_path):
    """A file in the output's path was `unexpected NotADirectoryError`, /proc (as root, whom os.access
    lets write there) `unexpected FileNotFoundError`: exit 1, as for a bug."""
    (tmp_path / "f").write_text("a file where a folder of the output goes")
    r = run_sleigh("data", "synth", tmp_path / "f" / "sub", "--n", "1")
    assert r.returncode == 2 and one_error_line(r).startswith(f"error: {tmp_path / 'f' / 'sub'} | "), r.stderr
    assert "is a file, not a folder" in r.stderr
    if Path("/proc/self").is_dir():
        r = run_sleigh("data", "synth", "/proc/sleigh-synth/sub", "--n", "1")
        assert r.returncode == 2, r.stderr
        line = one_error_line(r)
        assert line.startswith("error: /proc/sleigh-synth/sub | ") and ("/proc" in line.split("|")[1]), line


def test_a_synth_killed_by_a_signal_leaves_a_folder_the_next_synth_removes(tmp_path):
    """SIGTERM (timeout, systemd) runs no cleanup: the partial images' hidden folder stayed forever,
    a later synth into the same folder left it there. It names its owner now, and the next run of the
    split removes it once that owner is dead."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import cli_env

    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "sleigh.cli", "data", "synth", str(out), "--n", "100000",
                             "--min-size", "224", "--max-size", "300"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(out.glob(".train.tmp-*/*.jpg")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    left = list(out.glob(".train.tmp-*"))
    assert len(left) == 1 and any(left[0].iterdir()), "the killed run left no partial images to clean"
    write_split(out, 1, seed=0, spec=SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["train", "train.jsonl", "train.spec.json"]


def test_the_largest_canvas_loads_where_train_and_eval_load_images():
    from sleigh.data.synth import MAX_SIDE
    from sleigh.runtime.image import default_max_pixels

    assert MAX_SIDE ** 2 <= default_max_pixels() < (MAX_SIDE + 1) ** 2
    assert SynthSpec(max_size=MAX_SIDE).max_size == MAX_SIDE
    with pytest.raises(SleighError, match=f"max size <= {MAX_SIDE} px"):
        SynthSpec(max_size=MAX_SIDE + 1)
