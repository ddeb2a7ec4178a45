"""Where a decoder on another provider leaves the CPU provider's logits: one package (or one of its
engines), a text prompt's prefill and then decode steps, both sides fed the same tokens (the CPU's
greedy ones), and per step the largest logit difference and whether the greedy token agrees. On CUDA
it runs twice, with the decode steps captured as a CUDA graph and without (SLEIGH_CUDA_GRAPH=0).

    python benchmarks/cuda_steps_check.py PKG[:ENGINE] [--provider CUDAExecutionProvider] [--steps 40]

scripts/gpu_check.sh runs it on the tiny fused-cuda FP16 engine: on an H200 (session 27) the
fused-cuda packages' greedy tokens on CUDA were not the CPU's, and a token comparison alone does not
say whether the prefill, the first step after it (the cache as the prefill wrote it) or a later one
parts. Prints the prefill, the first three steps and the four positions from the first disagreement
(the largest logit difference and the greedy tokens), then a summary line per side; exits 1 where a
side's greedy tokens part from the CPU's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sleigh.errors import first_line  # noqa: E402
from sleigh.runtime.backends.onnxruntime_backend import CPU, CUDA, OnnxRuntimeBackend  # noqa: E402
from sleigh.runtime.backends.static_steps import CUDA_GRAPH_ENV  # noqa: E402
from sleigh.runtime.manifest import read_manifest  # noqa: E402
from sleigh.runtime.multimodal import no_image_rows  # noqa: E402


def run_side(pkg: Path, engine: str | None, providers: list[str], prompt: np.ndarray, tokens: list[int] | None,
             steps: int) -> tuple[list[np.ndarray], str]:
    """Logits of the prefill and of each decode step ((V,) each), and the backend's description. The
    steps read `tokens` (the CPU's greedy choices) where given, else their own greedy ones."""
    m = read_manifest(pkg)
    entry = m.engines[engine] if engine else None
    no_image = no_image_rows(m.contract.model.hidden_size)
    with OnnxRuntimeBackend.from_package(pkg, m, providers=providers, engine=entry) as backend:
        cache = backend.new_cache(1)
        P = prompt.shape[1]
        logits = backend.step_tokens(cache, prompt, np.ones((1, P), np.int64), np.zeros((1, P), np.float32),
                                     np.arange(P, dtype=np.int64)[None], no_image)
        out = [np.asarray(logits[0], np.float32).copy()]
        for i in range(steps):
            token = tokens[i] if tokens is not None else int(out[-1].argmax())
            logits = backend.step_tokens(cache, np.asarray([[token]], np.int64), np.ones((1, 1), np.int64),
                                         np.zeros((1, 1), np.float32), np.asarray([[P + i]], np.int64), no_image)
            out.append(np.asarray(logits[0], np.float32).copy())
        cache.close()
        return out, backend.describe()


def compare(name: str, ref: list[np.ndarray], got: list[np.ndarray]) -> bool:
    """One line each for the prefill, the first three steps and the four positions from the first
    disagreement; then the summary. -> whether every greedy token agrees."""
    scale = max(float(np.abs(r).max()) for r in ref)
    same = [int(r.argmax()) == int(g.argmax()) for r, g in zip(ref, got)]
    first_off = same.index(False) if False in same else None
    shown = set(range(4)) | (set(range(first_off, first_off + 4)) if first_off is not None else set())
    for i in sorted(shown & set(range(len(ref)))):
        r, g = ref[i], got[i]
        print(f"{name} {'prefill' if i == 0 else f'step {i}'}: max |logit diff| {float(np.abs(r - g).max()):.4g} (logits up "
              f"to {scale:.3g}), greedy token {'same' if same[i] else f'{int(g.argmax())} vs {int(r.argmax())}'}")
    agree = sum(same)
    print(f"{name}: greedy tokens agree at {agree} of {len(ref)} positions"
          + ("" if first_off is None else f", first apart at {'the prefill' if first_off == 0 else f'step {first_off}'}"))
    return first_off is None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="PKG or PKG:ENGINE")
    ap.add_argument("--provider", default=CUDA)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt-tokens", type=int, default=30)
    args = ap.parse_args()
    pkg, _, engine = args.target.partition(":")
    pkg, engine = Path(pkg), engine or None
    prompt = np.random.default_rng(0).integers(10, 100, (1, args.prompt_tokens)).astype(np.int64)  # ids every preset has
    ref, described = run_side(pkg, engine, [CPU], prompt, None, args.steps)
    print(f"reference: {described}")
    tokens = [int(r.argmax()) for r in ref[:-1]]
    ok = True
    for graphs in ("1", "0") if args.provider == CUDA else ("1",):
        os.environ[CUDA_GRAPH_ENV] = graphs
        try:
            got, described = run_side(pkg, engine, list(dict.fromkeys([args.provider, CPU])), prompt, tokens, args.steps)
        except Exception as e:  # onnxruntime's own types: one side failing must not hide the other
            print(f"{args.target} on {args.provider} (graphs {graphs}): FAILED {type(e).__name__}: {first_line(e)}")
            ok = False
            continue
        ok &= compare(f"{described} (graphs {graphs})", ref, got)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
