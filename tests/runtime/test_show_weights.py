"""`--show-weights`: each tile's GSWA weight drawn where the runtime cut that tile; torch-free."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.show_weights import draw_weights, output_format, save_weights_image
from tests.helpers import cli_env, one_error_line, run_sleigh


def grey(w=600, h=400) -> Image.Image:
    return Image.new("RGB", (w, h), (128, 128, 128))


def tile_pixel(img: Image.Image, grid, index, W, H):
    """A pixel inside tile `index`, a quarter of the way in (away from the centred number)."""
    cols, rows = grid
    r, c = divmod(index, cols)
    return np.asarray(img)[int((r + 0.25) * H / rows), int((c + 0.25) * W / cols)].astype(int)


def test_highest_tile_is_red_lowest_is_blue_and_caption_below():
    grid, weights = (3, 2), [1.0, 0.5, 1.2, 0.9, 3.0, 0.4, 1.0]  # thumbnail last
    out = draw_weights(grey(), grid, weights)
    assert out.width == 600 and out.height > 400  # the caption strip
    top, low = tile_pixel(out, grid, 4, 600, 400), tile_pixel(out, grid, 5, 600, 400)
    assert top[0] > top[2] + 60, top  # red over the grey
    assert low[2] > low[0] + 30, low  # blue
    mid = tile_pixel(out, grid, 0, 600, 400)
    assert low[2] - low[0] > mid[2] - mid[0] > top[2] - top[0]  # hotter as the weight grows


def test_one_view_and_large_images():
    assert draw_weights(grey(), (1, 1), [1.0]).width == 600
    assert max(draw_weights(grey(4000, 1000), (4, 1), [1, 2, 1, 1, 1]).size) <= 1600


@pytest.mark.parametrize("size, grid", [((1, 1), (1, 1)), ((40, 8000), (1, 6)), ((251, 335), (3, 4))])
def test_small_and_narrow_images_keep_their_numbers_and_caption(size, grid):
    """A 1x1 photo drew 1x28 pixels, a 40x8000 one 8x1627 with its caption cut: small images are scaled
    up (the short side to MIN_SIDE, or the long one to MAX_SIDE), and the canvas is as wide as the caption."""
    from PIL import ImageDraw

    from sleigh.runtime.show_weights import MAX_SIDE, MIN_SIDE, _font

    n = grid[0] * grid[1]
    out = draw_weights(grey(*size), grid, [1.0 + i / 10 for i in range(n)] + ([1.0] if n > 1 else []))
    scale = min(MAX_SIDE / max(size), max(1.0, MIN_SIDE / min(size)))
    W, H = round(size[0] * scale), round(size[1] * scale)
    assert min(W, H) >= MIN_SIDE or max(W, H) == MAX_SIDE
    caption_w = ImageDraw.Draw(out).textbbox((0, 0), "GSWA: 3x4 tiles, highest 2.10 (row 4, column 3), thumbnail 1.00",
                                             font=_font(12))[2]
    assert out.width >= max(W, caption_w if n > 1 else 0) and out.height > H


def test_bad_output_names_and_short_weights(tmp_path):
    with pytest.raises(SleighError, match="unknown image suffix"):
        output_format(tmp_path / "w.txt")
    with pytest.raises(SleighError, match="is a folder"):
        output_format(tmp_path)
    with pytest.raises(SleighError, match="one weight per tile"):
        draw_weights(grey(), (3, 2), [1.0, 1.0])
    path = save_weights_image(grey(), (2, 1), [0.5, 1.5, 1.0], tmp_path / "w.png")
    assert Image.open(path).format == "PNG"


def test_torch_free():
    code = ("import sys\nfor m in ('torch', 'onnx'): sys.modules[m] = None\n"
            "import sleigh.runtime.show_weights, sleigh.evaluate, sleigh.data.synth, sleigh.data.qa\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr


def test_cli_refuses_show_weights_without_image(tmp_path):
    line = one_error_line(run_sleigh("run", "-m", tmp_path, "--show-weights", tmp_path / "w.png"))
    assert "--show-weights" in line and "no image" in line


def test_the_picture_is_drawn_within_the_runs_own_pixel_limit(tiny_pkg, tmp_path, monkeypatch):
    """`--max-pixels` raised above the default: the picture once read the file again under the default
    limit, and failed after the whole run. It now draws the image the run decoded."""
    from typer.testing import CliRunner

    from sleigh import cli
    from sleigh.runtime import image as image_mod

    photo = tmp_path / "photo.png"
    Image.new("RGB", (500, 400), (90, 140, 60)).save(photo)
    monkeypatch.setattr(image_mod, "default_max_pixels", lambda *a, **k: 1000)  # far below the photo
    out = tmp_path / "w.png"
    result = CliRunner().invoke(cli.app, ["run", str(photo), "--model", str(tiny_pkg), "--max-new-tokens", "1",
                                          "--max-pixels", str(500 * 400), "--show-weights", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).width == 500


@pytest.mark.parametrize("how", ["the same path", "a symlink to it", "a hard link"])
def test_the_picture_never_replaces_the_photo_it_is_drawn_from(how, tmp_path):
    """`run photo.jpg --show-weights photo.jpg` once wrote the picture over the photo (exit 0): now one
    line before the model loads (no model is given here, so nothing else could answer first)."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (90, 140, 60)).save(photo)
    before = photo.read_bytes()
    out = {"the same path": photo, "a symlink to it": tmp_path / "link.png", "a hard link": tmp_path / "hard.png"}[how]
    if how == "a symlink to it":
        out.symlink_to(photo)
    elif how == "a hard link":
        os.link(photo, out)
    line = one_error_line(run_sleigh("run", photo, "-m", tmp_path / "no-such-pkg", "--show-weights", out))
    assert "is the input image" in line and "Expected: another file name" in line
    assert photo.read_bytes() == before
    with pytest.raises(SleighError, match="is the input image"):
        save_weights_image(photo, (1, 1), [1.0, 1.0], out)
    assert photo.read_bytes() == before
    save_weights_image(photo, (1, 1), [1.0, 1.0], tmp_path / "other.png")  # another name is written


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="/proc")
def test_an_output_folder_that_only_looks_writable_is_refused_before_the_run(tmp_path):
    """/proc says it is writable to root (os.access), and is not: the check makes a file there."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48)).save(photo)
    line = one_error_line(run_sleigh("run", photo, "-m", tmp_path / "no-such-pkg", "--show-weights", "/proc/x.png"))
    assert line.startswith("error: /proc/x.png | ") and ("cannot be written" in line or "not writable" in line), line
