"""Sleigh's decoder against onnxruntime-genai on the CPU: the same weights, alternated in one process.

    python benchmarks/genai_ab.py PKG CKPT [--engine NAME] [--genai-precision fp32|int4]
        [--prompt-tokens 2000 3500] [--rounds 7] [--new-tokens 32] [--threads N] [--seed 0]
        [--genai-option KEY=VALUE ...] [--work DIR] [--sleigh-chunk N] [--genai-chunk N]

PKG is a package exported from the checkpoint CKPT (`sleigh export CKPT -o PKG`). The checkpoint's
LLM is written as a Hugging Face `LlamaForCausalLM` folder (InternLM2 in Llama form: the config and
key map of tests/sleighvl/test_hf_parity.py, the one place that maps Sleigh onto HF), checked against
Sleigh's torch LLM through transformers' own Llama (last-position logits of a short prompt within
1e-4), and built by genai's model builder (`python -m onnxruntime_genai.models.builder -i HF -o OUT
-p fp32|int4 -e cpu`). Sleigh runs the package's embed + decoder (or engine NAME's) through the
runtime's backend API, as the Pipeline does for a text prompt: the prompt in calls of the backend's
`prefill_chunk` (256 for a fused decoder on the CPU; `--sleigh-chunk N` for others, 0 for one call),
then one call per token, each through `step_tokens` (a fused decoder of package schema 6 embeds the
token ids itself; the standard form runs the embed module first). genai runs its prompt in one call,
its default, or in chunks of N with `--genai-chunk N` (its `search.chunk_size`).

Both sides get the same N random token ids (never a special id or <IMG_CONTEXT>; `--seed`), decode
M new tokens greedily over the whole vocabulary but EOS and <IMG_CONTEXT> (so EOS is ignored), and
run with the same intra-op thread count (genai: the decoder's `session_options` through
`Config.overlay`). Each round runs every prompt length on
both sides, the side that goes first alternating from round to round, after one untimed warm-up
per side and length. Prefill = prompt in to first token (cache allocation, decoder with its embedding, argmax;
genai: Generator creation, append_tokens, the first generate_next_token). Decode = tokens/s of the
M - 1 steps after the first token. Both sides allocate the cache for N + M positions up front (genai
sizes its buffers by max_length; Sleigh's slots are reserved for N + M, as `--max-memory` runs do).

INT4: genai's builder quantizes as Sleigh's `--llm-weights int4` does (RTN, symmetric, blocks of 32,
accuracy level 4, INT8 LM head: `builder_options`), so the greedy tokens are identical there too.
`--genai-option KEY=VALUE` passes more builder options (e.g. prune_lm_head=true: genai's prefill then
computes the last position's logits only, as Sleigh's does; its default computes all of them).

Printed: the settings of both decoders (node count, quantized MatMuls), the greedy tokens of both
sides (identical, or how many match), then a markdown table of medians and the per-round ratios
sleigh/genai (median, min-max). Exit code 1 if the tokens differ other than at a near tie (both
sides' logits of the two candidates within NEAR_TIE where they part: INT4 decoders quantize
activations to INT8, at different points of the two graphs, so a long prompt can meet one).

Needs `onnxruntime-genai` (0.18.0 measured) and `transformers` (5.x), which Sleigh itself does not:
`pip install onnxruntime-genai transformers`. Timings need a quiet CPU.

FP32 against FP32 (the package's own decoder):
    python benchmarks/genai_ab.py PKG CKPT --genai-precision fp32
INT4 decoder weights against genai's INT4 (random weights fail the INT4 gate: --allow-degraded):
    sleigh build-engine PKG --precision fp32 --llm-weights int4 --allow-degraded   # engine onnxruntime-fp32-llm-int4
    python benchmarks/genai_ab.py PKG CKPT --engine onnxruntime-fp32-llm-int4 --genai-precision int4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sleigh.runtime.backends import PACKAGE_MODULES, open_package_backend  # noqa: E402
from sleigh.runtime.manifest import read_manifest  # noqa: E402
from sleigh.runtime.multimodal import no_image_rows  # noqa: E402
from sleigh.runtime.pipeline import prefill_in_chunks  # noqa: E402

# Where greedy tokens part, both sides' logits of the two candidates closer than this is a near tie
# (rounding decides it: INT4 decoders quantize activations to INT8 per block, at other points of two
# different graphs), not a disagreement; random weights have logits of std ~1.
NEAR_TIE = 0.05
MAPPING_TOL = 1e-4  # max abs logit difference, float32 (the HF parity test's tolerance)
HF_LLM_PREFIX = "model.language_model."  # the LLM's keys inside HF's InternVL; a LlamaForCausalLM's are "model."


# --- the checkpoint's LLM as a Hugging Face Llama ---------------------------------------------------


def llama_config(cfg):
    """Sleigh's SleighVLConfig -> transformers' LlamaConfig of its LLM (untied head, no biases)."""
    from tests.sleighvl.test_hf_parity import hf_config

    text = hf_config(cfg).text_config
    text.architectures = ["LlamaForCausalLM"]
    return text


def llama_state(cfg, ours: dict) -> dict:
    """Sleigh's state dict -> a LlamaForCausalLM's: the LLM's entries of the HF key map, every one a
    whole tensor (only the vision tower's fused qkv is sliced)."""
    from tests.sleighvl.test_hf_parity import hf_key_map

    state = {}
    for hk, (ok, rows) in hf_key_map(cfg).items():
        if not ok.startswith("llm."):
            continue
        assert rows is None, hk
        name = "model." + hk.removeprefix(HF_LLM_PREFIX) if hk.startswith(HF_LLM_PREFIX) else hk
        state[name] = ours[ok].detach().float().contiguous()
    return state


def write_llama_folder(ckpt: Path, dst: Path):
    """CKPT's LLM as a HF folder (config.json, model.safetensors, generation_config.json and the
    checkpoint's tokenizer, which genai's builder copies) -> (Sleigh model, its config)."""
    from safetensors.torch import save_file

    from sleigh.sleighvl.checkpoint import TOKENIZER, load_checkpoint

    model, cfg, _ = load_checkpoint(ckpt)
    dst.mkdir(parents=True, exist_ok=True)
    text = llama_config(cfg)
    text.save_pretrained(dst)
    save_file(llama_state(cfg, model.state_dict()), str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ckpt / TOKENIZER, dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "model_max_length": text.max_position_embeddings}))
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": text.bos_token_id,
                                                            "eos_token_id": text.eos_token_id, "do_sample": False}))
    return model, cfg


