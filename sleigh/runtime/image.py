"""Image loading and InternVL tiling, with numpy and Pillow only.

The reference model imports this module too, so PyTorch and the runtime share one implementation of
the tiling. It must never import torch.

    path / PIL image ─load_image─► RGB ─find_grid─► (cols, rows)
      ─resize (bicubic) to (size·cols, size·rows), crop row-major (+ thumbnail last)
      ─/255, ImageNet mean/std─► pixel_values [T, 3, size, size] float32
"""

from __future__ import annotations

import functools
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sleigh.errors import SleighError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The largest image (width·height) load_image can ever decode: Pillow's own hard limit (twice its
# warning threshold). No `max_pixels` may exceed it.
MAX_PIXELS = 178_956_970

# Tiling resizes every image to at most max_tiles·size² pixels, so a file far larger than that only
# costs memory (a 13000x13000 PNG of 20 KB decodes to 500 MB). The default limit is PIXEL_HEADROOM
# times the largest grid, counted for at least InternVL's 12 tiles of 448 pixels so that a small
# --max-tiles or a model of smaller tiles does not refuse a photo InternVL itself takes:
# 32 · 12 · 448² = 77 Mpx, above any phone or full-frame camera photo. It is checked on the header,
# before any pixel is decoded.
PIXEL_HEADROOM = 32
INTERNVL_MAX_TILES = 12
INTERNVL_TILE_SIZE = 448
INTERNVL_PATCH = 14  # the ViT's patch side: a 448-px view is 32 x 32 patches, 256 tokens after pixel shuffle
TILES_LIMIT = 40  # the most tiles any model here takes: export's --max-tiles range, checked in every config


class ImageError(SleighError):
    """An image that cannot be used as given (its file, format, size or pixels), as opposed to a bad
    argument: what `sleigh eval` skips a line for."""


# Alpha is composited onto this colour: documents and screenshots with transparency are usually
# meant to be seen on a white page, and InternVL's own `convert("RGB")` would show hidden colour.
BACKGROUND = (255, 255, 255)

ImageSource = Union[str, os.PathLike, Image.Image]

_RESAMPLE = Image.Resampling.BICUBIC  # what InternVL's `image.resize(...)` defaults to
RESAMPLE = "bicubic"  # its name, as a config and a manifest say it (the one resize this tiler implements)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # "https://x", or "https:/x" once pathlib has collapsed it


@dataclass(frozen=True, eq=False)
class TiledImage:
    """The views of one image, ready for the vision module.

    pixel_values: float32 [num_views, 3, size, size], ImageNet-normalised; tiles row-major, then the
    thumbnail (when there is one). grid: (cols, rows). image_size: the loaded image's (width, height).
    """

    pixel_values: np.ndarray
    grid: tuple[int, int]
    num_views: int
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        cols, rows = self.grid
        if self.pixel_values.ndim != 4 or self.pixel_values.shape[0] != self.num_views:
            raise ValueError(f"pixel_values {self.pixel_values.shape} does not hold {self.num_views} views")
        if self.num_views not in (cols * rows, cols * rows + 1):
            raise ValueError(f"{self.num_views} views do not fit grid {self.grid}")

    @property
    def has_thumbnail(self) -> bool:
        return self.num_views == self.grid[0] * self.grid[1] + 1


def max_views(max_tiles: int, thumbnail: bool) -> int:
    """The most views tiling gives: the tiles, and the thumbnail, which comes only with several tiles."""
    return max_tiles + (1 if thumbnail and max_tiles > 1 else 0)


def tiles_within(views: int | None, max_tiles: int, thumbnail: bool) -> int:
    """The most tiles (up to `max_tiles`) whose views fit in `views` (None: no limit): an engine built
    for fewer views than the model tiles for."""
    if views is None:
        return max_tiles
    return max((t for t in range(1, max_tiles + 1) if max_views(t, thumbnail) <= views), default=1)


def default_max_pixels(max_tiles: int = INTERNVL_MAX_TILES, size: int = INTERNVL_TILE_SIZE) -> int:
    """The largest image (width·height) tiling for `max_tiles` views of `size` pixels accepts by
    default: PIXEL_HEADROOM times the largest grid (at least InternVL's 12 tiles of 448), at most MAX_PIXELS."""
    _check_tiling_args(1, max_tiles, size)
    grid = max(max_tiles * size * size, INTERNVL_MAX_TILES * INTERNVL_TILE_SIZE ** 2)
    return min(PIXEL_HEADROOM * grid, MAX_PIXELS)


