"""Decode steps alone, at P cached positions, on one package or engine, alternated in one process:

- `ids`: the runtime's decode step (`Backend.step_tokens`): a fused decoder of package schema 6 is
  fed the token id and embeds it itself;
- `embed`: the same decoder fed the embed module's row for that token (how a decode step ran before
  schema 6: one embed session per token, then `step`);
- `genai` (with `--genai DIR`): onnxruntime-genai's decoder (DIR/model.onnx from its model builder,
  e.g. the folder benchmarks/genai_ab.py builds) through plain ONNX Runtime, bound as genai binds it
  (past and present share one buffer per tensor, sized once), without genai's own generator loop.

    python benchmarks/token_steps.py PKG [--engine NAME] [--positions 2000] [--rounds 15] [--steps 32]
        [--settle 0] [--genai DIR] [--threads 2]

Sleigh's sides start from a prefill of the same P random token ids (so the script runs on any
provider the backend picks: the CUDA provider first where onnxruntime-gpu has it); genai's from P
random cached positions. Every side decodes the same token,
`--steps` steps a round, sides in turns whose order alternates from round to round. A side's first
steps in a turn run slower (the other side's weights and cache have just passed through the CPU's
caches: RESULTS.md, "Rotary inside GroupQueryAttention"); `--settle K` runs K
untimed steps at the start of every turn, so that the timed ones are the steady ones a long answer
spends most of its time in. Printed: the first
step's logits of `ids` against `embed` (they must be equal: the same table rows), then each side's
median ms per step over every step, and the speed of `ids` against each other side per round (its
time / ids' time: median, min-max; against genai this is genai_ab's sleigh/genai decode ratio).
Timings need a quiet CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from sleigh.runtime.backends.base import Backend
from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.multimodal import no_image_rows

TOKEN = 5  # any text token: every step decodes it again


class SleighSide:
    def __init__(self, backend, prompt: np.ndarray, capacity: int, hidden: int, by_ids: bool):
        """The cache filled by a prefill of `prompt` (1, P) (on any provider: CPU slots or device buffers)."""
        P = prompt.shape[1]
        self.backend, self.position, self.by_ids = backend, P, by_ids
        self.cache = backend.new_cache(1)
        self.cache.reserve(capacity)
        self.no_image = no_image_rows(hidden)
        backend.step_tokens(self.cache, prompt, np.ones((1, P), np.int64), np.zeros((1, P), np.float32),
                            np.arange(P, dtype=np.int64)[None], self.no_image)
        self.args = (np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32))

    def step(self) -> np.ndarray:
        run = self.backend.step_tokens if self.by_ids else lambda *a: Backend.step_tokens(self.backend, *a)
        logits = run(self.cache, np.array([[TOKEN]], np.int64), *self.args, np.array([[self.position]], np.int64), self.no_image)
        self.position += 1
        return logits


class GenaiSide:
    def __init__(self, folder: Path, positions: int, capacity: int, threads: int, rng, kv_heads: int, head_dim: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.binding, self.buffers, self.position = self.session.io_binding(), [], positions
        for past in (i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")):
            value = ort.OrtValue.ortvalue_from_numpy((0.5 * rng.standard_normal((1, kv_heads, capacity, head_dim))).astype(np.float32))
            self.buffers.append(value)
            self.binding.bind_ortvalue_input(past.name, value)
            self.binding.bind_ortvalue_output(past.name.replace("past_key_values.", "present."), value)
        self.binding.bind_output("logits")

    def step(self) -> np.ndarray:
        self.binding.bind_cpu_input("input_ids", np.array([[TOKEN]], np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, self.position + 1), np.int64))
        self.session.run_with_iobinding(self.binding)
        self.position += 1
        return self.binding.get_outputs()[0].numpy()


def timed(side, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        side.step()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pkg", type=Path)
    ap.add_argument("--engine", default="package")
    ap.add_argument("--positions", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--settle", type=int, default=0, help="untimed steps at the start of every turn")
    ap.add_argument("--genai", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.settle < 0:
        ap.error(f"--settle {args.settle}: a count of untimed steps, 0 or more")

    manifest = read_manifest(args.pkg)
    entry = None if args.engine == "package" else manifest.engines[args.engine]
    backend = OnnxRuntimeBackend.from_package(args.pkg, manifest, threads=args.threads, engine=entry)
    if not backend.reads_ids:
        raise SystemExit(f"{args.pkg}: its decoder takes no token ids (a fused decoder of package schema 6 does)")
    P, hidden = args.positions, manifest.contract.model.hidden_size
    capacity = P + (args.steps + args.settle) * (args.rounds + 1) + 8
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, 1000, (1, P))  # text ids of every preset's vocabulary, never <IMG_CONTEXT>
    prompt[prompt == manifest.contract.prompt.img_context_token_id] = TOKEN
    sides = {"ids": SleighSide(backend, prompt, capacity, hidden, True),
             "embed": SleighSide(backend, prompt, capacity, hidden, False)}
    if args.genai:
        kv = manifest.contract.kv_cache  # the same model: genai's cache has Sleigh's heads and head size
        sides["genai"] = GenaiSide(args.genai, P, capacity, args.threads, rng, kv.num_kv_heads, kv.head_dim)
    first = {name: side.step() for name, side in sides.items()}
    print(f"first step's logits, ids against embed: max abs difference {np.abs(first['ids'] - first['embed']).max():.3g}")
    for side in sides.values():
        timed(side, 3)  # warm-up
    names, times = list(sides), {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            timed(sides[name], args.settle)
            times[name].append(timed(sides[name], args.steps))
    per_round = {name: np.array([np.median(t) for t in ts]) for name, ts in times.items()}
    label = f"{args.pkg.name}" + ("" if entry is None else f" [{entry.name}]")
    settle = f" after {args.settle} untimed" if args.settle else ""
    print(f"{label}, {P} cached positions, {args.rounds} rounds x {args.steps} steps{settle}, {args.threads} threads")
    for name in names:
        speed = per_round[name] / per_round["ids"] if name != "ids" else None
        against = "" if speed is None else f"; ids' speed against it {np.median(speed):.3f} ({speed.min():.3f}-{speed.max():.3f})"
        print(f"  {name:6s} {np.median(np.concatenate(times[name])):.3f} ms/step{against}")


if __name__ == "__main__":
    main()
