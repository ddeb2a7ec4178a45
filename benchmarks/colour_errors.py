"""Where a model's wrong answers come from: accuracy of one question type binned by the object's
side in the pixels of the view that shows it best, by the canvas's longer side, and by the number of
views, on a `sleigh data synth` split (its lines carry the object's box and the canvas size).

    python benchmarks/colour_errors.py runs/demo-pkg --data runs/demo-data/heldout.jsonl [--type colour]

"Object px in its view": the box's longer side times the scale of the view that shows it largest
(a tile: tile size / (canvas width / columns); the thumbnail: tile size / the canvas's longer side).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from sleigh.data.qa import read_qa
from sleigh.evaluate import normalize, proportion
from sleigh.runtime.pipeline import Pipeline


def object_px(box, size: tuple[int, int], grid: tuple[int, int], tile: int) -> float:
    """The object's longer side in the view that shows it largest."""
    (w, h), (cols, rows) = size, grid
    side = max(box[2] - box[0], box[3] - box[1])
    scale = min(tile * cols / w, tile * rows / h)  # a tile stretches each axis on its own: take the smaller
    return side * max(scale, tile / max(w, h))


def bin_of(value: float, edges: tuple) -> str:
    for lo, hi in zip(edges, edges[1:]):
        if lo <= value < hi:
            return f"{lo}-{hi}"
    return f">= {edges[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--type", default="colour")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    items = [q for q in read_qa(args.data).items if q.type == args.type]
    tables: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    wrong: dict[tuple[str, str], int] = defaultdict(int)
    with Pipeline.load(args.model, threads=args.threads) as pipe:
        tile = pipe.contract.image.size
        for item in items:
            result = pipe.generate(item.image, item.question, max_new_tokens=8).result
            hit = int(normalize(result.text) == normalize(item.answer))
            size = tuple(item.meta["size"])
            tables["object px in its view"][bin_of(object_px(item.meta["box"], size, result.grid, tile),
                                                   (0, 4, 6, 8, 10, 14, 20))].append(hit)
            tables["canvas longer side"][bin_of(max(size), (224, 336, 448, 561))].append(hit)
            tables["views"][str(result.views)].append(hit)
            if not hit:
                wrong[(item.answer, normalize(result.text))] += 1
    print(f"{args.type}: {args.model} on {args.data} ({len(items)} questions)\n")
    for name, rows in tables.items():
        print(f"| {name} | questions | accuracy |\n| --- | --- | --- |")
        for key in sorted(rows, key=lambda k: float(k.split("-")[0].lstrip(">= "))):
            p = proportion(sum(rows[key]), len(rows[key]))
            print(f"| {key} | {p['n']} | {100 * p['accuracy']:.1f} ± {100 * p['se']:.1f} |")
        print()
    print("| answer | given | times |\n| --- | --- | --- |")
    for (gold, given), n in sorted(wrong.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {gold} | {given} | {n} |")


if __name__ == "__main__":
    main()