def check_image_path(source: str | os.PathLike) -> Path:
    """What can be said of an image path without opening it: it exists and is a non-empty regular
    file (not a URL, a folder, a FIFO or a device, which would block or read as empty)."""
    path = Path(source)
    what = f"image {str(source)!r}"
    if not str(source):  # Path("") is ".", the folder
        raise ImageError(what, "is an empty path", "an image file")
    try:
        info = path.stat()
    except FileNotFoundError:
        if _URL.match(str(source)):
            raise ImageError(what, "is a URL, and URLs are not supported",
                              "a local image file (download it first, e.g. `curl -O URL`)") from None
        raise ImageError(what, "no such file", "an existing image file") from None
    except OSError as exc:
        raise ImageError(what, f"cannot be read ({_reason(exc)})", "a readable image file") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(what, "is a directory", "an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(what, f"is not a regular file (a {file_kind(info.st_mode)})",
                          "an image file (PNG, JPEG, WebP, ...)")
    if info.st_size == 0:
        raise ImageError(what, "is an empty file (0 bytes)", "an image file (PNG, JPEG, WebP, ...)")
    return path


# Pillow's words where it identified a format and has no decoder for it here: EPS wants Ghostscript, and a
# codec Pillow was built without is "decoder ... not available"
NO_DECODER = ("Ghostscript", "not available")
MAX_EXIF_BYTES = 1 << 20  # an eXIf chunk past this is not read (JPEG's EXIF holds 64 KiB)
# EXIF orientations (tag 0x0112) that turn the picture a quarter: `load_image` transposes it to h x w
QUARTER_TURNS = (5, 6, 7, 8)


def oriented_size(opened: Image.Image) -> tuple[int, int]:
    """An opened (not decoded) image's (width, height) as `load_image` returns it, EXIF orientation
    applied, from its header alone."""
    width, height = opened.size
    if opened.format == "PNG":  # Pillow's getexif() decodes a PNG to find an eXIf chunk after its pixels
        exif = Image.Exif()
        data = opened.info.get("exif") or _png_exif_after_pixels(opened.fp)  # before them: in the header's info
        if data:
            exif.load(data)
    else:
        exif = opened.getexif()
    return (height, width) if exif.get(0x0112) in QUARTER_TURNS else (width, height)


def _png_exif_after_pixels(fp) -> bytes | None:
    """An opened PNG's eXIf chunk where it comes after the image data (Pillow reads it only when it
    decodes; load_image turns by it), found by seeking from chunk header to chunk header, nothing
    decoded; the file's position is left where it was."""
    start = fp.tell()
    try:
        fp.seek(8)  # the signature
        while len(header := fp.read(8)) == 8:
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"eXIf":  # a forged length must not make the reader reserve gigabytes
                data = fp.read(length) if length <= MAX_EXIF_BYTES else b""
                return data if len(data) == length else None
            if kind == b"IEND":
                return None
            fp.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
        return None
    finally:
        fp.seek(start)


