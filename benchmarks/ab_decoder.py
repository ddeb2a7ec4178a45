"""Decode speed of two packages, alternated in one process so both see the same machine load.

    python benchmarks/ab_decoder.py PKG_A PKG_B [--rounds 3] [--new-tokens 48]

Uses the exported FP32 modules (engine "package") and a 13-view image (examples/chelsea.jpg
resized to 1792x1344).
"""

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from sleigh.runtime.pipeline import Pipeline

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    image = Path(tempfile.mkdtemp()) / "big.jpg"
    Image.open(ROOT / "examples" / "chelsea.jpg").resize((1792, 1344)).save(image)
    pipes = {str(p): Pipeline.load(p, engine="package") for p in (args.a, args.b)}
    for rnd in range(args.rounds):
        for name, pipe in pipes.items():
            r = pipe.generate(image, max_new_tokens=args.new_tokens, ignore_eos=True).result
            print(rnd, name, r.prompt_tokens, f"prefill {r.timings.prefill_s:.2f} s, decode {r.timings.decode_tokens_per_s:.1f} tokens/s",
                  flush=True)


if __name__ == "__main__":
    main()
