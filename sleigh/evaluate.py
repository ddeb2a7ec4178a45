"""`sleigh eval`: exact-match accuracy per question type on a JSONL, on any backend or engine.

Torch-free: it runs through `runtime.pipeline.Pipeline` (greedy, as `sleigh run`), so a package's
engines and a checkpoint on the torch backend are judged by the same code. Answers match after
trimming, lower-casing and dropping a final full stop; the model answers in at most 8 tokens
(EVAL_NEW_TOKENS, `--max-new-tokens`). A line whose image cannot be loaded or whose prompt exceeds the
context is skipped and counted, as the JSONL's bad lines are, each reason with the first line it struck
(and, for an image or a prompt, why: `first_skipped`). For data with object boxes (`sleigh
data synth`), it also counts how often GSWA's highest-weighted tile holds the object, over the images
with more than one tile.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from sleigh.errors import SleighError
from sleigh.progress import progress


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def proportion(hits: int, n: int) -> dict:
    """Accuracy with its binomial standard error."""
    p = hits / n if n else float("nan")
    return {"n": n, "correct": hits, "accuracy": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan")}


def top_tile_holds_object(weights: list[float], grid: tuple[int, int], image_size: tuple[int, int], box) -> bool:
    """Whether the centre of `box` (x0, y0, x1, y1; image px) lies in the tile GSWA weighs highest."""
    from sleigh.runtime.image import object_tile

    tiles = weights[:grid[0] * grid[1]]
    return max(range(len(tiles)), key=tiles.__getitem__) == object_tile(grid, image_size, box)


# Not the generation default: answers are matched exactly and are a word or two (a colour, a shape, a
# position), so 8 tokens hold any right answer and keep a wrong one from running on (`eval --max-new-tokens`).
EVAL_NEW_TOKENS = 8


def evaluate(model: Path, data: Path, *, backend: str = "auto", engine=None,
             threads: int | None = None, limit: int | None = None, max_new_tokens: int = EVAL_NEW_TOKENS,
             quiet: bool = False, tile_budget: int | None = None, max_tiles: int | None = None) -> dict:
    """`max_new_tokens`: the answer's token limit (EVAL_NEW_TOKENS; more for data with longer answers).
    `engine`: a name, or an EngineEntry build-engine has not registered yet (its task-accuracy gate).
    `tile_budget`: the LLM reads the K tiles GSWA weighs highest and the thumbnail (Pipeline.generate).
    `max_tiles`: most tiles per image (default: the model's or engine's)."""
    from PIL import Image

    from sleigh.data.qa import read_qa, skipped_text
    from sleigh.runtime.image import ImageError
    from sleigh.runtime.pipeline import ContextExceeded, Pipeline

    if limit is not None and limit < 1:
        raise SleighError("limit", f"got {limit}", "a number of questions >= 1")
    if max_new_tokens < 1:
        raise SleighError("max_new_tokens", f"got {max_new_tokens}", "an answer's token limit >= 1")
    qa = read_qa(data)
    items = qa.items
    skipped = Counter(qa.skipped)
    first_skipped = qa.first_lines()  # where each reason first struck (and, for eval's own skips, why)
    hits: dict[str, list[int]] = defaultdict(list)
    top_tile: dict[Path, bool] = {}
    first_token_s: list[float] = []
    views_read: list[int] = []  # image views in the LLM's prompt
    described = ""
    t0 = time.perf_counter()
    with Pipeline.load(model, backend=backend, threads=threads, engine=engine) as pipe:
        check_answer_room(pipe, max_new_tokens)  # before any line: else every line is skipped, one by one
        ran = engine_ran(pipe)
        with progress("eval", min(limit or len(items), len(items)), quiet) as bar:
            for item in items:
                if limit is not None and sum(map(len, hits.values())) >= limit:  # the first N questions evaluated
                    # and what was skipped before them, when the file was read too (not the rest of the file's)
                    skipped = qa.skipped_before(item.line) + Counter({k: v for k, v in skipped.items() if k not in qa.skipped})
                    first_skipped = {k: v for k, v in first_skipped.items() if k in skipped}
                    break
                try:
                    result = pipe.generate(item.image, item.question, max_new_tokens=max_new_tokens,
                                           tile_budget=tile_budget, max_tiles=max_tiles).result
                except (ImageError, ContextExceeded) as e:  # this line's image or prompt: skipped as read_qa skips
                    why = "image not loaded" if isinstance(e, ImageError) else "prompt past the context"
                    skipped[why] += 1
                    # an image error's `what` names the image; its remedy (run's --max-pixels) is not eval's
                    named = f"{e.what} " if isinstance(e, ImageError) else ""
                    first_skipped.setdefault(why, f"line {item.line}: {named}{e.problem}")
                    bar.advance(0 if limit else 1)  # under a limit, a skipped line is not one of the N
                    continue
                described = result.backend
                first_token_s.append(result.timings.time_to_first_token_s)
                views_read.append(result.views if result.kept_views is None else len(result.kept_views))
                hits[item.type].append(int(normalize(result.text) == normalize(item.answer)))
                box, grid = item.meta.get("box"), result.grid
                if box and grid and grid[0] * grid[1] > 1 and item.image not in top_tile:
                    with Image.open(item.image) as im:
                        size = im.size
                    top_tile[item.image] = top_tile_holds_object(result.gswa_weights, grid, size, box)
                bar.advance(1, description=f"eval {sum(map(sum, hits.values()))}/{sum(map(len, hits.values()))} right")
    if not hits:
        fit = ", or a smaller max_new_tokens" if "prompt past the context" in skipped else ""
        raise SleighError(str(qa.path), f"no line could be evaluated (skipped {skipped_text(skipped, first_skipped)})",
                          f"lines whose images load and whose questions fit the model's context{fit}")
    report = {
        "model": str(model), "data": str(qa.path), "backend": described,
        "engine": ran, "tile_budget": tile_budget,
        "types": {t: proportion(sum(v), len(v)) for t, v in sorted(hits.items())},
        "overall": proportion(sum(map(sum, hits.values())), sum(map(len, hits.values()))),
        "skipped": dict(skipped), "first_skipped": {why: first_skipped[why] for why in skipped},
        "seconds": time.perf_counter() - t0,
        "median_first_token_s": statistics.median(first_token_s) if first_token_s else None,
        "mean_views_read": statistics.mean(views_read) if views_read else None,
    }
    if top_tile:
        report["gswa_top_tile"] = {"images": len(top_tile), "holds_object": sum(top_tile.values()),
                                   "fraction": sum(top_tile.values()) / len(top_tile)}
    return report


def engine_ran(pipe) -> str | None:
    """The engine a pipeline runs, by name: the one asked for, or `auto`'s pick; "package" for a
    package's own modules; None for a checkpoint on PyTorch."""
    from sleigh.runtime.backends import PACKAGE_MODULES

    entry = getattr(pipe.backend, "entry", None)
    if entry is not None:
        return entry.name
    return None if pipe.backend.name == "torch" else PACKAGE_MODULES