def load_image(source: ImageSource, *, max_pixels: int | None = None) -> Image.Image:
    """Load `source` (a path or a PIL image) as a fully decoded RGB image.

    EXIF orientation is applied. Alpha (RGBA, LA, PA, P with transparency) is composited onto WHITE.
    16-bit greyscale (I;16*, and I, taken as 0..65535) is scaled to 8 bits (v/257, rounded), not
    clipped; F is taken on Pillow's 0..255 scale and clipped. A file over `max_pixels` (default:
    `default_max_pixels()`) is refused from its header, before decoding; a PIL image is already
    decoded and is not checked. Every failure is a SleighError naming the source.
    """
    max_pixels = _check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        what = f"image {source.mode} {source.size[0]}x{source.size[1]}"
        try:
            source.load()
            image = ImageOps.exif_transpose(source)
            return _to_rgb(image, what)
        except SleighError:
            raise
        except Exception as exc:  # a lazily opened PIL image can still fail to decode here
            raise ImageError(what, f"cannot be decoded ({_reason(exc)})", "a readable image") from exc
    if not isinstance(source, (str, os.PathLike)):
        raise SleighError("image", f"got a {type(source).__name__}", "a file path (str or pathlib.Path) or a PIL.Image.Image")
    path = check_image_path(source)
    what = f"image {str(source)!r}"
    fmt = None  # the format Pillow identified, once it has
    try:
        with warnings.catch_warnings():
            # max_pixels is the limit; Pillow's lower warning threshold would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                fmt = opened.format
                width, height = opened.size
                if width * height > max_pixels:
                    raise _bomb(what, width, height, max_pixels)
                # a 16-bit RGB PNG opens as 8-bit RGB, its colour key still in 16 bits: no 8-bit pixel stands for it
                sixteen_bit_rgb = opened.mode == "RGB" and any(";16" in str(t[3]) for t in opened.tile)
                opened.load()  # decode everything now, so a truncated file fails here
                image = ImageOps.exif_transpose(opened)
                if sixteen_bit_rgb:
                    image.info.pop("transparency", None)
        return _to_rgb(image, what)
    except SleighError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(what, f"is too large to decode safely ({_reason(exc)})", _max_pixels_text(max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(what, "is not an image Pillow can identify (corrupt or unsupported format)",
                          "an image file (PNG, JPEG, WebP, BMP, GIF, TIFF, ...)") from exc
    except PermissionError as exc:
        raise ImageError(what, "cannot be read (permission denied)", "a readable image file") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad data
        if fmt is not None and any(s in str(exc) for s in NO_DECODER):  # identified, and no way here to decode it
            raise ImageError(what, f"is an image in {fmt}, which this Pillow cannot decode ({_reason(exc)})",
                             "an image in a format decoded here: PNG, JPEG, WebP, BMP, GIF, TIFF, ...") from exc
        raise ImageError(what, f"is corrupt or truncated ({_reason(exc)})", "a complete, valid image file") from exc


def find_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = INTERNVL_MAX_TILES,
              size: int = INTERNVL_TILE_SIZE) -> tuple[int, int]:
    """The (cols, rows) grid InternVL's `dynamic_preprocess` picks for a width x height image.

    Mirrors the original step for step (same candidate order, same float arithmetic): the candidate
    whose cols/rows is closest to width/height wins; on an exact tie a later (larger) grid replaces
    the best only if width·height > 0.5·size²·cols·rows of that later grid. Not symmetric under
    transpose: 700x200 → (3, 1) but 200x700 → (1, 4).
    """
    _check_tiling_args(min_tiles, max_tiles, size)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SleighError(f"image {name}", f"got {value!r}", "a positive integer")
    width, height = int(width), int(height)
    aspect_ratio = width / height
    # InternVL iterates a set sorted by area; equal areas keep CPython's (deterministic) set order.
    target_ratios = set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                        if min_tiles <= i * j <= max_tiles)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * size * size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def object_tile(grid: tuple[int, int], image_size: tuple[int, int], box) -> int:
    """The row-major index of the tile holding the centre of `box` (x0, y0, x1, y1; image px), for a
    (cols, rows) grid stretched over the whole image as `tile_image` cuts it."""
    cols, rows = grid
    w, h = image_size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    c = next((c for c in range(cols) if cx < (c + 1) * w / cols), cols - 1)
    r = next((r for r in range(rows) if cy < (r + 1) * h / rows), rows - 1)
    return r * cols + c


def tile_image(image: ImageSource, *, min_tiles: int = 1, max_tiles: int = INTERNVL_MAX_TILES, size: int = INTERNVL_TILE_SIZE,
               thumbnail: bool = True, mean: tuple[float, float, float] = IMAGENET_MEAN,
               std: tuple[float, float, float] = IMAGENET_STD,
               max_pixels: int | None = None) -> TiledImage:
    """Tile `image` (a path or PIL image) as InternVL does and normalise it for the vision module.

    The image is resized (bicubic) to (size·cols, size·rows) and cut row-major into size x size tiles;
    when there is more than one tile and `thumbnail` is set, the whole image resized to size x size
    is appended last. A file over `max_pixels` (default: `default_max_pixels(max_tiles, size)`) is
    refused before decoding.
    """
    _check_tiling_args(min_tiles, max_tiles, size)
    rgb = load_image(image, max_pixels=default_max_pixels(max_tiles, size) if max_pixels is None else max_pixels)
    width, height = rgb.size
    cols, rows = find_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, size=size)
    resized = np.asarray(rgb.resize((size * cols, size * rows), _RESAMPLE))  # (rows·size, cols·size, 3)
    views = (
        resized.reshape(rows, size, cols, size, 3)  # (rows, size, cols, size, 3)
        .transpose(0, 2, 1, 3, 4)  # (rows, cols, size, size, 3): row-major tiles
        .reshape(rows * cols, size, size, 3)
    )
    if thumbnail and cols * rows > 1:
        thumb = np.asarray(rgb.resize((size, size), _RESAMPLE))  # (size, size, 3)
        views = np.concatenate([views, thumb[None]], axis=0)
    return TiledImage(pixel_values=_normalize(views, mean, std), grid=(cols, rows), num_views=views.shape[0],
                      image_size=(width, height))


