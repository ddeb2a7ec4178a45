"""The `sleigh` command line, always in a subprocess (the real entry point, exit codes and streams).

- `--help` lists every command with its one-line description, without importing torch or onnx;
- `sleigh init` is reproducible per seed;
- `sleigh run --json` on the converted oracle checkpoint gives the oracle's greedy tokens;
- bad input: exit code != 0, exactly one `error:` line on stderr naming the problem, no traceback,
  and no partial output folder.

The subprocesses of the bad-input table and of `run --json` are independent, so they run side by
side (one per core) in a module fixture; each test only reads its result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sleigh.errors import SleighError
from tests.helpers import ASTRONAUT, EXAMPLES, INIT_SEED, ORACLE_CKPT, cli_env, run_sleigh
from tests.runtime.test_image import huge_png

REQUIRED_COMMANDS = ("convert", "init", "run", "export", "inspect")
HEAVY_MODULES = ("torch", "onnx", "onnxruntime", "transformers", "tensorrt",
                 "numpy", "PIL")  # installed with the runtime, but help must not wait for them (0.18 s of 0.28)
MISSING_TENSOR = "language_model.model.layers.1.feed_forward.w2.weight"
MISSING_TENSOR_SLEIGH = "llm.layers.1.mlp.down_proj.weight"  # the same tensor after conversion


# -- help -----------------------------------------------------------------------------------------


def registered_commands() -> dict[str, str]:
    """name -> first line of the command's help, as the typer app registers them."""
    import typer.main

    from sleigh.cli import app

    group = typer.main.get_command(app)
    return {name: (cmd.help or "").strip().splitlines()[0] if (cmd.help or "").strip() else ""
            for name, cmd in group.commands.items() if not cmd.hidden}


