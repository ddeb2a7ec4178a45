"""SleighVL configuration: one frozen dataclass per section, loaded from and saved to `config.json`.

Kept free of torch so the CLI can read and validate a checkpoint without importing it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sleigh.errors import SleighError
from sleigh.runtime.image import (IMAGENET_MEAN, IMAGENET_STD, INTERNVL_MAX_TILES, INTERNVL_PATCH, INTERNVL_TILE_SIZE,
                                  RESAMPLE, TILES_LIMIT)
from sleigh.runtime.multimodal import GSWA_APPLY_MODES, MIN_WEIGHT, tokens_per_view, view_geometry_problem
from sleigh.runtime.package import read_json
from sleigh.runtime.prompt import DEFAULT_SYSTEM_MESSAGE, TEMPLATE

SCHEMA = "sleigh.sleighvl"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VisionConfig:
    """InternViT: patch embedding + CLS + pre-norm layers with layer scale; no final norm."""

    image_size: int = INTERNVL_TILE_SIZE
    patch_size: int = INTERNVL_PATCH
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        _divides(self, "patch_size", "image_size")
        _divides(self, "num_heads", "hidden_size")
        if (problem := view_geometry_problem(self.image_size, self.patch_size)) is not None:
            raise SleighError("vision config", problem, "e.g. 448 / 14 = 32")

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def tokens_per_view(self) -> int:  # after pixel shuffle with ratio 0.5
        return tokens_per_view(self.image_size, self.patch_size)


@dataclass(frozen=True)
class LLMConfig:
    """InternLM2 in Llama form: RMSNorm, RoPE (rotate-half), GQA, SwiGLU, untied head."""

    vocab_size: int = 92553
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 8
    intermediate_size: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "max_position_embeddings")
        _divides(self, "num_heads", "hidden_size")
        _divides(self, "num_kv_heads", "num_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class GSWAConfig:
    """Global Semantic-guided Weight Allocator (see DESIGN.md). hidden_size 0 means 2 x vision hidden (`width`)."""

    hidden_size: int = 0
    num_layers: int = 2
    num_heads: int = 8
    layer_norm_eps: float = 1e-6
    apply: str = "attention"
    min_weight: float = MIN_WEIGHT  # clamp before log(w) in attention mode

    def __post_init__(self):
        _positive(self, "num_layers", "num_heads")
        if self.hidden_size < 0:
            raise SleighError("gswa.hidden_size", f"got {self.hidden_size}", "0 (= 2 x vision hidden) or a positive int")
        if self.hidden_size:
            _divides(self, "num_heads", "hidden_size")
        if self.apply not in GSWA_APPLY_MODES:
            raise SleighError("gswa.apply", f"unknown mode {self.apply!r}", " or ".join(GSWA_APPLY_MODES))
        if not 0 < self.min_weight < 1:
            raise SleighError("gswa.min_weight", f"got {self.min_weight}", "a value in (0, 1)")

    def width(self, vision_hidden: int) -> int:
        """Dg, GSWA's hidden size: `hidden_size`, or by default twice the vision hidden size (Dg > Cv)."""
        return self.hidden_size or 2 * vision_hidden


@dataclass(frozen=True)
class ImageConfig:
    min_tiles: int = 1
    max_tiles: int = INTERNVL_MAX_TILES
    thumbnail: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = RESAMPLE

    def __post_init__(self):
        if not 1 <= self.min_tiles <= self.max_tiles <= TILES_LIMIT:
            raise SleighError("image config", f"min_tiles={self.min_tiles}, max_tiles={self.max_tiles}",
                              f"1 <= min_tiles <= max_tiles <= {TILES_LIMIT}")


@dataclass(frozen=True)
class PromptConfig:
    template: str = TEMPLATE
    bos_token_id: int = 1
    eos_token_id: int = 2
    img_context_token_id: int = 92546
    stop_token_ids: tuple[int, ...] = (92542,)
    system_message: str = DEFAULT_SYSTEM_MESSAGE  # the prompt's system block when the caller gives none

    def __post_init__(self):
        if self.template != TEMPLATE:
            raise SleighError("prompt.template", f"unknown template {self.template!r}", TEMPLATE)