def _normalize(views: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (T, H, W, 3) → float32 (T, 3, H, W), in torchvision's order: x/255, then (x − mean)/std.
    Each channel looks its 256 values up in a table computed by those float32 operations (the same
    bits, 2.6x faster than computing every pixel: 1.1 against 2.8 ms for 7 views of 112 px)."""
    table = _normalized_values(tuple(mean), tuple(std))  # (256, 3)
    out = np.empty((views.shape[0], 3) + views.shape[1:3], np.float32)
    for c in range(3):
        out[:, c] = table[:, c][views[..., c]]
    return out


@functools.lru_cache(maxsize=8)
def _normalized_values(mean: tuple, std: tuple) -> np.ndarray:
    x = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    keyed = _keyed_transparent(image)
    rgb = _opaque_rgb(image, what)
    if keyed is None or not keyed.any():
        return rgb
    pixels = np.array(rgb)
    pixels[keyed] = BACKGROUND
    return Image.fromarray(pixels)


def _keyed_transparent(image: Image.Image) -> np.ndarray | None:
    """Where an RGB or greyscale image (8 or 16 bits) is transparent by its colour key (a PNG's tRNS
    chunk: Pillow's info["transparency"], the one colour that stands for "no pixel"), or None. A
    palette image's key is its alpha (_opaque_rgb)."""
    key = image.info.get("transparency")
    if key is None or image.mode not in ("RGB", "L", *_SIXTEEN_BIT_MODES):
        return None
    pixels = np.asarray(image)
    if image.mode == "RGB":  # a 16-bit RGB PNG opens as 8-bit RGB with its key still in 16 bits: left opaque,
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, int) and 0 <= k <= 255 for k in key)):
            return None  # as Pillow's own RGBA leaves it
        return np.all(pixels == np.asarray(key, dtype=pixels.dtype), axis=-1)
    return pixels == key if isinstance(key, int) else None


def _opaque_rgb(image: Image.Image, what: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA") if mode != "La" else image.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        grey = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(what, f"has pixel mode {mode!r}, which cannot be converted to RGB", "an RGB-convertible image") from exc


def _check_tiling_args(min_tiles: int, max_tiles: int, size: int) -> None:
    for name, value in (("min_tiles", min_tiles), ("max_tiles", max_tiles), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SleighError(name, f"got {value!r}", "an integer")
    if min_tiles < 1:
        raise SleighError("min_tiles", f"got {min_tiles}", "at least 1")
    if max_tiles < min_tiles:
        raise SleighError("max_tiles", f"got {max_tiles}, below min_tiles {min_tiles}", f"at least {min_tiles}")
    if size < 1:
        raise SleighError("size", f"got {size}", "a positive number of pixels, e.g. 448")


def _check_max_pixels(max_pixels: int | None) -> int:
    if max_pixels is None:
        return default_max_pixels()
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or not 1 <= max_pixels <= MAX_PIXELS:
        raise SleighError("max_pixels", f"got {max_pixels!r}", f"an integer from 1 to {MAX_PIXELS:,} (Pillow's limit)")
    return int(max_pixels)


def _bomb(what: str, width: int, height: int, max_pixels: int) -> ImageError:
    problem = f"is {width}x{height} = {width * height:,} pixels, more than tiling needs and too large to decode safely"
    return ImageError(what, problem, _max_pixels_text(max_pixels))


def _max_pixels_text(max_pixels: int) -> str:
    if max_pixels >= MAX_PIXELS:  # no higher limit to offer
        return f"at most {max_pixels:,} pixels, Pillow's own limit (downscale the image)"
    return (f"at most {max_pixels:,} pixels (downscale the image, or raise the limit: `sleigh run --max-pixels N`, "
            f"max_pixels= in Python; Pillow's own limit is {MAX_PIXELS:,})")


def file_kind(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is (its st_mode): `FIFO`, `character device`, ..."""
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
