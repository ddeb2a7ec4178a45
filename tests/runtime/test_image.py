"""Image loading and InternVL tiling against the original InternVL's decisions and pixel values."""

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime import image as image_mod
from sleigh.runtime.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TiledImage,
    find_grid,
    load_image,
    tile_image,
)
from tests.helpers import ORACLE

TILING = json.loads((ORACLE / "tiling.json").read_text())
CASES = [
    pytest.param(max_num, case, id=f"max{max_num}-{case['width']}x{case['height']}")
    for key, max_num in (("max_num_12", 12), ("max_num_6", 6))
    for case in TILING[key]
]
PIXEL_TOL = 1e-5  # max abs vs InternVL's float32 torchvision pipeline


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _normalize_ref(rgb_uint8):
    """(H, W, 3) uint8 → (3, H, W) float64, the textbook formula, independent of the module's."""
    x = rgb_uint8.astype(np.float64) / 255.0
    return ((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


# --- tiling decisions --------------------------------------------------------------------------


def test_oracle_has_both_tables():
    assert len(TILING["max_num_12"]) == 26 and len(TILING["max_num_6"]) == 26


@pytest.mark.parametrize("max_num, case", CASES)
def test_find_grid_matches_internvl(max_num, case):
    assert find_grid(case["width"], case["height"], max_tiles=max_num) == (case["cols"], case["rows"])


@pytest.mark.parametrize("max_num, case", CASES)
def test_tile_image_views_match_internvl(max_num, case):
    img = Image.new("RGB", (case["width"], case["height"]), (90, 120, 200))
    tiled = tile_image(img, max_tiles=max_num)
    assert tiled.grid == (case["cols"], case["rows"])
    assert tiled.num_views == case["num_views"]
    assert tiled.pixel_values.shape == (case["num_views"], 3, 448, 448)
    assert tiled.pixel_values.dtype == np.float32
    assert tiled.image_size == (case["width"], case["height"])


def test_find_grid_is_not_transpose_symmetric():
    # Pinned in the oracle README: ties go to the later candidate, and (1, 4) comes after (3, 1).
    assert find_grid(700, 200) == (3, 1)
    assert find_grid(200, 700) == (1, 4)


def test_find_grid_tie_rule_uses_the_later_grids_area():
    # Square images tie on (1,1), (2,2), (3,3); (n,n) wins only if area > 0.5·448²·n².
    half = 0.5 * 448 * 448
    assert find_grid(634, 634) == (2, 2)  # 401956 > half·4 = 401408
    assert find_grid(633, 633) == (1, 1)  # 400689 ≤ half·4
    assert find_grid(951, 951) == (3, 3)  # 904401 > half·9 = 903168
    assert 950 * 950 <= half * 9 and find_grid(950, 950) == (2, 2)


def test_find_grid_tie_rule_is_strict():
    # 9x8 ties (1,1) and (2,2) (max 4); at size 6 its area 72 equals 0.5·6²·4 exactly: (1,1) stays.
    assert find_grid(9, 8, max_tiles=4, size=6) == (1, 1)
    assert find_grid(10, 8, max_tiles=4, size=6) == (2, 2)  # 80 > 72


def test_find_grid_min_tiles_and_size():
    assert find_grid(448, 448, min_tiles=2, max_tiles=4) == (2, 2)  # (1,1) is not a candidate
    assert find_grid(448, 448, min_tiles=1, max_tiles=4) == (1, 1)
    assert find_grid(64, 64, size=32) == (2, 2)  # the tie rule scales with size
    assert find_grid(64, 64, size=448) == (1, 1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_tiles=0), dict(min_tiles=5, max_tiles=4), dict(size=0), dict(size=-448), dict(max_tiles=2.5)],
)
def test_bad_tiling_arguments_raise(kwargs):
    with pytest.raises(SleighError):
        find_grid(448, 448, **kwargs)
    with pytest.raises(SleighError):
        tile_image(Image.new("RGB", (8, 8)), **kwargs)


@pytest.mark.parametrize("width, height", [(0, 10), (10, 0), (-1, 5)])
def test_find_grid_rejects_empty_sizes(width, height):
    with pytest.raises(SleighError):
        find_grid(width, height)


# --- pixel values ------------------------------------------------------------------------------


