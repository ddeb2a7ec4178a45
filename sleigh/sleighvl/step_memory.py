"""What one `sleigh train` step holds at least, checked against what the machine has before training.

A step runs the images of its batch (or of each --micro-batch part) through the LLM at once, each
image's prompt padded to the longest among them (train.answer_logits), and keeps every layer's
attention probabilities for the backward pass: images x heads x P x (P + 1) float32 per layer for
prompts of P tokens. So a part that holds the data's largest image (the most views, P = views x
tokens per view) costs that many square matrices per layer, whatever its other images. Counted here,
as a lower bound of a step's peak over the loaded model:

- every layer's probabilities, and one layer's scores more while it computes them (layers + 1);
- what each layer keeps per prompt position: the normed inputs, the query, the attention's output and
  the residual (at least 6 hidden-wide tensors), and the gate, up, SiLU and product of the MLP (4
  MLP-wide ones);
- the same for the question-and-answer rows, which run after the images' prompts (an image's lines
  each a row, padded to the part's longest, attending over the image's prompt and themselves; the
  question tokens all its lines share run once with the prompt, line_tokens): with long questions or
  answers (LLaVA-style data) they cost more than the image (a helper's 2,600-token answers took 18x a
  bound that counted the image alone);
- with the ViT trained, what each view keeps per layer: at least 6 hidden-wide and 2 MLP-wide
  tensors of (image/patch)^2 + 1 tokens;
- the step's tiled pixels: every image of the batch is tiled before the step and held through all
  its parts, and where the ViT trains, the part's views copied into one array are kept too;
- the gradients and AdamW's two moments of every trained parameter.

Measured (benchmarks/RESULTS.md, "A memory guard for `train --batch`"), a step's real peak is 1.32-1.89x
this bound at 448-px views with short lines (the tiny and small presets), 1.36-1.58x with lines of
hundreds to thousands of tokens, more at the demo preset's small views. So
a step refused where LEAST_OVER times the bound does not fit would have been killed mid-step by the
kernel's out-of-memory killer, with no message (a helper's `--batch 100` on the tiny preset took the
VM's 24 GB); one where that fits but OVER_BOUND times the bound does not trains with a warning.
"""

from __future__ import annotations

from sleigh.errors import SleighError
from sleigh.runtime.image import default_max_pixels, find_grid, max_views
from sleigh.runtime.memory import available_bytes, budget_and_need, gb
from sleigh.sleighvl.batches import CURRICULUM
from sleigh.sleighvl.config import SleighVLConfig

# What measured steps took over the bound: 1.32x at the least (1.36x with lines of thousands of tokens), so
# a part run at once is refused where LEAST_OVER (a margin under that) does not fit; at 448-px views at most
# 1.89x (one image at a time of a batch of 32, whose waiting images the bound counts at the data's fewest
# views; 2.0-3.4x at the demo preset's 112-px views, where the bound is a few hundred MB), so one is
# suggested where OVER_BOUND fits
LEAST_OVER = 1.25
OVER_BOUND = 2.0
# What the bound counts (the module docstring): per LLM layer and prompt position, hidden-wide and
# MLP-wide tensors kept; per ViT layer and token of a view, the same; per trained parameter, its
# gradient and AdamW's two moments
LLM_HIDDEN, LLM_MLP = 6, 4
VIT_HIDDEN, VIT_MLP = 6, 2
PER_TRAINED = 3


class LineTokens:
    """An image's lines, added one at a time (its question's ids, its answer's token count), as a step
    runs them (train.answer_logits), holding only the first question's ids: `counts()`."""

    def __init__(self):
        self.lines, self.first, self.shared, self.longest = 0, [], 0, 0

    def add(self, question: list[int], answer: int) -> None:
        if not self.lines:
            self.first, self.shared = list(question), len(question)
        else:
            self.shared = next((i for i, (a, b) in enumerate(zip(self.first[:self.shared], question)) if a != b),
                               min(self.shared, len(question)))
        self.lines += 1
        self.longest = max(self.longest, len(question) + answer)

    def counts(self) -> tuple[int, int, int]:
        """(how many lines, the tokens every question starts with, which run once with the image's
        prompt, and the most tokens a line's row holds after them: the rest of its question, its answer
        and <|im_end|>). One line, or lines of one question, put the whole question in the prompt."""
        return self.lines, self.shared, self.longest - self.shared + 1


def line_tokens(lines: list[tuple[list[int], int]]) -> tuple[int, int, int]:
    """LineTokens.counts() of an image's lines, each (its question's ids, its answer's token count)."""
    image = LineTokens()
    for question, answer in lines:
        image.add(question, answer)
    return image.counts()


def views_of(size: tuple[int, int], cfg: SleighVLConfig) -> int:
    """The views `tile_image` makes of a width x height image under the checkpoint's tiling."""
    img = cfg.image
    cols, rows = find_grid(*size, min_tiles=img.min_tiles, max_tiles=img.max_tiles, size=cfg.vision.image_size)
    return max_views(cols * rows, img.thumbnail)


