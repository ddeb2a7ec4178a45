"""One `sleigh train` step's peak memory against the guard's bound (sleigh/sleighvl/step_memory.py).

    python benchmarks/train_step_memory.py CKPT DATA [--batch 4] [--micro-batch K] [--train gswa] [--step 0] [--threads 2] [--device cuda]

Loads CKPT, draws step STEP's batch of DATA (the JSONL train reads, curriculum off) as `sleigh train`
does, and runs that one step. Printed: the batch's views per image, the step's peak over the loaded
model (VmHWM after the step less VmRSS before the batch was tiled, every weight read once before
that: Linux; on `--device cuda`, the GPU's: torch's peak allocation during the step less its allocation
before it, against the same bound, which the guard reads against the GPU's free memory there), the bound `step_bytes_at_least` gives for
that batch (its largest image's views; with --micro-batch, for its largest part run at once), and
their ratio. Run it in a fresh process per point: the peak
is the process's. The last line is `GREW BOUND` in bytes, for tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sleigh.data.qa import read_qa
from sleigh.runtime.memory import resident_bytes
from sleigh.runtime.prompt import PromptTokenizer
from sleigh.sleighvl import train as T
from sleigh.sleighvl.batches import CURRICULUM, Batches
from sleigh.sleighvl.checkpoint import TOKENIZER, load_checkpoint
from sleigh.sleighvl.step_memory import line_tokens, step_bytes_at_least


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--train", default="gswa")
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (as `sleigh train` picks where a GPU is)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg, _ = load_checkpoint(args.ckpt)
    device = torch.device(args.device)
    model = model.to(device)
    parts = T.parse_parts(args.train)
    opts = T.TrainOptions(batch=args.batch, micro_batch=args.micro_batch, steps=1, curriculum="off", train=args.train)
    trainer = T.Trainer(model, PromptTokenizer.from_file(args.ckpt / TOKENIZER), parts, opts, device,
                        use_aux=False)
    qa = read_qa(args.data)
    with torch.no_grad():  # safetensors maps the weights: each becomes resident as a step first reads it
        for p in model.parameters():
            p.sum()
    on_gpu = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if on_gpu else resident_bytes()  # on the host, the batch's
    batch = Batches(qa, opts, False, cfg).make(args.step, len(CURRICULUM))  # tiled images count: held through the step
    views = [t.num_views for t in batch.tiled]
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    trainer.step(batch, 1e-4)
    grew = (torch.cuda.max_memory_allocated(device) if on_gpu else resident_bytes("VmHWM")) - before
    size = min(args.micro_batch or len(views), len(views))
    tok = trainer.tok
    # each image's lines as the guard reads them: (how many, question tokens run with the prompt, a row's most)
    lines = [line_tokens([(tok.encode(q, add_bos=False), len(tok.encode(a, add_bos=False))) for q, a in ex.qas])
             for ex in batch.examples]

    def part_bound(i: int) -> int:  # the part's largest image with its own shared question: a floor of the padded prompt
        part = range(i, min(i + size, len(views)))
        largest = max(part, key=lambda j: views[j])
        return step_bytes_at_least(cfg, parts, views[largest], len(part), sum(p.numel() for p in trainer.params),
                                   rest=len(views) - len(part), rest_views=min(views), rows=sum(lines[j][0] for j in part),
                                   text=max(lines[j][2] for j in part), shared=lines[largest][1])

    bound = max(part_bound(i) for i in range(0, len(views), size))
    micro = f" --micro-batch {args.micro_batch}" if args.micro_batch else ""
    print(f"{args.ckpt.name} on {device.type} --train {args.train} --batch {args.batch}{micro}: views {views}; step's peak over the model "
          f"{grew / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB, peak/bound {grew / bound:.2f}")
    print(grew, bound)


if __name__ == "__main__":
    main()