def test_pixel_values_match_internvl_astronaut():
    expected = np.load(ORACLE / "pixel_values_astronaut.npy")
    tiled = tile_image(ORACLE / "astronaut.png")
    assert tiled.pixel_values.shape == expected.shape == (1, 3, 448, 448)
    assert tiled.pixel_values.dtype == np.float32
    assert tiled.grid == (1, 1) and tiled.num_views == 1 and not tiled.has_thumbnail
    assert tiled.image_size == (512, 512)
    err = float(np.abs(tiled.pixel_values - expected).max())
    assert err <= PIXEL_TOL, f"max abs {err:.3g} > {PIXEL_TOL}"


def test_tiles_are_row_major_and_thumbnail_is_last():
    img = _noise(900, 600, seed=1)  # → 3 cols x 2 rows, so a column-major cut would differ
    tiled = tile_image(img)
    cols, rows = tiled.grid
    assert (cols, rows) == (3, 2)
    assert tiled.num_views == 7 and tiled.has_thumbnail
    resized = np.asarray(img.resize((448 * cols, 448 * rows), Image.Resampling.BICUBIC))
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        crop = resized[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448]
        err = np.abs(tiled.pixel_values[k] - _normalize_ref(crop)).max()
        assert err <= PIXEL_TOL, f"tile {k} (row {r}, col {c}) differs by {err:.3g}"
    thumb = np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC))
    assert np.abs(tiled.pixel_values[-1] - _normalize_ref(thumb)).max() <= PIXEL_TOL


def test_no_thumbnail_when_disabled_or_single_tile():
    img = _noise(900, 600, seed=2)
    without = tile_image(img, thumbnail=False)
    with_thumb = tile_image(img)
    assert without.num_views == 6 and not without.has_thumbnail
    np.testing.assert_array_equal(without.pixel_values, with_thumb.pixel_values[:6])
    assert tile_image(_noise(300, 300), thumbnail=True).num_views == 1


def test_tiled_image_is_frozen():
    tiled = tile_image(_noise(50, 50))
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiled.grid = (2, 2)
    assert isinstance(tiled, TiledImage)
    assert tiled.pixel_values.flags.c_contiguous


def test_tile_image_accepts_a_path(tmp_path):
    path = tmp_path / "noise.png"
    _noise(900, 600, seed=3).save(path)
    from_path = tile_image(path)
    from_str = tile_image(str(path))
    np.testing.assert_array_equal(from_path.pixel_values, tile_image(Image.open(path)).pixel_values)
    np.testing.assert_array_equal(from_path.pixel_values, from_str.pixel_values)


# --- loading -----------------------------------------------------------------------------------


def _exif_jpeg(path, orientation):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    img.save(path, "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, orientation=6)  # 6: display rotated 90° clockwise
    for source in (path, Image.open(path)):
        img = load_image(source)
        assert img.size == (20, 40)
        top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
        assert top[0] > 200 and top[2] < 60, f"top should be red, got {top}"  # the old left edge
        assert bottom[2] > 200 and bottom[0] < 60, f"bottom should be blue, got {bottom}"
    assert tile_image(path).image_size == (20, 40)


def test_exif_orientation_1_keeps_size(tmp_path):
    path = tmp_path / "upright.jpg"
    _exif_jpeg(path, orientation=1)
    assert load_image(path).size == (40, 20)


def _palette_image(transparent):
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    if transparent:
        img.info["transparency"] = 1
    return img


def _from_array(array, mode):
    img = Image.fromarray(array)  # Pillow 13 infers the mode from the dtype and refuses to be told
    assert img.mode == mode
    return img


MODES = [
    ("1", lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
    ("1-black", lambda: Image.new("1", (2, 2), 0), (0, 0, 0)),
    ("L", lambda: Image.new("L", (2, 2), 100), (100, 100, 100)),
    ("P", lambda: _palette_image(transparent=False), (10, 200, 30)),
    ("P-transparent", lambda: _palette_image(transparent=True), (255, 255, 255)),
    ("PA-transparent", lambda: _palette_image(False).convert("PA"), (10, 200, 30)),
    ("LA-opaque", lambda: Image.new("LA", (2, 2), (50, 255)), (50, 50, 50)),
    ("LA-transparent", lambda: Image.new("LA", (2, 2), (50, 0)), (255, 255, 255)),
    ("RGBA-opaque", lambda: Image.new("RGBA", (2, 2), (10, 20, 30, 255)), (10, 20, 30)),
    ("RGBA-transparent", lambda: Image.new("RGBA", (2, 2), (10, 20, 30, 0)), (255, 255, 255)),
    ("RGBA-half", lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
    # 16-bit is scaled (v/257): 0x1234 → 18; a clip would give 255, keeping the low byte 0x34 = 52
    ("I;16-low", lambda: _from_array(np.full((2, 2), 0x1234, np.uint16), "I;16"), (18, 18, 18)),
    ("I;16-high", lambda: _from_array(np.full((2, 2), 0xABCD, np.uint16), "I;16"), (171, 171, 171)),
    ("I;16-max", lambda: _from_array(np.full((2, 2), 65535, np.uint16), "I;16"), (255, 255, 255)),
    ("I;16B", lambda: _from_array(np.full((2, 2), 257 * 200, ">u2"), "I;16B"), (200, 200, 200)),
    ("I", lambda: _from_array(np.full((2, 2), 32896, np.int32), "I"), (128, 128, 128)),
    ("F", lambda: _from_array(np.full((2, 2), 100.4, np.float32), "F"), (100, 100, 100)),
    ("CMYK-white", lambda: Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
    ("CMYK-cyan", lambda: Image.new("CMYK", (2, 2), (255, 0, 0, 0)), (0, 255, 255)),
    ("RGB", lambda: Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3)),
]


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=n) for n, m, e in MODES])
def test_modes_convert_to_rgb(make, expected):
    source = make()
    img = load_image(source)
    assert img.mode == "RGB" and img.size == (2, 2)
    got = tuple(int(v) for v in np.asarray(img)[0, 0])
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), f"{source.mode}: got {got}, expected {expected}"


