"""InternVL2 checkpoint (`InternVLChatModel`, InternLM2 LLM) -> Sleigh checkpoint.

Reads config.json, single or sharded safetensors and tokenizer.model; never executes the
checkpoint's remote code. The key map is explicit and strict. What it changes on the way:

- `wqkv` (InternLM2's fused projection, rows grouped per KV head as [q heads of the group, k, v])
  is split into Llama-form `q_proj`, `k_proj`, `v_proj`;
- `mlp1.0/.1/.3` become `projector.norm/.fc1/.fc2`;
- InternLM2 names become Llama names (w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sleigh.errors import SleighError, check_folder
from sleigh.runtime.package import inside, read_json
from sleigh.runtime.prompt import BOS, EOS, IM_END, IMG_CONTEXT
from sleigh.sleighvl.config import GSWAConfig, ImageConfig, LLMConfig, PromptConfig, SleighVLConfig, VisionConfig
from sleigh.staging import check_apart, prepare_output_dir

if TYPE_CHECKING:  # torch is imported where weights are read: the path and config checks come first, in 0.5 s
    import torch

_VISION_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")
_LLM_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)")
_LLM_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "vision_model.embeddings.class_embedding": "vision.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "vision.embeddings.patch_embedding.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision.embeddings.patch_embedding.bias",
    "vision_model.embeddings.position_embedding": "vision.embeddings.position_embedding",
    "mlp1.0.weight": "projector.norm.weight",
    "mlp1.0.bias": "projector.norm.bias",
    "mlp1.1.weight": "projector.fc1.weight",
    "mlp1.1.bias": "projector.fc1.bias",
    "mlp1.3.weight": "projector.fc2.weight",
    "mlp1.3.bias": "projector.fc2.bias",
    "language_model.model.tok_embeddings.weight": "llm.embed_tokens.weight",
    "language_model.model.norm.weight": "llm.norm.weight",
    "language_model.output.weight": "llm.lm_head.weight",
}
_VISION_LAYER_KEYS = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "ls1", "ls2",
                      "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "norm1.weight",
                      "norm1.bias", "norm2.weight", "norm2.bias"}


def _require(cond: bool, what: str, problem: str, expected: str) -> None:
    if not cond:
        raise SleighError(what, problem, expected)


def read_internvl_config(src: Path) -> dict:
    path = src / "config.json"
    check_folder(src, "an InternVL2 checkpoint folder")
    _require(path.is_file(), str(src), "no config.json", "an InternVL2 checkpoint folder (config.json, safetensors, tokenizer.model)")
    raw = read_json(path, "an InternVL2 config.json")
    arch = raw.get("architectures") or []
    _require(raw.get("model_type") == "internvl_chat" or "InternVLChatModel" in arch, str(path),
             f"model_type {raw.get('model_type')!r}, architectures {arch} is not InternVL2",
             "model_type 'internvl_chat' (InternVLChatModel)")
    llm = raw.get("llm_config") or {}
    llm_arch = llm.get("architectures") or []
    _require("InternLM2ForCausalLM" in llm_arch or llm.get("model_type") == "internlm2", str(path),
             f"the LLM is {llm_arch or llm.get('model_type')}, which SleighVL does not support",
             "an InternLM2 LLM (InternVL2-2B, -8B, -26B)")
    vis = raw.get("vision_config") or {}
    checks = [
        (raw.get("ps_version", "v2") == "v2", "ps_version", "v2"),
        (float(raw.get("downsample_ratio", 0.5)) == 0.5, "downsample_ratio", "0.5"),
        (raw.get("select_layer", -1) == -1, "select_layer", "-1"),
        (raw.get("template", "internlm2-chat") == "internlm2-chat", "template", "internlm2-chat"),
        (not vis.get("qk_normalization", False), "vision_config.qk_normalization", "false"),
        (vis.get("norm_type", "layer_norm") == "layer_norm", "vision_config.norm_type", "layer_norm"),
        (not llm.get("bias", False), "llm_config.bias", "false"),
    ]
    for ok, key, want in checks:
        _require(ok, str(path), f"unsupported {key}", want)
    return raw


def sleigh_config(raw: dict, tokenizer, gswa: GSWAConfig | None) -> SleighVLConfig:
    try:
        return _sleigh_config(raw, tokenizer, gswa)
    except (KeyError, TypeError, ValueError) as e:
        raise SleighError("config.json", f"InternVL2 config field missing or malformed ({e!r})",
                          "vision_config and llm_config as InternVL2 writes them") from None


def _sleigh_config(raw: dict, tokenizer, gswa: GSWAConfig | None) -> SleighVLConfig:
    vis, llm = raw["vision_config"], raw["llm_config"]
    image_size = int(raw.get("force_image_size") or vis["image_size"])
    _require(image_size == int(vis["image_size"]), "config.json", "force_image_size differs from the vision image_size",
             "equal sizes")
    return SleighVLConfig(
        vision=VisionConfig(image_size=image_size, patch_size=int(vis["patch_size"]), hidden_size=int(vis["hidden_size"]),
                            num_layers=int(vis["num_hidden_layers"]), num_heads=int(vis["num_attention_heads"]),
                            intermediate_size=int(vis["intermediate_size"]),
                            layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)), qkv_bias=bool(vis.get("qkv_bias", True))),
        llm=LLMConfig(vocab_size=int(llm["vocab_size"]), hidden_size=int(llm["hidden_size"]),
                      num_layers=int(llm["num_hidden_layers"]), num_heads=int(llm["num_attention_heads"]),
                      num_kv_heads=int(llm.get("num_key_value_heads") or llm["num_attention_heads"]),
                      intermediate_size=int(llm["intermediate_size"]), rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
                      rope_theta=float(llm.get("rope_theta", 10000.0)),
                      max_position_embeddings=int(llm.get("max_position_embeddings", 32768))),
        gswa=gswa,
        image=ImageConfig(min_tiles=int(raw.get("min_dynamic_patch", 1)), max_tiles=int(raw.get("max_dynamic_patch", 12)),
                          thumbnail=bool(raw.get("use_thumbnail", True))),
        prompt=prompt_config(tokenizer),
    )


def prompt_config(tokenizer) -> PromptConfig:
    """Special ids from a `tokenizers.Tokenizer` with the InternLM2/InternVL special tokens."""
    ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, IM_END, IMG_CONTEXT)}
    missing = [t for t, i in ids.items() if i is None]
    _require(not missing, "tokenizer", f"special tokens {missing} are missing", ", ".join(ids))
    return PromptConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], img_context_token_id=ids[IMG_CONTEXT],
                        stop_token_ids=(ids[IM_END], ids[EOS]))


def read_internvl_weights(src: Path) -> dict[str, torch.Tensor]:
    from sleigh.sleighvl.checkpoint import read_safetensors

    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "a JSON object with a weight_map").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SleighError(str(index), "bad safetensors index (weight_map is not an object of file names)",
                              "a JSON object with a weight_map")
        shards = [inside(src, shard, f"{index.name}: weight_map") for shard in sorted(set(weight_map.values()))]
        state: dict[str, torch.Tensor] = {}
        found_in: dict[str, str] = {}
        for shard in shards:  # every shard confined to the source folder before any is read
            for name, tensor in read_safetensors(shard).items():
                if name in found_in:  # the last shard read would silently win
                    raise SleighError(str(index), f"tensor {name} is in two shards, {found_in[name]} and {shard.name} "
                                      f"(weight_map names {weight_map.get(name)})", "each tensor in one shard")
                state[name], found_in[name] = tensor, shard.name
        missing = sorted(set(weight_map) - set(state))
        _require(not missing, str(index), f"tensors listed but absent from the shards: {missing[:8]}", "complete shards")
        return state
    single = src / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    bins = sorted(p.name for p in src.glob("*.bin"))
    raise SleighError(str(src), "no model.safetensors or model.safetensors.index.json" + (f" (found {bins[0]}: pickle is never loaded)" if bins else ""),
                      "safetensors weights")


def map_weights(src: dict[str, torch.Tensor], cfg: SleighVLConfig) -> dict[str, torch.Tensor]:
    """InternVL2 names -> Sleigh names, splitting wqkv. Unknown keys are collected for the strict check."""
    out: dict[str, torch.Tensor] = {}
    llm = cfg.llm
    groups = llm.num_heads // llm.num_kv_heads
    for key, t in src.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = t
        elif (m := _VISION_LAYER.fullmatch(key)) and m[2] in _VISION_LAYER_KEYS:
            out[f"vision.layers.{m[1]}.{m[2]}"] = t
        elif (m := _LLM_LAYER.fullmatch(key)) and m[2] in _LLM_RENAMES:
            out[f"llm.layers.{m[1]}.{_LLM_RENAMES[m[2]]}"] = t
        elif (m := _LLM_LAYER.fullmatch(key)) and m[2] == "attention.wqkv.weight":
            expected_rows = (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
            _require(t.shape == (expected_rows, llm.hidden_size), key, f"shape {tuple(t.shape)}",
                     f"({expected_rows}, {llm.hidden_size})")
            w = t.reshape(llm.num_kv_heads, groups + 2, llm.head_dim, llm.hidden_size)  # per KV head: [q.., k, v]
            prefix = f"llm.layers.{m[1]}.self_attn"
            out[f"{prefix}.q_proj.weight"] = w[:, :groups].reshape(llm.num_heads * llm.head_dim, llm.hidden_size)
            out[f"{prefix}.k_proj.weight"] = w[:, groups].reshape(llm.num_kv_heads * llm.head_dim, llm.hidden_size)
            out[f"{prefix}.v_proj.weight"] = w[:, groups + 1].reshape(llm.num_kv_heads * llm.head_dim, llm.hidden_size)
        else:
            out[f"<unmapped> {key}"] = t
    return out


def internvl_name(key: str) -> str:
    """The InternVL2 tensor a Sleigh key comes from (for error messages)."""
    inverse = {v: k for k, v in _TOP_RENAMES.items()}
    if key in inverse:
        return inverse[key]
    if m := re.fullmatch(r"vision\.layers\.(\d+)\.(.+)", key):
        return f"vision_model.encoder.layers.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"llm\.layers\.(\d+)\.self_attn\.[qkv]_proj\.weight", key):
        return f"language_model.model.layers.{m[1]}.attention.wqkv.weight"
    if m := re.fullmatch(r"llm\.layers\.(\d+)\.(.+)", key):
        renamed = {v: k for k, v in _LLM_RENAMES.items()}
        if m[2] in renamed:
            return f"language_model.model.layers.{m[1]}.{renamed[m[2]]}"
    return key


def _check_source_keys(state: dict[str, torch.Tensor], cfg: SleighVLConfig, src: Path) -> None:
    """Strict check in InternVL2's own names, before the Sleigh-side check."""
    import torch

    from sleigh.sleighvl.model import SleighVL

    with torch.device("meta"):
        expected = {k for k in SleighVL(cfg).state_dict() if not k.startswith("gswa.")}
    missing = sorted({internvl_name(k) for k in expected - set(state)})
    if missing:
        raise SleighError(str(src), f"missing {len(missing)} tensors: {', '.join(missing[:8])}"
                          + (f", ... (+{len(missing) - 8})" if len(missing) > 8 else ""),
                          "every tensor of an InternVL2 checkpoint of this config")


