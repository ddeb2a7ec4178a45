"""`manifest.json`, typed: the one contract between export, build-engine and the runtime (DESIGN.md,
"The model package"). One reader (`read_manifest`), one writer (`write_manifest`, and
`update_manifest` for every change after export).

The contract (model, image, prompt, generation, gswa, kv_cache) is what the runtime needs to run the
modules: each fact has one home here, and nothing is written that nothing reads (tests compare these
dataclasses to the keys `sleigh export` writes). A checkpoint folder gets the same contract from its
config.json through `contract_from_config`, the function the exporter writes it with.

Whatever a manifest holds, reading it raises nothing but a SleighError naming the field.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from sleigh.errors import SleighError, check_folder
from sleigh.runtime.fields import Fields, describe, is_int
from sleigh.runtime.image import IMAGENET_MEAN, IMAGENET_STD, RESAMPLE, TILES_LIMIT, max_views, tiles_within
from sleigh.runtime.kv_cache import NEW, PAST
from sleigh.runtime.multimodal import GSWA_APPLY_MODES, MIN_WEIGHT, tokens_per_view, view_geometry_problem
from sleigh.runtime.package import (CHECKPOINT_CONFIG, MANIFEST, MODULE_NAMES, REEXPORT, SCHEMA, SCHEMA_VERSION, inside, read_json,
                                    write_bytes_atomic)
from sleigh.runtime.prompt import DEFAULT_SYSTEM_MESSAGE, TEMPLATE



def kv_names(num_layers: int, prefix: str) -> list[str]:
    """The decoder's cache inputs (`PAST`) or new-position outputs (`NEW`), layer by layer, key then value."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


# -- the contract ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSection:
    hidden_size: int  # the LLM's width: image rows and token embeddings
    # the sizes that set activation memory (runtime/memory.py's budget)
    num_heads: int
    intermediate_size: int
    vision_tokens: int  # patches + CLS per view
    vision_hidden_size: int
    vision_num_heads: int
    vision_intermediate_size: int


@dataclass(frozen=True)
class ImageSection:
    size: int
    min_tiles: int
    max_tiles: int
    thumbnail: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str

    @property
    def max_views(self) -> int:
        return max_views(self.max_tiles, self.thumbnail)


@dataclass(frozen=True)
class PromptSection:
    template: str
    system_message: str  # used when the caller gives none
    img_context_token_id: int
    tokens_per_view: int


@dataclass(frozen=True)
class GenerationSection:
    stop_token_ids: tuple[int, ...]
    context_length: int


@dataclass(frozen=True)
class GSWASection:
    apply: str  # one of GSWA_APPLY_MODES
    min_weight: float  # w is clamped to this before log(w) in `attention` mode


# How the decoder takes its cache (README, "The decoder's KV cache"): "slots", the standard-op form
# (reads C masked slots, returns the new positions alone); "shared", the fused form of ONNX Runtime's
# operators (export --decoder fused: reads the buffer's positions in use, writes the new ones into it);
# "weighted", the fused form that runs on CUDA (export --decoder fused-cuda: as "shared", its heads
# padded to kv_cache.head_dim and each value row kept times its weight, export/fused_decoder.py).
KV_FORMS = ("slots", "shared", "weighted")
IN_PLACE_FORMS = ("shared", "weighted")  # the decoder writes its new positions into the buffers it is given

# A "shared" decoder whose heads are a multiple of this wide (ONNX Runtime's CPU kernel turns no others:
# "head_size shall be a multiple of 16") gives q, k and v packed to GroupQueryAttention, which turns q
# and k itself at position_ids (export/fused_decoder.py; the faster form: benchmarks/RESULTS.md, "Rotary
# inside GroupQueryAttention"); other heads keep RotaryEmbedding nodes. After a cache the kernel turns
# them at any position_ids, but a prompt into an empty cache at position_ids[0, 0] + 0..S-1 in every
# row, whatever the rest of position_ids holds (onnxruntime 1.22-1.32): the runtime refuses other
# positions there (backends/onnxruntime_backend.check_prompt_positions).
ROTARY_INSIDE_HEAD_MULTIPLE = 16


def rotary_in_attention(form: str, head_dim: int) -> bool:
    """Whether a decoder of this kv_cache form and head size has GroupQueryAttention turn q and k itself
    (ROTARY_INSIDE_HEAD_MULTIPLE): what the exporter writes and what the runtime checks positions for."""
    return form == "shared" and head_dim % ROTARY_INSIDE_HEAD_MULTIPLE == 0


