"""A task where the answer lives in one tile: a small coloured shape on a large textured canvas.

    seed, index ─► canvas (min..max px per side, any aspect ratio, muted texture, grey distractors)
               ─► one coloured circle/square/triangle (10-24 px) inside one cell of a 3x3 grid
               ─► questions about its colour, its shape and where it is (the cell)

Image `index` of `seed` is the same whatever `n` is, so splits are seeds: train on one, evaluate on
another. numpy and Pillow only (the runtime's eval reads these files too).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sleigh import staging
from sleigh.errors import SleighError, check_seed
from sleigh.runtime.image import default_max_pixels

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (235, 205, 25),
    "purple": (145, 50, 185),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
QUESTIONS = {
    "colour": ("What colour is the coloured shape?", "Which colour does the coloured shape have?"),
    "shape": ("What shape is the coloured object?", "Which shape is drawn in colour?"),
    "position": ("Where is the coloured shape?", "In which part of the image is the coloured shape?"),
}
QUESTION_TYPES = tuple(QUESTIONS)
JPEG_QUALITY = 92
# The largest canvas side: a square of it stays within the pixel limit every command loads images under by
# default (runtime.image.default_max_pixels(), 77 Mpx); past it, train and eval refuse the images synth wrote.
MAX_SIDE = math.isqrt(default_max_pixels())


def position_name(row: int, col: int) -> str:
    """'top left', 'top', ..., 'center', ..., 'bottom right' for a cell of the 3x3 grid."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}


def _margin(size: int) -> int:
    return 2 + size // 4


def cell_needs(size: int) -> int:
    """The smallest cell of the 3x3 grid an object of `size` px fits, margins included."""
    return size + 2 * _margin(size) + 1


@dataclass(frozen=True)
class SynthSpec:
    """What `render` draws; the curriculum of `sleigh train` varies the sizes."""

    min_size: int = 448  # canvas side, px
    max_size: int = 1800
    min_object: int = 10  # the coloured shape's side, px
    max_object: int = 24
    min_distractors: int = 3
    max_distractors: int = 10

    def __post_init__(self):
        if not 32 <= self.min_size <= self.max_size:
            raise SleighError("image size range", f"{self.min_size}..{self.max_size} px",
                              "32 <= min size <= max size")
        if self.max_size > MAX_SIDE:
            raise SleighError("image size range", f"{self.min_size}..{self.max_size} px: a {self.max_size} px square "
                              f"is {self.max_size ** 2:,} pixels, past the {default_max_pixels():,} that run, train "
                              "and eval load", f"max size <= {MAX_SIDE} px")
        if not 4 <= self.min_object <= self.max_object:
            raise SleighError("object size range", f"{self.min_object}..{self.max_object} px",
                              "4 <= min object <= max object")
        if 3 * cell_needs(self.max_object) > self.min_size:
            raise SleighError("object size range", f"objects up to {self.max_object} px do not fit a 3x3 grid of a "
                              f"{self.min_size} px canvas", f"min size >= {3 * cell_needs(self.max_object)} px")
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise SleighError("distractors", f"{self.min_distractors}..{self.max_distractors}", "0 <= min <= max")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    colour: str
    shape: str
    position: str
    box: tuple[int, int, int, int]  # the coloured shape's bounding box (x0, y0, x1, y1), canvas px

    def labels(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "position": self.position, "box": list(self.box)}


