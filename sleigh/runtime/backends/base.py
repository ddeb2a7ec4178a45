"""The one small interface every backend implements (Polygraphy-style runners).

`run(module, feeds)` runs `vision` or `embed` on a dict of named arrays and returns a dict of
named arrays. The decoder is stateful: the backend owns the KV cache, `reset()` empties it and
`step()` feeds new positions, adds them to the cache and returns the logits of the last one. The
cache keeps each position's attention mask and bias with its keys and values, so a step is given
the mask and bias of its new positions only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    name: str = "?"
    max_context: int | None = None  # longest prompt + answer the backend was built for (None: the model's)

    @abstractmethod
    def run(self, module: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `vision` or `embed` by name."""

    @abstractmethod
    def reset(self, batch: int = 1) -> None:
        """Start a new sequence: empty KV cache."""

    @abstractmethod
    def step(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, attention_bias: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Decoder on S new positions: inputs_embeds (B, S, D), attention_mask (B, S) int64 and
        attention_bias (B, S) float32 of the new positions, position_ids (B, S) -> last logits (B, V) float32."""

    @property
    @abstractmethod
    def past_length(self) -> int:
        """Positions held in the KV cache."""

    def describe(self) -> str:
        return self.name
