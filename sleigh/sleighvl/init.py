"""Random SleighVL checkpoints (`sleigh init`): real shapes or small presets, GSWA active (alpha = 1)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sleigh.errors import SleighError, check_seed
from sleigh.progress import progress
from sleigh.sleighvl.checkpoint import GenerationConfig, save_checkpoint
from sleigh.sleighvl.config import PRESETS, SleighVLConfig


@torch.no_grad()
def init_weights(model, seed: int, progress=None) -> None:
    """Scaled so activations and logits have unit spread and the image changes the answer."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if progress is not None:
            progress.advance(p.numel())
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("alpha"):
            p.fill_(1.0)  # GSWA active
        elif leaf in ("ls1", "ls2"):
            p.fill_(0.5)
        elif "norm" in name and leaf == "weight" and p.dim() == 1:
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        elif name.endswith("embed_tokens.weight") or "embedding" in name and p.dim() == 3:
            p.normal_(0.0, 1.0, generator=g)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            # GSWA's query/key: sharper attention, so tile weights differ visibly from 1
            gain = 4.0 if name.startswith("gswa.final_qk") else 1.0
            p.normal_(0.0, gain * fan_in ** -0.5, generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)


def tokenizer_corpus(preset: str) -> str | None:
    """The demo model's tokenizer learns the synthetic task's words and the default system message
    as whole pieces (repeated, so BPE merges them first): short prompts, one token per answer word."""
    if preset != "demo":
        return None
    from sleigh.data.synth import task_text
    from sleigh.runtime.prompt import DEFAULT_SYSTEM_MESSAGE
    from sleigh.sleighvl.tokenizer import _TINY_CORPUS

    return 50 * (task_text() + DEFAULT_SYSTEM_MESSAGE + "\nsystem\nuser\nassistant\n") + _TINY_CORPUS


def init_checkpoint(dst: Path, preset: str, seed: int = 0, *, force: bool = False, quiet: bool = True) -> SleighVLConfig:
    from sleigh.sleighvl.convert import prompt_config
    from sleigh.sleighvl.model import SleighVL
    from sleigh.sleighvl.tokenizer import train_tiny_tokenizer

    if preset not in PRESETS:
        raise SleighError("--preset", f"unknown preset {preset!r}", ", ".join(PRESETS))
    check_seed("--seed", seed)
    base = PRESETS[preset]
    tokenizer = train_tiny_tokenizer(vocab_size=min(1000, base.llm.vocab_size), corpus=tokenizer_corpus(preset))
    if tokenizer.get_vocab_size() > base.llm.vocab_size:
        raise SleighError("--preset", "the tokenizer is larger than the model vocabulary", "vocab_size >= tokenizer size")
    cfg = replace(base, prompt=prompt_config(tokenizer))
    torch.manual_seed(seed)
    model = SleighVL(cfg)
    with progress(f"init {preset}", sum(p.numel() for p in model.parameters()), quiet) as bar:
        init_weights(model, seed, bar)
    save_checkpoint(dst, model, tokenizer, GenerationConfig(stop_token_ids=cfg.prompt.stop_token_ids), force=force)
    return cfg
