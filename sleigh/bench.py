"""`sleigh bench`: time to first token, decode speed and vision time per view, for several
backends/engines measured in one run on the same image and prompt (medians over runs)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sleigh.errors import SleighError

# Not the generation default (sleigh.runtime.DEFAULT_MAX_NEW_TOKENS): timed runs have a fixed length (EOS ignored),
# long enough for a steady decode rate and short enough that a CPU run of a real model takes seconds.
BENCH_NEW_TOKENS = 64


@dataclass
class BenchRow:
    target: str
    backend: str
    views: int
    prompt_tokens: int
    new_tokens: int
    preprocess_ms: float
    vision_ms_per_view: float
    prefill_ms: float
    time_to_first_token_ms: float
    decode_tokens_per_s: float
    runs: int


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()}


def bench_pipeline(label: str, pipe, image, prompt: str, *, runs: int, max_new_tokens: int, progress=None,
                   tile_budget: int | None = None, max_tiles: int | None = None) -> BenchRow:
    """One warm-up, then `runs` timed generations with a fixed number of new tokens (EOS ignored)."""
    options = dict(ignore_eos=True, tile_budget=tile_budget, max_tiles=max_tiles)
    pipe.generate(image, prompt, max_new_tokens=min(4, max_new_tokens), **options).result
    results = []
    for _ in range(runs):
        results.append(pipe.generate(image, prompt, max_new_tokens=max_new_tokens, **options).result)
        if progress:
            progress.advance()
    med = lambda f: statistics.median(f(r) for r in results)  # noqa: E731
    r0 = results[0]
    return BenchRow(label, r0.backend, r0.views, r0.prompt_tokens, len(r0.token_ids),
                    round(med(lambda r: r.timings.preprocess_s) * 1e3, 1),
                    round(med(lambda r: r.timings.vision_s) * 1e3 / max(r0.views, 1), 1),
                    round(med(lambda r: r.timings.prefill_s) * 1e3, 1),
                    round(med(lambda r: r.timings.time_to_first_token_s) * 1e3, 1),
                    round(med(lambda r: r.timings.decode_tokens_per_s), 1), runs)


def check_fits(label: str, path: Path, engine: str | None, image, prompt: str, max_new_tokens: int) -> None:
    """Refuse, before any target is timed, a prompt and answer that cannot fit a target's context: the
    prompt's text tokens, one view's if there is an image (the fewest any image tiles into), and
    max_new_tokens, against the named engine's context or the model's. (What passes may still be
    refused when the target runs, from its views.)"""
    from sleigh.runtime.manifest import Contract, read_manifest
    from sleigh.runtime.package import TOKENIZER, model_kind
    from sleigh.runtime.pipeline import ContextExceeded
    from sleigh.runtime.prompt import PromptTokenizer, Turn

    path = Path(path)
    if model_kind(path) == "checkpoint":
        contract, tokenizer, context = Contract.of_checkpoint(path), path / TOKENIZER, None
    else:
        manifest = read_manifest(path)
        contract, tokenizer = manifest.contract, manifest.path(manifest.tokenizer, "manifest.json: tokenizer.file")
        entry = manifest.engines.get(engine or "")
        context = entry.max_context if entry is not None else None
    context = min(context or contract.generation.context_length, contract.generation.context_length)
    tok, turns, system = PromptTokenizer.from_file(tokenizer), [Turn("user", prompt)], contract.prompt.system_message
    fewest = tok.fewest_tokens(turns, system=system)  # megabytes of text are not tokenized to be refused
    if fewest < context:
        fewest = len(tok.encode_chat(turns, system=system))
    fewest += contract.prompt.tokens_per_view if image is not None else 0
    if fewest + max_new_tokens > context:
        raise ContextExceeded("prompt", f"{label}: at least {fewest} prompt tokens + {max_new_tokens} new tokens exceed "
                              f"its context of {context}", "a smaller max_new_tokens or a shorter prompt")


def other_model(pkg: Path, reference: Path) -> str | None:
    """Why `reference` (a checkpoint) is another model than the package was exported from, where its
    config.json's sha256 is not the one the manifest's source records (None where it is, or where the
    package does not say): bench's rows would then compare two models, not a package with its source.
    The weights are not compared (hashing them costs seconds at full size): a checkpoint trained from the
    same config passes."""
    from sleigh.runtime.manifest import read_manifest
    from sleigh.runtime.package import CHECKPOINT_CONFIG, sha256_file

    source = read_manifest(pkg).source or {}
    recorded = source.get("config_sha256")
    if recorded is None or not (Path(reference) / CHECKPOINT_CONFIG).is_file():
        return None
    if sha256_file(Path(reference) / CHECKPOINT_CONFIG) == recorded:
        return None
    made_from = source.get("checkpoint", "another checkpoint")
    return (f"--reference {reference}: its {CHECKPOINT_CONFIG} is not the one {pkg} was exported from ({made_from}): "
            "its row times a model of another configuration")


def most_tiles(path: Path, engine: str | None) -> int:
    """The most tiles a target takes: its model's, or a named engine's where it was built for fewer
    (the best engine `auto` picks is known only once loaded)."""
    from sleigh.runtime.manifest import Contract, read_manifest
    from sleigh.runtime.package import model_kind

    path = Path(path)
    if model_kind(path) == "checkpoint":
        return Contract.of_checkpoint(path).image.max_tiles
    manifest = read_manifest(path)
    return manifest.most_tiles(manifest.engines.get(engine or ""))


def run_bench(targets: list[tuple[str, Path, str, str | None]], image, prompt: str, *, runs: int = 3,
              max_new_tokens: int = BENCH_NEW_TOKENS, threads: int | None = None, quiet: bool = False,
              max_memory: int | None = None, tile_budget: int | None = None, max_tiles: int | None = None) -> dict:
    """targets: (label, model path, backend, engine). `tile_budget`: the LLM reads the K tiles GSWA
    weighs highest and the thumbnail (vision still runs on every view). `max_tiles`: the image is cut
    into at most this many tiles (default: the model's), so fewer views are timed."""
    from sleigh.progress import progress
    from sleigh.runtime.pipeline import Pipeline

    if runs < 1:
        raise SleighError("runs", f"got {runs}", "an integer >= 1")
    if max_new_tokens < 1:
        raise SleighError("max_new_tokens", f"got {max_new_tokens}", "an integer >= 1")
    for label, path, _, engine in targets:  # checked for every target before the first is timed
        if max_tiles is not None:
            top = most_tiles(path, engine)
            if not 1 <= max_tiles <= top:
                raise SleighError("max_tiles", f"got {max_tiles}; {label} takes 1 to {top}", f"1 to {top}")
        check_fits(label, path, engine, image, prompt, max_new_tokens)
    rows = []
    t0 = time.time()
    with progress("bench", runs * len(targets), quiet) as bar:
        for label, path, backend, engine in targets:
            with Pipeline.load(path, backend=backend, threads=threads, engine=engine,
                               max_memory=max_memory) as pipe:  # one target in memory at a time
                rows.append(bench_pipeline(label, pipe, image, prompt, runs=runs, max_new_tokens=max_new_tokens, progress=bar,
                                           tile_budget=tile_budget, max_tiles=max_tiles))
    return {"machine": machine(), "threads": threads, "image": str(image) if image else None, "prompt": prompt,
            "max_new_tokens": max_new_tokens, "tile_budget": tile_budget, "max_tiles": max_tiles, "rows": [asdict(r) for r in rows], "seconds": round(time.time() - t0, 1)}


def markdown(report: dict) -> str:
    cols = [f.name for f in fields(BenchRow) if f.name != "runs"]  # runs: in the line below the table
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    m = report["machine"]
    lines.append(f"\nMachine: {m['cpu']}, {m['cores']} cores, threads {report['threads'] or 'default'}; "
                 f"medians of {report['rows'][0]['runs'] if report['rows'] else 0} runs.")
    return "\n".join(lines)