def check_answer_room(pipe, max_new_tokens: int) -> None:
    """Refuse a token limit that leaves no room in the context for even the shortest prompt of a line
    (the chat template, an empty question and one image view), as `sleigh run` refuses its own."""
    from sleigh.runtime.prompt import Turn

    prompt = pipe.contract.prompt
    shortest = len(pipe.tokenizer.encode_chat([Turn("user", "", image=True)], 1, system=prompt.system_message,
                                              tokens_per_view=prompt.tokens_per_view))
    context = pipe.context_length
    if shortest + max_new_tokens > context:
        raise SleighError(f"max_new_tokens={max_new_tokens}", f"at least {shortest} prompt tokens (the chat template and "
                          f"one image view) + {max_new_tokens} new tokens exceed the context of {context}",
                          f"a smaller max_new_tokens, at most {context - shortest} (the default, {EVAL_NEW_TOKENS}, "
                          "holds an answer of a few words)")


def report_rows(report: dict) -> list[tuple]:
    return [(t, r["n"], f"{100 * r['accuracy']:.1f} %", f"± {100 * r['se']:.1f}")
            for t, r in [*report["types"].items(), ("all", report["overall"])]]


def accuracy_cell(report: dict, question_type: str) -> str:
    """`72.4 ± 2.0` (percent) for one question type of a report, `-` where the data has none."""
    r = report["types"].get(question_type)
    return f"{100 * r['accuracy']:.1f} ± {100 * r['se']:.1f}" if r else "-"


def questions_of_first_images(data: Path, images: int) -> int:
    """How many questions the first `images` images of a JSONL hold: the `limit` that evaluates those
    images only (for a JSONL whose lines are grouped by image, as `sleigh data synth` writes them)."""
    from sleigh.data.qa import read_qa

    groups = read_qa(data).by_image()
    return sum(len(items) for _, items in groups[:images])