def help_without_heavy_imports(*args: str) -> subprocess.CompletedProcess:
    """`sleigh ARGS` with torch, onnx, ... made unimportable, as on a bare runtime install."""
    code = ("import sys\n"
            f"for m in {HEAVY_MODULES!r}: sys.modules[m] = None\n"
            f"sys.argv = ['sleigh', *{list(args)!r}]\n"
            "from sleigh.cli import main\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)


def test_help_lists_every_command_with_a_description():
    commands = registered_commands()
    assert set(REQUIRED_COMMANDS) <= set(commands), sorted(commands)
    proc = help_without_heavy_imports("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, first_line in commands.items():
        assert first_line, f"command {name!r} has no description"
        hits = [ln for ln in lines if f" {name} " in f" {ln.strip(' │|')} " and first_line in ln]
        assert len(hits) == 1, f"{name!r} with {first_line!r} not on one help line:\n{proc.stdout}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full (Linux)")
def test_a_full_stdout_is_named_as_the_output_in_one_line():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "sleigh.cli", "--help"], stdout=full, stderr=subprocess.PIPE, text=True,
                              env=cli_env(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: the output (stdout, or a file) | no space left on device (ENOSPC). Expected: free disk space, then run it again"]


def test_help_shows_bracketed_text_as_written():
    """Help texts are rich markup: "[default: warning; serve: info]" and "sleigh[ray]" were eaten."""
    import re

    def shown(*args):
        proc = help_without_heavy_imports(*args)
        return re.sub(r"\s+", " ", proc.stdout.replace("│", " "))

    assert "[default: warning; serve: info]" in shown("--help")
    assert "'sleigh[ray]'" in shown("serve", "--help") and "[default: `sleigh --log-level`'s, else info]" in shown("serve", "--help")
    assert "[default: 512, cut to what the context leaves after the prompt]" in shown("run", "--help")


@pytest.mark.parametrize("command", REQUIRED_COMMANDS)
def test_command_help_needs_no_heavy_packages(command):
    proc = help_without_heavy_imports(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "Traceback" not in proc.stderr


# -- subprocess table ----------------------------------------------------------------------------


@dataclass
class Case:
    args: list
    words: tuple[str, ...] = ()  # each must appear in the error line
    any_words: tuple[str, ...] = ()  # at least one must appear
    dst: Path | None = None  # must not exist afterwards (nor a .dst.tmp-* beside it)
    keep: dict[str, bytes] | None = None  # dst exists before and must hold exactly these files after
    result: subprocess.CompletedProcess | None = field(default=None, repr=False)


def _oracle_copy(root: Path, name: str) -> Path:
    dst = root / name
    shutil.copytree(ORACLE_CKPT, dst)
    return dst


def build_cases(root: Path, ckpt: Path, pkg: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}

    other = root / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   "hidden_size": 64}))
    cases["convert_other_model"] = Case(["convert", other, root / "out-other"], ("not InternVL2", "llama"),
                                        dst=root / "out-other")

    empty = root / "empty"
    empty.mkdir()
    cases["convert_empty_folder"] = Case(["convert", empty, root / "out-empty"], ("no config.json", str(empty)),
                                         dst=root / "out-empty")

    src = _oracle_copy(root, "missing-tensor")
    state = load_file(str(src / "model.safetensors"))
    del state[MISSING_TENSOR]
    save_file(state, str(src / "model.safetensors"))
    cases["convert_missing_tensor"] = Case(["convert", src, root / "out-missing"], ("missing",),
                                           any_words=(MISSING_TENSOR, MISSING_TENSOR_SLEIGH), dst=root / "out-missing")

    src = _oracle_copy(root, "truncated")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["convert_truncated_weights"] = Case(["convert", src, root / "out-trunc"],
                                              ("model.safetensors", "unreadable"), dst=root / "out-trunc")

    busy = root / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_bytes(b"mine")
    cases["convert_non_empty_output"] = Case(["convert", ORACLE_CKPT, busy], ("not empty", "--force"), keep={
        "notes.txt": b"mine"}, dst=busy)

    missing_gswa = root / "nowhere" / "gswa.safetensors"
    cases["convert_missing_gswa_file"] = Case(["convert", ORACLE_CKPT, root / "out-gswa", "--gswa", missing_gswa],
                                              ("gswa.safetensors", "not found"), dst=root / "out-gswa")

    png = ASTRONAUT.read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "zero.png").write_bytes(b"")
    (root / "folder.png").mkdir()
    run = ["run", "--model", ckpt, "--max-new-tokens", "2", "--json"]
    cases["run_corrupt_image"] = Case([*run[:1], root / "truncated.png", *run[1:]], ("truncated.png", "corrupt"))
    cases["run_zero_byte_image"] = Case([*run[:1], root / "zero.png", *run[1:]], ("zero.png", "0 bytes"))
    cases["run_directory_as_image"] = Case([*run[:1], root / "folder.png", *run[1:]], ("folder.png", "folder"))
    cases["run_missing_model"] = Case(["run", ASTRONAUT, "--model", root / "no-model"], ("no-model", "not found"))
    # build-engine: every option is a flag and every flag is checked before anything is converted
    cases["build_engine_tensorrt_flag_on_onnxruntime"] = Case(["build-engine", pkg, "--workspace-gb", "8"],
                                                              ("--workspace-gb", "TensorRT engines only", "--backend tensorrt"))
    cases["build_engine_bad_name"] = Case(["build-engine", pkg, "--name", "../up"], ("--name '../up'", "folder name"))
    cases["build_engine_missing_plugin_library"] = Case(
        ["build-engine", pkg, "--backend", "tensorrt", "--plugin-library", root / "libnone.so"], ("--plugin-library", "no such file"))
    cases.update(hardening_cases(root, ckpt, pkg, run))
    cases.update(review_cases(root, ckpt, pkg, run))
    return cases