def mapping_error(model, hf_dir: Path, ids: list[int]) -> tuple[float, float]:
    """(max abs difference, std) of the last position's logits: Sleigh's torch LLM against
    transformers' LlamaForCausalLM loaded from `hf_dir`, eager attention, float32."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.tensor([ids])
    S = x.shape[1]
    with torch.no_grad():
        ours, _ = model.llm(model.llm.embed_tokens(x), torch.ones(1, S, dtype=torch.int64), torch.zeros(1, S),
                            torch.arange(S)[None], past=model.llm.empty_cache(1))
        theirs = hf(input_ids=x).logits[:, -1:]
    return (ours - theirs).abs().max().item(), ours.std().item()


def builder_options(precision: str, extra: list[str]) -> list[str]:
    """The builder's --extra_options: for INT4, Sleigh's weight-only scheme (sleigh/engines/build_engine.py
    weight_only: RTN, symmetric, blocks of 32, accuracy level 4, which are genai's defaults too, and an
    INT8 LM head, which is not), then `extra` (KEY=VALUE, later ones win)."""
    same_scheme = ["matmul_mixed_precision=last_matmul:int8"] if precision == "int4" else []
    return same_scheme + extra


def build_genai(hf_dir: Path, out: Path, precision: str, options: list[str]) -> None:
    """genai's model builder on the HF folder: out/model.onnx + genai_config.json."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]
    if options:
        cmd += ["--extra_options", *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        sys.exit(f"genai's builder failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# --- the two sides ----------------------------------------------------------------------------------


@dataclass
class Run:
    tokens: list[int]
    prefill_s: float  # prompt in -> first token
    decode_tokens_per_s: float  # the steps after the first token
    logits: list | None = None  # with record=True (untimed runs): the logits each token was picked from


class SleighSide:
    name = "sleigh"

    def __init__(self, pkg: Path, engine: str | None, threads: int, never: list[int], chunk: int | None = None):
        self.never = never
        manifest = read_manifest(pkg)
        self.backend = open_package_backend(pkg, manifest, "onnxruntime", threads=threads, engine=engine or PACKAGE_MODULES)
        self.chunk = self.backend.prefill_chunk if chunk is None else chunk  # as the Pipeline chunks a prompt; 0: one call
        self.hidden = manifest.contract.model.hidden_size
        context = manifest.contract.generation.context_length
        self.context = min(context, self.backend.max_context or context)  # an engine may be built for less
        self.files = {m: Path(p) for m, p in self.backend.files.items()}
        entry = self.backend.entry
        self.weights = "fp32" if entry is None else entry.llm_weights or entry.precision

    def generate(self, ids: np.ndarray, new_tokens: int, record: bool = False) -> Run:
        backend, P = self.backend, len(ids)
        seen = [] if record else None
        no_image = no_image_rows(self.hidden)
        t0 = time.perf_counter()
        cache = backend.new_cache(1)
        cache.reserve(P + new_tokens)
        logits = prefill_in_chunks(backend, cache, ids[None], np.zeros((1, P), np.float32), self.chunk or P, no_image)
        tokens = [self.pick(logits, seen)]
        t1 = time.perf_counter()
        one_mask, one_bias = np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32)
        for pos in range(P, P + new_tokens - 1):
            logits = backend.step_tokens(cache, np.asarray([[tokens[-1]]], np.int64), one_mask, one_bias,
                                         np.asarray([[pos]], np.int64), no_image)
            tokens.append(self.pick(logits, seen))
        t2 = time.perf_counter()
        cache.close()
        return Run(tokens, t1 - t0, (new_tokens - 1) / (t2 - t1), seen)

    def pick(self, logits: np.ndarray, seen: list | None) -> int:
        """Greedy over every id but `never` (genai's side: its min_length rule on these as EOS ids)."""
        if seen is not None:
            seen.append(logits[0].copy())
        logits[0, self.never] = -np.inf
        return int(logits[0].argmax())

    def close(self) -> None:
        self.backend.close()


class GenaiSide:
    name = "genai"

    def __init__(self, model_dir: Path, threads: int, never: list[int], chunk: int = 0):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(model_dir))
        config.clear_providers()  # the CPU
        # `never` as the EOS ids, which min_length keeps greedy search from picking (generate())
        overlay = {"model": {"eos_token_id": never, "decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1, "log_severity_level": 3}}}}
        if chunk:  # genai's own prefill in chunks (search.chunk_size); by default it runs the prompt in one call
            overlay["search"] = {"chunk_size": chunk}
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.files = {"decoder": model_dir / "model.onnx"}

    def generate(self, ids: np.ndarray, new_tokens: int, record: bool = False) -> Run:
        og = self.og
        seen = [] if record else None
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        length = len(ids) + new_tokens  # min_length = max_length: EOS never picked, generation never stops early
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids[None])  # the prefill: logits of the prompt's last position
        tokens = [self.pick(gen, seen)]  # from them (no decoder run)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tokens.append(self.pick(gen, seen))  # one decoder step on the last token, then the pick
        t2 = time.perf_counter()
        del gen
        return Run(tokens, t1 - t0, (new_tokens - 1) / (t2 - t1), seen)

    @staticmethod
    def pick(gen, seen: list | None) -> int:
        if seen is not None:
            seen.append(gen.get_logits()[0, -1].copy())  # runs the pending decoder step, which the pick then reuses
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    def close(self) -> None:
        del self.model


def genai_ids(genai_dir: Path, key: str) -> list[int]:
    """The ids genai's config gives `key` (bos_token_id, eos_token_id, pad_token_id): genai marks pad
    ids in a prompt as padding, and stops at eos."""
    v = json.loads((genai_dir / "genai_config.json").read_text())["model"].get(key)
    return v if isinstance(v, list) else [] if v is None else [v]


def describe_decoder(path: Path) -> str:
    """Node count and the quantized MatMuls' settings of a decoder graph (structure only, no weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = Counter()
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            kinds[f"bits={attrs.get('bits', 4)} block_size={attrs.get('block_size')} "
                  f"accuracy_level={attrs.get('accuracy_level', 0)}"] += 1
    return ", ".join([f"{len(graph.node)} nodes", *(f"{c} MatMulNBits {k}" for k, c in sorted(kinds.items()))])


# --- the measurement --------------------------------------------------------------------------------


def agreement(s: Run, g: Run) -> tuple[bool, str]:
    """(tokens agree, what to print): identical, or parted at a near tie (NEAR_TIE) on both sides; the
    text says how many tokens match and how far apart each side's logits of the two candidates were."""
    a, b = s.tokens, g.tokens
    text = (f"\n  first token's logits: max abs difference {np.abs(s.logits[0] - g.logits[0]).max():.2e}"
            f"\n  sleigh {a}\n  genai  {b}")
    if a == b:
        return True, "identical" + text
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    gaps = s.logits[i][a[i]] - s.logits[i][b[i]], g.logits[i][b[i]] - g.logits[i][a[i]]
    tie = max(gaps) < NEAR_TIE
    return tie, (f"DIFFER{' at a near tie' if tie else ''}: {sum(x == y for x, y in zip(a, b))}/{len(a)} match, "
                 f"first at token {i}: sleigh's logit of {a[i]} exceeds its logit of genai's {b[i]} by {gaps[0]:.4f}, "
                 f"genai's the other way by {gaps[1]:.4f} (logit std {s.logits[i].std():.2f})") + text


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(results: dict[int, dict[str, list[Run]]]) -> str:
    """Markdown: per prompt length, each side's medians and the per-round ratios sleigh/genai."""
    rows = ["| prompt tokens | sleigh prefill ms | genai prefill ms | prefill ratio sleigh/genai (min-max) "
            "| sleigh decode tok/s | genai decode tok/s | decode ratio sleigh/genai (min-max) |",
            "|---|---|---|---|---|---|---|"]
    for n, runs in results.items():
        s, g = runs["sleigh"], runs["genai"]
        prefill = lambda rs: statistics.median(r.prefill_s for r in rs) * 1e3  # noqa: E731
        decode = lambda rs: statistics.median(r.decode_tokens_per_s for r in rs)  # noqa: E731
        pre = [a.prefill_s / b.prefill_s for a, b in zip(s, g)]  # one ratio per round: same load on both
        dec = [a.decode_tokens_per_s / b.decode_tokens_per_s for a, b in zip(s, g)]
        rows.append(f"| {n} | {prefill(s):.0f} | {prefill(g):.0f} | {spread(pre)} "
                    f"| {decode(s):.1f} | {decode(g):.1f} | {spread(dec)} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pkg", type=Path, help="package exported from CKPT")
    ap.add_argument("ckpt", type=Path, help="the Sleigh checkpoint PKG was exported from")
    ap.add_argument("--engine", default=None, help="an ONNX Runtime engine of PKG (default: the package's FP32 modules)")
    ap.add_argument("--genai-precision", choices=("fp32", "int4"), default="fp32")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[2000, 3500])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, both sides (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--genai-option", action="append", default=[], metavar="KEY=VALUE",
                    help="one more --extra_options for genai's builder (e.g. prune_lm_head=true); repeatable")
    ap.add_argument("--work", type=Path, default=None, help="where the HF folder and genai's model go (default: a temporary folder)")
    ap.add_argument("--sleigh-chunk", type=int, default=None, metavar="N",
                    help="Sleigh's prompt in calls of N positions (default: its backend's, as the Pipeline does; 0: one call)")
    ap.add_argument("--genai-chunk", type=int, default=0, metavar="N",
                    help="genai's prompt in chunks of N (its search.chunk_size; default 0: genai's default, one call)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if min(args.sleigh_chunk or 0, args.genai_chunk) < 0:
        ap.error("--sleigh-chunk and --genai-chunk must be 0 or more")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")

    work_root = args.work or Path(tempfile.mkdtemp(prefix="genai-ab-"))
    hf_dir, genai_dir = work_root / "hf-llama", work_root / f"genai-{args.genai_precision}"
    for d in (hf_dir, genai_dir):
        shutil.rmtree(d, ignore_errors=True)
    try:
        model, cfg = write_llama_folder(args.ckpt, hf_dir)
        rng = np.random.default_rng(args.seed)
        probe = rng.integers(3, cfg.llm.vocab_size, 12).tolist()
        err, std = mapping_error(model, hf_dir, probe)
        print(f"mapping: Sleigh's torch LLM vs transformers' LlamaForCausalLM, {len(probe)} tokens: "
              f"max abs logit difference {err:.2e} (logit std {std:.2f})", flush=True)
        if not err < MAPPING_TOL or not std > 0.1:
            sys.exit(f"the HF Llama folder does not reproduce Sleigh's LLM (tolerance {MAPPING_TOL})")
        del model
        t = time.perf_counter()
        options = builder_options(args.genai_precision, args.genai_option)
        build_genai(hf_dir, genai_dir, args.genai_precision, options)
        print(f"genai {args.genai_precision} model built in {time.perf_counter() - t:.0f} s "
              f"(builder options: {' '.join(options) or 'none'}): {genai_dir}", flush=True)
        return measure(args, cfg, genai_dir)
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)


