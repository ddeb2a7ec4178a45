"""What the runtime needs to know about a model, read from a checkpoint's config.json or a
package's manifest (which embeds the same config). Plain dicts in, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from sleigh.runtime.fields import Fields
from sleigh.runtime.multimodal import GSWA_APPLY_MODES


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
    def from_config(cls, cfg, where: str = "config", path: str = "") -> ModelInfo:
        """Every field the runtime reads, with its type; `path`: where `cfg` sits in its file
        (`model_config` in a manifest), for the messages."""
        f = Fields(where, "a config written by this version of sleigh")
        if not isinstance(cfg, dict):
            raise f.fail(path or "config", "is not an object", "the model config")
        p = lambda section: f"{path}.{section}" if path else section  # noqa: E731
        v, llm, img, prompt = (f.get(cfg, s, "object", path) for s in ("vision", "llm", "image", "prompt"))
        gswa = f.get(cfg, "gswa", "object", path, null=True, default=None)

        image_size, patch = f.get(v, "image_size", "positive", p("vision")), f.get(v, "patch_size", "positive", p("vision"))
        grid = image_size // patch
        if image_size % patch or grid % 2:
            raise f.fail(p("vision"), f"image_size {image_size} / patch_size {patch} is not an even whole number",
                         "e.g. 448 / 14 = 32")
        # The decoder's shapes: the backends size the KV cache from these.
        hidden, heads, kv_heads = (f.get(llm, k, "positive", p("llm")) for k in ("hidden_size", "num_heads", "num_kv_heads"))
        f.get(llm, "num_layers", "positive", p("llm"))
        if hidden % heads or heads % kv_heads:
            raise f.fail(p("llm"), f"hidden_size {hidden}, num_heads {heads}, num_kv_heads {kv_heads} do not divide",
                         "num_heads | hidden_size and num_kv_heads | num_heads")
        min_tiles, max_tiles = f.get(img, "min_tiles", "positive", p("image")), f.get(img, "max_tiles", "positive", p("image"))
        if min_tiles > max_tiles:
            raise f.fail(p("image"), f"min_tiles {min_tiles} > max_tiles {max_tiles}", "1 <= min_tiles <= max_tiles")
        mean, std = (tuple(f.items(f.get(img, k, "list", p("image"), default=list(d)), "number", f"{p('image')}.{k}"))
                     for k, d in (("mean", cls.mean), ("std", cls.std)))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise f.fail(p("image"), f"mean {list(mean)} / std {list(std)}", "three numbers each, std > 0")
        stops = f.items(f.get(prompt, "stop_token_ids", "list", p("prompt")), "count", f"{p('prompt')}.stop_token_ids")
        apply, min_weight = None, 1e-4
        if gswa is not None:
            apply = f.get(gswa, "apply", "string", p("gswa"))
            if apply not in GSWA_APPLY_MODES:
                raise f.fail(f"{p('gswa')}.apply", f"is {apply!r}", " or ".join(GSWA_APPLY_MODES))
            min_weight = f.get(gswa, "min_weight", "number", p("gswa"))
            if not 0 < min_weight < 1:
                raise f.fail(f"{p('gswa')}.min_weight", f"is {min_weight}", "a value in (0, 1)")
        return cls(
            hidden_size=hidden, context_length=f.get(llm, "max_position_embeddings", "positive", p("llm")),
            image_size=image_size, tokens_per_view=grid * grid // 4, min_tiles=min_tiles, max_tiles=max_tiles,
            thumbnail=f.get(img, "thumbnail", "bool", p("image")),
            img_context_token_id=f.get(prompt, "img_context_token_id", "count", p("prompt")),
            stop_token_ids=tuple(stops), gswa_apply=apply, gswa_min_weight=float(min_weight),
            mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std),
        )
