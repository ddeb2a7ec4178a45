"""Decode-step time of a schema-1 decoder (returns Concat(past, new)) against a schema-2 decoder
(cache slots written in place), alternated in one process so both see the same machine load.

    python benchmarks/kv_cache_steps.py OLD_DECODER.onnx NEW_DECODER.onnx [--context 3516] [--rounds 6] [--steps 40]

Each side runs as its runtime runs it: schema 1 through IOBinding, the `present` OrtValues bound as
the next step's `past` (the old OnnxRuntimeBackend); schema 2 on a SlotCache (the current one).
Both start from a cache of --context random positions and decode one token per step.
"""

import argparse
import time

import numpy as np
import onnxruntime as ort

from sleigh.runtime.kv_cache import NEW, PAST, SlotCache


def session(path: str):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def io(sess):
    ins = {i.name: i.shape for i in sess.get_inputs()}
    past = [n for n in ins if n.startswith("past_key_values.")]
    _, kv, _, hd = ins[past[0]]
    return past, kv, hd, ins["inputs_embeds"][2]


class Concatenating:
    def __init__(self, path, context, rng):
        self.sess = session(path)
        self.past_names, kv, hd, self.D = io(self.sess)
        self.outs = [o.name for o in self.sess.get_outputs()]
        self.past = {n: ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, kv, context, hd)).astype(np.float32))
                     for n in self.past_names}
        self.P = context

    def step(self, x):
        b = self.sess.io_binding()
        feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, self.P + 1), np.int64),
                 "attention_bias": np.zeros((1, self.P + 1), np.float32), "position_ids": np.array([[self.P]], np.int64)}
        for n, a in feeds.items():
            b.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(a))
        for n, v in self.past.items():
            b.bind_ortvalue_input(n, v)
        for o in self.outs:
            b.bind_output(o, "cpu")
        self.sess.run_with_iobinding(b)
        out = dict(zip(self.outs, b.get_outputs()))
        self.past = {n: out["present." + n[len("past_key_values."):]] for n in self.past_names}
        self.P += 1


class Slots:
    def __init__(self, path, context, rng):
        self.sess = session(path)
        past_names, kv, hd, self.D = io(self.sess)
        self.new_names = [o.name for o in self.sess.get_outputs() if o.name.startswith(NEW + ".")]
        self.cache = SlotCache(past_names, 1, kv, hd)
        self.cache.append({n: rng.standard_normal((1, kv, context, hd)).astype(np.float32) for n in past_names},
                          np.ones((1, context), np.int64), np.zeros((1, context), np.float32))
        self.one_mask, self.one_bias = np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32)

    def step(self, x):
        P = self.cache.length
        feeds = {"inputs_embeds": x, "position_ids": np.array([[P]], np.int64), **self.cache.feeds(self.one_mask, self.one_bias)}
        _, *new = self.sess.run(["logits", *self.new_names], feeds)
        self.cache.append({PAST + n[len(NEW):]: a for n, a in zip(self.new_names, new)}, self.one_mask, self.one_bias)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--context", type=int, default=3516)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sides = {"concat (schema 1)": Concatenating(args.old, args.context, rng), "slots (schema 2)": Slots(args.new, args.context, rng)}
    x = rng.standard_normal((1, 1, sides["slots (schema 2)"].D)).astype(np.float32)
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            side.step(x)
            t = time.perf_counter()
            for _ in range(args.steps):
                side.step(x)
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    for name, ts in times.items():
        print(f"{name}: median {np.median(ts):.2f} ms/step ({1e3 / np.median(ts):.1f} tokens/s), rounds {[round(t, 2) for t in ts]}")


if __name__ == "__main__":
    main()