@dataclass(frozen=True)
class KVCacheSection:
    """The decoder's cache: `past[i]` is the slot input that `new[i]` (an output) is written into."""

    num_kv_heads: int
    head_dim: int
    past: tuple[str, ...]
    new: tuple[str, ...]
    form: str = "slots"  # one of KV_FORMS

    @property
    def num_layers(self) -> int:
        return len(self.past) // 2

    @property
    def in_place(self) -> bool:
        return self.form in IN_PLACE_FORMS

    @property
    def rotary_in_attention(self) -> bool:
        return rotary_in_attention(self.form, self.head_dim)


@dataclass(frozen=True)
class Contract:
    """Everything the runtime's loop and backends need to know about the model."""

    model: ModelSection
    image: ImageSection
    prompt: PromptSection
    generation: GenerationSection
    gswa: GSWASection | None  # None: no GSWA
    kv_cache: KVCacheSection

    SECTIONS = ("model", "image", "prompt", "generation", "gswa", "kv_cache")

    @classmethod
    def from_json(cls, obj: dict, f: Fields) -> Contract:
        """The contract sections of `obj` (a manifest, or `contract_from_config`'s output), checked."""
        model = f.get(obj, "model", "object")
        img, prompt, gen, kv = (f.get(obj, s, "object") for s in ("image", "prompt", "generation", "kv_cache"))
        gswa = f.get(obj, "gswa", "object", null=True)

        min_tiles, max_tiles = f.get(img, "min_tiles", "positive", "image"), f.get(img, "max_tiles", "positive", "image")
        if min_tiles > max_tiles:
            raise f.fail("image", f"min_tiles {min_tiles} > max_tiles {max_tiles}", "1 <= min_tiles <= max_tiles")
        if max_tiles > TILES_LIMIT:  # the grid search is cubic in it: a huge one would hang the run
            raise f.fail("image.max_tiles", f"is {max_tiles}", f"at most {TILES_LIMIT}")
        mean, std = (tuple(float(x) for x in f.items(f.get(img, k, "list", "image"), "number", f"image.{k}"))
                     for k in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise f.fail("image", f"mean {list(mean)} / std {list(std)}", "three numbers each, std > 0")
        _one_of(f, img, "resample", "image", (RESAMPLE,))
        _one_of(f, prompt, "template", "prompt", (TEMPLATE,))
        system = prompt.get("system_message")
        if not isinstance(system, str):  # "" is a valid (empty) system message
            problem = "is missing" if "system_message" not in prompt else f"is {describe(system)}"
            raise f.fail("prompt.system_message", problem, "a string")
        gswa_section = None
        if gswa is not None:
            min_weight = f.get(gswa, "min_weight", "number", "gswa")
            if not 0 < min_weight < 1:
                raise f.fail("gswa.min_weight", f"is {min_weight}", "a value in (0, 1)")
            gswa_section = GSWASection(_one_of(f, gswa, "apply", "gswa", GSWA_APPLY_MODES), float(min_weight))
        past, new = (tuple(f.items(f.get(kv, k, "list", "kv_cache"), "string", f"kv_cache.{k}")) for k in ("past", "new"))
        if not past or len(past) != len(new) or len(past) % 2:
            raise f.fail("kv_cache", f"lists {len(past)} past and {len(new)} new names",
                         "a key and a value per layer, as many new names as past ones")
        return cls(
            model=ModelSection(**{k: f.get(model, k, "positive", "model") for k in ModelSection.__dataclass_fields__}),
            image=ImageSection(size=f.get(img, "size", "positive", "image"), min_tiles=min_tiles, max_tiles=max_tiles,
                               thumbnail=f.get(img, "thumbnail", "bool", "image"), mean=mean, std=std, resample=RESAMPLE),
            prompt=PromptSection(template=TEMPLATE, system_message=system,
                                 img_context_token_id=f.get(prompt, "img_context_token_id", "count", "prompt"),
                                 tokens_per_view=f.get(prompt, "tokens_per_view", "positive", "prompt")),
            generation=GenerationSection(
                stop_token_ids=tuple(f.items(f.get(gen, "stop_token_ids", "list", "generation"), "count",
                                             "generation.stop_token_ids")),
                context_length=f.get(gen, "context_length", "positive", "generation")),
            gswa=gswa_section,
            kv_cache=KVCacheSection(f.get(kv, "num_kv_heads", "positive", "kv_cache"),
                                    f.get(kv, "head_dim", "positive", "kv_cache"), past, new,
                                    _one_of(f, kv, "form", "kv_cache", KV_FORMS, default="slots")),  # absent before the fused form
        )

    @classmethod
    def from_config(cls, cfg, where: str) -> Contract:
        """A checkpoint's contract, from its config.json (already parsed)."""
        return cls.from_json(contract_from_config(cfg, where), Fields(where, "a config.json written by this sleigh"))

    @classmethod
    def of_checkpoint(cls, folder: Path) -> Contract:
        """A Sleigh checkpoint folder's contract, read from its config.json."""
        config = Path(folder) / CHECKPOINT_CONFIG
        return cls.from_config(read_json(config, "a Sleigh checkpoint's config.json"), str(config))


def contract_from_config(cfg, where: str = "config.json", *, max_tiles: int | None = None) -> dict:
    """The contract sections (JSON) of a model with this config.json: what `sleigh export` writes into
    the manifest, and what the runtime reads from a checkpoint folder. `max_tiles`: export's --max-tiles."""
    f = Fields(where, "a config written by this version of sleigh")
    if not isinstance(cfg, dict):
        raise f.fail("config", "is not an object", "the model config")
    v, llm, img, prompt = (f.get(cfg, s, "object") for s in ("vision", "llm", "image", "prompt"))
    gswa = f.get(cfg, "gswa", "object", null=True, default=None)
    size, patch = f.get(v, "image_size", "positive", "vision"), f.get(v, "patch_size", "positive", "vision")
    if (problem := view_geometry_problem(size, patch)) is not None:
        raise f.fail("vision", problem, "e.g. 448 / 14 = 32")
    hidden, heads, kv_heads, layers = (f.get(llm, k, "positive", "llm")
                                       for k in ("hidden_size", "num_heads", "num_kv_heads", "num_layers"))
    if hidden % heads or heads % kv_heads:
        raise f.fail("llm", f"hidden_size {hidden}, num_heads {heads}, num_kv_heads {kv_heads} do not divide",
                     "num_heads | hidden_size and num_kv_heads | num_heads")
    min_tiles, max_tiles_cfg = (f.get(img, k, "positive", "image") for k in ("min_tiles", "max_tiles"))
    img_context = f.get(prompt, "img_context_token_id", "count", "prompt")
    stops = f.items(f.get(prompt, "stop_token_ids", "list", "prompt"), "count", "prompt.stop_token_ids")
    _check_token_ids(f, img_context, stops, f.get(llm, "vocab_size", "positive", "llm"), "llm.vocab_size",
                     "prompt.stop_token_ids")
    gswa_section = None
    if gswa is not None:
        gswa_section = {"apply": f.get(gswa, "apply", "string", "gswa"),
                        "min_weight": f.get(gswa, "min_weight", "number", "gswa", default=MIN_WEIGHT)}
    return {
        "model": {"hidden_size": hidden, "num_heads": heads,
                  "intermediate_size": f.get(llm, "intermediate_size", "positive", "llm"),
                  "vision_tokens": (size // patch) ** 2 + 1,
                  **{f"vision_{k}": f.get(v, k, "positive", "vision")
                     for k in ("hidden_size", "num_heads", "intermediate_size")}},
        "image": {"size": size, "min_tiles": min_tiles, "max_tiles": max_tiles_cfg if max_tiles is None else max_tiles,
                  "thumbnail": f.get(img, "thumbnail", "bool", "image"),
                  "mean": f.get(img, "mean", "list", "image", default=list(IMAGENET_MEAN)),
                  "std": f.get(img, "std", "list", "image", default=list(IMAGENET_STD)),
                  "resample": f.get(img, "resample", "string", "image", default=RESAMPLE)},
        "prompt": {"template": f.get(prompt, "template", "string", "prompt", default=TEMPLATE),
                   "system_message": prompt.get("system_message", DEFAULT_SYSTEM_MESSAGE),
                   "img_context_token_id": img_context,
                   "tokens_per_view": tokens_per_view(size, patch)},
        "generation": {"stop_token_ids": list(stops),
                       "context_length": f.get(llm, "max_position_embeddings", "positive", "llm")},
        "gswa": gswa_section,
        "kv_cache": {"num_kv_heads": kv_heads, "head_dim": hidden // heads,
                     "past": kv_names(layers, PAST), "new": kv_names(layers, NEW)},
    }


def _one_of(f: Fields, obj: dict, key: str, path: str, allowed: tuple[str, ...], **default) -> str:
    value = f.get(obj, key, "string", path, **default)
    if value not in allowed:
        raise f.fail(f"{path}.{key}", f"is {value!r:.60}", " or ".join(allowed))
    return value


# -- the package: modules, files, engines ------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple  # ints and symbolic names ("batch", "sequence", ...)


@dataclass(frozen=True)
class ModuleEntry:
    file: str
    data_files: tuple[str, ...]
    precision: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def names(self, side: str) -> list[str]:
        return [t.name for t in getattr(self, side)]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Calibration:
    """`sleigh calibrate`'s entry: the vision module's activation ranges (its files have fixed names,
    engines/calibration/int8.py, and their hashes are in the manifest's `files`), from which images,
    tiled how. `to_json` is its one form on disk; `record` is the rest (timing, versions, the cache header)."""

    method: str
    images: tuple[str, ...]  # the images the ranges came from (the accuracy gate takes others)
    skipped_files: tuple[dict, ...]  # {"file", "reason"} of each unreadable image
    views: int  # the views the ranges saw
    max_tiles: int
    tensors: int  # activation tensors with a range
    module: str = "vision"
    # the images' sha256, in `images` order: what the gate holds out (names repeat across folders:
    # every `sleigh data synth` split is 000000.jpg, ...); absent in calibrations made before it
    image_sha256: tuple[str, ...] = ()
    record: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def to_json(self) -> dict:
        return {**self.record, "module": self.module, "method": self.method, "num_images": self.num_images,
                "skipped": self.skipped, "images": list(self.images), "skipped_files": list(self.skipped_files),
                "views": self.views, "max_tiles": self.max_tiles, "tensors": self.tensors,
                **({"image_sha256": list(self.image_sha256)} if self.image_sha256 else {})}


_CALIBRATION_TYPED = ("module", "method", "num_images", "skipped", "images", "skipped_files", "views", "max_tiles",
                      "tensors", "image_sha256", "files")  # files: in earlier entries (the manifest's files hold them)


def _calibration(f: Fields, data: dict) -> Calibration | None:
    c = f.get(data, "calibration", "object", null=True, default=None)
    if c is None:
        return None
    opt = lambda key, kind, default: f.get(c, key, kind, "calibration", default=default)  # noqa: E731
    return Calibration(
        method=f.get(c, "method", "string", "calibration"),
        images=tuple(f.items(f.get(c, "images", "list", "calibration"), "string", "calibration.images")),
        skipped_files=tuple(f.items(opt("skipped_files", "list", []), "object", "calibration.skipped_files")),
        views=opt("views", "count", 0), max_tiles=opt("max_tiles", "count", 0), tensors=opt("tensors", "count", 0),
        module=opt("module", "string", "vision"),
        image_sha256=tuple(f.items(opt("image_sha256", "list", []), "sha256", "calibration.image_sha256")),
        record={k: v for k, v in c.items() if k not in _CALIBRATION_TYPED})


@dataclass(frozen=True)
class Manifest:
    """A package's manifest, read and checked. `root`: the package folder every path is inside.
    `json`: the object as on disk, for tools that show it and for `update_manifest`'s functions."""

    root: Path
    schema_version: int
    created_by: dict | None
    source: dict | None  # what it was exported from (export.exporter.source_of); None in older packages
    opset: int | None
    contract: Contract
    tokenizer: str  # the tokenizer file
    modules: dict[str, ModuleEntry]
    files: dict[str, FileEntry]
    parity: dict | None
    calibration: Calibration | None
    engines: dict[str, EngineEntry]
    json: dict

    TOP_LEVEL = ("schema", "schema_version", "created_by", "source", "opset", *Contract.SECTIONS, "tokenizer", "modules",
                 "files", "parity", "calibration", "engines")

    def path(self, rel: str, what: str = "manifest.json") -> Path:
        """A package file named in the manifest (checked to stay inside the package when read, and again here)."""
        return inside(self.root, rel, what)

    def module_path(self, module: str) -> Path:
        """The package's own ONNX file of `module`, which must exist."""
        p = self.path(self.modules[module].file, f"manifest.json: modules.{module}.file")
        if not p.is_file():
            raise SleighError(str(p), "module file missing", f"the files listed in manifest.json; {REEXPORT}")
        return p

    def most_tiles(self, entry: EngineEntry | None = None) -> int:
        """Most tiles per image a run takes: the model's, or fewer where engine `entry` was built for
        fewer views (build-engine --max-tiles)."""
        img = self.contract.image
        return tiles_within(entry.max_views if entry else None, img.max_tiles, img.thumbnail)

    def module_files(self) -> list[str]:
        """Every file of the package's own modules, external data included."""
        return [rel for m in self.modules.values() for rel in (m.file, *m.data_files)]


def read_manifest(pkg: Path) -> Manifest:
    """The package's manifest, checked: every field with its type, every path inside the package.
    Whatever the file holds, the only exception is a SleighError."""
    pkg = Path(pkg)
    path = pkg / MANIFEST
    try:
        check_folder(pkg, "a model package folder written by `sleigh export`")
        if not path.is_file():
            hint = " (an interrupted or failed export leaves no manifest)" if any(pkg.glob("*.onnx")) else ""
            raise SleighError(str(pkg), f"no manifest.json{hint}", "a complete package from `sleigh export`")
    except OSError as e:
        raise SleighError(str(pkg), f"cannot be read ({e.strerror or e})", "a readable package folder") from None
    return parse_manifest(read_json(path, "a manifest written by `sleigh export`"), pkg, str(path))


def parse_manifest(data, pkg: Path, where: str) -> Manifest:
    """`data` (a manifest's JSON) as a Manifest; a SleighError naming the first missing field, wrong
    type or path that leaves the package."""
    pkg = Path(pkg)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SleighError(where, "not a Sleigh package manifest", f"schema {SCHEMA!r}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SleighError(where, f"schema_version is {describe(version)}", f"the integer {SCHEMA_VERSION}; {REEXPORT}")
    if version > SCHEMA_VERSION:
        raise SleighError(where, f"schema_version {version} is newer than this sleigh reads ({SCHEMA_VERSION})",
                          "upgrade sleigh (`pip install -U sleigh`) to run this package")
    if version < SCHEMA_VERSION:
        raise SleighError(where, f"schema_version {version} is from an older sleigh", f"{SCHEMA_VERSION}; {REEXPORT}")
    f = Fields(where, REEXPORT)
    in_pkg = lambda rel, field: inside(pkg, rel, f"{where}: {field}")  # noqa: E731

    files = {}
    raw_files = f.get(data, "files", "object")
    for rel in raw_files:
        in_pkg(rel, "files")
        entry = f.get(raw_files, rel, "object", "files")
        files[rel] = FileEntry(f.get(entry, "sha256", "sha256", f"files.{rel}"), f.get(entry, "bytes", "count", f"files.{rel}"))

    def listed(rel: str, field: str, f: Fields = f) -> str:  # a file the runtime opens has a size and sha256 to check
        in_pkg(rel, field)
        if rel not in files:
            raise f.fail(field, f"{rel!r:.100} is not listed in files", "every file the package uses, with its sha256")
        return rel

    tokenizer = listed(f.get(f.get(data, "tokenizer", "object"), "file", "string", "tokenizer"), "tokenizer.file")
    raw_modules = f.get(data, "modules", "object")
    missing = [m for m in MODULE_NAMES if m not in raw_modules]
    if missing:
        raise SleighError(where, f"modules {missing} are missing", f"all of {list(MODULE_NAMES)}; {REEXPORT}")
    modules = {name: _module(f, raw_modules, name, listed) for name in raw_modules}  # any other a newer sleigh may list
    contract = Contract.from_json(data, f)
    decoder = modules["decoder"]
    for side, names in (("inputs", contract.kv_cache.past), ("outputs", contract.kv_cache.new)):
        absent = sorted(set(names) - set(decoder.names(side)))
        if absent:
            raise f.fail("kv_cache", f"names {absent[:2]} that are not among modules.decoder.{side}",
                         "the decoder's own cache names")
    _check_sizes(f, contract, modules)
    created_by = f.get(data, "created_by", "object", null=True, default=None)
    source = f.get(data, "source", "object", null=True, default=None)
    opset = f.get(data, "opset", "positive", null=True, default=None)
    parity = f.get(data, "parity", "object", null=True, default=None)
    calibration = _calibration(f, data)
    raw_engines = f.get(data, "engines", "object", default={})
    engines = {name: _engine(raw_engines, name, in_pkg, listed, where) for name in raw_engines}
    return Manifest(root=pkg, schema_version=version, created_by=created_by, source=source, opset=opset, contract=contract,
                    tokenizer=tokenizer, modules=modules, files=files, parity=parity, calibration=calibration,
                    engines=engines, json=data)


def _check_sizes(f: Fields, contract: Contract, modules: dict[str, ModuleEntry]) -> None:
    """The contract's sizes and cache form against the modules' recorded inputs, which the runtime checks
    against the files (check_module_io): an edited size would otherwise fail inside ONNX Runtime."""
    kv = contract.kv_cache
    sizes = [("image.size", contract.image.size, [("vision", "pixel_values", 2), ("vision", "pixel_values", 3)]),
             ("model.hidden_size", contract.model.hidden_size, [("embed", "image_embeds", 1), ("decoder", "inputs_embeds", 2)]),
             ("kv_cache.num_kv_heads", kv.num_kv_heads, [("decoder", kv.past[0], 1)]),
             ("kv_cache.head_dim", kv.head_dim, [("decoder", kv.past[0], 3)])]
    for what, value, places in sizes:
        for module, name, axis in places:
            shape = next((t.shape for t in modules[module].inputs if t.name == name), ())
            dim = shape[axis] if axis < len(shape) else None
            if is_int(dim) and dim != value:
                raise f.fail(what, f"is {value}, but modules.{module} takes {name} with {dim} on axis {axis}",
                             "the size the modules were exported with")
    logits = next((t.shape for t in modules["decoder"].outputs if t.name == "logits"), ())
    if logits and is_int(logits[-1]):
        _check_token_ids(f, contract.prompt.img_context_token_id, contract.generation.stop_token_ids, logits[-1],
                         "the decoder's logits", "generation.stop_token_ids")
    reads_ids = "input_ids" in modules["decoder"].names("inputs")  # the fused forms embed a step's tokens
    if reads_ids != kv.in_place:
        raise f.fail("kv_cache.form", f"is {kv.form!r}, but the decoder {'takes' if reads_ids else 'lacks'} input_ids",
                     f"{' or '.join(map(repr, IN_PLACE_FORMS))} for a fused decoder (with input_ids), 'slots' for the standard one")


def _check_token_ids(f: Fields, img_context: int, stops, vocab: int, of: str, stops_field: str) -> None:
    """The image placeholder and the stop tokens are ids of the vocabulary: a stop id past it never ends
    an answer, an image id past it never takes an image. `stops_field`: where the file holds the stops
    (a config's prompt.stop_token_ids, a manifest's generation.stop_token_ids)."""
    for what, ids in (("prompt.img_context_token_id", [img_context]), (stops_field, list(stops))):
        if any(i >= vocab for i in ids):
            raise f.fail(what, f"holds {max(ids)}, past the vocabulary of {vocab} ({of})", f"ids below {vocab}")


def _module(f: Fields, modules: dict, name: str, listed) -> ModuleEntry:
    path = f"modules.{name}"
    entry = f.get(modules, name, "object", "modules")
    file = listed(f.get(entry, "file", "string", path), f"{path}.file")
    data_files = f.items(f.get(entry, "data_files", "list", path, default=[]), "string", f"{path}.data_files")
    for i, rel in enumerate(data_files):
        listed(rel, f"{path}.data_files[{i}]")
    io = {}
    for side in ("inputs", "outputs"):
        tensors = []
        for i, t in enumerate(f.items(f.get(entry, side, "list", path), "object", f"{path}.{side}")):
            at = f"{path}.{side}[{i}]"
            shape = f.get(t, "shape", "list", at, default=[])
            for j, d in enumerate(shape):
                if not (isinstance(d, str) and d) and not (isinstance(d, int) and not isinstance(d, bool) and d >= 0):
                    raise f.fail(f"{at}.shape[{j}]", f"is {describe(d)}", "a size >= 0 or a dimension's name")
            tensors.append(TensorInfo(f.get(t, "name", "string", at), f.get(t, "dtype", "string", at, default="?"), tuple(shape)))
        io[side] = tuple(tensors)
    return ModuleEntry(file, tuple(data_files), f.get(entry, "precision", "string", path, default="fp32"), **io)


# What this sleigh builds (build-engine's --backend, --precision and --llm-weights). An entry may hold
# other values (a newer sleigh's): the runtime ranks such an engine last, and the accuracy gate, which
# needs to know the kind, refuses it in one line (engines/accuracy.run_gate).
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
LLM_WEIGHTS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class EngineEntry:
    """One engine of `sleigh build-engine`: what the runtime and the tools read of it, checked, and
    `record`, the rest of the build's record as written (shapes, profiles, sources, ...). `to_json`
    is its one form on disk, the one `_engine` reads back."""

    name: str
    backend: str
    precision: str
    modules: dict[str, str]  # module -> the file it runs from (ONNX or a TensorRT plan)
    llm_weights: str | None = None
    dir: str | None = None
    files: dict[str, FileEntry] | None = None  # every file the build wrote; None: not listed yet (being gated)
    accuracy_passed: bool | None = None
    degraded: bool | None = None
    build_options: dict | None = None  # EngineOptions as given (what a rebuild repeats)
    accuracy: dict | None = None  # the agreement gate's report
    task_accuracy: dict | None = None  # the task gate's report (--eval-data)
    versions: dict | None = None
    cpu_features: tuple[str, ...] | None = None  # the kernels' CPU features the gate ran with (ONNX Runtime)
    cpu_machine: str | None = None
    plugin_library: str | None = None  # TensorRT: the GSWA plugin's copy the vision plan calls
    kv_dtype: str | None = None  # ONNX Runtime: the decoder's cache slots (None: built before entries said)
    max_memory: int | None = None  # bytes: the memory budget of a run on this engine unless the run gives one
    # INT8 vision: the calibration its ranges came from (the package's may be redone since; the gate holds
    # out these images), with the ranges file's sha256 in its record; None: no INT8, or built before entries said
    calibration: Calibration | None = None
    record: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def gated(self) -> bool:
        """Passed its gate outright (not kept with --allow-degraded): what `auto` may pick."""
        return bool(self.accuracy_passed) and not self.degraded

    @property
    def max_views(self) -> int | None:
        """Most views per image the engine was built for (build-engine --max-tiles), None where unsaid."""
        return (self.record.get("shapes") or {}).get("max_views")

    @property
    def max_context(self) -> int | None:
        """Longest prompt + answer the engine was built for (build-engine --max-context), None where unsaid."""
        return (self.record.get("shapes") or {}).get("max_context")

    @property
    def files_bytes(self) -> int | None:
        return None if self.files is None else sum(f.bytes for f in self.files.values())

    @property
    def json(self) -> dict:
        return self.to_json()

    def to_json(self) -> dict:
        out = {**self.record, **{k: getattr(self, k) for k in _AS_IS}}
        if self.files is not None:
            out["files"] = {rel: asdict(f) for rel, f in self.files.items()}
            out["files_bytes"] = self.files_bytes
        if self.cpu_machine is not None or self.cpu_features is not None:
            out["cpu"] = {"machine": self.cpu_machine, "features": self.cpu_features and list(self.cpu_features)}
        if self.plugin_library is not None:
            out["gswa"] = {**out.get("gswa", {}), "via": "plugin", "plugin_library": self.plugin_library}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        return out


def parse_engine(pkg: Path, name: str, data) -> EngineEntry:
    """An entry build-engine has written and not yet listed (its files are checked when it is)."""
    where = f"engine {name}"

    def in_pkg(rel, at: str, f=None):
        inside(Path(pkg), rel, f"{where}: {at}")
        return rel

    return _engine({name: data}, name, in_pkg, in_pkg, where)


# The keys `to_json` writes from the typed fields (as they are, or in their on-disk form); the rest
# of an entry is its record.
_AS_IS = ("name", "backend", "precision", "llm_weights", "kv_dtype", "dir", "modules", "build_options", "versions",
          "accuracy", "task_accuracy", "accuracy_passed", "degraded", "max_memory")
_TYPED = (*_AS_IS, "files", "files_bytes", "cpu", "calibration")


def _engine(engines: dict, name: str, in_pkg, listed, where: str) -> EngineEntry:
    f = Fields(where, "an entry as `sleigh build-engine` writes it: rebuild the engine with --force")
    path = f"engines.{name}"
    e = f.get(engines, name, "object", "engines")
    opt = lambda key, kind, obj=e, at=path: f.get(obj, key, kind, at, null=True, default=None)  # noqa: E731
    if (d := opt("dir", "string")) is not None:
        in_pkg(d, f"{path}.dir")
    raw = f.get(e, "modules", "object", path)
    modules = {m: listed(f.get(raw, m, "string", f"{path}.modules"), f"{path}.modules.{m}", f) for m in raw}
    if sorted(modules) != sorted(MODULE_NAMES):
        raise f.fail(f"{path}.modules", f"lists {sorted(modules)}", f"one file for each of {list(MODULE_NAMES)}")
    if "name" in e and e["name"] != name:
        raise f.fail(f"{path}.name", f"is {describe(e['name'])}", f"the entry's key, {name!r}")
    files = None
    if "files" in e:
        files, raw_files = {}, f.get(e, "files", "object", path)
        for rel in raw_files:
            entry, at = f.get(raw_files, listed(rel, f"{path}.files", f), "object", f"{path}.files"), f"{path}.files.{rel}"
            files[rel] = FileEntry(f.get(entry, "sha256", "sha256", at), f.get(entry, "bytes", "count", at))
    shapes = opt("shapes", "object") or {}
    for key in ("max_views", "max_context"):
        opt(key, "positive", shapes, f"{path}.shapes")
    cpu = opt("cpu", "object") or {}
    features = opt("features", "list", cpu, f"{path}.cpu")
    plugin, gswa = None, opt("gswa", "object") or {}
    if gswa.get("via") == "plugin":
        plugin = listed(f.get(gswa, "plugin_library", "string", f"{path}.gswa"), f"{path}.gswa.plugin_library", f)
        if files is not None and plugin not in files:
            raise f.fail(f"{path}.gswa.plugin_library", "is not among the entry's files", "the library the build copied")
    return EngineEntry(
        name=name, backend=f.get(e, "backend", "string", path), precision=f.get(e, "precision", "string", path),
        modules=modules, llm_weights=opt("llm_weights", "string"), dir=d, files=files,
        accuracy_passed=opt("accuracy_passed", "bool"), degraded=opt("degraded", "bool"),
        build_options=opt("build_options", "object"), accuracy=opt("accuracy", "object"),
        task_accuracy=opt("task_accuracy", "object"), versions=opt("versions", "object"),
        cpu_features=None if features is None else tuple(f.items(features, "string", f"{path}.cpu.features")),
        cpu_machine=opt("machine", "string", cpu, f"{path}.cpu"), plugin_library=plugin, kv_dtype=opt("kv_dtype", "string"),
        max_memory=opt("max_memory", "count"), calibration=_calibration(Fields(f"{where}: {path}", f.expected), e),
        record={k: v for k, v in e.items() if k not in _TYPED})


# -- writing ---------------------------------------------------------------------------------------

def write_manifest(pkg: Path, data: dict, *, before_replace: Callable[[], None] | None = None) -> Manifest:
    """Check `data` as a manifest of `pkg` and write it atomically; returns the manifest as written.
    `before_replace`: where a writer moves in the files the new manifest lists (a failure there leaves
    the old manifest)."""
    pkg = Path(pkg)
    manifest = parse_manifest(data, pkg, str(pkg / MANIFEST))  # nothing unreadable is ever written
    write_bytes_atomic(pkg / MANIFEST, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(),
                       before_replace=before_replace)
    return manifest


def update_manifest(pkg: Path, fn: Callable[[dict], dict | None], *,
                    before_replace: Callable[[], None] | None = None) -> Manifest:
    """Read the package's manifest, apply `fn` to (a copy of) its JSON object (it changes it in place or
    returns a new one), and write the result (`write_manifest`). Writers in other processes wait for
    each other, so none loses another's change."""
    pkg = Path(pkg)
    with _locked(pkg):
        data = copy.deepcopy(read_manifest(pkg).json)
        changed = fn(data)
        return write_manifest(pkg, data if changed is None else changed, before_replace=before_replace)


@contextmanager
def _locked(pkg: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock between processes; each write is still atomic
        yield
        return
    # The package folder itself is the lock: it is never replaced (as manifest.json is by each write)
    # and locking it leaves no file behind. One writer at a time: calibrate and build-engine may overlap.
    fd = os.open(pkg, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
