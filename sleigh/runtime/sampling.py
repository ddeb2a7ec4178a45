"""Next-token choice from logits (numpy): greedy, temperature, top-k, top-p, repetition penalty.

Shared by every backend, so seeded sampling gives the same tokens whatever computed the logits
(up to the logits' own differences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sleigh.errors import SleighError


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise SleighError("--temperature", f"got {self.temperature}", "a value >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise SleighError("--top-k", f"got {self.top_k}", "an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise SleighError("--top-p", f"got {self.top_p}", "a value in (0, 1]")
        if self.repetition_penalty <= 0:
            raise SleighError("--repetition-penalty", f"got {self.repetition_penalty}", "a value > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | np.ndarray = ()) -> int:
        """logits (V,) -> next token id. `history` holds the ids the repetition penalty applies to."""
        o = self.options
        x = np.asarray(logits, dtype=np.float64).copy()
        if o.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < x.shape[0])]
            x[seen] = np.where(x[seen] > 0, x[seen] / o.repetition_penalty, x[seen] * o.repetition_penalty)
        if o.greedy:
            return int(np.argmax(x))
        x = x / o.temperature
        if o.top_k and o.top_k < x.shape[0]:
            kth = np.partition(x, -o.top_k)[-o.top_k]
            x[x < kth] = -np.inf
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if o.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < o.top_p  # always keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
