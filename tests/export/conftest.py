from pathlib import Path

import pytest

from sleigh.export.exporter import ExportOptions, export_package
from sleigh.sleighvl.init import init_checkpoint

ORACLE = Path(__file__).parents[1] / "fixtures" / "oracle"
EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("export") / "tiny-ckpt"
    init_checkpoint(dst, "tiny", seed=1)
    return dst


@pytest.fixture(scope="session")
def tiny_pkg(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-pkg"
    export_package(tiny_ckpt, out, ExportOptions(quiet=True))
    return out
