"""The supported onnxruntime range (runtime/compat.py): the floor pyproject.toml declares is the one
the runtime enforces, an older onnxruntime is refused in one line, and a package of an older schema
asks for a re-export."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from sleigh.errors import SleighError
from sleigh.runtime.compat import ONNXRUNTIME_MIN, check_onnxruntime, parse_version
from tests.helpers import ROOT, cli_env, one_error_line

PYPROJECT = ROOT / "pyproject.toml"


def declared_floor(package: str) -> tuple[int, int, int]:
    found = re.findall(rf'"{re.escape(package)}>=([0-9.]+)"', PYPROJECT.read_text())
    assert len(found) == 1, f"one {package}>= floor in pyproject.toml, found {found}"
    return parse_version(found[0])


def test_pyproject_declares_the_floor_the_runtime_enforces():
    assert declared_floor("onnxruntime") == ONNXRUNTIME_MIN
    assert declared_floor("onnxruntime-gpu") == ONNXRUNTIME_MIN


def test_the_installed_onnxruntime_is_in_range():
    import onnxruntime

    check_onnxruntime(onnxruntime.__version__)


@pytest.mark.parametrize("text,version", [("1.31.1", (1, 31, 1)), ("1.20", (1, 20, 0)), ("1.22.0+cu126", (1, 22, 0)),
                                          ("1.21.0.dev20240101", (1, 21, 0)), ("2", (2, 0, 0))])
def test_parse_version(text, version):
    assert parse_version(text) == version


@pytest.mark.parametrize("old", ["1.21.1", "1.20.0", "0.9", "1.21.99+cu126"])
def test_older_onnxruntime_is_refused(old):
    with pytest.raises(SleighError) as e:
        check_onnxruntime(old)
    floor = ".".join(map(str, ONNXRUNTIME_MIN))
    assert f"onnxruntime {old}" in str(e.value) and f"onnxruntime>={floor}" in str(e.value)


@pytest.mark.parametrize("ok", ["1.22.0", "1.31.1", "1.32.0", "2.0.0", "nightly"])
def test_supported_or_unparsable_versions_pass(ok):
    check_onnxruntime(ok)


def run_with_onnxruntime_version(version: str, *args: str) -> subprocess.CompletedProcess:
    """`sleigh ARGS` in a fresh interpreter whose onnxruntime reports `version`."""
    code = ("import sys, onnxruntime; onnxruntime.__version__ = sys.argv[1]; sys.argv = ['sleigh', *sys.argv[2:]]; "
            "from sleigh.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, version, *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


def test_run_with_an_old_onnxruntime_is_one_line(tiny_pkg):
    line = one_error_line(run_with_onnxruntime_version("1.21.1", "run", "--model", str(tiny_pkg), "--prompt", "hi",
                                                       "--max-new-tokens", "1"))
    assert "onnxruntime 1.21.1" in line and "older than" in line
    proc = run_with_onnxruntime_version(".".join(map(str, ONNXRUNTIME_MIN)), "run", "--model", str(tiny_pkg),
                                        "--prompt", "hi", "--max-new-tokens", "1")
    assert proc.returncode == 0, proc.stderr


def test_a_package_of_an_older_schema_asks_for_a_re_export(tiny_pkg, tmp_path):
    old = tmp_path / "schema2-pkg"
    shutil.copytree(tiny_pkg, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 2  # decoders of schema 2 reduced over the empty slot axis and returned every logit
    (old / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "sleigh.cli", "run", "--model", str(old), "--prompt", "hi"],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert "re-export" in one_error_line(proc)
