"""Whether a fused decoder gives its in-place greedy tokens when GroupQueryAttention's past and present
are two buffers: what ONNX Runtime's copies make of the in-place binding when that node runs on the CPU
inside a CUDA session (a float32 cache: CUDA has no float32 kernel). On an H200 such a package's tokens
parted from the CPU provider's (benchmarks/RESULTS.md, "The first GPU check"); this probe, on the CPU,
binds a copy of the cache as past and a NaN-filled buffer as present (what is not written shows), then
takes present as the cache. Prints both token lists, the largest difference in the first layer's keys
and any slot left unwritten; exits 1 where the tokens differ.

    python benchmarks/gqa_two_buffers.py PKG/decoder.onnx     # a fused-cuda package's decoder
"""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sleigh.runtime.backends.static_steps import bind_in_place  # noqa: E402
from sleigh.runtime.kv_cache import NEW, PAST  # noqa: E402

path = sys.argv[1]
C, PROMPT, STEPS = 64, 12, 20  # cache slots, prompt tokens, greedy steps after it
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
inputs = {i.name: i for i in s.get_inputs()}
past = [n for n in inputs if n.startswith(PAST + ".")]
new = [n.replace(PAST, NEW, 1) for n in past]  # new[i] is written into past[i] (kv_cache's naming)
KV, hd = inputs[past[0]].shape[1], inputs[past[0]].shape[3]
hidden = inputs["inputs_embeds"].shape[2]


def run(shared: bool):
    cache = {n: np.zeros((1, KV, C, hd), np.float32) for n in past}
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 100, (1, PROMPT)).astype(np.int64)
    tokens = []
    mask = np.zeros((1, C), np.int64)
    bias = np.zeros((1, C), np.float32)
    length = 0
    for _ in range(STEPS + 1):
        S = ids.shape[1]
        mask[:, length:length + S] = 1
        feeds = {"input_ids": ids, "inputs_embeds": np.zeros((1, 1, hidden), np.float32),
                 "attention_mask": mask[:, :length + S].copy(), "attention_bias": bias[:, :length + S].copy(),
                 "position_ids": np.arange(length, length + S, dtype=np.int64)[None]}
        b = s.io_binding()
        for k, v in feeds.items():
            b.bind_cpu_input(k, v)
        if shared:  # as the runtime binds them (static_steps.bind_in_place)
            bound = bind_in_place(ort, b, past, new, cache, on_device=False)
        else:
            bound = {p: np.full_like(cache[p], np.nan) for p in past}  # present: what is not written shows
            for p, n in zip(past, new):
                b.bind_cpu_input(p, cache[p].copy())
                b.bind_ortvalue_output(n, ort.OrtValue.ortvalue_from_numpy(bound[p]))
        logits = np.empty((1, 1, s.get_outputs()[0].shape[-1]), np.float32)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        s.run_with_iobinding(b)
        if not shared:
            for p in past:
                cache[p][:] = bound[p]
        length += S
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
        ids = np.array([[tok]], np.int64)
    return tokens, cache


a, ca = run(True)
b, cb = run(False)
used = PROMPT + STEPS  # the positions in use
print("one buffer ", a)
print("two buffers", b)
print(f"every layer's keys and values, largest difference over the {used} positions in use:",
      max(float(np.nanmax(np.abs(ca[p][0, :, :used] - cb[p][0, :, :used]))) for p in past),
      "| slots in use never written (NaN):",
      sorted({int(i) for p in past for i in np.where(np.isnan(cb[p][0, :, :used]).any(axis=(0, 2)))[0]}))
sys.exit(0 if a == b else 1)
