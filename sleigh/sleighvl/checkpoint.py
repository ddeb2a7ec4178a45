"""Sleigh checkpoints on disk: config.json, model.safetensors, tokenizer.json, generation_config.json.

Loading is strict (STYLE 14): every tensor must be present with its shape, nothing extra; safetensors
only. Saving writes into a temporary folder beside the destination and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sleigh.errors import SleighError, check_folder, first_line
from sleigh.runtime.package import CHECKPOINT_CONFIG as CONFIG, TOKENIZER, ordinary_modes, read_json
from sleigh.runtime import DEFAULT_MAX_NEW_TOKENS
from sleigh.runtime.sampling import SamplingOptions
from sleigh.sleighvl.config import SleighVLConfig

WEIGHTS = "model.safetensors"
GENERATION = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    """A checkpoint's generation_config.json, as HF checkpoints carry one (for tools that read it, such as
    transformers' generate): the runtime's own defaults, written out. Sleigh reads its stop ids from
    config.json's prompt section and its sampling from the caller (SamplingOptions)."""

    stop_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = SamplingOptions.temperature  # 0 = greedy
    top_p: float = SamplingOptions.top_p
    top_k: int = SamplingOptions.top_k
    repetition_penalty: float = SamplingOptions.repetition_penalty

    @classmethod
    def load(cls, path: Path) -> GenerationConfig:
        if not path.exists():
            return cls()
        d = read_json(path, "a generation_config.json")
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a clear SleighError when it is unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise SleighError(str(path), "file not found", "a .safetensors weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SleighError(str(path), f"unreadable safetensors file ({first_line(e)})",
                          "a complete, untruncated safetensors file") from None


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check; lists every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{k}: {tuple(got[k].shape)} != {tuple(expected[k])}"
                   for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {_short(wrong)}")
        raise SleighError(source, "weights do not match the config; " + "; ".join(parts),
                          "exactly the tensors the config describes")


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def build_model(cfg: SleighVLConfig, state: dict[str, torch.Tensor] | None = None, source: str = "weights"):
    """The model for `cfg`; with `state`, weights are assigned strictly (built on the meta device)."""
    from sleigh.sleighvl.model import SleighVL

    if state is None:
        return SleighVL(cfg)
    with torch.device("meta"):
        model = SleighVL(cfg)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def load_checkpoint(path: Path):
    """(model, config, generation config) from a Sleigh checkpoint folder."""
    path = Path(path)
    check_folder(path, "a Sleigh checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    if not (path / CONFIG).is_file():
        raise SleighError(str(path), "no config.json", "a Sleigh checkpoint folder (make one with `sleigh init` or `sleigh convert`)")
    cfg = SleighVLConfig.load(path / CONFIG)
    model = build_model(cfg, read_safetensors(path / WEIGHTS), str(path / WEIGHTS))
    return model, cfg, GenerationConfig.load(path / GENERATION)


@contextmanager
def atomic_dir(dst: Path, force: bool = False, keep_others: bool = False):
    """Yield a staging folder beside `dst` (sleigh/staging.py); on success it replaces `dst`, whose old
    content stays whole until then; on failure it is removed. Stale staging folders of `dst` go first.
    `keep_others`: what `dst` holds that the staging folder does not is kept (`_carry_others`)."""
    from sleigh import staging

    dst = Path(dst)
    staging.clean_stale(dst.resolve().parent, dst.name)
    staging.prepare_output_dir(dst, force)
    tmp = staging.make(dst.resolve().parent, dst.name)
    try:
        yield tmp
        ordinary_modes(tmp)  # mkdtemp makes it 0700 and safetensors writes 0600: others could not read it
        if keep_others and dst.is_dir():  # after the modes: the carried files keep their own
            _carry_others(dst, tmp)
        staging.install(tmp, dst.resolve())
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _carry_others(old: Path, new: Path) -> None:
    """Every entry of `old` that `new` (a save being staged) does not write, put in `new` as hard links
    (a log still being appended to through an open file goes on growing in the new folder), copied
    where the file system has none."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or (new / entry.name).is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    if Path(src).is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(dst: Path, model, tokenizer, generation: GenerationConfig, *, force: bool = False,
                    extra=None, dtype=None, keep_others: bool = False) -> None:
    """Write a Sleigh checkpoint atomically. `tokenizer` is a `tokenizers.Tokenizer`; `extra(folder)`
    may add files (a training state) that then appear together with the weights or not at all.
    `dtype` (e.g. torch.float16) stores the float weights in it; they load as float32. `keep_others`:
    what else `dst` holds (a training run's own folder: its log, notes, evaluations) stays in it."""
    from safetensors.torch import save_file

    with atomic_dir(dst, force, keep_others) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        # one metadata key: safetensors keeps metadata in a hash map, so several keys make the header's
        # byte order (and the file's sha256) vary from save to save
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        tokenizer.save(str(tmp / TOKENIZER))
        (tmp / GENERATION).write_text(json.dumps(generation.to_dict(), indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        model.cfg.save(tmp / CONFIG)  # last: a folder with config.json is complete