def test_pa_transparent_pixel_is_white():
    pa = _palette_image(False).convert("PA")
    pa.putpixel((0, 0), (1, 0))  # palette index 1, alpha 0
    rgb = np.asarray(load_image(pa))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 1]) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_a_png_colour_key_is_transparent_as_alpha_is(mode, tmp_path):
    """A PNG's tRNS chunk on an RGB or greyscale image names one colour "no pixel": those pixels come
    out white, as alpha 0 does (they kept the key colour, green on a red photo). RGB and 8-bit grey
    against Pillow's own conversion to RGBA composited on white."""
    rng = np.random.default_rng(5)
    if mode == "RGB":
        pixels, key = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8), (0, 255, 0)
        pixels[::2, ::3] = key
    else:
        dtype = np.uint8 if mode == "L" else np.uint16
        pixels, key = rng.integers(0, 256 if mode == "L" else 65536, (6, 8)).astype(dtype), 10 if mode == "L" else 40000
        pixels[::2, ::3] = key
    path = tmp_path / "keyed.png"
    Image.fromarray(pixels).save(path, transparency=key)
    with Image.open(path) as opened:
        assert opened.mode == mode and opened.info["transparency"] == key
        if mode != "I;16":  # Pillow's I;16 to RGBA clips instead of scaling
            on_white = Image.alpha_composite(Image.new("RGBA", opened.size, (255, 255, 255, 255)), opened.convert("RGBA"))
    got = np.asarray(load_image(path))
    keyed = np.all(pixels.reshape(6, 8, -1) == np.asarray(key).reshape(-1), axis=-1)
    assert keyed.sum() >= 9 and (got[keyed] == 255).all()
    if mode == "I;16":
        np.testing.assert_array_equal(got[~keyed][:, 0], np.rint(pixels[~keyed] / 257).astype(np.uint8))
    else:
        np.testing.assert_array_equal(got, np.asarray(on_white.convert("RGB")))


