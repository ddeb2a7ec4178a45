"""The HF transformers anchor of issue 9: InternVL2 shapes (a Sleigh preset) as HF's own
`InternVLForConditionalGeneration`, random weights, eager attention, timed the way `sleigh bench`
times a package: vision ms per view, prefill, first token (vision + prefill), decode tokens/s.

    python benchmarks/hf_anchor.py --preset internvl2-2b --views 7 --prompt-tokens 1980 --device cuda --dtype bfloat16

Prints one JSON object with the keys of `sleigh bench --json`'s rows (plus gpu_memory_gb), so
benchmarks/gpu_table.py puts both in one table. The HF config comes from the HF parity test
(tests/sleighvl/test_hf_parity.py: hf_config), the one place that maps Sleigh's config onto HF's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sleigh.sleighvl.config import PRESETS  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, runs: int) -> tuple[float, object]:
    """Median seconds of `runs` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


@torch.inference_mode()
def run(preset: str, views: int, prompt_tokens: int, new_tokens: int, device: str, dtype: str, runs: int) -> dict:
    from transformers import InternVLForConditionalGeneration

    from tests.sleighvl.test_hf_parity import hf_config

    cfg = PRESETS[preset]
    image_tokens = views * cfg.vision.tokens_per_view
    if prompt_tokens < image_tokens + 2:
        raise SystemExit(f"--prompt-tokens {prompt_tokens} leaves no room for {image_tokens} image tokens and text")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds for 2B parameters, not minutes
        model = InternVLForConditionalGeneration(hf_config(cfg)).to(getattr(torch, dtype)).eval()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, min(cfg.llm.vocab_size, cfg.prompt.img_context_token_id), (1, prompt_tokens), device=device)
    image_rows = torch.zeros_like(ids, dtype=torch.bool)
    image_rows[:, 1:1 + image_tokens] = True  # BOS-like first token, the image block, then text
    pixels = torch.randn(views, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=model.dtype)
    lm = model.model.language_model

    vision_s, feats = timed(lambda: model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output,
                            device, runs)
    embeds = lm.embed_tokens(ids)
    embeds[image_rows] = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)

    def prefill():
        out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    prefill_s, (token, cache) = timed(prefill, device, runs)

    def decode():
        tok, kv = prefill()
        _sync(device)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=kv, use_cache=True)
            tok, kv = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
        _sync(device)
        return new_tokens / (time.perf_counter() - t)

    decode_rates = [decode() for _ in range(max(1, runs))]
    return {"target": f"HF transformers {__import__('transformers').__version__} eager, {dtype}", "backend": f"torch {device}",
            "views": views, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "preprocess_ms": None,
            "vision_ms_per_view": round(vision_s * 1e3 / views, 1), "prefill_ms": round(prefill_s * 1e3, 1),
            "time_to_first_token_ms": round((vision_s + prefill_s) * 1e3, 1),
            "decode_tokens_per_s": round(statistics.median(decode_rates), 1), "runs": runs,
            "gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="internvl2-2b", choices=sorted(PRESETS))
    p.add_argument("--views", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=1980)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(run(a.preset, a.views, a.prompt_tokens, a.new_tokens, a.device, a.dtype, a.runs)))


if __name__ == "__main__":
    main()
