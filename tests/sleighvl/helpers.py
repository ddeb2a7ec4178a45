"""Helpers for the reference-model tests."""

from __future__ import annotations

import torch


def image_rows(vision_out, hidden: int) -> torch.Tensor:
    """The embed module's image_embeds input: every view's image tokens as rows (none for a text-only
    prompt, as the runtime feeds it)."""
    if vision_out is None:
        return torch.zeros(0, hidden)
    return vision_out.image_embeds.reshape(-1, hidden)