@pytest.mark.parametrize("key", [0x1234, 0x0012])
def test_a_sixteen_bit_rgb_pngs_colour_key_leaves_it_opaque_not_refused(key, tmp_path):
    """Pillow opens a 16-bit RGB PNG as 8-bit RGB and keeps its key in 16 bits: 0x1234 made the key
    comparison overflow (the image refused), 0x0012 whitened the pixel whose high byte is 0x12."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = struct.pack(">6H", key, 0, 0, 0x12FF, 0, 0)  # the keyed pixel, then one whose high byte is 0x12
    (tmp_path / "k.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
                                     + chunk(b"tRNS", struct.pack(">3H", key, 0, 0))
                                     + chunk(b"IDAT", zlib.compress(b"\x00" + pixels)) + chunk(b"IEND", b""))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "k.png")), [[[key >> 8, 0, 0], [0x12, 0, 0]]])


def test_an_exif_chunk_with_a_forged_length_is_not_read(tmp_path):
    """The memory guard's header walk (oriented_size) finds an eXIf chunk after the pixels by its length:
    one of 4 GB is skipped, not read (a reader would reserve that much)."""
    import io
    import struct

    from sleigh.runtime.image import oriented_size

    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, "PNG")
    forged = buf.getvalue()[:-12] + struct.pack(">I", 0xFFFFFFF0) + b"eXIf" + b"\0" * 8 + buf.getvalue()[-12:]
    (tmp_path / "f.png").write_bytes(forged)
    with Image.open(tmp_path / "f.png") as opened:
        assert oriented_size(opened) == (30, 20)


def test_sixteen_bit_png_file_is_scaled(tmp_path):
    path = tmp_path / "grey16.png"
    values = np.random.default_rng(4).integers(0, 65536, (8, 8)).astype(np.uint16)
    values[0, :2] = (0, 65535)
    Image.fromarray(values).save(path)  # mode I;16
    got = np.asarray(load_image(path))
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.rint(values / 257).astype(np.uint8))


def test_load_image_does_not_alias_caller_image():
    src = Image.new("RGB", (4, 4), (1, 2, 3))
    out = load_image(src)
    out.putpixel((0, 0), (9, 9, 9))
    assert src.getpixel((0, 0)) == (1, 2, 3)


# --- failures ----------------------------------------------------------------------------------


def _assert_user_error(source, *needles):
    with pytest.raises(SleighError) as info:
        load_image(source)
    message = str(info.value)
    assert "\n" not in message and " | " in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    _assert_user_error(path, str(path), "no such file")
    with pytest.raises(SleighError, match="no such file"):
        tile_image(str(path))


@pytest.mark.skipif(__import__("shutil").which("gs") is not None, reason="Ghostscript is installed: EPS decodes")
def test_a_format_pillow_identifies_and_cannot_decode_here_is_not_called_corrupt(tmp_path):
    """EPS needs Ghostscript to decode: it said "corrupt or truncated"."""
    Image.new("RGB", (20, 20)).save(tmp_path / "a.eps")
    message = _assert_user_error(tmp_path / "a.eps", "is an image in EPS, which this Pillow cannot decode", "Ghostscript")
    assert "corrupt" not in message


def test_directory(tmp_path):
    _assert_user_error(tmp_path, str(tmp_path), "directory")


def test_an_empty_path_is_called_empty_not_the_current_folder():
    assert _assert_user_error("", "is an empty path").startswith("image '' | ")  # Path("") is "." (it said "a directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_user_error(path, str(path), "empty")


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    _assert_user_error(path, str(path), "corrupt or unsupported")


def test_unsupported_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is text, not an image\n")
    _assert_user_error(path, str(path))


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path, fmt, suffix):
    full = tmp_path / f"full.{suffix}"
    _noise(128, 128).save(full, fmt)
    data = full.read_bytes()
    path = tmp_path / f"truncated.{suffix}"
    path.write_bytes(data[: len(data) // 2])  # the header survives, so open() alone would succeed
    _assert_user_error(path, str(path), "truncated")
    with pytest.raises(SleighError):
        load_image(Image.open(path))  # a lazily opened PIL image fails the same way


def test_wrong_source_type():
    with pytest.raises(SleighError, match="int"):
        load_image(42)


def test_decompression_bomb_by_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    assert load_image(path, max_pixels=400).size == (20, 20)
    with pytest.raises(SleighError, match="400 pixels") as info:
        load_image(path, max_pixels=399)
    assert "max-pixels" in str(info.value) and "399" in str(info.value)
    with pytest.raises(SleighError, match="too large"):
        tile_image(path, max_pixels=399)


def test_decompression_bomb_from_pillow(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises above 2x: 400 > 200
    _assert_user_error(path, str(path), "too large")


def test_pillow_bomb_warning_below_max_pixels_is_not_raised(tmp_path, monkeypatch):
    # Between Pillow's warning threshold and MAX_PIXELS the image loads, silently: MAX_PIXELS rules.
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (20, 20)


def test_runtime_image_does_not_import_torch():
    code = "import sys, sleigh.runtime.image; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_normalisation_follows_the_given_mean_and_std(tmp_path):
    """A package may carry other mean/std than ImageNet's: tiling uses what it is given."""
    path = tmp_path / "flat.png"
    Image.new("RGB", (448, 448), (128, 64, 255)).save(path)
    default = tile_image(path).pixel_values
    custom = tile_image(path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).pixel_values
    expected = (np.array([128, 64, 255], np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(custom[0, :, 0, 0], expected, atol=1e-6)
    assert not np.allclose(default, custom)


# --- what is refused before opening, and the pixel limit ---------------------------------------


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height, all black: a few KB on disk, width·height pixels decoded.
    Written chunk by chunk from the PNG spec, so making it never holds the image in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_huge_png_helper_is_a_real_png(tmp_path):
    path = huge_png(tmp_path / "small.png", 37, 5)
    with Image.open(path) as img:
        img.load()
        assert img.size == (37, 5) and img.mode == "1" and not np.asarray(img).any()


def test_default_pixel_limit_follows_the_grid():
    # 32x the largest grid's pixels, counted for at least InternVL's 12 tiles of 448, capped by Pillow.
    assert image_mod.default_max_pixels(12, 448) == 32 * 12 * 448 * 448 == 77_070_336
    assert image_mod.default_max_pixels(1, 448) == image_mod.default_max_pixels(12, 448)
    assert image_mod.default_max_pixels(24, 448) == 2 * image_mod.default_max_pixels(12, 448)
    # smaller tiles (the demo model's 112) take the photos InternVL takes (the Pipeline, like the CLI,
    # uses default_max_pixels() whatever the model: test_pipeline_api.py)
    assert image_mod.default_max_pixels(12, 112) == image_mod.default_max_pixels(12, 224) == image_mod.default_max_pixels()
    assert image_mod.default_max_pixels(12, 640) == 77_070_336 * 640**2 // 448**2
    assert image_mod.default_max_pixels(40, 896) == image_mod.MAX_PIXELS


def test_a_169_megapixel_png_of_a_few_kb_is_refused_from_its_header(tmp_path, monkeypatch):
    """The issue's case: a 13000x13000 PNG cost +620 MB. Refused without decoding a pixel."""
    path = huge_png(tmp_path / "huge.png", 13000, 13000)
    assert path.stat().st_size < 50_000
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    message = _assert_user_error(path, "13000x13000", "169,000,000 pixels", "77,070,336", "--max-pixels")
    assert "downscale" in message
    with pytest.raises(SleighError, match="13000x13000"):
        tile_image(path)
    bigger = huge_png(tmp_path / "bigger.png", 16000, 12000)  # past Pillow's own limit: no higher one to offer
    at_limit = str(pytest.raises(SleighError, load_image, bigger, max_pixels=image_mod.MAX_PIXELS).value)
    assert at_limit.endswith("Pillow's own limit (downscale the image)") and "--max-pixels" not in at_limit, at_limit


def test_pixel_limit_is_a_parameter_of_tiling(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 10)).save(path)
    assert tile_image(path, max_pixels=400).image_size == (40, 10)
    with pytest.raises(SleighError, match="400 pixels"):
        tile_image(path, max_pixels=399)
    # the default follows the tiling's largest grid, and takes InternVL's photos for small views too
    with pytest.raises(SleighError, match="154,140,672"):  # 32 · 24 · 448²
        tile_image(huge_png(tmp_path / "h.png", 13000, 12000), max_tiles=24)
    assert tile_image(huge_png(tmp_path / "ok.png", 4000, 3000), size=2).image_size == (4000, 3000)


@pytest.mark.parametrize("bad", [0, -1, image_mod.MAX_PIXELS + 1, 1.5, "100", True])
def test_bad_pixel_limit(tmp_path, bad):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(SleighError, match="max_pixels"):
        load_image(path, max_pixels=bad)


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "http://example.com/a.png", "s3://bucket/k.jpg",
                                 Path("https://example.com/cat.jpg")])
def test_url_is_not_a_file(url):
    message = _assert_user_error(url, "URL", "not supported", "download")
    if isinstance(url, str):
        assert url in message  # the address as given, not pathlib's "https:/..."


def test_a_file_whose_name_looks_like_a_url_still_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data:").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "data:" / "x.png")
    assert load_image("data:/x.png").size == (4, 4)


def test_fifo_is_not_read(tmp_path):
    import os

    path = tmp_path / "pipe.png"
    os.mkfifo(path)  # opening it would block until a writer came
    _assert_user_error(path, str(path), "not a regular file", "FIFO")


def test_dev_null_is_not_an_empty_image():
    message = _assert_user_error("/dev/null", "/dev/null", "not a regular file", "character device")
    assert "0 bytes" not in message


def test_the_normalisation_table_gives_the_bits_of_the_per_pixel_arithmetic():
    """Every uint8 value of every channel, in torchvision's order (x/255, then (x - mean)/std) in float32."""
    views = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    views[0] = np.arange(256, dtype=np.uint8).reshape(16, 16)[:, :, None]  # all 256 values in every channel
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))):
        x = views.astype(np.float32) / np.float32(255)
        want = ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(0, 3, 1, 2)
        got = image_mod._normalize(views, mean, std)
        assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want)