def hardening_cases(root: Path, ckpt: Path, pkg: Path, run: list) -> dict[str, Case]:
    """Issue 11's user errors: each used to be accepted, or an `unexpected` line with rc 1."""

    def image_run(image, *more, words):
        return Case([run[0], image, *run[1:], *more], words)

    os.mkfifo(root / "fifo.png")
    huge_png(root / "huge.png", 13000, 13000)  # 169 Mpx in a few KB
    truncated = root / "truncated.png"  # if bench timed anything before its checks, this would be the error
    cases = {
        "run_threads_too_many": Case([*run, "--threads", "100000"], ("--threads", "100000", "CPUs")),
        "run_threads_zero": Case([*run, "--threads", "0"], ("--threads", "got 0")),
        "bench_threads_too_many": Case(["bench", pkg, "--threads", "100000", "--image", truncated], ("--threads",)),
        "run_temperature_nan": Case([*run, "--temperature", "nan"], ("--temperature", "nan", "finite")),
        "run_temperature_inf": Case([*run, "--temperature", "inf"], ("--temperature", "inf", "finite")),
        "run_temperature_negative": Case([*run, "--temperature", "-1"], ("--temperature", "-1")),
        "run_repetition_penalty_nan": Case([*run, "--repetition-penalty", "nan"], ("--repetition-penalty", "nan")),
        "run_repetition_penalty_inf": Case([*run, "--repetition-penalty", "inf"], ("--repetition-penalty", "inf")),
        "run_top_p_nan": Case([*run, "--top-p", "nan"], ("--top-p", "nan")),
        "run_top_k_negative": Case([*run, "--top-k", "-5"], ("--top-k", "-5")),
        "run_seed_negative": Case([*run, "--seed", "-1"], ("--seed", "-1", ">= 0")),
        # subprocess passes "\udce9" as the byte 0xE9 (PEP 383), as a Latin-1 terminal would
        "run_prompt_not_utf8": Case([*run, "--prompt", "caf\udce9?"], ("--prompt", "UTF-8", "0xe9")),
        "run_system_not_utf8": Case([*run, "--system", "\udcff"], ("--system", "UTF-8", "0xff")),
        "bench_prompt_not_utf8": Case(["bench", pkg, "--prompt", "\udcc3", "--image", truncated],
                                      ("--prompt", "UTF-8")),
        "run_url_image": image_run("https://example.com/cat.jpg",
                                   words=("https://example.com/cat.jpg", "URL", "not supported", "download")),
        "run_fifo_image": image_run(root / "fifo.png", words=("fifo.png", "not a regular file", "FIFO")),
        "run_dev_null_image": image_run("/dev/null", words=("/dev/null", "not a regular file")),
        "run_huge_png": image_run(root / "huge.png", words=("huge.png", "13000x13000", "--max-pixels")),
        "run_max_pixels_below_image": image_run(ASTRONAUT, "--max-pixels", "1000",
                                                words=("512x512", "at most 1,000 pixels")),
        "run_max_pixels_zero": image_run(ASTRONAUT, "--max-pixels", "0", words=("--max-pixels", "got 0")),
        "run_max_tiles_above_model": image_run(ASTRONAUT, "--max-tiles", "20",
                                               words=("--max-tiles", "got 20", "maximum of 12")),
        "run_engine_with_checkpoint": Case([*run, "--engine", "int8"], ("--engine int8", "checkpoint", "no engines")),
        "run_unknown_engine": Case(["run", "--model", pkg, "--engine", "nope"],
                                   ("--engine nope", "no such engine", "package")),
        "bench_unknown_engine": Case(["bench", pkg, "--engine", "nope", "--image", truncated],
                                     ("--engine nope", "no such engine", "package")),
        "bench_engine_on_checkpoint": Case(["bench", ckpt, "--engine", "fp16", "--image", truncated], ("checkpoint",)),
        "bench_missing_reference": Case(["bench", pkg, "--reference", root / "no-ref", "--image", truncated],
                                        ("no-ref", "not found")),
        "bench_url_image": Case(["bench", pkg, "--image", "https://example.com/cat.jpg"], ("URL",)),
        "bench_zero_new_tokens": Case(["bench", pkg, "--max-new-tokens", "0"], ("--max-new-tokens",)),
        "log_level_unknown": Case(["--log-level", "loud", *run], ("--log-level loud", "debug, info, warning, error")),
    }
    return cases