def step_bytes_at_least(cfg: SleighVLConfig, parts: tuple[str, ...], views: int, batch: int, trained: int,
                        itemsize: int = 4, rest: int = 0, rest_views: int = 1, rows: int | None = None,
                        text: int = 1, shared: int = 0) -> int:
    """A lower bound of one step's peak over the loaded model, for `batch` images run at once, the
    largest of which tiles into `views` views and every other into `rest_views` at least (the module
    docstring), while `rest` more images of the step (other --micro-batch parts) wait as pixels;
    `trained`: the trained parameters' count. `rows`: the part's question-and-answer lines (default:
    one per image), the longest `text` tokens of a row; `shared`: the tokens of question the largest
    image's prompt runs (line_tokens)."""
    llm, vision = cfg.llm, cfg.vision
    pixels = 3 * vision.image_size**2 * itemsize  # a view's normalised pixels, float32 (runtime.image.tile_image)
    # the step's tiled images all held (a batch is tiled before it trains); the part's copy into one array
    # is kept for the backward pass where the ViT trains (its first convolution's input)
    part = views + (batch - 1) * rest_views
    total = ((2 if "vision" in parts else 1) * part + rest * rest_views) * pixels
    prompt = views * vision.tokens_per_view + 1 + shared  # and at least one token of text
    # every layer's attention probabilities, and one layer's scores while it computes them
    total += (llm.num_layers + 1) * batch * llm.num_heads * prompt * (prompt + 1) * itemsize
    total += llm.num_layers * batch * prompt * (LLM_HIDDEN * llm.hidden_size + LLM_MLP * llm.intermediate_size) * itemsize
    rows = batch if rows is None else rows  # the lines, each attending over its image's prompt and itself
    total += (llm.num_layers + 1) * rows * llm.num_heads * text * (prompt + text) * itemsize
    total += llm.num_layers * rows * text * (LLM_HIDDEN * llm.hidden_size + LLM_MLP * llm.intermediate_size) * itemsize
    if "vision" in parts:
        per_view = (vision.num_patches + 1) * (VIT_HIDDEN * vision.hidden_size + VIT_MLP * vision.intermediate_size)
        total += part * vision.num_layers * per_view * itemsize
    return total + PER_TRAINED * trained * itemsize


CURRICULUM_SAMPLE = "a curriculum sample"


def run_views(cfg: SleighVLConfig, sizes: dict, curriculum: bool) -> tuple[int, str, int]:
    """(the most views an image of the run tiles into, which image that is, the fewest): the data's
    images that train (`sizes`, image -> (width, height) as tiled; those past the tiler's pixel limit
    leave their batches), and with the curriculum, its samples of the most tiles (drawn, not read)."""
    limit = default_max_pixels(cfg.image.max_tiles, cfg.vision.image_size)
    found = [(views_of(size, cfg), f"image {image}") for image, size in sizes.items() if size[0] * size[1] <= limit]
    if curriculum:
        tiles = max(t for _, t, _ in CURRICULUM)
        found.append((max_views(tiles, cfg.image.thumbnail), f"{CURRICULUM_SAMPLE} of {tiles} tiles"))
    if not found:
        return 0, "", 0
    most = max(found, key=lambda f: f[0])
    return most[0], most[1], min(v for v, _ in found)


def costliest(cfg: SleighVLConfig, sizes: dict, texts: dict, curriculum: bool) -> list[tuple[int, int, int, int, str]]:
    """The images that may set a step's cost, as (views, lines, a row's most tokens, question tokens
    run with the prompt, what it is): of the run's images that train (`sizes`, as run_views reads them;
    `texts`: image -> line_tokens of its lines, one line of one token where absent), those that no other
    has as many of all four as, or more (the bound grows with each)."""
    return _front(_run_images(cfg, sizes, texts, curriculum))


def _run_images(cfg: SleighVLConfig, sizes: dict, texts: dict, curriculum: bool) -> dict[tuple[int, int, int, int], str]:
    """Every (views, lines, a row's most tokens, question tokens run with the prompt) of the run's
    images that train, and the curriculum's sample, -> the first image of each (costliest)."""
    limit = default_max_pixels(cfg.image.max_tiles, cfg.vision.image_size)
    found: dict[tuple[int, int, int, int], str] = {}
    for image, size in sizes.items():
        if size[0] * size[1] <= limit:
            lines, shared, text = texts.get(image, (1, 0, 1))
            found.setdefault((views_of(size, cfg), lines, text, shared), f"image {image}")
    if curriculum:
        tiles = max(t for _, t, _ in CURRICULUM)
        found.setdefault((max_views(tiles, cfg.image.thumbnail), 1, 1, 0), f"{CURRICULUM_SAMPLE} of {tiles} tiles")
    return found


