"""The two fused decoders of one checkpoint on the CPU: the bias form (`export --decoder fused`) against
the weighted-values form (`--decoder fused-cuda`), FP32, alternated in one process. Per round: a
prefill of P positions from an empty cache, then decode steps after it, each side on its own buffers
bound once (as the runtime binds them). Prints medians and the weighted/bias ratios with their range.

    python benchmarks/weighted_decoder.py CHECKPOINT [--positions 2000] [--rounds 7] [--steps 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from sleigh.export import fused_decoder
    from sleigh.runtime.compat import session_options
    from sleigh.runtime.kv_cache import NEW, PAST
    from sleigh.runtime.manifest import kv_names
    from sleigh.sleighvl.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--positions", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    P, steps = args.positions, args.steps

    llm = load_checkpoint(args.checkpoint)[0].eval().llm
    cfg = llm.cfg
    L, kv_heads, hd, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    past, new = kv_names(L, PAST), kv_names(L, NEW)
    sessions = {wv: ort.InferenceSession(fused_decoder.build(llm, 18, weighted_values=wv).SerializeToString(),
                                         sess_options=session_options(None), providers=["CPUExecutionProvider"])
                for wv in (False, True)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, P, D)).astype(np.float32)
    bias = np.concatenate([(0.5 * rng.standard_normal((1, P))).astype(np.float32), np.zeros((1, steps), np.float32)], 1)
    mask, capacity = np.ones((1, P + steps), np.int64), P + steps

    def one(weighted: bool) -> tuple[float, float]:
        sess = sessions[weighted]
        width = fused_decoder.padded_head_dim(hd) if weighted else hd
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, capacity, width), np.float32)) for _ in past]
        binding = sess.io_binding()
        binding.bind_output("logits")
        for p, n, value in zip(past, new, buffers):
            binding.bind_ortvalue_input(p, value)
            binding.bind_ortvalue_output(n, value)
        feeds = {"input_ids": np.full((1, 1), -1, np.int64), "inputs_embeds": x, "attention_mask": mask[:, :P],
                 "attention_bias": bias[:, :P], "position_ids": np.arange(P, dtype=np.int64)[None]}
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        prefill = time.perf_counter() - t
        binding.bind_cpu_input("inputs_embeds", np.zeros((1, 1, D), np.float32))
        t = time.perf_counter()
        for s in range(steps):
            for name, array in (("input_ids", np.array([[5 + s]], np.int64)), ("attention_mask", mask[:, :P + s + 1]),
                                ("attention_bias", bias[:, :P + s + 1]), ("position_ids", np.array([[P + s]], np.int64))):
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            sess.run_with_iobinding(binding)
        return prefill, (time.perf_counter() - t) / steps

    one(False), one(True)  # warm-up
    times = {False: [], True: []}
    for r in range(args.rounds):
        for weighted in ((False, True) if r % 2 == 0 else (True, False)):
            times[weighted].append(one(weighted))
    bias_t, weighted_t = np.array(times[False]), np.array(times[True])
    for name, t in (("bias", bias_t), ("weighted", weighted_t)):
        print(f"{name:8s}: prefill {np.median(t[:, 0]) * 1e3:.1f} ms, decode {np.median(t[:, 1]) * 1e3:.2f} ms/step")
    ratio = weighted_t / bias_t
    print(f"weighted/bias over {args.rounds} rounds, {P} positions: prefill {np.median(ratio[:, 0]):.3f} "
          f"({ratio[:, 0].min():.3f}-{ratio[:, 0].max():.3f}), decode {np.median(ratio[:, 1]):.3f} "
          f"({ratio[:, 1].min():.3f}-{ratio[:, 1].max():.3f})")


if __name__ == "__main__":
    main()