def gswa_state(mode: str, cfg: SleighVLConfig, seed: int = 0) -> tuple[GSWAConfig | None, dict[str, torch.Tensor]]:
    """GSWA for `--gswa identity|none|PATH`: config and weights (prefixed `gswa.`)."""
    if mode == "none":
        return None, {}
    if mode == "identity":
        width = GSWAConfig().width(cfg.vision.hidden_size)
        gcfg = GSWAConfig(hidden_size=width, num_heads=_default_heads(width))
        import torch

        from sleigh.sleighvl.gswa import GSWA

        torch.manual_seed(seed)
        module = GSWA(gcfg, cfg.vision.hidden_size)
        init_gswa(module)
        with torch.no_grad():
            module.alpha.zero_()  # identity: SleighVL computes exactly what InternVL2 computes
        return gcfg, {f"gswa.{k}": v.detach() for k, v in module.state_dict().items()}
    return load_gswa_file(Path(mode), cfg)


def _default_heads(dim: int) -> int:
    for heads in (16, 8, 4, 2, 1):
        if dim % heads == 0 and dim // heads >= 8:
            return heads
    return 1


def load_gswa_file(path: Path, cfg: SleighVLConfig) -> tuple[GSWAConfig, dict[str, torch.Tensor]]:
    """Trained GSWA weights: keys as `GSWA.state_dict()` (optionally prefixed `gswa.`); the
    safetensors metadata may carry `num_heads`, `apply` and `layer_norm_eps` (defaults otherwise)."""
    from safetensors import safe_open

    from sleigh.sleighvl.checkpoint import read_safetensors

    state = {k.removeprefix("gswa."): v for k, v in read_safetensors(path).items()}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    _require("proj.weight" in state, str(path), "no proj.weight tensor", "GSWA weights (proj, blocks.*, final_norm, final_qk, alpha)")
    dim, cv = state["proj.weight"].shape
    _require(cv == cfg.vision.hidden_size, str(path), f"GSWA input width {cv} != vision hidden {cfg.vision.hidden_size}",
             "GSWA weights trained for this vision encoder")
    blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    try:
        gcfg = GSWAConfig(hidden_size=int(dim), num_layers=blocks + 1,
                          num_heads=int(meta.get("num_heads", _default_heads(int(dim)))),
                          layer_norm_eps=float(meta.get("layer_norm_eps", 1e-6)), apply=meta.get("apply", "attention"))
    except ValueError as e:
        raise SleighError(str(path), f"bad GSWA metadata ({e})", "num_heads int, layer_norm_eps float") from None
    from sleigh.sleighvl.gswa import GSWA

    expected = set(GSWA(gcfg, cv).state_dict())
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    wrong = [f"{what} {len(keys)}: {', '.join(keys[:3])}" for what, keys in (("unexpected", extra), ("missing", missing)) if keys]
    _require(not wrong, str(path), f"not this model's GSWA weights ({'; '.join(wrong)})",
             "a file of GSWA weights alone (proj, blocks.*, final_norm, final_qk, alpha)")
    return gcfg, {f"gswa.{k}": v for k, v in state.items()}


