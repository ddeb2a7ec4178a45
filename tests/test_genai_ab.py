"""benchmarks/genai_ab.py writes a Sleigh checkpoint's LLM as a Hugging Face `LlamaForCausalLM` folder,
which onnxruntime-genai's builder then reads: transformers' own Llama loaded from that folder must give
Sleigh's logits (the benchmark's speed comparison is only meaningful on the same model)."""

import json
import sys

import pytest

from tests.helpers import ROOT

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "benchmarks"))

import genai_ab  # noqa: E402


@pytest.fixture(scope="module")
def llama_folder(tiny_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("hf-llama")
    model, cfg = genai_ab.write_llama_folder(tiny_ckpt, dst)
    return model, cfg, dst


def test_llama_folder_reproduces_sleigh_llm(llama_folder):
    model, cfg, dst = llama_folder
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["rope_parameters"]["rope_theta"] == cfg.llm.rope_theta
    ids = list(range(5, 5 + 3 * 7, 3))  # 7 positions: RoPE at several angles
    err, std = genai_ab.mapping_error(model, dst, ids)
    assert std > 0.1  # not a degenerate comparison
    assert err < genai_ab.MAPPING_TOL


def test_mapping_check_has_power(llama_folder, tmp_path):
    """A folder with InternLM2's rope base replaced by Llama's default (10000) fails the check."""
    model, cfg, dst = llama_folder
    for f in dst.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    err, _ = genai_ab.mapping_error(model, tmp_path, list(range(5, 5 + 3 * 7, 3)))
    assert err > 100 * genai_ab.MAPPING_TOL