def measure(args, cfg, genai_dir: Path) -> int:
    # Never picked: EOS (both sides ignore it), and <IMG_CONTEXT>, which Sleigh's embed module reads as an
    # image row, not as its embedding (a real model never generates it)
    image_id = cfg.prompt.img_context_token_id
    never = sorted({*genai_ids(genai_dir, "eos_token_id"), image_id})
    sides = [SleighSide(args.pkg, args.engine, args.threads, never, args.sleigh_chunk),
             GenaiSide(genai_dir, args.threads, never, args.genai_chunk)]
    longest = max(args.prompt_tokens) + args.new_tokens
    if longest > sides[0].context:
        sys.exit(f"{longest} positions exceed the context of {sides[0].context} of Sleigh's {args.engine or PACKAGE_MODULES}")
    for side in sides:
        print(f"{side.name}: decoder {describe_decoder(side.files['decoder'])}", flush=True)
    if sides[0].weights != args.genai_precision:
        print(f"warning: Sleigh's decoder weights are {sides[0].weights}, genai's {args.genai_precision}", flush=True)
    print(f"threads {args.threads}, {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"sleigh {args.engine or PACKAGE_MODULES}, genai {args.genai_precision}; prompt in chunks of "
          f"{sides[0].chunk or 'all'} (sleigh) and {args.genai_chunk or 'all'} (genai)", flush=True)

    specials = {image_id, *(i for key in ("bos_token_id", "eos_token_id", "pad_token_id") for i in genai_ids(genai_dir, key))}
    allowed = np.asarray([i for i in range(3, cfg.llm.vocab_size) if i not in specials], np.int64)
    prompts = {n: np.random.default_rng([args.seed, n]).choice(allowed, n) for n in args.prompt_tokens}

    mismatched = False
    for n, ids in prompts.items():  # warm-up (sessions, arenas), and the greedy tokens
        runs = {side.name: side.generate(ids, args.new_tokens, record=True) for side in sides}
        agree, text = agreement(runs["sleigh"], runs["genai"])
        print(f"{n} prompt tokens: greedy tokens {text}", flush=True)
        mismatched |= not agree

    results = {n: {side.name: [] for side in sides} for n in prompts}
    for rnd in range(args.rounds):
        order = sides if rnd % 2 == 0 else sides[::-1]
        for n, ids in prompts.items():
            for side in order:
                r = side.generate(ids, args.new_tokens)
                results[n][side.name].append(r)
                print(f"round {rnd} {n} {side.name}: prefill {r.prefill_s * 1e3:.0f} ms, decode {r.decode_tokens_per_s:.1f} tokens/s",
                      flush=True)
    for side in sides:
        side.close()
    print()
    print(table(results))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