@dataclass(frozen=True)
class SleighVLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    gswa: GSWAConfig | None = field(default_factory=GSWAConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    projector_layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.gswa is not None and not self.image.thumbnail:
            raise SleighError("config", "GSWA weights tiles by the thumbnail's attention, and thumbnails are off",
                              "image.thumbnail true, or gswa null")
        if self.gswa is not None and self.gswa.width(self.vision.hidden_size) % self.gswa.num_heads:
            raise SleighError("gswa", f"hidden size {self.gswa.width(self.vision.hidden_size)} is not "
                              f"divisible by num_heads={self.gswa.num_heads}", "a head count that divides it")
        if self.image.resample != "bicubic":
            raise SleighError("image.resample", f"got {self.image.resample!r}", "bicubic (InternVL's resize)")

    @property
    def projector_in(self) -> int:  # pixel shuffle 0.5 packs 4 patches into one token
        return self.vision.hidden_size * 4

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SleighVLConfig:
        if d.get("schema") != SCHEMA:
            raise SleighError("config.json", f"schema is {d.get('schema')!r}, not a Sleigh checkpoint config",
                              f"schema {SCHEMA!r} (convert InternVL2 checkpoints with `sleigh convert`)")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SleighError("config.json", f"schema_version {d.get('schema_version')!r} is not supported",
                              str(SCHEMA_VERSION))
        return cls(
            vision=_section(VisionConfig, d, "vision"),
            llm=_section(LLMConfig, d, "llm"),
            gswa=None if d.get("gswa") is None else _section(GSWAConfig, d, "gswa"),
            image=_section(ImageConfig, d, "image"),
            prompt=_section(PromptConfig, d, "prompt"),
            projector_layer_norm_eps=float(d.get("projector_layer_norm_eps", 1e-5)),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> SleighVLConfig:
        return cls.from_dict(read_json(path, "a Sleigh checkpoint folder with config.json"))


def _section(cls, d: dict, name: str):
    raw = d.get(name)
    if not isinstance(raw, dict):
        raise SleighError("config.json", f"section {name!r} is missing or not an object", f"an object with {cls.__name__} fields")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SleighError(f"config.json [{name}]", f"unknown keys {unknown}", f"keys among {sorted(known)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**kwargs)


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SleighError(f"{type(obj).__name__}.{n}", f"got {v!r}", "a positive integer")


def _divides(obj, small: str, big: str):
    if getattr(obj, big) % getattr(obj, small):
        raise SleighError(type(obj).__name__, f"{big}={getattr(obj, big)} is not divisible by {small}={getattr(obj, small)}",
                          f"{big} a multiple of {small}")


# Special token ids of InternLM2's tokenizer (InternVL2-2B); `init` uses the tiny tokenizer's own ids instead.
PRESETS: dict[str, SleighVLConfig] = {
    "tiny": SleighVLConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        llm=LLMConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=8192),
        gswa=GSWAConfig(hidden_size=64, num_layers=2, num_heads=2),
    ),
    "small": SleighVLConfig(
        vision=VisionConfig(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=1024),
        llm=LLMConfig(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                      intermediate_size=1536, max_position_embeddings=8192),
        gswa=GSWAConfig(hidden_size=512, num_layers=2, num_heads=4),
    ),
    # Trains from scratch on 2 CPU cores in minutes (`sleigh train --train all`, FACTS.md "Training a toy
    # SleighVL"): 112-px views (16 image tokens each), at most 6 tiles, a GSWA no wider than the LLM.
    "demo": SleighVLConfig(
        vision=VisionConfig(image_size=112, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256),
        llm=LLMConfig(vocab_size=1000, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=384, max_position_embeddings=2048),
        gswa=GSWAConfig(hidden_size=128, num_layers=2, num_heads=4),
        image=ImageConfig(max_tiles=6),
    ),
    "internvl2-2b": SleighVLConfig(gswa=GSWAConfig(hidden_size=2048, num_layers=2, num_heads=16)),
}
