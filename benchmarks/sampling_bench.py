"""The Sampler's pick per token, at the small preset's vocabulary and InternVL2's, for the settings
users pass (greedy, a repetition penalty, temperature, top-p, top-k), on flat and peaked logits.

    python benchmarks/sampling_bench.py [--vocab 8192 92553] [--picks 200]

Logits: float32 normal draws times a spread, 2 (flat: a top-p of 0.9 keeps thousands of ids, the worst
case) and 6 (peaked, as a trained model's mostly are). The penalty's history: 2,000 ids, one more
appended before each pick, as the Pipeline gathers it (a TokenHistory), and the same as a plain list
(what the Sampler took before TokenHistory; "list" in the setting's name). Printed:
milliseconds per pick, the best of three runs of `--picks` picks. Run it against another checkout
with `PYTHONPATH=OTHER python benchmarks/sampling_bench.py` (RESULTS.md, "Greedy picks").
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from sleigh.runtime.sampling import Sampler, SamplingOptions, TokenHistory

PENALTY = SamplingOptions(repetition_penalty=1.1)
SETTINGS = {"greedy": SamplingOptions(), "greedy, penalty 1.1": PENALTY, "greedy, penalty 1.1, list": PENALTY,
            "T 0.7": SamplingOptions(temperature=0.7, seed=0),
            "T 0.7, top-p 0.9": SamplingOptions(temperature=0.7, top_p=0.9, seed=0),
            "T 1, top-p 0.95, top-k 50": SamplingOptions(temperature=1.0, top_p=0.95, top_k=50, seed=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 92553])
    ap.add_argument("--picks", type=int, default=200)
    args = ap.parse_args()
    print("| vocabulary | logits | setting | ms per pick |\n|---|---|---|---|")
    for V in args.vocab:
        for spread, shape in ((2.0, "flat"), (6.0, "peaked")):
            logits = (spread * np.random.default_rng(0).standard_normal(V)).astype(np.float32)
            for name, options in SETTINGS.items():
                sampler, prompt = Sampler(options), range(0, 4000, 2)
                history = list(prompt) if name.endswith("list") else TokenHistory(prompt)
                new = iter(range(4000, 10**9))  # a new id each pick: the history's costliest append

                def pick():
                    history.append(next(new))
                    return sampler(logits, history)

                best = min(timeit.repeat(pick, number=args.picks, repeat=3))
                print(f"| {V:,} | {shape} | {name} | {1e3 * best / args.picks:.3f} |")


if __name__ == "__main__":
    main()
