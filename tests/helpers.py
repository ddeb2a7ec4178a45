"""What tests share that is not a fixture: the repository's paths, and the `sleigh` CLI run in a
subprocess or in this process with its user-error contract. Fixtures live in the conftest.py files."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from sleigh.runtime.prompt import TOKENS_PER_VIEW, Turn, chat_parts

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
ORACLE = ROOT / "tests" / "fixtures" / "oracle"  # the original InternVL code's outputs (see its README.md)
ORACLE_CKPT = ORACLE / "internvl2-tiny"
ASTRONAUT = ORACLE / "astronaut.png"
INIT_SEED = 3  # the `init_ckpt` fixture's seed
CLI_TIMEOUT_S = 180


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


def run_cli(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """`sleigh ARGS...` through sleigh.cli.main() in this process, so that a test's monkeypatches
    (a full disk, a read-only folder) apply: (exit code, non-empty stderr lines)."""
    from sleigh.cli import main

    monkeypatch.setattr(sys, "argv", ["sleigh", *map(str, args)])
    monkeypatch.delenv("SLEIGH_DEBUG", raising=False)
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes: to prove nothing changed. The
    sha256 cache (package.VERIFIED) is left out: checking the sources before a build that then fails
    may remember their hashes, which changes no content."""
    from sleigh.runtime.package import VERIFIED

    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != VERIFIED}


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0  # root writes through any chmod


HEAVY = ("tensorrt", "cuda", "torch", "onnx", "transformers")


def heavy_imports(module: str) -> list[str]:
    """The heavy packages that importing `module` pulls in, in a fresh interpreter."""
    code = (f"import json, sys, {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class HostCuda:
    """runtime/backends/cuda.Cuda's malloc/free/zero/copy_rows/sync on host memory: runs the TensorRT
    cache's device bookkeeping (allocation, pitches, growth) on the CPU, where it can be checked."""

    def __init__(self):
        self.buffers: dict[int, ctypes.Array] = {}

    def malloc(self, nbytes):
        buf = ctypes.create_string_buffer(max(int(nbytes), 256))
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr):
        del self.buffers[ptr]

    def zero(self, ptr, nbytes):
        ctypes.memset(ptr, 0, nbytes)

    def copy_rows(self, dst, dst_pitch, src, src_pitch, width, rows):
        for r in range(rows):
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)

    def sync(self):
        pass


def build_prompt(question: str, num_views: int = 0, *, system: str | None = None, tokens_per_view: int = TOKENS_PER_VIEW) -> str:
    """The internlm2-chat prompt of one user turn as text (`chat_parts` joined): the image block where
    the question says `<image>`, else on its own line before it; `system=None`: the default message."""
    parts = chat_parts([Turn("user", question, image=num_views > 0)], num_views, system=system,
                       tokens_per_view=tokens_per_view)
    return "".join(text for text, _ in parts)
