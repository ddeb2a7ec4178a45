"""Decode steps against float32 and float16 KV slots (build-engine --kv-dtype): the slots' bytes, the
peak one step adds above the RSS before it, and decode speed, at given context lengths.

    PYTHONPATH=. python benchmarks/kv_dtype_bench.py PKG ENGINE... [--contexts 512 4096] [--steps 32] [--runs 3]

Each step reads C filled slots (random keys and values; a step's cost does not depend on them) and
writes one. Memory: a fresh process per engine and context with ONNX Runtime's arena off, so a step's
transient tensors show in VmHWM (reset through /proc/self/clear_refs) instead of staying in the arena.
Speed: every engine in one process (arena on, as `sleigh run` has it), alternated run by run; the
median of the runs. Linux only.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from memory_bench import MB, status as _status  # a sibling script: the same /proc reader


def _open(pkg: Path, engine: str, context: int, arena: bool = True):
    """The engine's backend and a cache with `context` filled slots (room for a few more)."""
    from sleigh.runtime.backends import onnxruntime_backend as ob
    from sleigh.runtime.manifest import read_manifest

    if not arena:
        ob.session_options = functools.partial(ob.session_options, arena=False)
    m = read_manifest(pkg)
    backend = ob.OnnxRuntimeBackend.from_package(pkg, m, engine=None if engine == "package" else m.engines[engine])
    cache = backend.new_cache(1)
    cache.reserve(context + 64)
    rng = np.random.default_rng(0)
    for buf in cache.slots.values():
        buf[...] = (0.1 * rng.standard_normal(buf.shape)).astype(buf.dtype)
    cache.length, cache.mask[:, :context] = context, 1
    return backend, cache, m.contract.model.hidden_size


def _step(backend, cache, hidden: int) -> None:
    pos = cache.length
    backend.step(cache, np.full((1, 1, hidden), 0.01, np.float32), np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32),
                 np.asarray([[pos]], np.int64))


def step_memory(pkg: Path, engine: str, context: int) -> dict:
    backend, cache, hidden = _open(pkg, engine, context, arena=False)
    _step(backend, cache, hidden)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    _step(backend, cache, hidden)
    return {"engine": engine, "context": context, "kv_dtype": str(cache.layout.dtype),
            "slots_mb": sum(b.nbytes for b in cache.slots.values()) / MB, "step_peak_mb": (_status("VmHWM") - before) / MB}


def speed(pkg: Path, engines: list[str], context: int, steps: int, runs: int) -> dict[str, float]:
    opened = {e: _open(pkg, e, context) for e in engines}
    times: dict[str, list[float]] = {e: [] for e in engines}
    for _ in range(runs):
        for e, (backend, cache, hidden) in opened.items():
            _step(backend, cache, hidden)  # warm-up
            t = time.perf_counter()
            for _ in range(steps):
                _step(backend, cache, hidden)
            times[e].append(steps / (time.perf_counter() - t))
            cache.length = context  # the next run reads the same slots
    return {e: statistics.median(v) for e, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("engines", nargs="+", help="engine names, or 'package' for the package's own modules")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # "ENGINE CONTEXT": one memory row, in this process
    args = ap.parse_args()
    if args.memory_of:
        engine, context = args.memory_of.split()
        print(json.dumps(step_memory(args.package, engine, int(context))))
        return
    print("| engine | KV slots | context | slots MB | one step's peak above RSS MB | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for context in args.contexts:
        rates = speed(args.package, args.engines, context, args.steps, args.runs)
        for e in args.engines:
            proc = subprocess.run([sys.executable, __file__, str(args.package), e, "--memory-of", f"{e} {context}"],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {e} | {row['kv_dtype']} | {context:,} | {row['slots_mb']:.1f} | {row['step_peak_mb']:.1f} | "
                  f"{rates[e]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
