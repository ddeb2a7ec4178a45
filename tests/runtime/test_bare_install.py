"""The runtime installs without extras into a bare venv and runs a package made beforehand:
no torch, transformers or onnx come with it."""

import json
import subprocess
import venv

import pytest

from tests.helpers import ROOT



@pytest.mark.slow
def test_bare_venv_runs_a_package(tiny_pkg, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "onnxruntime" in names and "tokenizers" in names
    assert not names & {"torch", "transformers", "onnx", "onnxscript"}, names
    run = subprocess.run([str(env_dir / "bin" / "sleigh"), "run", str(ROOT / "examples" / "coffee.jpg"),
                          "--model", str(tiny_pkg), "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["backend"].startswith("onnxruntime") and out["views"] > 1
    help_out = subprocess.run([str(env_dir / "bin" / "sleigh"), "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "export" in help_out.stdout
