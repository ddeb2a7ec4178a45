"""A package and its engines made under one onnxruntime run under another (README "Tested versions").

`.ci/run` makes them under the newest onnxruntime,

    python -m tests.runtime.test_cross_version DIR

and, after installing an older onnxruntime, runs this file with SLEIGH_CROSS_PKG=DIR: every engine
loads and runs, the FP32 package gives the greedy tokens recorded where it was made, and every
engine's last prompt logits match the recorded ones. Skipped without SLEIGH_CROSS_PKG.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import EXAMPLES

RECORD = "cross_version.json"
PROMPT, NEW_TOKENS = "Describe the image.", 8
# The same engine file under two onnxruntime versions: only kernel choices differ (FP16 and INT8
# accumulation orders), far less than the accuracy gate allows between precisions.
LOGITS_COS_MIN = 0.999


def _engines(manifest) -> list[str]:
    return ["package", *sorted(manifest.engines)]


def _run(pkg: Path, engine: str) -> tuple[list[int], np.ndarray]:
    from sleigh.runtime.pipeline import Pipeline

    pipe = Pipeline.load(pkg, backend="onnxruntime", engine=engine)
    tokens = pipe.generate(EXAMPLES / "coffee.jpg", PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).result.token_ids
    logits = pipe.prefill(EXAMPLES / "coffee.jpg", PROMPT).logits.reshape(-1)
    return list(map(int, tokens)), logits.astype(np.float32)


def make(root: Path) -> None:
    """A tiny package with FP16, INT8 and INT4 engines, and what each gives under this onnxruntime."""
    import onnxruntime

    from sleigh.engines.calibration.collect import calibrate_package
    from sleigh.engines.build_engine import EngineOptions, build_engine
    from sleigh.export.exporter import ExportOptions, export_package
    from sleigh.runtime.manifest import read_manifest
    from sleigh.sleighvl.init import init_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    init_checkpoint(root / "ckpt", "tiny", seed=5)
    pkg = root / "pkg"
    export_package(root / "ckpt", pkg, ExportOptions(quiet=True, force=True))
    calibrate_package(pkg, EXAMPLES, quiet=True)
    for opts in (EngineOptions(precision="fp16", quiet=True), EngineOptions(precision="int8", allow_degraded=True, quiet=True),
                 EngineOptions(precision="fp32", llm_weights="int4", allow_degraded=True, quiet=True)):
        build_engine(pkg, opts)
    record = {"onnxruntime": onnxruntime.__version__, "engines": {}}
    for engine in _engines(read_manifest(pkg)):
        tokens, logits = _run(pkg, engine)
        np.save(root / f"{engine}.logits.npy", logits)
        record["engines"][engine] = {"tokens": tokens}
    (root / RECORD).write_text(json.dumps(record, indent=1))


ROOT = Path(os.environ["SLEIGH_CROSS_PKG"]) if os.environ.get("SLEIGH_CROSS_PKG") else None
pytestmark = pytest.mark.skipif(ROOT is None, reason="SLEIGH_CROSS_PKG not set (.ci/run sets it after an onnxruntime swap)")


def test_every_engine_made_under_another_onnxruntime_runs_alike():
    import onnxruntime

    from sleigh.runtime.manifest import read_manifest

    record = json.loads((ROOT / RECORD).read_text())
    manifest = read_manifest(ROOT / "pkg")
    assert set(record["engines"]) == set(_engines(manifest)) and len(record["engines"]) == 4
    if record["onnxruntime"] == onnxruntime.__version__:
        pytest.skip(f"made under this onnxruntime ({onnxruntime.__version__}): nothing crosses versions")
    for engine, made in record["engines"].items():
        tokens, logits = _run(ROOT / "pkg", engine)
        ref = np.load(ROOT / f"{engine}.logits.npy")
        cos = float(logits @ ref / (np.linalg.norm(logits) * np.linalg.norm(ref)))
        assert cos >= LOGITS_COS_MIN, f"{engine}: last prompt logits cosine {cos:.6f} against {record['onnxruntime']}"
        if engine == "package":  # FP32: the same greedy tokens
            assert tokens == made["tokens"], f"{engine}: tokens differ from those under {record['onnxruntime']}"


if __name__ == "__main__":
    make(Path(sys.argv[1]))