def init_gswa(module) -> None:
    """Small random init for GSWA (LayerNorms at identity)."""
    import torch

    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name or name == "norm.weight":
            torch.nn.init.ones_(p)
        elif p.dim() >= 2:
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        elif name != "alpha":
            torch.nn.init.zeros_(p)


def convert(src: Path, dst: Path, *, gswa: str = "identity", force: bool = False) -> SleighVLConfig:
    """Convert an InternVL2 folder into a Sleigh checkpoint folder; returns the new config."""
    src, dst = Path(src), Path(dst)
    check_apart(dst, {"source checkpoint": src, "--gswa file": Path(gswa) if gswa not in ("identity", "none") else None})
    prepare_output_dir(dst, force)  # before torch is imported or gigabytes of weights read: a refusal costs nothing
    raw = read_internvl_config(src)

    from sleigh.sleighvl.checkpoint import GenerationConfig, build_model, save_checkpoint
    from sleigh.sleighvl.tokenizer import convert_sentencepiece

    tokenizer = convert_sentencepiece(src)
    base = sleigh_config(raw, tokenizer, gswa=None)
    gcfg, gswa_weights = gswa_state(gswa, base)
    cfg = SleighVLConfig(vision=base.vision, llm=base.llm, gswa=gcfg, image=base.image, prompt=base.prompt)
    state = map_weights(read_internvl_weights(src), cfg)
    state.update(gswa_weights)
    unmapped = sorted(k.removeprefix("<unmapped> ") for k in state if k.startswith("<unmapped>"))
    if unmapped:
        raise SleighError(str(src), f"unexpected tensors {len(unmapped)}: {', '.join(unmapped[:8])}",
                          "only InternVL2 vision_model / mlp1 / language_model tensors")
    _check_source_keys(state, cfg, src)
    model = build_model(cfg, state, str(src))
    generation = GenerationConfig(stop_token_ids=cfg.prompt.stop_token_ids)
    save_checkpoint(dst, model, tokenizer, generation, force=force)
    return cfg


__all__ = ["convert", "map_weights", "read_internvl_config", "gswa_state", "init_gswa"]
