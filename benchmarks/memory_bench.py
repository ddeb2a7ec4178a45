"""Per-stage memory of one generation on the CPU: RSS after load, vision, prefill and N decode steps,
and the peak of each stage (VmHWM, reset between stages through /proc/self/clear_refs), for 1, 7
and 13 views at two prompt lengths, the whole prompt in one call against chunks, the CPU arena
kept at its peak against shrunk after each large call (runtime/backends/onnxruntime_backend.py), and
the views in one vision call against chunks of views (`--vision-chunks 0 1 2`; 0: all in one call),
or a memory budget (`--max-memory 2.5G`: `Pipeline.load(max_memory=...)`, the runtime picks both chunks
and refuses in one line what cannot fit; the variant then sets only the arena).
"vision" is measured after GSWA, which runs once after the last chunk. Every configuration runs in a
fresh interpreter, so no run inherits another's heap.

    PYTHONPATH=. python benchmarks/memory_bench.py runs/small-pkg [--decode 16] [--engine NAME] [--max-memory 2.5G] [--json out.json]

Also prints the memory model's estimate (runtime/memory.py) beside the measured peak. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZES = {1: (448, 448), 7: (1344, 896), 13: (1792, 1344)}  # image sizes that tile to 1, 6 + 1, 12 + 1 views
CONTEXTS = (0, 4096)  # prompt tokens: the image's and a short question (0), or padded with text up to 4,096
VARIANTS = {  # name: (prefill chunk or None, arena shrunk after large calls, arena on)
    "whole, arena kept": (None, False, True),
    "whole, arena shrunk": (None, True, True),
    "chunks of 512, arena shrunk": (512, True, True),
    "chunks of 256, arena shrunk": (256, True, True),  # what a fused decoder on the CPU runs by default
    "chunks of 512, arena off": (512, False, False),
}
MB = 1024**2


def status(field: str) -> int:
    from sleigh.runtime.memory import resident_bytes

    value = resident_bytes(field)
    if value is None:
        raise KeyError(field)
    return value


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def one(pkg: str, views: int, context: int, variant: str, decode: int, engine: str | None = None,
        vision_chunk: int = 0, max_memory: str | None = None) -> dict:
    """One configuration, in this process (the parent starts a fresh one per configuration)."""
    import functools

    from PIL import Image

    chunk, shrink, arena = VARIANTS[variant]
    if not arena:
        from sleigh.runtime.backends import onnxruntime_backend as ob

        ob.session_options = functools.partial(ob.session_options, arena=False)
    from sleigh.runtime.memory import MemoryBudget, weights_bytes
    from sleigh.runtime.pipeline import Pipeline

    stages: dict[str, dict] = {}

    def mark(name: str) -> None:
        stages[name] = {"rss_mb": status("VmRSS") / MB, "peak_mb": status("VmHWM") / MB}
        reset_peak()

    reset_peak()
    pipe = Pipeline.load(pkg, verify=False, engine=engine, max_memory=max_memory)
    if not shrink:
        pipe.backend._shrink = None
    pipe.prefill_chunk = chunk or pipe.contract.generation.context_length  # "whole": the prompt in one call
    pipe.vision_chunk = vision_chunk or None
    pipe.reserve_generation = True  # the KV reserved up front, as under --max-memory (what the model counts)
    mark("load")
    image = f"/tmp/memory_bench_{views}.png"
    Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize(SIZES[views]).save(image)
    prompt = _prompt(pipe, image, context)
    run = pipe.backend.run

    def run_and_mark(module, feeds):  # RSS right after the vision calls and GSWA, before embed and prefill
        out = run(module, feeds)
        if module == "gswa":
            mark("vision")
        return out

    pipe.backend.run = run_and_mark
    state = pipe.prefill(image, prompt, max_new_tokens=decode)
    pipe.backend.run = run
    mark("prefill")
    result = pipe.generate_from(state, max_new_tokens=decode, ignore_eos=True).result
    mark("decode")
    if pipe.budget is not None:  # the chunks the runtime picked for this generation
        vision_chunk, chunk, staged = pipe.chunks(result.views, len(state.ids), decode)
        estimate = pipe.budget.plan(result.views, len(state.ids), decode).estimate  # the model's, for the budget's own chunk
    else:
        staged = False
        budget = MemoryBudget(1 << 50, _shapes(pkg, pipe.backend.kv_dtype), weights_bytes(pipe.backend.files.values()))
        estimate = budget.estimate(len(state.ids), decode, min(vision_chunk or views, views), chunk or len(state.ids), views)
    return {"engine": pipe.backend.describe(), "kv_dtype": str(pipe.backend.kv_dtype), "views": result.views,
            "max_memory": max_memory, "vision_chunk": vision_chunk or result.views,
            "prefill_chunk": min(chunk or len(state.ids), len(state.ids)),
            "prompt_tokens": result.prompt_tokens, "variant": variant, "stages": stages, "modules_staged": staged,
            "peak_mb": max(s["peak_mb"] for s in stages.values()), "estimate_mb": estimate / MB,
            "vision_s": result.timings.vision_s, "prefill_s": result.timings.prefill_s,
            "first_token_s": result.timings.time_to_first_token_s, "decode_tokens_per_s": result.timings.decode_tokens_per_s}


def _prompt(pipe, image, context: int) -> str:
    """A question padded with text so that the prompt has about `context` tokens (at least the image's)."""
    words, base = "", len(pipe.prepare(image, "Describe it.")[1])
    if base < context:
        per_word = len(pipe.prepare(image, "Describe it." + " the colour" * 100)[1]) - base
        words = " the colour" * int(100 * (context - base) / per_word)
    return "Describe it." + words


def _shapes(pkg: str, kv_dtype):
    from sleigh.runtime.memory import Shapes
    from sleigh.runtime.manifest import read_manifest

    return Shapes.from_contract(read_manifest(Path(pkg)).contract, kv_dtype=kv_dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--decode", type=int, default=16, help="decode steps after the prefill")
    ap.add_argument("--views", type=int, nargs="*", default=sorted(SIZES))
    ap.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--vision-chunks", type=int, nargs="*", default=[0], help="views per vision call (0: all)")
    ap.add_argument("--engine", help="an engine of the package, or 'package' (default: the runtime's choice)")
    ap.add_argument("--max-memory", help="a budget such as 2.5G: the runtime picks the chunks (overrides the variant's "
                    "prefill chunk and --vision-chunks)")
    ap.add_argument("--json", type=Path, help="write every row here as well")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a configuration as JSON: run it here, print its row
    args = ap.parse_args()
    if args.one:
        cfg = json.loads(args.one)
        print(json.dumps(one(args.package, cfg["views"], cfg["context"], cfg["variant"], args.decode, args.engine,
                             cfg.get("vision_chunk", 0), args.max_memory)))
        return
    rows = []
    for views in args.views:
        for context in args.contexts:
            for variant, vision_chunk in [(v, c) for v in args.variants for c in args.vision_chunks]:
                t = time.perf_counter()
                cfg = json.dumps({"views": views, "context": context, "variant": variant, "vision_chunk": vision_chunk})
                engine = ["--engine", args.engine] if args.engine else []
                budget = ["--max-memory", args.max_memory] if args.max_memory else []
                proc = subprocess.run([sys.executable, __file__, args.package, "--decode", str(args.decode), *engine, *budget,
                                       "--one", cfg],
                                      capture_output=True, text=True)
                if proc.returncode and args.max_memory:  # a budget the runtime refuses: its one line is the result
                    print(f"| {views} views, context {context}, {variant}, max {args.max_memory}: "
                          f"{proc.stderr.strip().splitlines()[-1]} |", flush=True)
                    rows.append({"views": views, "context": context, "variant": variant, "max_memory": args.max_memory,
                                 "refused": proc.stderr.strip().splitlines()[-1]})
                    continue
                if proc.returncode:
                    sys.exit(f"{cfg}: {proc.stderr.strip().splitlines()[-1]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                s = row["stages"]
                label = variant if not args.max_memory else (f"{variant}, max {args.max_memory}, prefill chunks of {row['prefill_chunk']}"
                                                             + (", modules a stage at a time" if row["modules_staged"] else ""))
                print(f"| {row['views']} | {row['vision_chunk']} | {row['prompt_tokens']:,} | {label} | "
                      + " | ".join(f"{s[k]['rss_mb']:.0f} ({s[k]['peak_mb']:.0f})" for k in ("load", "vision", "prefill", "decode"))
                      + f" | **{row['peak_mb']:.0f}** | {row['estimate_mb']:.0f} | {row['first_token_s']:.2f} | "
                      f"{row['decode_tokens_per_s']:.1f} |  ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