def _front(found: dict[tuple[int, int, int, int], str]) -> list[tuple[int, int, int, int, str]]:
    front: list[tuple[int, int, int, int]] = []
    for key in sorted(found, reverse=True):  # by views, then lines...: none later has more of all four
        if not any(all(o >= k for o, k in zip(other, key, strict=True)) for other in front):
            front.append(key)
    return [(*key, found[key]) for key in front]


def check_step_memory(cfg: SleighVLConfig, parts: tuple[str, ...], sizes: dict, batch: int, micro_batch: int | None,
                      trained: int, available: int | None, where: str = "this machine", curriculum: bool = False,
                      itemsize: int = 4, texts: dict | None = None) -> str | None:
    """Refuse, in one line, a step whose images run at once (--micro-batch, else all of --batch) cannot
    fit in `available` bytes (None: unknown, not checked), `sizes` being the data's images that train
    (image -> (width, height) as tiled, from their header check) and `texts` their lines (image -> (how
    many, the most tokens of question and answer in one)). -> a warning where LEAST_OVER times the
    bound fits but OVER_BOUND times it does not (such a step may still not fit), else None. The remedy
    offered first is --micro-batch: the same update from fewer images at a time (train.Trainer.step)."""
    if available is None:
        return None
    found = _run_images(cfg, sizes, texts or {}, curriculum)  # every image's views, once
    if not found:
        return None
    fewest, images = min(views for views, *_ in found), _front(found)
    size = min(micro_batch or batch, batch)
    flag = "--micro-batch" if size < batch else "--batch"

    def bound(image: tuple, b: int, waiting: int) -> int:  # `image` and b - 1 others of one line, `waiting` more as pixels
        views, lines, text, shared, _ = image
        return step_bytes_at_least(cfg, parts, views, b, trained, itemsize, waiting, fewest, rows=lines + b - 1, text=text,
                                   shared=shared)

    def need(b: int, times: float = 1.0, waiting: int | None = None) -> int:  # b images at once, the rest waiting
        return int(times * max(bound(image, b, batch - b if waiting is None else waiting) for image in images))

    if need(size, OVER_BOUND) <= available:
        return None
    fits = _most_images(lambda b: need(b, OVER_BOUND), available, size - 1)
    whole = _most_images(lambda b: need(b, OVER_BOUND, waiting=0), available, batch - 1)  # a smaller batch, run at once
    has, needs = budget_and_need(available, need(size, LEAST_OVER))  # as many decimals as it takes to tell them apart
    views, lines, text, shared, which = max(images, key=lambda image: bound(image, size, batch - size))
    said = (f", {lines} line{'s' * (lines != 1)} of up to {shared + text:,} tokens of question and answer"
            if texts else "")
    why = (f"with {which} ({views} views, {views * cfg.vision.tokens_per_view:,} image tokens{said}, to which every prompt "
           f"run with it is padded), {'one image needs' if size == 1 else f'{size} images at once need'} at least {needs} "
           f"beyond the loaded model, and {where} has {has} available")
    if need(size, LEAST_OVER) <= available:
        return f"{flag} {size} may not fit: {why}, and steps have taken up to {gb(need(size, OVER_BOUND), 'up')}" + (
            f"; --micro-batch {fits} would fit" if fits else "")
    remedies = [f"--micro-batch {fits} (the same update, {'one image' if fits == 1 else f'{fits} images'} at a time, "
                "where the most steps have taken fits)"] if fits else []
    if whole and whole < batch:
        remedies.append(f"--batch {whole} or less")
    if remedies:
        raise SleighError(f"{flag} {size}", why, ", ".join(remedies) + ", or a machine with more memory")
    if size > 1 and need(1, LEAST_OVER) <= available:
        raise SleighError(f"{flag} {size}", why, "--micro-batch 1 (which may still not fit), or a machine with more memory")
    one = f"; one image at a time needs at least {gb(need(1, LEAST_OVER), 'up')}" if size > 1 else ""
    if which.startswith(CURRICULUM_SAMPLE):
        fewer = "--curriculum off (its samples tile into more views than the data's images)"
    elif lines * text + shared > views * cfg.vision.tokens_per_view:  # its lines cost more than its image
        fewer = f"shorter questions and answers than {shared + text:,} tokens, or fewer lines per image"
    else:
        fewer = f"images that tile into fewer than {views} views"
    raise SleighError(f"{flag} {size}", why + one, f"a machine with more memory, or {fewer}")


def _most_images(need, available: int, most: int) -> int:
    """The most images, up to `most`, whose `need` fits in `available` (0 if not one): need grows by the
    same amount with each image, so it is solved for, then checked against `need` itself."""
    if most < 1 or need(1) > available:
        return 0
    per_image = max(need(2) - need(1), 1)
    b = min(most, 1 + (available - need(1)) // per_image)
    while b > 1 and need(b) > available:  # the int() rounding of each need
        b -= 1
    while b < most and need(b + 1) <= available:
        b += 1
    return b


def available_for(device) -> tuple[int | None, str]:
    """(bytes a step can still take on `device`, what to call it): the GPU's free memory, or the host's."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], "the GPU"
    return available_bytes(), "this machine"
