"""Every `--flag` that a message of Sleigh tells the user to pass exists on some `sleigh` command.

The messages are read from the source: every string constant (f-string parts included) in the
arguments of a call to an error type (`SleighError(...)`, `GateFailed(...)`, a subclass's
`super().__init__(...)`) or of a warning (`warn(...)`, `logger.warning(...)`). The flags are those the
typer app registers, which is what `sleigh COMMAND --help` lists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SLEIGH = Path(__file__).parents[1] / "sleigh"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MESSAGE_CALLS = re.compile(r"(Error|^GateFailed|^__init__|^warn|^warning|^_err)$")


def message_flags(path: Path) -> list[tuple[int, str]]:
    """(line, flag) for each --flag in a message built in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None) or ""
        if not MESSAGE_CALLS.search(name):
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            for sub in ast.walk(arg):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found += [(sub.lineno, f) for f in FLAG.findall(sub.value)]
    return found


def cli_flags() -> set[str]:
    """Every option of every `sleigh` command and sub-command, and --help (click adds it to each)."""
    import typer.main

    from sleigh.cli import app

    def walk(cmd) -> set[str]:
        flags = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
        for sub in getattr(cmd, "commands", {}).values():
            flags |= walk(sub)
        return flags

    return walk(typer.main.get_command(app)) | {"--help"}


def test_every_flag_a_message_names_exists():
    flags = cli_flags()
    assert {"--backend", "--plugin-library", "--workspace-gb", "--max-batch", "--name", "--threads"} <= flags
    named = [(path, line, f) for path in sorted(SLEIGH.rglob("*.py")) for line, f in message_flags(path)]
    assert len(named) > 50  # the scan sees the messages
    unknown = [f"{path.relative_to(SLEIGH.parent)}:{line} {f}" for path, line, f in named if f not in flags]
    assert not unknown, "messages name flags that no sleigh command has:\n" + "\n".join(unknown)


def test_the_scan_sees_a_flag_in_an_error(tmp_path):
    """Negative control: a made-up flag in a SleighError, an f-string part and a subclass's message."""
    bad = tmp_path / "bad.py"
    bad.write_text('def f(x):\n'
                   '    raise SleighError("--no-such-flag", "problem", f"{x} or --nor-this")\n'
                   'class E(SleighError):\n'
                   '    def __init__(self):\n'
                   '        super().__init__("engine", "bad", "--nor-that")\n'
                   'HELP = "--not-a-message"\n')
    assert sorted(f for _, f in message_flags(bad)) == ["--no-such-flag", "--nor-that", "--nor-this"]
    assert not {"--no-such-flag", "--nor-this", "--nor-that"} & cli_flags()


LIBRARY = [*sorted((SLEIGH / "runtime").rglob("*.py")), SLEIGH / "bench.py", SLEIGH / "evaluate.py"]


def what_flags(path: Path) -> list[tuple[int, str]]:
    """(line, flag) for each --flag in the first argument (`what`) of a SleighError raised in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        name = isinstance(node, ast.Call) and (getattr(node.func, "id", None) or getattr(node.func, "attr", None))
        if name == "SleighError" and node.args:
            found += [(sub.lineno, f) for sub in ast.walk(node.args[0])
                      if isinstance(sub, ast.Constant) and isinstance(sub.value, str) for f in FLAG.findall(sub.value)]
    return found


def test_library_errors_name_parameters_not_flags(tmp_path):
    """A library caller (or the server's client) passes `max_new_tokens=`, not `--max-new-tokens`: the
    runtime, bench and eval name the parameter, and the CLI maps it to its flag (cli._as_flags)."""
    flagged = [f"{p.relative_to(SLEIGH.parent)}:{line} {f}" for p in LIBRARY for line, f in what_flags(p)]
    assert not flagged, "library errors that name a CLI flag:\n" + "\n".join(flagged)
    bad = tmp_path / "bad.py"  # negative control: the scan sees a flag in `what`, f-string parts included
    bad.write_text('def f(x):\n    raise SleighError(f"--backend {x}", "problem", "--not-what")\n')
    assert what_flags(bad) == [(2, "--backend")]
