"""What the runtime needs to know about a model, read from a checkpoint's config.json or a
package's manifest (which embeds the same config). Plain dicts in, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from sleigh.errors import SleighError


@dataclass(frozen=True)
class ModelInfo:
    hidden_size: int
    context_length: int
    image_size: int
    tokens_per_view: int
    min_tiles: int
    max_tiles: int
    thumbnail: bool
    img_context_token_id: int
    stop_token_ids: tuple[int, ...]
    gswa_apply: str | None  # None: no GSWA
    gswa_min_weight: float
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config") -> ModelInfo:
        try:
            v, llm, img, prompt, gswa = cfg["vision"], cfg["llm"], cfg["image"], cfg["prompt"], cfg.get("gswa")
            grid = v["image_size"] // v["patch_size"]
            return cls(
                hidden_size=llm["hidden_size"], context_length=llm["max_position_embeddings"], image_size=v["image_size"],
                tokens_per_view=grid * grid // 4, min_tiles=img["min_tiles"], max_tiles=img["max_tiles"],
                thumbnail=img["thumbnail"],
                img_context_token_id=prompt["img_context_token_id"], stop_token_ids=tuple(prompt["stop_token_ids"]),
                gswa_apply=None if gswa is None else gswa["apply"],
                gswa_min_weight=1e-4 if gswa is None else gswa["min_weight"],
                mean=tuple(img.get("mean", cls.mean)), std=tuple(img.get("std", cls.std)),
            )
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise SleighError(where, f"model config is incomplete ({e!r})", "a config written by this version of sleigh") from None