def review_cases(root: Path, ckpt: Path, pkg: Path, run: list) -> dict[str, Case]:
    """Session 24's review of the CLI: each used to be accepted (a NaN checkpoint, a run that never
    ends), refused only after minutes of work, or an `unexpected` line with rc 1."""
    data = root / "no-data.jsonl"  # the options are checked before the data is read
    (root / "a-file.png").write_bytes(b"not a folder")

    def train(name, *more, words):
        return Case(["train", ckpt, "--data", data, "-o", root / name, *more], words, dst=root / name)

    return {
        "train_minutes_nan": train("tr-nan", "--minutes", "nan", words=("--minutes", "nan", "finite")),
        "train_lr_inf": train("tr-inf", "--steps", "2", "--lr", "inf", words=("--lr", "inf", "finite")),
        "train_steps_zero": train("tr-zero", "--steps", "0", words=("--steps", "got 0")),
        "train_seed_negative": train("tr-seed", "--steps", "2", "--seed", "-1", words=("--seed", "-1", "2**63 - 1")),
        "train_threads_zero": train("tr-threads", "--steps", "2", "--threads", "0", words=("--threads", "got 0")),
        "eval_threads_too_many": Case(["eval", pkg, "--data", data, "--threads", "100000"], ("--threads", "CPUs")),
        "eval_max_new_tokens_zero": Case(["eval", pkg, "--data", data, "--max-new-tokens", "0"], ("--max-new-tokens", "got 0")),
        "init_seed_huge": Case(["init", root / "init-huge", "--seed", str(10**20)], ("--seed", "2**63 - 1"),
                               dst=root / "init-huge"),
        "synth_seed_negative": Case(["data", "synth", root / "syn", "--n", "1", "--seed", "-5"], ("--seed", "-5")),
        "synth_into_a_file": Case(["data", "synth", root / "a-file.png", "--n", "1"], ("a-file.png", "not a folder")),
        "build_engine_reserved_name": Case(["build-engine", pkg, "--precision", "fp32", "--name", "package"],
                                           ("--name package", "reserved")),
        "run_show_weights_xbm": Case([run[0], ASTRONAUT, *run[1:], "--show-weights", root / "w.xbm"],
                                     ("w.xbm", "XBM"), dst=root / "w.xbm"),
        "bench_reference_package": Case(["bench", pkg, "--reference", pkg, "--runs", "30"], ("--reference", "is a package")),
        # session 25: found only after the whole run, as "unexpected FileExistsError"
        "run_show_weights_under_a_file": Case([run[0], ASTRONAUT, *run[1:], "--show-weights", root / "a-file.png" / "w.png"],
                                              ("a-file.png", "is a file")),
    }


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, oracle_ckpts, tiny_pkg):
    """Every subprocess of this module that is not a help call, run side by side."""
    root = tmp_path_factory.mktemp("cli")
    ckpt = oracle_ckpts["identity"]
    cases = build_cases(root, ckpt, tiny_pkg)
    jobs = {name: c.args for name, c in cases.items()}
    jobs["run_json"] = ["run", ASTRONAUT, "--model", ckpt, "--max-new-tokens", "12", "--ignore-eos", "--json"]
    jobs["init_again"] = ["init", root / "init-again", "--preset", "tiny", "--seed", INIT_SEED]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_sleigh, *args) for name, args in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    for name, c in cases.items():
        c.result = results[name]
    return cases, results, root


# -- run --json ----------------------------------------------------------------------------------


