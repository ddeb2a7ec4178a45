"""What one `sleigh train` step holds at least, checked against what the machine has before training.

A step runs every image of its batch through the LLM at once, each image's prompt padded to the
batch's longest (train.answer_logits), and keeps every layer's attention probabilities for the
backward pass: batch x heads x P x (P + 1) float32 per layer for prompts of P tokens. So a batch that
holds the data's largest image (the most views, P = views x tokens per view) costs that many
square matrices per layer, whatever its other images. Counted here, as a lower bound of a step's
peak over the loaded model:

- every layer's probabilities, and one layer's scores more while it computes them (layers + 1);
- what each layer keeps per prompt position: the normed inputs, the query, the attention's output and
  the residual (at least 6 hidden-wide tensors), and the gate, up, SiLU and product of the MLP (4
  MLP-wide ones);
- with the ViT trained, what each view keeps per layer: at least 6 hidden-wide and 2 MLP-wide
  tensors of (image/patch)^2 + 1 tokens;
- the gradients and AdamW's two moments of every trained parameter.

Measured (benchmarks/RESULTS.md, "A memory guard for `train --batch`"), a step's real peak is 1.3-1.5x
this bound at 448-px views (the tiny and small presets), more at the demo preset's small views. So a
batch the bound refuses would have been killed mid-step by the kernel's out-of-memory killer, with no
message (a helper's `--batch 100` on the tiny preset took the VM's 24 GB); one whose bound fits but
not OVER_BOUND times it trains with a warning.
"""

from __future__ import annotations

from sleigh.errors import SleighError
from sleigh.runtime.image import find_grid, max_views
from sleigh.runtime.memory import available_bytes, gb
from sleigh.sleighvl.config import SleighVLConfig

# The most a measured step took over the bound at 448-px views (1.3-1.5x; 1.7-3.4x at the demo preset's
# 112-px views, where the bound is a few hundred MB): a batch is suggested where this many bounds fit
OVER_BOUND = 1.5


def views_of(size: tuple[int, int], cfg: SleighVLConfig) -> int:
    """The views `tile_image` makes of a width x height image under the checkpoint's tiling."""
    img = cfg.image
    cols, rows = find_grid(*size, min_tiles=img.min_tiles, max_tiles=img.max_tiles, size=cfg.vision.image_size)
    return cols * rows + (1 if img.thumbnail and cols * rows > 1 else 0)


def step_bytes_at_least(cfg: SleighVLConfig, parts: tuple[str, ...], views: int, batch: int, trained: int,
                        itemsize: int = 4) -> int:
    """A lower bound of one step's peak over the loaded model, for `batch` images the largest of which
    tiles into `views` views (the module docstring); `trained`: the trained parameters' count."""
    llm, vision = cfg.llm, cfg.vision
    prompt = views * vision.tokens_per_view + 1  # and at least one token of text
    total = (llm.num_layers + 1) * batch * llm.num_heads * prompt * (prompt + 1) * itemsize
    total += llm.num_layers * batch * prompt * (6 * llm.hidden_size + 4 * llm.intermediate_size) * itemsize
    if "vision" in parts:
        tokens = vision.num_patches + 1
        total += batch * views * vision.num_layers * (6 * vision.hidden_size + 2 * vision.intermediate_size) * tokens * itemsize
    return total + 3 * trained * itemsize


def check_step_memory(cfg: SleighVLConfig, parts: tuple[str, ...], sizes: dict, batch: int, trained: int,
                      available: int | None, where: str = "this machine", itemsize: int = 4) -> str | None:
    """Refuse, in one line, a --batch whose step cannot fit in `available` bytes (None: unknown, not
    checked), `sizes` being the data's images (width, height) from their header check. -> a warning
    where the bound fits but OVER_BOUND times it does not (such a step may still not fit), else None."""
    if available is None or not sizes:
        return None
    views = max(views_of(s, cfg) for s in sizes.values())

    def need(b: int, times: float = 1.0) -> int:
        return int(times * step_bytes_at_least(cfg, parts, views, b, trained, itemsize))

    if need(batch, OVER_BOUND) <= available:
        return None
    fits = next((b for b in range(batch - 1, 0, -1) if need(b, OVER_BOUND) <= available), 0)  # need grows with b
    prompt = views * cfg.vision.tokens_per_view
    why = (f"a step whose batch holds the data's largest image ({views} views, {prompt:,} image tokens, to which every "
           f"prompt of the batch is padded) needs at least {gb(need(batch), 'up')} beyond the loaded model, and "
           f"{where} has {gb(available)} available")
    smaller = f"--batch {fits} or less (where {OVER_BOUND}x that fits, as much as steps have taken)" if fits else ""
    if need(batch) <= available:
        return f"--batch {batch} may not fit: {why}, and steps have taken up to {OVER_BOUND}x that" + (
            f"; {smaller} would fit" if smaller else "")
    if smaller:
        raise SleighError("--batch", f"{batch}: {why}", f"{smaller}, or a machine with more memory")
    if batch > 1 and need(1) <= available:
        raise SleighError("--batch", f"{batch}: {why}", "--batch 1 (which may still not fit), or a machine with more memory")
    most = max_views(cfg.image.max_tiles, cfg.image.thumbnail)
    one = f"; --batch 1 needs at least {gb(need(1), 'up')}" if batch > 1 else ""
    raise SleighError("--batch", f"{batch}: {why}{one}",
                      f"a machine with more memory, or images that tile into fewer views (at most {most} here)")


def available_for(device) -> tuple[int | None, str]:
    """(bytes a step can still take on `device`, what to call it): the GPU's free memory, or the host's."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], "the GPU"
    return available_bytes(), "this machine"
