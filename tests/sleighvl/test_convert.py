"""InternVL2 -> Sleigh conversion (`sleigh.sleighvl.convert.convert`), in process.

What the converted model computes is checked against the oracle in test_model.py; here: the config
mapping, that every source tensor arrives unchanged under its new name (wqkv rebuilt from the split
per README's layout), the three `gswa` modes, sharded input, `force`, and the refusals for what the
converter does not support. The CLI side of bad input (one line, no traceback) is in tests/test_cli.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sleigh.errors import SleighError
from sleigh.sleighvl.checkpoint import load_checkpoint
from sleigh.sleighvl.config import GSWAConfig, SleighVLConfig
from sleigh.sleighvl.convert import convert
from sleigh.sleighvl.gswa import GSWA
from tests.helpers import ORACLE_CKPT

SRC_WEIGHTS = ORACLE_CKPT / "model.safetensors"

# InternVL2 name -> Sleigh name, written out from README/DESIGN (wqkv is checked separately).
TOP = {
    "vision_model.embeddings.class_embedding": "vision.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding": "vision.embeddings.position_embedding",
    "vision_model.embeddings.patch_embedding.weight": "vision.embeddings.patch_embedding.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision.embeddings.patch_embedding.bias",
    "mlp1.0.weight": "projector.norm.weight", "mlp1.0.bias": "projector.norm.bias",
    "mlp1.1.weight": "projector.fc1.weight", "mlp1.1.bias": "projector.fc1.bias",
    "mlp1.3.weight": "projector.fc2.weight", "mlp1.3.bias": "projector.fc2.bias",
    "language_model.model.tok_embeddings.weight": "llm.embed_tokens.weight",
    "language_model.model.norm.weight": "llm.norm.weight",
    "language_model.output.weight": "llm.lm_head.weight",
}
LLM_LAYER = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def src_state() -> dict[str, torch.Tensor]:
    return load_file(str(SRC_WEIGHTS))


@pytest.fixture(scope="module")
def src_config() -> dict:
    return json.loads((ORACLE_CKPT / "config.json").read_text())


def copy_oracle(tmp_path: Path) -> Path:
    src = tmp_path / "internvl2"
    shutil.copytree(ORACLE_CKPT, src)
    return src


def assert_no_output(dst: Path) -> None:
    assert not dst.exists(), f"{dst} was left behind"
    leftovers = sorted(p.name for p in dst.parent.glob(f".{dst.name}.tmp-*"))
    assert not leftovers, f"temporary folders left behind: {leftovers}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_config_follows_the_internvl_config(oracle_ckpts, src_config, oracle_expected):
    cfg = SleighVLConfig.load(oracle_ckpts["identity"] / "config.json")
    v, t = src_config["vision_config"], src_config["llm_config"]
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_heads, cfg.vision.intermediate_size) == (
        v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["intermediate_size"])
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.layer_norm_eps, cfg.vision.qkv_bias) == (
        src_config["force_image_size"], v["patch_size"], v["layer_norm_eps"], v["qkv_bias"])
    assert (cfg.llm.vocab_size, cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.num_heads, cfg.llm.num_kv_heads,
            cfg.llm.intermediate_size) == (t["vocab_size"], t["hidden_size"], t["num_hidden_layers"],
                                           t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"])
    assert (cfg.llm.rms_norm_eps, cfg.llm.rope_theta, cfg.llm.max_position_embeddings) == (
        t["rms_norm_eps"], t["rope_theta"], t["max_position_embeddings"])
    assert (cfg.image.min_tiles, cfg.image.max_tiles, cfg.image.thumbnail) == (
        src_config["min_dynamic_patch"], src_config["max_dynamic_patch"], src_config["use_thumbnail"])
    added = json.loads((ORACLE_CKPT / "added_tokens.json").read_text())
    assert cfg.prompt.img_context_token_id == added["<IMG_CONTEXT>"] == oracle_expected["img_context_token_id"]
    assert cfg.prompt.bos_token_id == t["bos_token_id"] and cfg.prompt.eos_token_id == t["eos_token_id"]
    assert oracle_expected["eos_token_id"] in cfg.prompt.stop_token_ids  # <|im_end|>
    gen = json.loads((oracle_ckpts["identity"] / "generation_config.json").read_text())
    assert tuple(gen["stop_token_ids"]) == cfg.prompt.stop_token_ids
    assert sorted(p.name for p in oracle_ckpts["identity"].iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("mode", ["identity", "none"])
def test_every_tensor_arrives_unchanged(oracle_ckpts, src_state, src_config, mode):
    out = weights(oracle_ckpts[mode])
    t = src_config["llm_config"]
    layers, nh, nkv = t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"]
    hd, D = t["hidden_size"] // nh, t["hidden_size"]
    groups = nh // nkv
    expected_names = set()
    for key, x in src_state.items():
        if key in TOP:
            name = TOP[key]
        elif key.startswith("vision_model.encoder.layers."):
            name = "vision.layers." + key.removeprefix("vision_model.encoder.layers.")
        elif key.endswith("attention.wqkv.weight"):
            i = key.split(".")[3]
            q, k, v = (out[f"llm.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv")
            assert q.shape == (nh * hd, D) and k.shape == v.shape == (nkv * hd, D)
            q, k, v = q.reshape(nh, hd, D), k.reshape(nkv, hd, D), v.reshape(nkv, hd, D)
            # README: for each KV head g, [its query heads, k_g, v_g], each head_dim rows
            rebuilt = torch.cat([torch.cat([q[g * groups:(g + 1) * groups].reshape(-1, D), k[g], v[g]])
                                 for g in range(nkv)])
            assert torch.equal(rebuilt, x), key
            expected_names |= {f"llm.layers.{i}.self_attn.{n}_proj.weight" for n in "qkv"}
            continue
        else:
            i, rest = key.removeprefix("language_model.model.layers.").split(".", 1)
            name = f"llm.layers.{i}.{LLM_LAYER[rest]}"
        assert torch.equal(out[name], x), f"{key} -> {name}"
        expected_names.add(name)
    assert len(src_state) + 2 * layers == len(expected_names)
    extra = sorted(set(out) - expected_names)
    if mode == "none":
        assert extra == []
    else:
        assert extra and all(k.startswith("gswa.") for k in extra)
        assert out["gswa.alpha"].item() == 0.0


def test_gswa_modes_in_the_config(oracle_ckpts):
    identity = SleighVLConfig.load(oracle_ckpts["identity"] / "config.json")
    none = SleighVLConfig.load(oracle_ckpts["none"] / "config.json")
    assert none.gswa is None
    assert identity.gswa is not None and identity.gswa.apply == "attention"
    assert identity.gswa.width(identity.vision.hidden_size) > identity.vision.hidden_size  # DESIGN: Dg > Cv
    assert json.loads((oracle_ckpts["none"] / "config.json").read_text())["gswa"] is None


@pytest.mark.parametrize("prefixed", [False, True])
def test_gswa_from_a_trained_file(tmp_path, oracle_ckpts, prefixed):
    torch.manual_seed(4)
    gcfg = GSWAConfig(hidden_size=48, num_layers=3, num_heads=3, layer_norm_eps=1e-5, apply="scale")
    module = GSWA(gcfg, 32)
    with torch.no_grad():
        module.alpha.fill_(0.7)
    state = {("gswa." if prefixed else "") + k: v.detach().clone() for k, v in module.state_dict().items()}
    path = tmp_path / "gswa.safetensors"
    save_file(state, str(path), metadata={"num_heads": "3", "apply": "scale", "layer_norm_eps": "1e-5"})

    dst = tmp_path / "ckpt"
    cfg = convert(ORACLE_CKPT, dst, gswa=str(path))
    assert cfg.gswa == gcfg
    assert SleighVLConfig.load(dst / "config.json").gswa == gcfg
    out = weights(dst)
    for k, v in module.state_dict().items():
        assert torch.equal(out[f"gswa.{k}"], v), k
    base = weights(oracle_ckpts["none"])
    assert all(torch.equal(out[k], v) for k, v in base.items())

    model, _, _ = load_checkpoint(dst)
    cls = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(model.gswa(cls), module(cls))


def test_gswa_file_for_another_vision_width(tmp_path):
    path = tmp_path / "gswa.safetensors"
    save_file({k: v.detach().clone() for k, v in GSWA(GSWAConfig(hidden_size=64), 48).state_dict().items()}, str(path))
    dst = tmp_path / "ckpt"
    with pytest.raises(SleighError, match="GSWA input width 48 != vision hidden 32"):
        convert(ORACLE_CKPT, dst, gswa=str(path))
    assert_no_output(dst)


def test_sharded_checkpoint_converts_like_the_single_file(tmp_path, src_state, oracle_ckpts):
    src = copy_oracle(tmp_path)
    (src / "model.safetensors").unlink()
    keys = sorted(src_state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: src_state[k] for k in names}, str(src / shard))
        weight_map.update(dict.fromkeys(names, shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dst = tmp_path / "ckpt"
    convert(src, dst, gswa="none")
    got, want = weights(dst), weights(oracle_ckpts["none"])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    # a tensor the index lists but no shard holds
    weight_map["language_model.model.norm.extra"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SleighError, match="language_model.model.norm.extra"):
        convert(src, tmp_path / "ckpt2", gswa="none")
    assert_no_output(tmp_path / "ckpt2")

    # a tensor in two shards (the index names the first; the second's copy silently won)
    del weight_map["language_model.model.norm.extra"]
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    name = next(k for k, v in weight_map.items() if v == "model-00001-of-00002.safetensors")
    second = src / "model-00002-of-00002.safetensors"
    save_file({**{k: src_state[k] for k in shards[second.name]}, name: torch.zeros_like(src_state[name])}, str(second))
    with pytest.raises(SleighError, match=f"tensor {name} is in two shards"):
        convert(src, tmp_path / "ckpt3", gswa="none")
    assert_no_output(tmp_path / "ckpt3")


def test_pickle_weights_are_never_loaded(tmp_path):
    src = copy_oracle(tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(SleighError, match="pickle is never loaded"):
        convert(src, tmp_path / "ckpt")
    assert_no_output(tmp_path / "ckpt")


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: s.__setitem__("mlp1.1.weight", s["mlp1.1.weight"].T.contiguous()),
     r"wrong shape 1: projector\.fc1\.weight"),
    (lambda s: s.__setitem__("language_model.model.layers.0.attention.wqkv.weight", torch.zeros(96, 64)),
     r"language_model\.model\.layers\.0\.attention\.wqkv\.weight.*shape \(96, 64\)"),
    (lambda s: s.__setitem__("vision_model.encoder.layers.0.attn.q_norm.weight", torch.ones(32)),
     r"unexpected tensors 1: vision_model\.encoder\.layers\.0\.attn\.q_norm\.weight"),
    (lambda s: s.pop("vision_model.encoder.layers.1.ls2"), r"missing 1 tensors: vision_model\.encoder\.layers\.1\.ls2"),
])
def test_bad_tensors_are_refused(tmp_path, src_state, edit, pattern):
    src = copy_oracle(tmp_path)
    state = dict(src_state)
    edit(state)
    save_file(state, str(src / "model.safetensors"))
    dst = tmp_path / "ckpt"
    with pytest.raises(SleighError, match=pattern):
        convert(src, dst)
    assert_no_output(dst)


@pytest.mark.parametrize("edit, word", [
    (lambda c: c.update(ps_version="v1"), "ps_version"),
    (lambda c: c.update(downsample_ratio=0.25), "downsample_ratio"),
    (lambda c: c.update(select_layer=-4), "select_layer"),
    (lambda c: c.update(template="Hermes-2"), "template"),
    (lambda c: c["vision_config"].update(qk_normalization=True), "qk_normalization"),
    (lambda c: c["llm_config"].update(architectures=["Qwen2ForCausalLM"], model_type="qwen2"), "Qwen2ForCausalLM"),
    (lambda c: c.update(model_type="llava", architectures=["LlavaForConditionalGeneration"]), "not InternVL2"),
])
def test_unsupported_configs_are_refused(tmp_path, edit, word):
    src = copy_oracle(tmp_path)
    raw = json.loads((src / "config.json").read_text())
    edit(raw)
    (src / "config.json").write_text(json.dumps(raw))
    dst = tmp_path / "ckpt"
    with pytest.raises(SleighError, match=word):
        convert(src, dst)
    assert_no_output(dst)


def test_force_replaces_a_non_empty_folder(tmp_path, oracle_ckpts):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me unless --force")
    with pytest.raises(SleighError, match="not empty"):
        convert(ORACLE_CKPT, dst, gswa="none")
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    convert(ORACLE_CKPT, dst, gswa="none", force=True)
    assert not (dst / "old.txt").exists()
    got, want = weights(dst), weights(oracle_ckpts["none"])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_empty_destination_folder_is_fine(tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    convert(ORACLE_CKPT, dst, gswa="none")
    assert (dst / "config.json").is_file()


@pytest.mark.parametrize("shard, problem", [("../outside.safetensors", "points outside the folder"),
                                            ("ABSOLUTE", "is an absolute path"),
                                            ("link.safetensors", "outside the folder (through a symlink)"),
                                            (".", "names the folder itself"),
                                            (7, "bad safetensors index")])
def test_index_shards_outside_the_source_folder_are_refused(tmp_path, src_state, shard, problem):
    """A shard path in model.safetensors.index.json must stay inside the source folder (symlinks
    included); the shard outside is a complete, valid file, so only the confinement check refuses it."""
    src = copy_oracle(tmp_path)
    (src / "model.safetensors").unlink()
    outside = tmp_path / "outside.safetensors"
    save_file(src_state, str(outside))
    (src / "link.safetensors").symlink_to(outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(src_state, shard)}))
    with pytest.raises(SleighError, match="model.safetensors.index.json") as err:
        convert(src, tmp_path / "ckpt", gswa="none")
    assert problem in str(err.value)
    assert_no_output(tmp_path / "ckpt")


def test_a_gswa_file_that_holds_more_than_gswa_is_named(tmp_path, oracle_ckpts):
    """A whole checkpoint given as --gswa was blamed on the source ("weights do not match the config")."""
    whole = oracle_ckpts["identity"] / "model.safetensors"
    dst = tmp_path / "ckpt"
    with pytest.raises(SleighError) as e:
        convert(ORACLE_CKPT, dst, gswa=str(whole))
    assert str(e.value).startswith(f"{whole} | not this model's GSWA weights (unexpected "), str(e.value)
    assert_no_output(dst)


def test_a_missing_source_folder_is_not_found(tmp_path):
    """`sleigh convert nonexist DST` said "not a folder"."""
    with pytest.raises(SleighError, match=r"nonexist \| not found\. Expected: an InternVL2 checkpoint folder"):
        convert(tmp_path / "nonexist", tmp_path / "out")
    assert not (tmp_path / "out").exists()