def test_run_json_reproduces_the_oracle(cli_runs, oracle_expected):
    proc = cli_runs[1]["run_json"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: one object, nothing else on stdout
    out = json.loads(lines[0])
    exp = oracle_expected["astronaut"]
    assert out["token_ids"] == exp["greedy_12_no_eos_ids"]
    assert isinstance(out["text"], str) and out["text"]
    assert out["prompt_tokens"] == exp["num_input_ids"] == 452
    assert out["grid"] == [1, 1] and out["views"] == exp["num_views"] == 1
    assert out["gswa_weights"] == [1.0]
    t = out["timings"]
    for key in ("preprocess_s", "vision_s", "time_to_first_token_s", "decode_tokens_per_s"):
        assert isinstance(t[key], (int, float)) and t[key] >= 0, (key, t)
    assert t["decode_tokens_per_s"] > 0 and t["time_to_first_token_s"] >= t["preprocess_s"]


# -- init ----------------------------------------------------------------------------------------


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header JSON, tensor bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_init_is_reproducible_per_seed(cli_runs, init_ckpt, tmp_path):
    proc = cli_runs[1]["init_again"]
    assert proc.returncode == 0, proc.stderr
    again = cli_runs[2] / "init-again"
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (again / name).read_bytes() == (init_ckpt / name).read_bytes(), name
    # The tensor bytes and the header are identical; whole-file byte identity is pinned down (as a
    # known bug) in test_init_writes_identical_weight_files.
    assert _safetensors_parts(again / "model.safetensors") == _safetensors_parts(init_ckpt / "model.safetensors")

    from sleigh.sleighvl.init import init_checkpoint

    init_checkpoint(tmp_path / "seed4", "tiny", seed=INIT_SEED + 1)
    a, b = load_file(str(init_ckpt / "model.safetensors")), load_file(str(tmp_path / "seed4" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    random_tensors = [k for k in a if a[k].dim() >= 2]
    assert set(random_tensors) <= set(differing), sorted(set(random_tensors) - set(differing))[:5]


def test_init_writes_identical_weight_files(init_ckpt, tmp_path):
    """Saving is byte-reproducible (safetensors' header order once varied from save to save): the init
    checkpoint's weights, saved again and again in this process, give `sleigh init`'s file each time.
    The weights themselves are compared across inits in test_init_is_reproducible_per_seed."""
    from tokenizers import Tokenizer

    from sleigh.sleighvl.checkpoint import load_checkpoint, save_checkpoint

    model, _, generation = load_checkpoint(init_ckpt)
    tokenizer = Tokenizer.from_file(str(init_ckpt / "tokenizer.json"))
    want = (init_ckpt / "model.safetensors").read_bytes()
    for i in range(16):  # a coin flip per save: 16 saves all matching by chance is 2^-16
        save_checkpoint(tmp_path / str(i), model, tokenizer, generation)
        assert (tmp_path / str(i) / "model.safetensors").read_bytes() == want, f"save {i} differs"


# -- bad input -----------------------------------------------------------------------------------

BAD_INPUT = ["convert_other_model", "convert_empty_folder", "convert_missing_tensor", "convert_truncated_weights",
             "convert_non_empty_output", "convert_missing_gswa_file", "run_corrupt_image", "run_zero_byte_image",
             "run_directory_as_image", "run_missing_model",
             "run_threads_too_many", "run_threads_zero", "bench_threads_too_many", "run_temperature_nan",
             "run_temperature_inf", "run_temperature_negative", "run_repetition_penalty_nan",
             "run_repetition_penalty_inf", "run_top_p_nan", "run_top_k_negative", "run_seed_negative",
             "run_prompt_not_utf8", "run_system_not_utf8", "bench_prompt_not_utf8", "run_url_image", "run_fifo_image",
             "run_dev_null_image", "run_huge_png", "run_max_pixels_below_image", "run_max_pixels_zero",
             "run_max_tiles_above_model", "run_engine_with_checkpoint", "run_unknown_engine", "bench_unknown_engine",
             "bench_engine_on_checkpoint", "bench_missing_reference", "bench_url_image", "bench_zero_new_tokens",
             "log_level_unknown", "build_engine_tensorrt_flag_on_onnxruntime", "build_engine_bad_name",
             "build_engine_missing_plugin_library", "train_minutes_nan", "train_lr_inf", "train_steps_zero",
             "train_seed_negative", "train_threads_zero", "eval_threads_too_many", "init_seed_huge",
             "synth_seed_negative", "synth_into_a_file", "build_engine_reserved_name", "run_show_weights_xbm",
             "bench_reference_package", "eval_max_new_tokens_zero", "run_show_weights_under_a_file"]


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_gives_one_error_line(cli_runs, name):
    case = cli_runs[0][name]
    proc = case.result
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0, both
    assert "Traceback" not in both, both
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error: ") and not line.startswith("error: unexpected"), line
    assert proc.returncode == 2, (proc.returncode, line)
    assert " | " in line and "Expected:" in line, f"not a SleighError message: {line}"
    for word in case.words:
        assert word in line, f"{word!r} not in {line!r}"
    if case.any_words:
        assert any(w in line for w in case.any_words), f"none of {case.any_words} in {line!r}"
    assert proc.stdout.strip() == "", proc.stdout
    if case.dst is not None:
        if case.keep is None:
            assert not case.dst.exists(), f"{case.dst} left behind"
        else:
            assert {p.name: p.read_bytes() for p in case.dst.iterdir()} == case.keep
        leftovers = sorted(p.name for p in case.dst.parent.glob(f".{case.dst.name}.tmp-*"))
        assert not leftovers, leftovers


def test_bad_input_table_is_complete(cli_runs):
    assert sorted(BAD_INPUT) == sorted(cli_runs[0])


# -- help, version, logging, terminal output -------------------------------------------------------


def command_help(*args: str) -> str:
    from typer.testing import CliRunner

    from sleigh.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [(), *[(name,) for name in registered_commands()]])
def test_boolean_flags_show_no_value_in_help(command):
    """`--force  <bool>` read as `--force true`, which is refused: a flag takes no value."""
    text = command_help(*command)
    assert "--help" in text and "<bool>" not in text, text
    assert "<int>" in text or "<path>" in text or "<str>" in text or not command or "Commands" in text  # the other types still show (a group lists commands)


def test_force_takes_no_value(tmp_path):
    proc = run_sleigh("init", tmp_path / "ckpt", "--force", "true")
    assert proc.returncode == 2 and "true" in proc.stderr and not (tmp_path / "ckpt").exists()


def test_version_is_the_installed_one():
    from importlib.metadata import version

    proc = run_sleigh("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"sleigh {version('sleigh')}"


def test_bench_help_names_the_photo_it_uses():
    """bench's default image is `shipped_photo()`: its help must name the example that photo is."""
    import numpy as np
    from PIL import Image

    from sleigh.runtime.package import shipped_photo

    named = [name for name in ("chelsea.jpg", "coffee.jpg") if name in command_help("bench")]
    assert len(named) == 1, named
    example = EXAMPLES / named[0]
    shipped, original = Image.open(shipped_photo()), Image.open(example)
    assert shipped.size == original.size
    diff = np.abs(np.asarray(shipped, np.int16) - np.asarray(original, np.int16))
    assert diff.mean() < 5, diff.mean()  # the same photo, re-encoded (a different one differs by tens)


@pytest.mark.parametrize("level, shown", [("warning", True), ("error", False)])
def test_log_level_routes_python_warnings(level, shown, capsys, monkeypatch):
    import logging
    import warnings

    from sleigh import cli

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    cli._setup_logging(level)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = warnings.showwarning  # catch_warnings restores the hook on exit
        warnings.warn("engine int8 was gated on a CPU with VNNI")
        logging.getLogger("sleigh.runtime.backends").warning("a runtime warning")
    err = capsys.readouterr().err
    expected = ["warning: engine int8 was gated on a CPU with VNNI", "warning: a runtime warning"] if shown else []
    assert err.splitlines() == expected


def test_a_logged_exception_keeps_its_traceback(capsys, monkeypatch):
    """`sleigh serve` logs a bug with log.exception and tells the client to see the log: the line
    and the traceback are both there (a user error never reaches the log: it is one line from main)."""
    import logging

    from sleigh import cli

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    cli._setup_logging("warning")
    try:
        raise KeyError("slot")
    except KeyError:
        logging.getLogger("sleigh.serve").exception("generation failed")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: generation failed" and err[1] == "Traceback (most recent call last):"
    assert err[-1] == "KeyError: 'slot'"


def test_as_flags_names_flags_but_not_python_keywords():
    """In a remedy, `max_tiles` becomes `--max-tiles`; `max_pixels=` (how Python spells it) stays."""
    from sleigh.cli import _as_flags
    from sleigh.runtime.memory import gb

    with pytest.raises(SleighError) as err, _as_flags("max_pixels", "max_tiles"):
        raise SleighError("image.png", "too large", "fewer tiles (max_tiles), or `sleigh run --max-pixels N`, max_pixels= in Python")
    assert err.value.expected == "fewer tiles (--max-tiles), or `sleigh run --max-pixels N`, max_pixels= in Python"
    assert (gb(1024), gb(5 * 1024**2), gb(3 * 1024**3)) == ("1024 bytes", "5.00 MB", "3.00 GB")  # not 0.00 GB


def test_json_output_is_strict_json():
    """--json writes null where Python would write NaN or Infinity (a NaN model's GSWA weights)."""
    from sleigh.cli import _json_line

    line = _json_line({"gswa_weights": [float("nan"), 1.5], "rate": float("inf"), "t": (1, -float("inf")), "s": "é"},
                      ensure_ascii=False)
    assert line == '{"gswa_weights": [null, 1.5], "rate": null, "t": [1, null], "s": "é"}'
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))


def test_escape_controls():
    from sleigh.cli import _escape_controls

    assert _escape_controls("a\x1b[2Jb\tc\nd\r\x07\x7f\x9b é") == "a\\x1b[2Jb\tc\nd\\x0d\\x07\\x7f\\x9b é"


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("stream", [True, False])
def test_generated_control_bytes_reach_a_terminal_escaped(terminal, stream, monkeypatch, tmp_path):
    """ESC sequences in generated text are shown as `\\x1b` on a terminal; a pipe or --json gets the text."""
    from typer.testing import CliRunner

    from sleigh import cli
    from sleigh.runtime import pipeline
    from sleigh.runtime.pipeline import Generation, GenerationResult

    pieces = ["red ", "\x1b[2J\x1b]0;pwned\x07", "car"]

    def steps():
        for piece in pieces:
            yield piece
        return GenerationResult(text="".join(pieces), token_ids=[1, 2, 3], prompt_tokens=4, grid=None, views=0,
                                gswa_weights=[], stop_reason="length", backend="fake")

    class FakePipeline:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def generate(self, *args, **kwargs):
            return Generation(steps())

    monkeypatch.setattr(pipeline.Pipeline, "load", classmethod(lambda cls, *a, **k: FakePipeline()))
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: terminal)
    (tmp_path / "manifest.json").write_text("{}")  # a package, as far as the CLI's checks before loading look
    args = ["run", "--model", str(tmp_path), *([] if stream else ["--no-stream"])]
    out = CliRunner().invoke(cli.app, args).stdout
    assert out.splitlines()[0] == ("red \\x1b[2J\\x1b]0;pwned\\x07car" if terminal else "".join(pieces))
    as_json = CliRunner().invoke(cli.app, [*args, "--json"]).stdout
    assert json.loads(as_json)["text"] == "".join(pieces)


