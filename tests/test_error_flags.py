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

import pytest

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


# A clause that names another command to run may name that command's flags: "(sleigh build-engine
# --precision int8)", "rebuild with a larger --max-context", "an engine built with a larger --max-batch".
OTHER_COMMAND = re.compile(r"(sleigh [a-z-]+|rebuil[dt]|built with)[^,;()]*$")


def library_flags(path: Path) -> list[tuple[int, str]]:
    """(line, flag) for each --flag that a SleighError raised in `path` asks its caller to pass: in any
    part of the message (f-string parts and the module's string constants it names included), except
    in a clause that names another command to run."""
    tree = ast.parse(path.read_text(), str(path))
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        name = isinstance(node, ast.Call) and (getattr(node.func, "id", None) or getattr(node.func, "attr", None))
        if name != "SleighError":
            continue
        for sub in ast.walk(node):
            text = sub.value if isinstance(sub, ast.Constant) else constants.get(getattr(sub, "id", None))
            if isinstance(text, str):
                found += [(sub.lineno, m.group()) for m in FLAG.finditer(text)
                          if not OTHER_COMMAND.search(text[:m.start()])]
    return found


def test_library_errors_name_parameters_not_flags(tmp_path):
    """A library caller (or the server's client) passes `max_new_tokens=`, not `--max-new-tokens`: the
    runtime, bench and eval name the parameter, in what the error is about and in its remedy, and the
    CLI maps it to its flag (cli._as_flags)."""
    flagged = [f"{p.relative_to(SLEIGH.parent)}:{line} {f}" for p in LIBRARY for line, f in library_flags(p)]
    assert not flagged, "library errors that name a CLI flag:\n" + "\n".join(flagged)
    bad = tmp_path / "bad.py"  # negative control: flags in `what`, in f-string parts, in a named constant
    bad.write_text('HOW = "fewer tiles (--max-tiles), or a smaller engine (sleigh build-engine --precision int8)"\n'
                   'def f(x):\n'
                   '    raise SleighError(f"--backend {x}", "problem", f"{x} or --max-new-tokens, or {HOW}")\n'
                   'def g():\n'
                   '    raise SleighError("x", "p", "rebuild with a larger --max-context, an engine built with --max-batch")\n')
    assert sorted(library_flags(bad)) == [(3, "--backend"), (3, "--max-new-tokens"), (3, "--max-tiles")]  # HOW where named


def test_the_cli_names_the_flags_a_library_remedy_names_as_parameters():
    """`sleigh run` maps the parameters in a library error's remedy to its flags (snake_case names
    only: "a shorter prompt" stays a phrase), and leaves other errors as they are."""
    from sleigh.cli import _as_flags
    from sleigh.errors import SleighError

    with pytest.raises(SleighError) as e, _as_flags("prompt", "max_tiles", "max_new_tokens"):
        raise SleighError("prompt", "too long", "fewer tiles (max_tiles), a shorter prompt or a smaller max_new_tokens")
    assert str(e.value).startswith("--prompt | too long")
    assert e.value.expected == "fewer tiles (--max-tiles), a shorter prompt or a smaller --max-new-tokens"
    with pytest.raises(SleighError) as e, _as_flags("max_tiles"):  # `what` not a parameter: the remedy still maps
        raise SleighError("max_memory=2.00 GB", "too small", "fewer tiles (max_tiles) or top_p")
    assert e.value.what == "max_memory=2.00 GB" and e.value.expected == "fewer tiles (--max-tiles) or top_p"
    error = SleighError("engine", "missing", "an engine built with `sleigh build-engine`")
    with pytest.raises(SleighError) as e, _as_flags("max_tiles"):
        raise error
    assert e.value is error
