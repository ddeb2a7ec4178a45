"""Shared, expensive fixtures, each built at most once per run under pytest's session tmp folder: the
oracle checkpoint converted per GSWA mode, `sleigh init` checkpoints (tiny, demo), the tiny package.
Paths and helpers that are not fixtures are in tests/helpers.py."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import INIT_SEED, ORACLE, ORACLE_CKPT, run_sleigh, snapshot


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
def demo_ckpt(tmp_path_factory) -> Path:
    """A `sleigh init --preset demo --seed 0` checkpoint: small views, the synthetic task's tokenizer
    (read-only use)."""
    from sleigh.sleighvl.init import init_checkpoint

    dst = tmp_path_factory.mktemp("demo") / "demo-ckpt"
    init_checkpoint(dst, "demo", seed=0)
    return dst


def _contents(pkg: Path) -> dict[str, bytes]:
    """`snapshot` of a package but the runtime's own checksum cache (written on load)."""
    from sleigh.runtime.package import VERIFIED

    return {rel: data for rel, data in snapshot(pkg).items() if Path(rel).name != VERIFIED}


@pytest.fixture(scope="session")
def tiny_pkg(tiny_ckpt, tmp_path_factory):
    """`tiny_ckpt` exported with parity checked, the standard decoder (every backend's; read-only use:
    copy it before changing it; the session fails if a test changed it). The fused form's own tests:
    tests/export/test_fused_decoder.py. Under pytest-xdist the workers share one export (the first to
    take the lock builds it), since tiny_ckpt is the same seed everywhere."""
    from sleigh.export.exporter import ExportOptions, export_package

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "shared"  # pytest-N/: one per run, every worker's parent
    else:
        root = tmp_path_factory.mktemp("shared")
    root.mkdir(exist_ok=True)
    out, done = root / "tiny-pkg", root / "tiny-pkg.done"
    with open(root / "tiny-pkg.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed half-way
            export_package(tiny_ckpt, out, ExportOptions(quiet=True, decoder="standard"))
            done.touch()
    before = _contents(out)
    yield out
    assert _contents(out) == before, f"a test changed the shared package {out}: copy it first (package_copies)"


def pytest_collection_modifyitems(session, config, items):
    """Test files in this order (each file's tests kept together, in their order): the first that needs
    `tiny_pkg`, then every file that needs none, then the rest. The first worker to need the package
    exports it (about 35 s) while any other that needs it waits on its lock; so one worker starts the
    export at once, and the other has files of its own meanwhile."""
    needs = {}
    for item in items:
        needs[item.path] = needs.get(item.path, False) or "tiny_pkg" in getattr(item, "fixturenames", ())
    first = next((path for path, needed in needs.items() if needed), None)
    items.sort(key=lambda item: 0 if item.path == first else 2 if needs[item.path] else 1)  # stable