def _streaming_run(tiny_pkg) -> subprocess.Popen:
    """`sleigh run` on a long answer, stdout piped to the test. SIGINT as a terminal's Ctrl-C delivers it:
    a test run started in the background (`nohup ... &`) inherits SIGINT ignored, which Python keeps."""
    return subprocess.Popen([sys.executable, "-m", "sleigh.cli", "run", "--model", str(tiny_pkg), "--prompt", "hi",
                             "--max-new-tokens", "6000", "--ignore-eos", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_is_one_line_and_130(tiny_pkg):
    """typer turned Ctrl-C into a silent exit 130, before `main` could say "interrupted"."""
    proc = _streaming_run(tiny_pkg)
    try:
        assert proc.stdout.read(1)  # the answer is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode().strip().splitlines() == ["error: interrupted"], err


def test_a_closed_stdout_ends_the_run_quietly(tiny_pkg):
    """`sleigh run ... | head -c 5`: the reader goes away; typer exited 1 there (a failed pipeline)."""
    proc = _streaming_run(tiny_pkg)
    try:
        assert proc.stdout.read(5)
        proc.stdout.close()
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", err


def test_a_closed_stdout_ends_a_table_quietly_too(tiny_pkg):
    """`sleigh inspect PKG | head -1`: rich's console exited 1 on its own there."""
    proc = subprocess.Popen([sys.executable, "-m", "sleigh.cli", "inspect", str(tiny_pkg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env())
    proc.stdout.close()  # gone before the table is written
    try:
        proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", (proc.returncode, err)


def test_the_defaults_and_ranges_help_states_are_the_libraries_own():
    """The CLI states defaults and ranges that live in the libraries (which it does not import for
    help, to stay light): each number in a help text, and each typer default, is the library's."""
    import typer.main

    from sleigh.cli import app
    from sleigh.engines import options as o
    from sleigh.engines.options import EngineOptions
    from sleigh.export.exporter import OPSET_RANGE, ExportOptions
    from sleigh.runtime.sampling import SamplingOptions
    from sleigh.serve.app import ServeSettings
    from sleigh.serve.ray_app import Scaling

    commands = typer.main.get_command(app).commands
    params = {name: {p.name: p for p in cmd.params} for name, cmd in commands.items() if hasattr(cmd, "params")}
    export, build, run, serve = params["export"], params["build-engine"], params["run"], params["serve"]
    assert (export["opset"].default, export["max_tiles"].default) == (ExportOptions().opset, ExportOptions().max_tiles)
    assert f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]}" in export["opset"].help
    assert (build["backend"].default, build["precision"].default) == (EngineOptions().backend, EngineOptions().precision)
    states = {"workspace_gb": f"default: {o.DEFAULT_WORKSPACE_GB:g})", "max_batch": f"1..{o.MAX_BATCH}",
              "builder_optimization_level": f"{min(o.BUILDER_OPTIMIZATION_LEVELS)}..{max(o.BUILDER_OPTIMIZATION_LEVELS)}",
              "opt_tiles": f"default: {o.DEFAULT_OPT_TILES} ", "opt_context": f"+ {o.OPT_TEXT_TOKENS})",
              "max_context": f"TensorRT: {o.TENSORRT_DEFAULT_CONTEXT} ", "eval_tolerance": f"default: {o.DEFAULT_EVAL_TOLERANCE})"}
    for name, text in states.items():
        assert text in build[name].help, (name, build[name].help)
    assert f"default: {o.DEFAULT_BUILDER_OPTIMIZATION_LEVEL})" in build["builder_optimization_level"].help
    sampling = SamplingOptions()
    assert [run[k].default for k in ("temperature", "top_p", "top_k", "repetition_penalty")] == \
        [sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty]
    settings, scaling = ServeSettings(model=Path(".")), Scaling()
    assert (serve["max_queue"].default, int(serve["max_body_mb"].default * 2**20), serve["max_image_pixels"].default) == \
        (settings.max_queue, settings.max_body_bytes, settings.max_image_pixels)
    assert [serve[k].default for k in ("replicas", "target_ongoing_requests", "replica_cpus", "shutdown_timeout")] == \
        [scaling.replicas, scaling.target_ongoing_requests, scaling.replica_cpus, scaling.shutdown_timeout]


def test_image_flags_without_an_image_are_named_as_ignored(tiny_pkg):
    """--tile-budget, --max-tiles and --max-pixels act on an image: given without one, they were
    silently ignored (even --max-pixels 5, which no image passes)."""
    proc = run_sleigh("run", "--model", tiny_pkg, "--prompt", "hi", "--max-new-tokens", "1", "--tile-budget", "2",
                      "--max-pixels", "5")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --max-pixels, --tile-budget: no image given, so ignored" in proc.stderr.splitlines()
