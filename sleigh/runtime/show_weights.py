"""`sleigh run IMAGE --show-weights out.png`: GSWA's weight of each tile drawn over the image.

Pillow only. The tiles are the runtime's (a (cols, rows) grid stretched over the whole image, as
`image.tile_image` cuts it after resizing), so each overlay covers exactly what its view saw. A tile's
colour runs from blue (lowest weight) to red (highest) and its number is the weight itself; the
thumbnail (always 1) is named in the caption.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sleigh.errors import SleighError, first_line
from sleigh.runtime.image import ImageSource, load_image

MAX_SIDE = 1600  # larger images are drawn scaled down, so the numbers stay readable
MIN_SIDE = 224  # smaller ones scaled up (to this short side, or MAX_SIDE long), so a tile holds its number
LOW, HIGH = (40, 90, 230), (235, 40, 30)  # the heat scale's ends


def heat(t: float) -> tuple[int, int, int]:
    """t in [0, 1] -> a colour from LOW to HIGH."""
    t = min(max(t, 0.0), 1.0)
    return tuple(round(lo + t * (hi - lo)) for lo, hi in zip(LOW, HIGH))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def draw_weights(image: ImageSource, grid: tuple[int, int], weights: list[float]) -> Image.Image:
    """The image with each tile's weight as a heat overlay and a number; the highest tile outlined."""
    cols, rows = grid
    n = cols * rows
    if len(weights) < n:
        raise SleighError("weights", f"{len(weights)} weights for a {cols}x{rows} grid", "one weight per tile")
    rgb = load_image(image)
    scale = min(MAX_SIDE / max(rgb.size), max(1.0, MIN_SIDE / min(rgb.size)))
    if scale == 1:
        base = rgb.copy()
    else:  # pixels kept sharp where scaled up: a 1x1 photo is one colour, not a blur
        base = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                          Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    W, H = base.size
    tiles = [float(w) for w in weights[:n]]
    lo, hi = min(tiles), max(tiles)
    top = max(range(n), key=tiles.__getitem__)

    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = _font(max(12, min(W // cols, H // rows) // 6))
    for i, w in enumerate(tiles):
        r, c = divmod(i, cols)
        box = (round(c * W / cols), round(r * H / rows), round((c + 1) * W / cols) - 1, round((r + 1) * H / rows) - 1)
        t = (w - lo) / (hi - lo) if hi > lo else 0.5
        draw.rectangle(box, fill=heat(t) + (round(60 + 90 * t),), outline=(255, 255, 255, 200),
                       width=max(1, min(W, H) // 400 + 1))
        label = f"{w:.2f}"
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0, y0, x1, y1 = draw.textbbox((cx, cy), label, font=font, anchor="mm")
        draw.rectangle((x0 - 4, y0 - 3, x1 + 4, y1 + 3), fill=(0, 0, 0, 170))
        draw.text((cx, cy), label, font=font, fill=(255, 255, 255, 255), anchor="mm")
    if n > 1:
        r, c = divmod(top, cols)
        draw.rectangle((round(c * W / cols), round(r * H / rows), round((c + 1) * W / cols) - 1,
                        round((r + 1) * H / rows) - 1), outline=(255, 230, 0, 255), width=max(3, min(W, H) // 150))
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")

    caption = (f"GSWA: {cols}x{rows} tiles, highest {tiles[top]:.2f} (row {top // cols + 1}, column {top % cols + 1})"
               + (", thumbnail 1.00" if len(weights) > n else "") if n > 1 else "GSWA: one view (weight 1): no tiles to weigh")
    cap_font = _font(max(12, W // 50))
    _, _, cap_w, cap_h = draw.textbbox((0, 0), caption, font=cap_font)
    framed = Image.new("RGB", (max(W, cap_w + 16), H + cap_h + 12), (20, 20, 20))  # the caption whole, however narrow
    framed.paste(out, (0, 0))
    ImageDraw.Draw(framed).text((8, H + 6), caption, font=cap_font, fill=(255, 255, 255))
    return framed


def output_format(out: Path, image: ImageSource | None = None) -> str:
    """Pillow's format name for `out`'s suffix, and a location it can be written to that is not the
    file of `image` (the photo the picture is drawn from); checked before any model work."""
    from sleigh.staging import check_output_file

    out = Path(out)
    check_output_file(out, "an image file name, e.g. weights.png")
    if isinstance(image, (str, os.PathLike)) and out.exists():
        try:
            same = os.path.samefile(image, out)
        except OSError:
            same = False
        if same:
            raise SleighError(str(out), f"is the input image {str(image)!r}, which the picture would replace",
                              "another file name for the picture")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise SleighError(str(out), f"unknown image suffix {out.suffix!r}", "an image file name that Pillow writes in colour: .png, .jpg, .webp, .gif, .tiff, ...")
    try:  # Pillow lists formats it cannot write a colour picture in (XBM, MSP, PALM) or has no encoder for
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise SleighError(str(out), f"Pillow cannot write a colour image as {fmt} ({first_line(e)})",
                          "an image file name that Pillow writes in colour: .png, .jpg, .webp, .gif, .tiff, ...") from None
    return fmt


def save_weights_image(image: ImageSource, grid: tuple[int, int], weights: list[float], out: Path) -> Path:
    """Draw and write `out` atomically (format from its suffix: .png, .jpg, .webp, ...)."""
    from sleigh.runtime.package import write_bytes_atomic

    out = Path(out)
    fmt = output_format(out, image)
    buf = io.BytesIO()
    draw_weights(image, grid, weights).save(buf, format=fmt)
    try:
        write_bytes_atomic(out, buf.getvalue())
    except OSError as e:  # checked up front (output_format), but a folder may change meanwhile
        raise SleighError(str(out), f"cannot be written ({e.strerror or first_line(e)})", "a writable location") from None
    return out
