"""Accuracy against first-token time under a tile budget: `sleigh eval --tile-budget K` for K = all,
6, 4, 2 on one package (or checkpoint) and a held-out JSONL, as one markdown table.

    python benchmarks/tile_budget.py runs/demo-pkg --data runs/demo-data/heldout.jsonl [--images 200]

Per K: accuracy ± standard error per question type, GSWA's top-tile hit rate (the same for every K:
GSWA weighs all views before the budget drops any), the mean image views the LLM read, and the
median time to first token (tiling, vision over every view, prefill). The times come from a pass of
their own that runs every K on each question in turn (rotating which goes first), so a load that
comes and goes on the machine falls on all K alike; they are wall-clock: state the machine's load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import statistics

from sleigh.bench import machine
from sleigh.data.qa import read_qa
from sleigh.evaluate import accuracy_cell, evaluate, questions_of_first_images
from sleigh.runtime.pipeline import Pipeline

BUDGETS = (None, 6, 4, 2)  # None: every tile
TYPES = ("colour", "shape", "position")


def first_token_times(model: Path, data: Path, questions: int, *, engine: str | None, threads: int | None) -> dict:
    """K -> median seconds to the first token over the first `questions` questions, every K on each
    question in turn (one new token: the first is all that is timed)."""
    items = read_qa(data).items[:questions]
    times: dict = {k: [] for k in BUDGETS}
    with Pipeline.load(model, engine=engine, threads=threads) as pipe:
        pipe.generate(items[0].image, items[0].question, max_new_tokens=1).result  # warm-up
        for i, item in enumerate(items):
            for k in BUDGETS[i % len(BUDGETS):] + BUDGETS[:i % len(BUDGETS)]:
                result = pipe.generate(item.image, item.question, max_new_tokens=1, tile_budget=k).result
                times[k].append(result.timings.time_to_first_token_s)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown(reports: list[dict], first_token_s: dict, timed: int) -> str:
    cols = ["tile budget", *TYPES, "GSWA top tile", "views read (mean)", "median first token (ms)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in reports:
        top = r.get("gswa_top_tile")
        lines.append("| " + " | ".join([
            "all" if r["tile_budget"] is None else str(r["tile_budget"]), *(accuracy_cell(r, t) for t in TYPES),
            f"{100 * top['fraction']:.1f} % of {top['images']}" if top else "-", f"{r['mean_views_read']:.2f}",
            f"{1e3 * first_token_s[r['tile_budget']]:.1f}"]) + " |")
    r0 = reports[0]
    m = machine()
    lines.append(f"\n{r0['model']} ({r0['backend']}), {r0['overall']['n']} questions of {r0['data']}; first-token "
                 f"medians over the first {timed} questions, every K in turn; {m['cpu']}, {m['cores']} cores.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="package (sleigh export) or checkpoint")
    ap.add_argument("--data", type=Path, required=True, help="held-out JSONL (sleigh data synth)")
    ap.add_argument("--images", type=int, help="only the first N images")
    ap.add_argument("--engine", help="engine name from the package manifest (default: the best built one)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--timing-questions", type=int, default=100, help="questions in the first-token timing pass")
    ap.add_argument("--json", type=Path, help="also write the reports here")
    args = ap.parse_args()

    limit = questions_of_first_images(args.data, args.images) if args.images else None
    reports = [evaluate(args.model, args.data, engine=args.engine, threads=args.threads, limit=limit, tile_budget=k)
               for k in BUDGETS]
    timed = min(args.timing_questions, reports[0]["overall"]["n"])
    first_token_s = first_token_times(args.model, args.data, timed, engine=args.engine, threads=args.threads)
    if args.json:
        args.json.write_text(json.dumps({"reports": reports, "median_first_token_s": list(first_token_s.items())}, indent=2))
    print(markdown(reports, first_token_s, timed))


if __name__ == "__main__":
    main()
