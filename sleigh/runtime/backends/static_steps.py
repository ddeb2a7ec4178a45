"""Decode steps on buffers that never move: what ONNX Runtime captures as a CUDA graph and replays
(issue 9: no per-step launches of ~1,500 kernels from the host).

A weighted-values fused decoder (kv_cache.form "weighted", export/fused_decoder.py) may be given a
mask and bias as wide as its cache buffers, so every decode step of a batch-1 generation has the same
shapes: token id (1, 1), position (1, 1), mask and bias (1, C), the C-slot buffers, logits (1, 1, V).
`StaticSteps` holds one such set of buffers, bound once to one IOBinding, and lends the cache buffers
to one generation at a time (the others take the ordinary path). A step writes its token, position,
mask and bias into the bound inputs and runs the binding under its graph id; on the CUDA provider with
`enable_cuda_graph`, ONNX Runtime captures the first such run and replays it after that.

UNVERIFIED on a GPU (none was at hand): the same code runs on the CPU provider in the tests, where
no graph is captured and the run option is ignored, and gives the ordinary path's tokens.
"""

from __future__ import annotations

import numpy as np

from sleigh.runtime.kv_cache import LOGITS, Layout, SlotCache

# ONNX Runtime's run option naming the CUDA graph a run captures or replays; "-1": none (a prefill,
# whose shapes change from call to call, runs uncaptured in the same session)
GRAPH_ID = "gpu_graph_id"
NO_GRAPH = "-1"
# SLEIGH_CUDA_GRAPH=0 turns the captured decode steps off (the ordinary bound steps then run)
CUDA_GRAPH_ENV = "SLEIGH_CUDA_GRAPH"
# The fixed buffers' slots: a 4K-token context at most (issue 9's memory target: FP16 weights and a
# 4K-token cache within 6 GB; InternVL2-2B's own context of 32,768 would hold 3.4 GB of float16 KV).
# A generation that needs more moves to buffers of its own (SlotCache.reserve) and the ordinary steps.
STATIC_SLOTS = 4096


def bind_in_place(ort, binding, past: list[str], new: list[str], buffers: dict, on_device: bool) -> list:
    """Bind each cache buffer as its layer's input `past[i]` and output `new[i]`, so the decoder writes
    the new positions into it (device OrtValues as they are, numpy arrays wrapped without a copy);
    -> the OrtValues bound, which must outlive the binding."""
    values = []
    for p, n in zip(past, new):
        values.append(buffers[p] if on_device else ort.OrtValue.ortvalue_from_numpy(buffers[p]))
        binding.bind_ortvalue_input(p, values[-1])
        binding.bind_ortvalue_output(n, values[-1])
    return values


def graph_run_options(ort, graph_id: str):
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID, graph_id)
    return options


class StaticSteps:
    """One generation's worth of fixed buffers for a fused decoder's session `sess`: the cache buffers
    (`capacity` slots, batch 1, from `storage`) and the decode step's inputs and logits, bound once."""

    def __init__(self, ort, sess, device: str, storage, layout: Layout, past: list[str], new: list[str],
                 capacity: int, hidden: int, vocab: int, graph_id: str = "1"):
        self.ort, self.sess, self.capacity = ort, sess, capacity
        self.on_host = device == "cpu"
        self.slots = {name: storage.alloc(layout, capacity) for name in past}
        self.host = {"input_ids": np.zeros((1, 1), np.int64), "inputs_embeds": np.zeros((1, 1, hidden), np.float32),
                     "attention_mask": np.zeros((1, capacity), np.int64), "attention_bias": np.zeros((1, capacity), np.float32),
                     "position_ids": np.zeros((1, 1), np.int64)}
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in self.host.items()}
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, vocab], np.float32, device, 0)
        self.binding = sess.io_binding()
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.bound = bind_in_place(ort, self.binding, past, new, self.slots, device != "cpu")
        self.binding.bind_ortvalue_output(LOGITS, self.logits)
        self.run_options = graph_run_options(ort, graph_id)
        self.borrower: SlotCache | None = None
        self.steps = 0  # decode steps run through the bound buffers (what the tests count)

    def lend(self, cache: SlotCache) -> bool:
        """Give `cache` (empty, batch 1) these buffers, if no other open cache holds them."""
        if self.borrower is not None and not self.borrower.closed:
            return False
        cache.adopt(self.slots, self.capacity, on_close=self._returned)
        self.borrower = cache
        return True

    def _returned(self, cache: SlotCache) -> None:
        if self.borrower is cache:
            self.borrower = None

    def serves(self, cache: SlotCache, new_positions: int) -> bool:
        """Whether this step of `cache` can run on the bound buffers: it holds them (a growth would have
        moved its slots), and the new position fits."""
        first = next(iter(self.slots))
        return (self.borrower is cache and cache.slots.get(first) is self.slots[first] and new_positions == 1
                and cache.length + 1 <= self.capacity)

    def step(self, cache: SlotCache, input_ids, attention_mask, attention_bias, position_ids) -> np.ndarray:
        """One decode step: the bound inputs updated in place, one run (a replay, once captured)."""
        P = cache.length
        self.host["attention_mask"][:] = cache.mask
        self.host["attention_bias"][:] = cache.bias
        self.host["attention_mask"][:, P] = attention_mask[:, 0]
        self.host["attention_bias"][:, P] = attention_bias[:, 0]
        self.host["input_ids"][:] = input_ids
        self.host["position_ids"][:] = position_ids
        for name in ("input_ids", "attention_mask", "attention_bias", "position_ids"):
            self.values[name].update_inplace(self.host[name])
        self.sess.run_with_iobinding(self.binding, self.run_options)
        # float32 (1, V): on the CPU a view of the bound output, which the next step writes again, so a
        # copy; from a device already a host copy of its own (one copy of the vocabulary a token, not two)
        logits = self.logits.numpy()[:, -1]
        cache.advance(attention_mask, attention_bias)
        self.steps += 1
        return logits.copy() if self.on_host else logits
