"""Seconds per training step of the demo recipe, per phase, with each batch made one of three ways:

- `serial`: in the training thread, one image after another;
- `threads`: between steps, its images drawn (curriculum) and tiled on `batches.TILE_THREADS` threads
  (what `sleigh train` does);
- `ahead`: the next step's batch made in a thread while this step trains (session 14's way, since dropped).

Run the modes one after the other, alone on the machine, and alternate them: the VM's speed drifts.

    python benchmarks/train_batches.py serial CKPT --data runs/demo-data/train.jsonl
    python benchmarks/train_batches.py threads CKPT --data runs/demo-data/train.jsonl
    python benchmarks/train_batches.py ahead CKPT --data runs/demo-data/train.jsonl

CKPT is a `sleigh init --preset demo` checkpoint; steps are taken at the start of each phase of a
2,000-step run (batch 16, seed 0, 2 threads), at a small learning rate.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sleigh.data.qa import read_qa
from sleigh.runtime.prompt import PromptTokenizer
from sleigh.sleighvl.batches import Batches
from sleigh.sleighvl.checkpoint import TOKENIZER, load_checkpoint
from sleigh.sleighvl.train import PARTS, TrainOptions, Trainer

PHASE_STARTS = ((0, 0), (1, 500), (2, 800), (3, 1000))  # (phase, first step) in the demo recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("serial", "threads", "ahead"))
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20, help="steps per phase")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg, _ = load_checkpoint(args.checkpoint)
    tok = PromptTokenizer.from_file(args.checkpoint / TOKENIZER)
    opts = TrainOptions(train="all", steps=2000, batch=16, seed=0, threads=args.threads)
    trainer = Trainer(model, tok, PARTS, opts, torch.device("cpu"), use_aux=True)
    batches = Batches(read_qa(args.data), opts, True, cfg)
    with batches if args.mode == "threads" else contextlib.nullcontext(), ThreadPoolExecutor(1) as ahead:
        for phase, start in PHASE_STARTS:
            t0 = time.perf_counter()
            made = ahead.submit(batches.make, start, phase)
            for k in range(start, start + args.steps):
                if args.mode == "ahead":
                    batch = made.result()
                    if k + 1 < start + args.steps:
                        made = ahead.submit(batches.make, k + 1, phase)
                else:
                    batch = made.result() if k == start else batches.make(k, phase)
                trainer.step(batch, 1e-4)
            print(f"{args.mode} phase {phase}: {(time.perf_counter() - t0) / args.steps:.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