def rng_for(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def render(rng: np.random.Generator, spec: SynthSpec = SynthSpec()) -> Sample:
    """One canvas with its coloured shape and distractors, drawn from `rng`."""
    w, h = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    image = Image.fromarray(_texture(rng, w, h))
    draw = ImageDraw.Draw(image)

    size = int(rng.integers(spec.min_object, spec.max_object + 1))
    row, col = (int(v) for v in rng.integers(0, 3, size=2))
    # the shape lies wholly inside its cell, a margin away from the cell's edges
    margin = _margin(size)
    cx = int(rng.integers(col * w // 3 + margin, (col + 1) * w // 3 - size - margin + 1))
    cy = int(rng.integers(row * h // 3 + margin, (row + 1) * h // 3 - size - margin + 1))
    box = (cx, cy, cx + size, cy + size)

    for _ in range(int(rng.integers(spec.min_distractors, spec.max_distractors + 1))):
        d = int(rng.integers(spec.min_object, 2 * spec.max_object + 1))
        for _try in range(20):  # keep distractors off the coloured shape
            x, y = int(rng.integers(0, w - d)), int(rng.integers(0, h - d))
            if x > box[2] + 4 or x + d < box[0] - 4 or y > box[3] + 4 or y + d < box[1] - 4:
                grey = int(rng.integers(40, 216))
                _draw_shape(draw, SHAPES[int(rng.integers(0, 3))], (x, y, x + d, y + d), (grey, grey, grey))
                break

    colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
    shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
    _draw_shape(draw, shape, box, COLOURS[colour])
    return Sample(image, colour, shape, position_name(row, col), box)


def questions(sample: Sample, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(type, question, answer) for each question type, a phrasing drawn from `rng`."""
    answers = {"colour": sample.colour, "shape": sample.shape, "position": sample.position}
    return [(kind, QUESTIONS[kind][int(rng.integers(0, len(QUESTIONS[kind])))], answers[kind])
            for kind in QUESTION_TYPES]


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Muted low-frequency blotches plus fine grain: busy, but never one of the six colours. (Computed
    one channel plane at a time: numpy broadcasting over a trailing axis of 3 is several times slower.)"""
    base = rng.integers(90, 190) + rng.integers(-15, 16, size=3).astype(np.float32)  # a tinted grey
    coarse = rng.normal(0, 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
    low = np.asarray(Image.fromarray(np.uint8(np.clip(128 + 40 * coarse, 0, 255))).resize((w, h), Image.BICUBIC),
                     np.float32).transpose(2, 0, 1) - 128  # (3, h, w)
    grey = (low[0] + low[1] + low[2]) / np.float32(3)
    grain = rng.normal(0, 4, size=(h, w)).astype(np.float32)
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        out[..., c] = np.clip(base[c] + (grey + 0.35 * (low[c] - grey)) + grain, 0, 255)  # low saturation, grain
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def write_split(out: Path, n: int, seed: int, *, split: str = "train", spec: SynthSpec = SynthSpec(),
                force: bool = False, progress=None) -> Path:
    """Write `out/{split}/NNNNNN.jpg` and `out/{split}.jsonl` (one line per question, paths relative
    to `out`). The images' folder is renamed into place first and the JSONL last, so an interrupted
    run leaves no JSONL that names missing images."""
    out = Path(out)
    if n < 1:
        raise SleighError("--n", f"got {n}", "a number of images >= 1")
    check_seed("--seed", seed)
    staging.check_output_dir(out)  # a file there or where one of its folders goes, no folder makeable: before any image
    if not split or any(c in split for c in "/\\") or split.startswith(".") or split.endswith(".jsonl"):
        raise SleighError("--split", f"got {split!r}", "a plain name such as train or heldout")
    jsonl, images = out / f"{split}.jsonl", out / split
    if (jsonl.exists() or images.exists()) and not force:
        raise SleighError(str(jsonl), "split already exists", "another --split name or folder, or --force")
    out.mkdir(parents=True, exist_ok=True)
    staging.clean_stale(out, split)  # what synths of this split killed by a signal (no cleanup) left behind
    tmp = staging.make(out, split)  # named with its owner, so that a later run knows when it is stale
    try:
        lines = []
        for i in range(n):
            rng = rng_for(seed, i)
            sample = render(rng, spec)
            name = f"{i:06d}.jpg"
            sample.image.save(tmp / name, quality=JPEG_QUALITY, subsampling=0)
            meta = {**sample.labels(), "size": list(sample.image.size)}
            for kind, q, a in questions(sample, rng):
                lines.append(json.dumps({"image": f"{split}/{name}", "question": q, "answer": a, "type": kind,
                                         "meta": meta}))
            if progress is not None:
                progress.advance(1)
        if images.is_dir() and not images.is_symlink():
            shutil.rmtree(images)
        elif images.exists() or images.is_symlink():  # --force over a file (or a link) of the split's name
            images.unlink()
        tmp.rename(images)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from sleigh.runtime.package import write_bytes_atomic

    (out / f"{split}.spec.json").write_text(json.dumps({"n": n, "seed": seed, **asdict(spec)}, indent=2) + "\n")
    write_bytes_atomic(jsonl, ("\n".join(lines) + "\n").encode())  # last: a split with a JSONL is complete
    return jsonl


def task_text() -> str:
    """Every question and answer of the task, one per line (a tokenizer corpus)."""
    lines = [q for qs in QUESTIONS.values() for q in qs]
    lines += [a for answers in ANSWERS.values() for a in answers]
    return "\n".join(lines) + "\n"
