"""Glue between the vision output and the decoder input, shared by the reference and the runtime."""

from __future__ import annotations

import numpy as np

# How GSWA's tile weights act on the LLM (DESIGN.md, "GSWA"): log-weights added to the attention logits
# of each view's image tokens, or the projected image features scaled.
GSWA_APPLY_MODES = ("attention", "scale")
MIN_WEIGHT = 1e-4  # the default floor of a view's weight before log(w) in `attention` mode
PIXEL_SHUFFLE_TOKENS = 4  # patches packed into one image token by the 0.5 pixel shuffle (2 x 2)

# The GSWA node in gswa.onnx (sleigh/export/gswa_op.py writes it): a `sleigh::GSWA` custom op with an
# ONNX function body; TensorRT can map it to a plugin of this name, version and namespace instead.
GSWA_DOMAIN, GSWA_OP, GSWA_OP_VERSION = "sleigh", "GSWA", 1
GSWA_PLUGIN_NAMESPACE, GSWA_PLUGIN_VERSION = "sleigh", "1"
GSWA_NODE_PREFIX = "/gswa/"  # the function body's node names, kept where a tool inlines it


def no_image_rows(hidden: int) -> np.ndarray:
    """The embed module's image_embeds for text alone (a decode step, a text prompt): no rows, so an
    <IMG_CONTEXT> among the ids (a generated one) keeps its token-table row (package schema 7)."""
    return np.zeros((0, hidden), np.float32)


def view_geometry_problem(image_size: int, patch_size: int) -> str | None:
    """What is wrong with a view of `image_size` px cut into `patch_size` px patches, None if nothing:
    the patches must tile it, an even number a side (the 0.5 pixel shuffle packs 2 x 2 into a token)."""
    if image_size % patch_size or (image_size // patch_size) % 2:
        return f"image_size {image_size} / patch_size {patch_size} is not an even whole number (the 0.5 pixel shuffle)"
    return None


def tokens_per_view(image_size: int, patch_size: int) -> int:
    """Image tokens per view: the (image_size / patch_size)² patches after the 0.5 pixel shuffle."""
    return (image_size // patch_size) ** 2 // PIXEL_SHUFFLE_TOKENS


def scaled_embeds(image_embeds, gswa_weights, apply: str):
    """GSWA's `scale` mode: each view's image embeddings (T, tokens, D) times its weight (T,); in
    `attention` mode they stay as they are. numpy or torch alike."""
    return gswa_weights[:, None, None] * image_embeds if apply == "scale" else image_embeds


def image_attention_bias(input_ids: np.ndarray, gswa_weights: np.ndarray, img_context_id: int,
                         tokens_per_view: int, min_weight: float = MIN_WEIGHT) -> np.ndarray:
    """GSWA's `attention` mode: log(w_t) on every <IMG_CONTEXT> position of view t, 0 elsewhere.

    input_ids (B, S) int64; gswa_weights (T,) for the image rows in order (views of row 0 first).
    Returns float32 (B, S). The thumbnail's weight is 1, so its positions get 0.
    """
    ids = np.asarray(input_ids)
    is_img = ids.reshape(-1) == img_context_id
    count = int(is_img.sum())
    bias = np.zeros(ids.size, dtype=np.float32)
    if count:
        w = np.asarray(gswa_weights, dtype=np.float32)
        if count != w.shape[0] * tokens_per_view:
            raise ValueError(f"{count} <IMG_CONTEXT> tokens but {w.shape[0]} views x {tokens_per_view}")
        per_token = np.repeat(np.log(np.maximum(w, np.float32(min_weight))), tokens_per_view)
        bias[is_img] = per_token
    return bias.reshape(ids.shape)
