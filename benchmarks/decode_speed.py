"""Prefill and decode speed of one package (or one of its engines) on a long image prompt.

    python benchmarks/decode_speed.py PKG [--engine NAME] [--runs 3] [--new-tokens 48] [--tiles 12]

A 13-view image (examples/chelsea.jpg resized to 1792x1344: 12 tiles + thumbnail) makes the prompt
long, which is where the KV cache's handling shows. Only the Pipeline API is used, so the same
script times packages made by older versions of sleigh when run with that version on PYTHONPATH
(benchmarks/kv_cache_ab.sh).
"""

import argparse
import tempfile
from pathlib import Path

from PIL import Image

import sleigh
from sleigh.runtime.pipeline import Pipeline

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pkg", type=Path)
    ap.add_argument("--engine", default="package")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    image = Path(tempfile.mkdtemp()) / "big.jpg"
    Image.open(ROOT / "examples" / "chelsea.jpg").resize((1792, 1344)).save(image)
    pipe = Pipeline.load(args.pkg, engine=args.engine)
    pipe.generate(image, max_new_tokens=4, ignore_eos=True).result  # warm-up
    for run in range(args.runs):
        r = pipe.generate(image, max_new_tokens=args.new_tokens, ignore_eos=True).result
        print(f"{args.label or args.pkg} [{args.engine}] run {run}: {r.prompt_tokens} prompt tokens, "
              f"prefill {r.timings.prefill_s:.2f} s, decode {r.timings.decode_tokens_per_s:.1f} tokens/s "
              f"(sleigh from {Path(sleigh.__file__).parent})", flush=True)


if __name__ == "__main__":
    main()
