"""`sleigh train`'s batches: step k's images and questions, tiled exactly as the runtime tiles them, a
pure function of (seed, k). No torch here: making a batch is numpy and Pillow."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sleigh.data.qa import QA, QAData
from sleigh.errors import SleighError
from sleigh.data.synth import COLOURS, SHAPES, SynthSpec, cell_needs, questions, render
from sleigh.runtime.image import TiledImage, tile_image
from sleigh.sleighvl.config import SleighVLConfig

# The curriculum's phases: (end as a fraction of the curriculum, most tiles, object side range in canvas px);
# then the data. By default the curriculum is the run's first CURRICULUM_SHARE (or --curriculum-steps).
CURRICULUM = ((0.4, 1, (40, 80)), (0.7, 2, (24, 60)), (1.0, 4, (16, 40)))
CURRICULUM_SHARE = 0.5
# Threads that draw (curriculum) and tile a batch's images between training steps, not during one: a
# batch made in a thread while a step trains (session 14) fought torch's two threads for the 2-core CPU,
# and on one day made steps up to 1.7x slower (benchmarks/RESULTS.md, "A shorter recipe for 20 minutes").
# Drawing the curriculum's samples on them too takes a one-tile batch from 0.21-0.28 to 0.13-0.17 s.
TILE_THREADS = 2


@dataclass
class Example:
    image: object  # a path or a PIL image
    qas: list[tuple[str, str]]  # (question, answer)
    labels: tuple[int, int] | None  # (colour index, shape index) for the auxiliary loss
    max_tiles: int | None = None  # a curriculum phase's tile limit
    source: str = ""
    box: tuple[int, int, int, int] | None = None  # the object's box (image px), for --gswa-hint


@dataclass
class Batch:
    examples: list[Example]
    tiled: list[TiledImage]
    curriculum: bool = False  # drawn by a curriculum phase (not from the data)


def labels_of(qa: QA) -> tuple[int, int] | None:
    colour, shape = qa.meta.get("colour"), qa.meta.get("shape")
    if colour in COLOURS and shape in SHAPES:
        return list(COLOURS).index(colour), SHAPES.index(shape)
    return None


def box_of(qa: QA) -> tuple[int, int, int, int] | None:
    box = qa.meta.get("box")
    ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    return tuple(box) if ok else None


class Batches:
    """Step k's examples, a pure function of (seed, k): the JSONL's images in a per-epoch shuffle,
    or during a curriculum phase, synthetic samples drawn on the fly."""

    def __init__(self, data: QAData, opts, curriculum: bool, cfg: SleighVLConfig):
        self.groups = data.by_image()
        self.jsonl = data.path
        self.opts, self.curriculum, self.cfg = opts, curriculum, cfg
        sizes = [qa.meta.get("size") for _, qas in self.groups for qa in qas[:1]]
        sizes = [s for s in sizes if isinstance(s, list) and len(s) == 2]
        self.canvas = (min(min(s) for s in sizes), max(max(s) for s in sizes)) if sizes else (224, 560)
        self._pool = None  # inside `with`: the threads that tile a batch's images
        self.undecodable: dict[str, str] = {}  # an image (path) that passed the header check and failed to decode -> why

    def __enter__(self) -> Batches:
        self._pool = ThreadPoolExecutor(TILE_THREADS, thread_name_prefix="sleigh-tiles")
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def phase(self, step: int, frac: float) -> int:
        """0, 1, 2 for the curriculum's phases, 3 for the data: by step when the curriculum's length is
        given in steps, else by the run's fraction `frac` (of its steps, or of its minutes)."""
        if not self.curriculum:
            return len(CURRICULUM)
        steps = self.opts.curriculum_steps
        c = step / steps if steps else frac / CURRICULUM_SHARE
        return next((i for i, (end, _, _) in enumerate(CURRICULUM) if c < end), len(CURRICULUM))

    def _jobs(self, step: int, phase: int) -> list[Example | tuple[np.random.Generator, int]]:
        """Step `step`'s examples, or for a curriculum phase, each sample's own random stream and the
        phase (the streams drawn from the step's, so samples can be rendered on any thread in any order)."""
        rng = np.random.default_rng([self.opts.seed, step])
        if phase < len(CURRICULUM):
            return [(np.random.default_rng(seed), phase) for seed in rng.integers(0, 2**63, size=self.opts.batch)]
        n = len(self.groups)
        out = []
        for j in range(self.opts.batch):
            k = step * self.opts.batch + j
            order = np.random.default_rng([self.opts.seed, 1_000_003, k // n]).permutation(n)
            image, qas = self.groups[int(order[k % n])]
            if len(qas) > self.opts.questions_per_image:
                qas = [qas[int(i)] for i in sorted(rng.choice(len(qas), self.opts.questions_per_image, replace=False))]
            out.append(Example(image, [(qa.question, qa.answer) for qa in qas], labels_of(qas[0]), None,
                               f"{self.jsonl}:{qas[0].line} (image {qas[0].image})", box_of(qas[0])))
        return out

    def make(self, step: int, phase: int) -> Batch:
        """Step `step`'s examples, tiled. An image that cannot be decoded leaves the batch (noted in
        `undecodable`; under `strict`, its SleighError); a batch left with none is a SleighError.
        Inside `with`, the images are drawn (curriculum) and tiled on TILE_THREADS threads (Pillow
        and numpy release the GIL) while the training step waits: each image has its own random
        stream and its own views, so the batch is the same either way."""
        made = [m for m in (self._pool.map if self._pool else map)(self._tiled, self._jobs(step, phase)) if m is not None]
        if not made:
            raise SleighError(f"step {step}", "no image of its batch could be decoded", "images that decode")
        return Batch([ex for ex, _ in made], [t for _, t in made], phase < len(CURRICULUM))

    def _tiled(self, job: Example | tuple[np.random.Generator, int]) -> tuple[Example, TiledImage] | None:
        ex = self._synthetic(*job) if isinstance(job, tuple) else job
        try:
            return ex, self._tile(ex)
        except SleighError as e:  # from the JSONL's images only: a curriculum sample is drawn, not read
            if isinstance(job, tuple):
                raise
            if self.opts.strict:  # the JSONL line it came from, as --strict names a bad line
                raise SleighError(ex.source, e.problem, "images that decode (downscale one past the pixel limit)") from None
            # the image (its questions are drawn anew) -> what is wrong with it; the remedy is the run's to say
            self.undecodable.setdefault(str(ex.image), e.problem)
            return None

    def _tile(self, ex: Example) -> TiledImage:
        img, size = self.cfg.image, self.cfg.vision.image_size
        return tile_image(ex.image, min_tiles=img.min_tiles, max_tiles=ex.max_tiles or img.max_tiles, size=size,
                          thumbnail=img.thumbnail, mean=img.mean, std=img.std)

    def _synthetic(self, rng: np.random.Generator, phase: int) -> Example:
        _, tiles, (lo, hi) = CURRICULUM[phase]
        smallest = 3 * cell_needs(hi)
        spec = SynthSpec(min_size=max(self.canvas[0], smallest), max_size=max(self.canvas[1], smallest),
                         min_object=lo, max_object=hi)
        sample = render(rng, spec)
        qas = [(q, a) for _, q, a in questions(sample, rng)]
        return Example(sample.image, qas, (list(COLOURS).index(sample.colour), SHAPES.index(sample.shape)), tiles,
                       "curriculum sample", sample.box)
