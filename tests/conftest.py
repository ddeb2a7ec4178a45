"""Shared, expensive fixtures: the oracle checkpoint converted once per GSWA mode, one `sleigh init`
tiny checkpoint, and a runner for the `sleigh` CLI in a subprocess.

Everything is written under pytest's session tmp folder and built at most once per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ORACLE = Path(__file__).parent / "fixtures" / "oracle"
ORACLE_CKPT = ORACLE / "internvl2-tiny"
ASTRONAUT = ORACLE / "astronaut.png"
INIT_SEED = 3
CLI_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def oracle_expected() -> dict:
    """expected.json from the original InternVL code."""
    return json.loads((ORACLE / "expected.json").read_text())


class _Converted:
    """The oracle InternVL2 checkpoint converted with `gswa=mode`, converted on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[str, Path] = {}

    def __getitem__(self, mode: str) -> Path:
        if mode not in self._dirs:
            from sleigh.sleighvl.convert import convert

            dst = self.root / f"oracle-{mode}"
            convert(ORACLE_CKPT, dst, gswa=mode)
            self._dirs[mode] = dst
        return self._dirs[mode]


@pytest.fixture(scope="session")
def oracle_ckpts(tmp_path_factory) -> _Converted:
    """`oracle_ckpts["identity"]`, `oracle_ckpts["none"]`: converted checkpoint folders (read-only use)."""
    return _Converted(tmp_path_factory.mktemp("converted"))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SLEIGH_DEBUG", None)  # tracebacks on request only: the tests check there are none
    env.pop("SLEIGH_MODEL", None)
    env["COLUMNS"] = "200"  # rich wraps help text to the terminal; keep every description on one line
    env["NO_COLOR"] = "1"
    env["TERM"] = "dumb"
    return env


def run_sleigh(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`sleigh ARGS...` in a fresh interpreter (the installed package, this venv)."""
    return subprocess.run([sys.executable, "-m", "sleigh.cli", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=CLI_TIMEOUT_S)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A user error's contract: non-zero exit, no traceback, exactly one `error:` line on stderr."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="session")
def sleigh_cli():
    """Callable: sleigh_cli("run", image, "--model", ckpt) -> CompletedProcess (text mode)."""
    return run_sleigh


@pytest.fixture(scope="session")
def init_ckpt(tmp_path_factory) -> Path:
    """`sleigh init DST --preset tiny --seed 3`, through the CLI. Read-only for the tests that use it."""
    dst = tmp_path_factory.mktemp("init") / "tiny-seed3"
    proc = run_sleigh("init", dst, "--preset", "tiny", "--seed", INIT_SEED)
    assert proc.returncode == 0, proc.stderr
    return dst


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A `sleigh init --preset tiny --seed 1` checkpoint (GSWA active)."""
    from sleigh.sleighvl.init import init_checkpoint

    dst = tmp_path_factory.mktemp("tiny") / "tiny-ckpt"
    init_checkpoint(dst, "tiny", seed=1)
    return dst


@pytest.fixture(scope="session")
def tiny_pkg(tiny_ckpt, tmp_path_factory) -> Path:
    """`tiny_ckpt` exported with parity checked (read-only use: copy it before changing it)."""
    from sleigh.export.exporter import ExportOptions, export_package

    out = tmp_path_factory.mktemp("tiny") / "tiny-pkg"
    export_package(tiny_ckpt, out, ExportOptions(quiet=True))
    return out
