"""The `sleigh` command line. Heavy imports (torch, onnx) happen inside the commands that need them."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from sleigh import __version__
from sleigh.bench import BENCH_NEW_TOKENS
from sleigh.errors import SleighError, first_line, flag
from sleigh.evaluate import EVAL_NEW_TOKENS
from sleigh.runtime import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from sleigh.runtime.package import model_kind
from sleigh.serve import (MAX_BODY_MB, MAX_IMAGE_PIXELS, MAX_QUEUE, REPLICA_CPUS, REPLICAS, SHUTDOWN_TIMEOUT_S,
                          TARGET_ONGOING_REQUESTS)
from sleigh.serve.launch import LOG_LEVELS
THREADS_PER_CPU = 4  # more only adds contention, and memory: --threads 100000 took 16.6 GB in 11 minutes
# C0 and C1 control characters but tab and newline: an ESC in generated text must not drive the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _plain_flags(params: list) -> list:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which turns KeyboardInterrupt into a silent exit 130)."""


class _PipeClosed(Exception):
    """The reader of stdout went away (`| head`), carried past typer (which exits 1 on EPIPE)."""


class _Group(TyperGroup):
    """Boolean flags take no value, so help shows none (typer shows `<bool>`, which reads as
    `--force true`), for every command and sub-group. Ctrl-C and a closed stdout reach `main` (one
    "interrupted" line and 130; a quiet 0), past typer's own handling."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None
        except BrokenPipeError:
            raise _PipeClosed() from None

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        cmd = super().get_command(ctx, cmd_name)
        if isinstance(cmd, TyperGroup) and not isinstance(cmd, _Group):
            cmd.__class__ = _Group  # a sub-app (app.add_typer) gets the same help
        elif cmd is not None:
            _plain_flags(cmd.get_params(ctx))
        return cmd


# help texts are rich markup: a literal "[" is written "\\[" ([default: ...] and sleigh[ray] were eaten)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  help="Sleigh: SleighVL (InternVL2-2B + GSWA) from PyTorch to ONNX, engines and an edge runtime.")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sleigh {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print sleigh's version and exit."),
    log_level: Optional[str] = typer.Option(None, "--log-level", envvar="SLEIGH_LOG_LEVEL",
                                            help=f"Messages shown on stderr: {', '.join(LOG_LEVELS)} \\[default: warning; serve: info]."),
):
    _LOG_LEVEL_GIVEN[0] = log_level
    _setup_logging(log_level or "warning")


_LOG_LEVEL_GIVEN: list[str | None] = [None]  # `sleigh --log-level` (or $SLEIGH_LOG_LEVEL) as given: serve's default


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a caller may have swapped it since the setup)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


class _LevelFormatter(logging.Formatter):
    """`level: message`; a record logged with its exception (a bug caught by `sleigh serve`: user
    errors are SleighErrors, printed as one line by `main`) keeps its traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            return f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _setup_logging(level: str) -> None:
    """One line per message on stderr (`warning: ...`), at `level` and above; Python warnings
    (warnings.warn) go through the same logger, so --log-level error silences them too."""
    if level.lower() not in LOG_LEVELS:
        raise SleighError(f"--log-level {level}", "unknown level", ", ".join(LOG_LEVELS))
    handler = _StderrHandler()
    handler.setFormatter(_LevelFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

    def show(message, category, filename, lineno, file=None, line=None):
        logging.getLogger("sleigh").warning("%s", first_line(message) if isinstance(message, Warning) else message)

    warnings.showwarning = show


@app.command()
def convert(
    src: Path = typer.Argument(..., help="InternVL2 checkpoint folder (config.json, safetensors, tokenizer.model)."),
    dst: Path = typer.Argument(..., help="Output Sleigh checkpoint folder."),
    gswa: str = typer.Option("identity", help="identity (alpha = 0), none, or PATH to trained GSWA safetensors."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
):
    """Convert an InternVL2 checkpoint into a Sleigh checkpoint (no remote code is run)."""
    from sleigh.sleighvl.convert import convert as do_convert

    cfg = do_convert(src, dst, gswa=gswa, force=force)
    gswa_desc = "none" if cfg.gswa is None else f"{cfg.gswa.apply} ({gswa})"
    typer.echo(f"wrote {dst}: vision {cfg.vision.num_layers}x{cfg.vision.hidden_size}, "
               f"LLM {cfg.llm.num_layers}x{cfg.llm.hidden_size}, GSWA {gswa_desc}")


@app.command()
def init(
    dst: Path = typer.Argument(..., help="Output Sleigh checkpoint folder."),
    preset: str = typer.Option("tiny", help="tiny (tests), small (CPU benchmarks), demo (trains on a CPU: sleigh train) or internvl2-2b (real shapes)."),
    seed: int = typer.Option(0, help="Random seed."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
):
    """Write a Sleigh checkpoint with random weights (GSWA active) and a small tokenizer."""
    from sleigh.sleighvl.init import init_checkpoint

    cfg = init_checkpoint(dst, preset, seed, force=force, quiet=False)
    typer.echo(f"wrote {dst}: preset {preset}, seed {seed}, vocab {cfg.llm.vocab_size} (random weights give random text)")


@app.command()
def run(
    image: Optional[str] = typer.Argument(None, help="Image file; leave out for a text-only chat."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", envvar="SLEIGH_MODEL",
                                         help="Model package (sleigh export) or Sleigh checkpoint folder. Default: $SLEIGH_MODEL."),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", "-p", help="The question."),
    system: Optional[str] = typer.Option(None, help="System message (default: the internlm2-chat one)."),
    backend: str = typer.Option("auto", help="auto, onnxruntime, torch or tensorrt."),
    engine: Optional[str] = typer.Option(None, help="Engine name from the package manifest (default: the best built one)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    max_new_tokens: Optional[int] = typer.Option(
        None, help=f"Most tokens to generate \\[default: {DEFAULT_MAX_NEW_TOKENS}, cut to what the context leaves after the prompt]."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past stop tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, help="Top-k sampling (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="1 = off."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    max_tiles: Optional[int] = typer.Option(None, help="Most tiles per image (default and maximum: the model's, 12, or the engine's where it was built for fewer)."),
    max_pixels: Optional[int] = typer.Option(None, help="Largest image (width x height) decoded (default: 32 x the "
                                             "model's largest grid, 77 Mpx for 12 tiles of 448 px)."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer once it is complete."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token ids, timings, ...)."),
    no_verify_files: bool = typer.Option(False, "--no-verify-files",
                                         help="Skip the sha256 check of the package's files (sizes are still checked)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="A string that ends the answer (not printed); repeatable."),
    allow_special_tokens: bool = typer.Option(False, "--allow-special-tokens",
                                              help="Let control tokens typed in --prompt/--system (<|im_end|>, </s>, ...) act as such; by default they are plain text."),
    show_weights: Optional[Path] = typer.Option(None, "--show-weights", help="Write the image with GSWA's weight of each tile drawn on it (.png, .jpg, .webp, or another format Pillow writes)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 2.5G: vision and prefill run in chunks that fit it, and what cannot fit is refused in one line."),
    tile_budget: Optional[int] = typer.Option(None, "--tile-budget", help="The LLM reads only the K tiles GSWA weighs highest, and the thumbnail (fewer image tokens)."),
):
    """Answer a question about an image (or chat without one) on a package or checkpoint."""
    from sleigh.runtime.image import check_image_path, load_image
    from sleigh.runtime.memory import parse_size
    from sleigh.runtime.pipeline import Pipeline
    from sleigh.runtime.sampling import SamplingOptions

    if model is None:
        raise SleighError("--model", "no model given and $SLEIGH_MODEL is not set",
                          "a package folder: make one with `sleigh init tiny-ckpt && sleigh export tiny-ckpt -o tiny-pkg`")
    _check_text("--prompt", prompt)
    if system is not None:
        _check_text("--system", system)
    _check_threads(threads)
    with _as_flags("max_memory"):
        budget = None if max_memory is None else parse_size(max_memory)
    with _as_flags("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        sampling = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, seed=seed)
    source = None
    if image is not None:
        with _as_flags("max_pixels"):  # decoded before the model loads (a bad image costs nothing); the pipeline tiles it
            source = load_image(check_image_path(image), max_pixels=max_pixels)
    else:
        unused = [f for f, v in (("--max-tiles", max_tiles), ("--max-pixels", max_pixels), ("--tile-budget", tile_budget))
                  if v is not None]
        if unused:  # a script's flags, kept for its image runs: a warning, not a refusal
            logging.getLogger("sleigh").warning("%s", f"{', '.join(unused)}: no image given, so ignored")
    if show_weights is not None:
        from sleigh.runtime.show_weights import output_format

        if image is None:
            raise SleighError("--show-weights", "no image given", "an IMAGE argument whose tile weights to draw")
        output_format(show_weights, image)
    _check_model(model, engine)
    with _as_flags("backend", "engine", "prompt", "system", "max_new_tokens", "max_tiles", "max_memory", "tile_budget", "stop"), \
            Pipeline.load(model, backend=backend, threads=threads, engine=engine, verify=not no_verify_files,
                          max_memory=budget) as pipe:
        pipe.allow_special_tokens = allow_special_tokens
        gen = pipe.generate(source, prompt, system=system, max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None
                            else max_new_tokens, sampling=sampling, ignore_eos=ignore_eos, max_tiles=max_tiles,
                            stop=stop or (), tile_budget=tile_budget, fit_context=max_new_tokens is None)
        if as_json:
            typer.echo(_json_line(gen.result.to_dict(), ensure_ascii=False))
            _show_weights(source, gen.result, show_weights)
            return
        shown = _escape_controls if _stdout_is_terminal() else str  # a pipe gets the text as generated
        if no_stream:
            sys.stdout.write(shown(gen.result.text) + "\n")  # not typer.echo: it strips ANSI codes off a pipe
        else:
            for piece in gen:
                sys.stdout.write(shown(piece))
                sys.stdout.flush()
            sys.stdout.write("\n")
        r = gen.result
        t = r.timings
        grid = f"grid {r.grid[0]}x{r.grid[1]}, {r.views} views, " if r.grid else ""
        if r.kept_views is not None:
            grid += f"{len(r.kept_views)} read, "
        typer.echo(f"[{r.backend}] {grid}{r.prompt_tokens} prompt tokens, {len(r.token_ids)} new; "
                   f"first token {t.time_to_first_token_s:.2f} s, {t.decode_tokens_per_s:.1f} tokens/s", err=True)
        _show_weights(source, r, show_weights)


def _show_weights(image, result, out: Optional[Path]) -> None:
    """`image`: the run's decoded image (the picture is drawn within the limit the run was given)."""
    if out is None:
        return
    from sleigh.runtime.show_weights import save_weights_image

    save_weights_image(image, result.grid, result.gswa_weights, out)
    typer.echo(f"wrote {out}: GSWA weights {', '.join(f'{w:.2f}' for w in result.gswa_weights)} (thumbnail last)", err=True)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Sleigh checkpoint folder (sleigh init / sleigh convert)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output package folder."),
    opset: int = typer.Option(18, help="ONNX opset, 18..20."),
    max_tiles: int = typer.Option(12, help="Most tiles per image the package is built and profiled for."),
    decoder: str = typer.Option("fused", help="Decoder form: fused (ONNX Runtime's fused operators, fastest on the "
                                "CPU), fused-cuda (the fused form that ONNX Runtime's CUDA provider runs) or standard "
                                "(standard ops: what TensorRT needs)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against PyTorch."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest's parity report as JSON."),
):
    """Export a checkpoint to an ONNX package (vision, gswa with the GSWA op, embed, decoder) and check parity."""
    from sleigh.export.exporter import ExportOptions, export_package

    opts = ExportOptions(opset=opset, max_tiles=max_tiles, decoder=decoder, verify=not no_verify, force=force, quiet=as_json)
    result = export_package(checkpoint, out, opts)
    if as_json:
        typer.echo(_json_line({"package": str(out), "seconds": round(result.seconds, 2),
                               "parity": result.manifest.get("parity")}))
        return
    if result.parity:
        from sleigh.export.parity import table_rows

        _print_table(["case", "output", "", "max abs", "mean abs", "cosine", "needed atol", "atol"],
                     table_rows(result.parity), title="parity: ONNX Runtime (CPU) vs PyTorch, fp32")
    sizes = sum(e["bytes"] for e in result.manifest["files"].values())
    typer.echo(f"wrote {out} ({sizes / 1e6:.1f} MB) in {result.seconds:.1f} s"
               + ("" if result.parity else " (parity not checked: --no-verify)"))


@app.command()
def inspect(
    package: Path = typer.Argument(..., help="Model package folder."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256 against the manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
):
    """Show a package's modules, inputs and outputs, opset, sizes, GSWA node and engines."""
    from sleigh.engines.inspect import inspect_package

    report = inspect_package(package, verify=verify)
    if as_json:
        typer.echo(_json_line(report, ensure_ascii=False))
    else:
        from sleigh.engines.inspect import print_report

        print_report(report)
    if verify and report["verify"]["problems"]:
        raise SleighError(str(package), f"{len(report['verify']['problems'])} files differ from the manifest: "
                          + "; ".join(report["verify"]["problems"][:5]), "files as exported (re-export the package)")


@app.command()
def calibrate(
    package: Path = typer.Argument(..., help="Model package folder."),
    images: Path = typer.Option(..., "--images", help="Folder of calibration images (tiled as the runtime tiles them)."),
    num_images: Optional[int] = typer.Option(None, help="Use at most this many usable images (default: all)."),
    method: str = typer.Option("entropy", help="entropy, percentile or minmax."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration summary as JSON."),
):
    """Record INT8 activation ranges of the vision module from images (and a TensorRT calibration cache)."""
    from sleigh.engines.calibration.collect import calibrate_package
    from sleigh.engines.calibration.int8 import CACHE_FILE, RANGES_FILE

    result = calibrate_package(package, images, num_images=num_images, method=method, quiet=as_json)
    files = [RANGES_FILE, CACHE_FILE]
    if as_json:
        typer.echo(_json_line({**result.to_json(), "files": files}))
        return
    typer.echo(f"calibrated {package}: {result.num_images} images ({result.skipped} skipped), method {result.method}, "
               f"files {', '.join(files)}")


@app.command("build-engine")
def build_engine(
    package: Path = typer.Argument(..., help="Model package folder."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime or tensorrt."),
    precision: str = typer.Option("fp16", help="fp32, fp16 or int8 (int8 needs `sleigh calibrate` first)."),
    llm_weights: Optional[str] = typer.Option(None, help="Decoder weights: fp16, int8 or int4 (default: follows --precision)."),
    kv_dtype: Optional[str] = typer.Option(None, help="ONNX Runtime: the decoder's KV cache slots, float32 or float16 "
                                           "(half the bytes; a fused decoder's attention computes in it, a standard one's in float32; default: float16 for an FP16 decoder, else float32)."),
    name: Optional[str] = typer.Option(None, help="Engine name (default: BACKEND-PRECISION, and -llm-WEIGHTS where the decoder's differ, e.g. onnxruntime-int8-llm-int4)."),
    max_tiles: Optional[int] = typer.Option(None, help="Most tiles per image the engine takes (default: the package's)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget runs on this engine keep unless they "
                                             "give their own, e.g. 2.5G; an engine that cannot load within it is refused."),
    max_context: Optional[int] = typer.Option(None, help="Longest prompt + answer (default: the model's context; "
                                              "TensorRT: 4096 or the model's context if shorter)."),
    opt_tiles: Optional[int] = typer.Option(None, help="TensorRT: the tiles its kernels are tuned for (default: 6 or --max-tiles)."),
    opt_context: Optional[int] = typer.Option(None, help="TensorRT: the sequence its kernels are tuned for "
                                              "(default: the image tokens of --opt-tiles + 64)."),
    max_batch: Optional[int] = typer.Option(None, help="TensorRT: most sequences per step, 1..64 (default: 1)."),
    workspace_gb: Optional[float] = typer.Option(None, help="TensorRT: builder scratch memory in GiB (default: 4)."),
    builder_optimization_level: Optional[int] = typer.Option(None, help="TensorRT: 0..5, higher builds slower "
                                                             "and may run faster (default: 3)."),
    plugin_library: Optional[Path] = typer.Option(None, help="TensorRT: a shared library that registers the "
                                                  "sleigh::GSWA plugin; GSWA runs through it (copied into the engine)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Held-out images for the accuracy gate (default: shipped photo variants)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="JSONL (sleigh data synth): the gate becomes task accuracy: refuse the engine when a "
                                             "question type's accuracy falls below FP32's by more than --eval-tolerance (the "
                                             "agreement numbers are then recorded, not enforced)."),
    eval_tolerance: Optional[float] = typer.Option(None, "--eval-tolerance", help="Points of accuracy per question type the engine may lose against FP32 (default: 1.0)."),
    allow_degraded: bool = typer.Option(False, "--allow-degraded", help="Keep the engine even if it fails the accuracy gate."),
    force: bool = typer.Option(False, "--force", help="Rebuild an engine of the same name."),
    as_json: bool = typer.Option(False, "--json", help="Print the engine's manifest entry as JSON."),
):
    """Build an FP32/FP16/INT8 engine for ONNX Runtime or TensorRT, gated by an accuracy check."""
    from sleigh.engines.build_engine import GateFailed, TaskGateFailed, build_engine as build
    from sleigh.engines.options import EngineOptions
    from sleigh.runtime.memory import parse_size

    with _as_flags("max_memory"):
        budget = None if max_memory is None else parse_size(max_memory)
    opts = EngineOptions(backend=backend, precision=precision, llm_weights=llm_weights, kv_dtype=kv_dtype, name=name, max_tiles=max_tiles,
                         max_memory=budget,
                         max_context=max_context, opt_tiles=opt_tiles, opt_context=opt_context, max_batch=max_batch,
                         workspace_gb=workspace_gb, builder_optimization_level=builder_optimization_level,
                         plugin_library=plugin_library, allow_degraded=allow_degraded, gate_images=images, force=force,
                         quiet=as_json, eval_data=eval_data, eval_tolerance=eval_tolerance)
    t0 = time.perf_counter()
    try:
        entry = build(package, opts)
    except GateFailed as e:
        if not as_json:
            _print_gate(e.report, f"accuracy gate: {opts.engine_name} vs FP32")
        raise
    except TaskGateFailed as e:
        if not as_json:
            _print_task_gate(e.report, opts.engine_name)
        raise
    seconds = round(time.perf_counter() - t0, 2)
    if as_json:
        typer.echo(_json_line({**entry.json, "build_seconds": seconds}))
        return
    _print_gate(entry.accuracy, f"accuracy gate: {entry.name} vs FP32")
    if entry.task_accuracy is not None:
        _print_task_gate(entry.task_accuracy, entry.name)
    typer.echo(f"built {entry.name}: {entry.files_bytes / 1e6:.1f} MB in {seconds:.1f} s"
               + (" (DEGRADED: kept with --allow-degraded)" if entry.degraded else ""))


@app.command()
def compare(
    package: Path = typer.Argument(..., help="Model package folder."),
    engine: str = typer.Option(..., "--engine", help="Engine name from the manifest (sleigh inspect lists them)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Held-out images (default: shipped photo variants)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Compare an engine against the package's FP32 modules (the accuracy gate, as a report)."""
    from sleigh.engines.accuracy import run_gate
    from sleigh.progress import progress

    with progress(f"compare {engine}", None, as_json) as bar:  # pairs of runs, both sides: seconds to minutes
        report = run_gate(package, engine, images=images, progress=bar)
    if as_json:
        typer.echo(_json_line(report))
    else:
        _print_gate(report, f"{engine} vs FP32")
    if not report["passed"]:
        raise typer.Exit(1)


@app.command()
def train(
    checkpoint: Path = typer.Argument(..., help="Sleigh checkpoint to start from (sleigh init / sleigh convert)."),
    data: Path = typer.Option(..., "--data", help="JSONL of {image, question, answer} lines (or a folder with one)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint folder (new or empty, unless --resume)."),
    parts: str = typer.Option("gswa", "--train", help="What is trained: gswa, gswa,projector, ... or all."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (or --minutes)."),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget (or --steps); the curriculum follows the clock."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, cosine to 10 %)."),
    batch: int = typer.Option(16, help="Images per step (each with its questions)."),
    micro_batch: Optional[int] = typer.Option(None, help="Images run at once within a step (default: the whole batch); the same update in less memory."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out (same checkpoint, data and schedule options)."),
    curriculum: str = typer.Option("auto", help="auto (synthetic data with the ViT trained), on or off."),
    curriculum_steps: Optional[int] = typer.Option(None, help="The curriculum's length in steps (default: the run's first half)."),
    save_every: int = typer.Option(200, help="Save the checkpoint every this many steps."),
    strict: bool = typer.Option(False, "--strict", help="Refuse bad JSONL lines instead of skipping them."),
    threads: Optional[int] = typer.Option(None, help="CPU threads."),
    save_dtype: str = typer.Option("float32", help="float32 or float16: the checkpoint's weights (--resume keeps float32)."),
    gswa_hint: float = typer.Option(0.0, help="Curriculum only: weight of a loss on whether GSWA looks at the tile with the object (0: off)."),
):
    """Train GSWA (or more) on image/question/answer data; loss on the answer tokens only."""
    from sleigh.data.qa import skipped_text
    from sleigh.sleighvl.train import TrainOptions, train as do_train

    _check_threads(threads)  # as on run, bench, eval and serve
    opts = TrainOptions(train=parts, steps=steps, minutes=minutes, lr=lr, batch=batch, micro_batch=micro_batch, seed=seed, resume=resume,
                        curriculum=curriculum, curriculum_steps=curriculum_steps, save_every=save_every, strict=strict,
                        threads=threads, save_dtype=save_dtype, gswa_hint=gswa_hint)
    r = do_train(checkpoint, data, out, opts, log=lambda m: typer.echo(m, err=True))
    skipped = f", skipped {skipped_text(r.skipped)}" if r.skipped else ""
    idle = f" ({r.skipped_steps} without an update: no image of the batch decoded)" if r.skipped_steps else ""
    typer.echo(f"wrote {out}: {r.steps} steps{idle} in {r.seconds / 60:.1f} min on {r.device}, {r.images} images / "
               f"{r.lines} questions{skipped}, curriculum {'on' if r.curriculum else 'off'}, last loss {r.last['loss']:.3f}")


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Model package (sleigh export) or Sleigh checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="JSONL of {image, question, answer[, type]} lines (or a folder with one)."),
    engine: Optional[str] = typer.Option(None, help="Engine name from the package manifest (default: the best built one)."),
    backend: str = typer.Option("auto", help="auto, onnxruntime, torch or tensorrt."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    limit: Optional[int] = typer.Option(None, help="Only the first N questions evaluated (a line skipped for its image or length is not one of them)."),
    tile_budget: Optional[int] = typer.Option(None, "--tile-budget", help="The LLM reads only the K tiles GSWA weighs highest, and the thumbnail."),
    max_new_tokens: int = typer.Option(EVAL_NEW_TOKENS, help="The answer's token limit: answers longer than it can never match."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Exact-match accuracy per question type (with its standard error) on any backend or engine."""
    from sleigh.data.qa import skipped_text
    from sleigh.evaluate import evaluate, report_rows

    _check_threads(threads)
    _check_model(model, engine)  # as run: --engine on a checkpoint ran the torch reference and reported the engine
    with _as_flags("backend", "engine", "limit", "tile_budget", "max_new_tokens"):
        report = evaluate(model, data, backend=backend, engine=engine, threads=threads, limit=limit, quiet=as_json,
                          tile_budget=tile_budget, max_new_tokens=max_new_tokens)
    if as_json:
        typer.echo(_json_line(report))
        return
    _print_table(["question type", "n", "accuracy", "standard error"], report_rows(report),
                 title=f"{model} ({report['backend']}) on {report['data']}")
    top = report.get("gswa_top_tile")
    if top:
        typer.echo(f"GSWA's top tile holds the object in {top['holds_object']}/{top['images']} multi-tile images "
                   f"({100 * top['fraction']:.1f} %)")
    if report["median_first_token_s"] is not None:
        budget = "" if tile_budget is None else f", tile budget {tile_budget}"
        typer.echo(f"median first token {1e3 * report['median_first_token_s']:.1f} ms, {report['mean_views_read']:.2f} "
                   f"views read on average{budget}")
    if report["skipped"]:
        typer.echo("skipped lines: " + skipped_text(report["skipped"], report["first_skipped"]))


data_app = typer.Typer(no_args_is_help=True, help="Make training and evaluation data.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Output folder: SPLIT.jsonl and SPLIT/ images are written there."),
    n: int = typer.Option(..., "--n", help="Number of images (three questions each)."),
    seed: int = typer.Option(0, help="Seed: image i of a seed is always the same; use another seed for a held-out split."),
    split: str = typer.Option("train", help="Split name (file SPLIT.jsonl)."),
    min_size: int = typer.Option(448, help="Smallest canvas side, px."),
    max_size: int = typer.Option(1800, help="Largest canvas side, px."),
    min_object: int = typer.Option(10, help="Smallest object side, px."),
    max_object: int = typer.Option(24, help="Largest object side, px."),
    force: bool = typer.Option(False, "--force", help="Replace an existing split of the same name."),
):
    """Synthetic task: a small coloured shape on a large textured canvas; colour/shape/position questions."""
    from sleigh.data.synth import SynthSpec, write_split
    from sleigh.progress import progress

    spec = SynthSpec(min_size=min_size, max_size=max_size, min_object=min_object, max_object=max_object)
    with progress(f"synth {split}", n) as bar:
        path = write_split(out, n, seed, split=split, spec=spec, force=force, progress=bar)
    typer.echo(f"wrote {path}: {n} images, {3 * n} questions (seed {seed})")


def _print_gate(report: dict, title: str) -> None:
    from sleigh.engines.accuracy import report_rows

    _print_table(["metric", "value", "threshold", ""], report_rows(report), title=title)
    typer.echo(f"{len(report['pairs'])} image/prompt pairs on held-out images: {', '.join(report.get('images_held_out', []))}")


def _print_task_gate(report: dict, name: str) -> None:
    from sleigh.engines.accuracy import task_rows

    _print_table(["question type", "n", "FP32", name, ""], task_rows(report),
                 title=f"task accuracy on {report['data']}: at most {report['tolerance_points']:g} points below FP32")


@app.command()
def bench(
    model: Path = typer.Argument(..., help="Model package (or checkpoint) to time."),
    image: Optional[str] = typer.Option(None, help="Image (default: the photo shipped inside sleigh, examples/coffee.jpg)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Also time this Sleigh checkpoint on the torch backend."),
    engine: list[str] = typer.Option([], "--engine", help="Also time these engines of the package (repeatable)."),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="The question."),
    runs: int = typer.Option(3, help="Timed runs per target (after one warm-up)."),
    max_new_tokens: int = typer.Option(BENCH_NEW_TOKENS, help="Tokens generated per run (EOS ignored)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for every backend."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 2.5G: vision and prefill run in chunks that fit it, and what cannot fit is refused in one line."),
    tile_budget: Optional[int] = typer.Option(None, "--tile-budget", help="The LLM reads only the K tiles GSWA weighs highest, and the thumbnail."),
    max_tiles: Optional[int] = typer.Option(None, help="Most tiles per image (default and maximum: the model's, or an engine's built for fewer): time fewer views."),
):
    """Time to first token, decode tokens/s and vision ms per view, per backend and engine, in one run."""
    from sleigh.bench import markdown, other_model, run_bench
    from sleigh.runtime.image import check_image_path
    from sleigh.runtime.memory import parse_size
    from sleigh.runtime.package import shipped_photo

    _check_text("--prompt", prompt)
    _check_threads(threads)
    if image is not None:
        image = check_image_path(image)
    targets = [(str(model), model, "auto", None)]
    targets += [(f"{model} [{e}]", model, "auto", e) for e in engine]
    if reference is not None:
        targets.append((str(reference), reference, "torch", None))
    for _, path, _, name in targets:  # a typo must not cost the timing of the targets before it
        _check_model(path, name)
    if reference is not None and model_kind(reference) == "package":
        raise SleighError(f"--reference {reference}", "is a package; the reference runs a checkpoint on PyTorch",
                          "the Sleigh checkpoint the package was exported from")
    if reference is not None and model_kind(model) == "package" and (why := other_model(model, reference)):
        logging.getLogger("sleigh").warning("%s", why)
    with _as_flags("engine", "runs", "prompt", "max_new_tokens", "max_memory", "tile_budget", "max_tiles"):
        report = run_bench(targets, image or shipped_photo(), prompt, runs=runs, max_new_tokens=max_new_tokens,
                           threads=threads, quiet=as_json, max_memory=None if max_memory is None else parse_size(max_memory),
                           tile_budget=tile_budget, max_tiles=max_tiles)
    typer.echo(_json_line(report) if as_json else markdown(report))


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", envvar="SLEIGH_MODEL",
                                         help="Model package (sleigh export). Default: $SLEIGH_MODEL."),
    engine: Optional[str] = typer.Option(None, help="Engine name from the package manifest (default: the best built one)."),
    backend: str = typer.Option("auto", help="auto, onnxruntime or tensorrt."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend (per replica)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: the package folder's name)."),
    max_queue: int = typer.Option(MAX_QUEUE, help="Requests that may wait for the model (per replica); more get 503 + Retry-After."),
    max_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, help="max_tokens when a request gives none (cut to what the context leaves after the prompt)."),
    max_body_mb: float = typer.Option(float(MAX_BODY_MB), help="Largest request body, in MiB (413 beyond)."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, help="Largest image (width x height) a request may send."),
    allow_local_files: Optional[Path] = typer.Option(None, help="Accept file:// image URLs inside this folder only."),
    log_level: Optional[str] = typer.Option(None, help="debug, info, warning or error \\[default: `sleigh --log-level`'s, else info]."),
    ray: bool = typer.Option(False, "--ray", help="Deploy on Ray Serve (pip install 'sleigh\\[ray]'): one model per replica."),
    replicas: int = typer.Option(REPLICAS, help="With --ray: number of replicas."),
    min_replicas: Optional[int] = typer.Option(None, help="With --ray and --max-replicas: autoscaling floor."),
    max_replicas: Optional[int] = typer.Option(None, help="With --ray: autoscale up to this many replicas."),
    target_ongoing_requests: float = typer.Option(TARGET_ONGOING_REQUESTS, help="With --ray autoscaling: ongoing requests per replica to aim for."),
    replica_cpus: float = typer.Option(REPLICA_CPUS, help="With --ray: CPUs Ray reserves per replica."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: a running cluster's address (default: $RAY_ADDRESS, else a new cluster of this machine)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 2.5G: vision and prefill run in chunks that fit it, and what cannot fit is refused in one line."),
    shutdown_timeout: float = typer.Option(SHUTDOWN_TIMEOUT_S, help="Seconds answers under way may take to finish after Ctrl-C or SIGTERM; then they are cut off."),
):
    """Serve the model over HTTP with OpenAI's chat-completions API (/v1/chat/completions, /v1/models, /health, /metrics)."""
    from sleigh.serve.launch import launch

    _check_threads(threads)  # as on run and bench
    from sleigh.runtime.memory import parse_size
    log_level = log_level or (_LOG_LEVEL_GIVEN[0] or "info").lower()  # `sleigh --log-level error serve` stays quiet
    with _as_flags("backend", "engine", "max_memory"):
        launch(model=model, engine=engine, backend=backend, threads=threads, host=host, port=port, model_name=model_name,
               max_queue=max_queue, max_tokens=max_tokens, max_body_mb=max_body_mb, max_image_pixels=max_image_pixels,
               allow_local_files=allow_local_files, log_level=log_level, ray=ray, replicas=replicas,
               min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests,
               replica_cpus=replica_cpus, ray_address=ray_address,
               max_memory=None if max_memory is None else parse_size(max_memory), shutdown_timeout=shutdown_timeout)


def _json_line(obj, **kw) -> str:
    """One line of strict JSON for --json: a NaN or infinity (a broken model's GSWA weights, a rate
    over no time) becomes null, which every JSON parser reads; Python would write NaN, which most do not."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(obj), allow_nan=False, **kw)


def _print_table(header: list[str], rows: list[tuple], title: str | None = None) -> None:
    from rich.table import Table

    from sleigh.progress import table_console

    table = Table(title=title, show_lines=False)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*[str(c) for c in r])
    table_console(120).print(table)


def _check_model(path: Path, engine: str | None) -> None:
    """What can be refused before a model is loaded (seconds, or minutes for a bench): a missing
    folder, an engine for a checkpoint, an engine the package does not have."""
    kind = model_kind(path)
    if engine is None:
        return
    if kind == "package":
        from sleigh.runtime.backends import PACKAGE_MODULES
        from sleigh.runtime.manifest import read_manifest

        names = [PACKAGE_MODULES, *read_manifest(path).engines]
        if engine not in names:
            raise SleighError(f"--engine {engine}", f"no such engine in {path}", ", ".join(names))
    else:
        from sleigh.runtime.pipeline import checkpoint_has_no_engines

        raise checkpoint_has_no_engines(path, f"--engine {engine}", "--engine")


def _check_threads(threads: int | None) -> None:
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= THREADS_PER_CPU * cpus:
        raise SleighError("--threads", f"got {threads}",
                          f"an integer from 1 to {THREADS_PER_CPU * cpus} ({THREADS_PER_CPU} x this machine's {cpus} CPUs)")


def _check_text(flag: str, text: str) -> None:
    """Command-line text that is not UTF-8 reaches Python as surrogate escapes (PEP 383)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
        raise SleighError(flag, f"is not valid UTF-8 ({byte} at position {e.start})",
                          "UTF-8 text (check the terminal's or the script's encoding)") from None


@contextmanager
def _as_flags(*params: str):
    """The library's errors name a parameter (`top_p`, `engine=int8`); on the command line, name its
    flag (`--top-p`, `--engine int8`), in what the error is about and in its remedy ("fewer tiles
    (max_tiles)" -> "(--max-tiles)"). In the remedy only snake_case names are flags: `prompt` or
    `engine` there is a word of the sentence."""
    try:
        yield
    except SleighError as e:
        param, given, value = e.what.partition("=")
        expected = e.expected and _SNAKE_CASE.sub(lambda m: flag(m.group()) if m.group() in params else m.group(), e.expected)
        if param in params:
            raise SleighError(flag(param) + (f" {value}" if given else ""), e.problem, expected) from None
        if expected != e.expected:
            raise SleighError(e.what, e.problem, expected) from None
        raise


_SNAKE_CASE = re.compile(r"(?<![\w-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w=-])")  # `name=`: Python's keyword


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _escape_controls(text: str) -> str:
    """Control characters as visible escapes (`\\x1b`), for text printed on a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _system_error(e: OSError) -> SleighError | None:
    """A full disk, a read-only file system or missing permissions: the machine's state, not a bug (rc 2)."""
    import errno

    name = errno.errorcode.get(e.errno or -1)
    if name not in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT"):
        return None
    full = name in ("ENOSPC", "EDQUOT")
    problem = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded",
               "EROFS": "read-only file system"}.get(name, "permission denied (read-only or not this user's)")
    where = Path(e.filename) if e.filename else None
    if where is not None and where.name.startswith("."):  # a temporary or staged file: name its folder
        where = where.parent
    return SleighError(str(where or "the output (stdout, or a file)"), f"{problem} ({name})",  # a write without a name
                       "free disk space, then run it again" if full else "files and folders this user may read "
                       "and write (copy the package elsewhere, or change its permissions)")


def main() -> None:
    try:
        app()
    except SleighError as e:
        _err(str(e))
        sys.exit(2)
    except (KeyboardInterrupt, _Interrupted):
        _err("interrupted")
        sys.exit(130)
    except (BrokenPipeError, _PipeClosed):
        os._exit(0)  # nothing more can be written; skip the flush of a closed stdout at exit
    except Exception as e:  # a bug or an unforeseen failure: still one line, traceback on request
        if isinstance(e, OSError) and (user := _system_error(e)) is not None:
            _err(str(user))
            sys.exit(2)
        if os.environ.get("SLEIGH_DEBUG"):
            raise
        _err(f"unexpected {type(e).__name__}: {first_line(e)} (set SLEIGH_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
