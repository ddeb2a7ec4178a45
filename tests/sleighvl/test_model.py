"""The reference SleighVL end to end.

1. The oracle InternVL2 checkpoint, converted with GSWA `identity` and `none`, reproduces what the
   original InternVL code computed (tests/fixtures/oracle): prompt ids, the vision encoder's last
   hidden state, `vit_embeds`, the last prompt logits and the 12 greedy tokens, both through the model
   directly (a cache-free greedy loop written here) and through `Pipeline` (KV cache, sampler, stream).
2. Checkpoints from `sleigh init` load strictly and their config round-trips; config validation.
3. Generation behaviour through `Pipeline` on the tiny `sleigh init` checkpoint: seeded sampling,
   streaming, text-only chat, max_new_tokens and the context limit, greedy tokens against the
   cache-free loop on a multi-view image with GSWA active.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.backends.base import Backend
from sleigh.runtime.image import tile_image
from sleigh.runtime.pipeline import Pipeline
from sleigh.runtime.prompt import PromptTokenizer
from sleigh.runtime.sampling import SamplingOptions
from sleigh.sleighvl.checkpoint import load_checkpoint, read_safetensors
from sleigh.sleighvl.config import PRESETS, GSWAConfig, LLMConfig, SleighVLConfig, VisionConfig
from sleigh.sleighvl.model import SleighVL
from tests.helpers import ASTRONAUT, ORACLE, ORACLE_CKPT, build_prompt, run_sleigh
from tests.sleighvl.helpers import image_rows

ORACLE_TOL = 1e-4  # float32 against the original code, max abs
GSWA_MODES = ["identity", "none"]
QUESTION = "Describe the image in detail."
SAMPLING = SamplingOptions(temperature=0.8, top_p=0.9, top_k=20, seed=7)


def oracle_array(name: str) -> np.ndarray:
    return np.load(ORACLE / name)


def oracle_text(pieces: list[str]) -> str:
    """Text of SentencePiece pieces, decoded here from the oracle's own pieces ('▁' = space, <0xNN> = byte)."""
    data = b"".join(bytes([int(p[3:5], 16)]) if len(p) == 6 and p.startswith("<0x") else p.replace("▁", " ").encode()
                    for p in pieces)
    return data.decode("utf-8", errors="replace")


def check_close(got, want, what: str, tol: float = ORACLE_TOL) -> None:
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max abs {err:.3g} > {tol}"


@torch.no_grad()
def reference_greedy(model: SleighVL, ids: list[int], pixel_values: np.ndarray | None, n: int,
                     usable: int | None = None) -> list[int]:
    """Greedy tokens, recomputing the whole sequence every step (no KV cache, no Pipeline).
    `usable`: ids the tokenizer can decode (the Pipeline never picks padded-vocabulary ids)."""
    hidden = model.cfg.llm.hidden_size
    vis = model.encode_images(torch.from_numpy(pixel_values)) if pixel_values is not None else None
    rows = image_rows(vis, hidden)
    weights = vis.gswa_weights if vis is not None else torch.ones(0)
    seq = list(ids)
    for _ in range(n):
        t = torch.tensor([seq])
        S = t.shape[1]
        logits, _ = model.llm(model.embed(t, rows), torch.ones(1, S, dtype=torch.int64), model.attention_bias(t, weights),
                              torch.arange(S)[None], model.llm.empty_cache())
        seq.append(int(logits[0, -1, :usable].argmax()))
    return seq[len(ids):]


# -- 1. the converted oracle checkpoint --------------------------------------------------------


@pytest.fixture(scope="module", params=GSWA_MODES)
def oracle(request, oracle_ckpts):
    """(mode, checkpoint folder, model, config) for each GSWA mode."""
    path = oracle_ckpts[request.param]
    model, cfg, _ = load_checkpoint(path)
    return request.param, path, model, cfg


@pytest.fixture(scope="module")
def oracle_ids(oracle_expected) -> list[int]:
    return oracle_expected["astronaut"]["input_ids"]


def test_converted_config_has_the_requested_gswa(oracle):
    mode, _, model, cfg = oracle
    if mode == "none":
        assert cfg.gswa is None and model.gswa is None
    else:
        assert cfg.gswa is not None and model.gswa.alpha.item() == 0.0


def test_prompt_ids_equal_oracle(oracle, oracle_expected, oracle_ids):
    _, path, _, cfg = oracle
    tok = PromptTokenizer.from_file(path / "tokenizer.json")
    text = build_prompt(QUESTION, num_views=1, tokens_per_view=cfg.vision.tokens_per_view)
    ids = tok.encode(text, add_bos=True)
    assert len(ids) == oracle_expected["astronaut"]["num_input_ids"] == 452
    assert ids == oracle_ids
    assert ids.count(cfg.prompt.img_context_token_id) == oracle_expected["astronaut"]["num_image_tokens"]
    assert cfg.prompt.img_context_token_id == oracle_expected["img_context_token_id"]
    _, pipe_ids = Pipeline.load(path).prepare(ASTRONAUT, QUESTION)
    assert pipe_ids == oracle_ids


@pytest.mark.parametrize("source", ["oracle_npy", "tile_image"])
def test_vision_and_logits_match_oracle(oracle, oracle_expected, oracle_ids, source):
    _, _, model, cfg = oracle
    if source == "oracle_npy":
        pv = oracle_array(oracle_expected["pixel_values_file"])
    else:
        pv = tile_image(ASTRONAUT).pixel_values
    assert pv.shape == tuple(oracle_expected["astronaut"]["pixel_values_shape"])
    with torch.no_grad():
        vis = model.encode_images(torch.from_numpy(pv))
        check_close(vis.last_hidden, oracle_array(oracle_expected["vit_last_hidden_file"]), "vision last hidden")
        check_close(vis.image_embeds, oracle_array(oracle_expected["vit_embeds_file"]), "vit_embeds")
        assert torch.equal(vis.gswa_weights, torch.ones(1))
        ids = torch.tensor([oracle_ids])
        S = ids.shape[1]
        logits, _ = model.llm(model.embed(ids, vis.image_embeds.reshape(-1, cfg.llm.hidden_size)),
                              torch.ones(1, S, dtype=torch.int64), model.attention_bias(ids, vis.gswa_weights),
                              torch.arange(S)[None], model.llm.empty_cache())
    last = logits[0, -1].numpy()
    check_close(last, oracle_array(oracle_expected["astronaut"]["last_logits_file"]), "last logits")
    top5 = oracle_expected["astronaut"]["last_logits_top5"]
    assert [int(i) for i in np.argsort(-last)[:5]] == [i for i, _ in top5]
    check_close(last[[i for i, _ in top5]], [v for _, v in top5], "top-5 logits")


def test_the_image_matters(oracle, oracle_expected, oracle_ids):
    """The oracle comparison has power: a mirrored image moves the logits far beyond the tolerance."""
    _, _, model, cfg = oracle
    pv = np.ascontiguousarray(oracle_array(oracle_expected["pixel_values_file"])[..., ::-1])
    with torch.no_grad():
        vis = model.encode_images(torch.from_numpy(pv))
        ids = torch.tensor([oracle_ids])
        S = ids.shape[1]
        logits, _ = model.llm(model.embed(ids, vis.image_embeds.reshape(-1, cfg.llm.hidden_size)),
                              torch.ones(1, S, dtype=torch.int64), torch.zeros(1, S), torch.arange(S)[None],
                              model.llm.empty_cache())
    oracle_last = oracle_array(oracle_expected["astronaut"]["last_logits_file"])
    assert np.abs(logits[0, -1].numpy() - oracle_last).max() > 100 * ORACLE_TOL


def test_an_img_context_past_the_image_rows_keeps_its_table_row(oracle):
    """InternVL's generate embeds a generated <IMG_CONTEXT> with language_model.get_input_embeddings(),
    like any token: the i-th <IMG_CONTEXT> takes image row i, and one past the rows (or with none, as
    a decode step passes) its row of the original checkpoint's tok_embeddings."""
    from safetensors.numpy import load_file

    _, _, model, cfg = oracle
    table = load_file(str(ORACLE_CKPT / "model.safetensors"))["language_model.model.tok_embeddings.weight"]
    img, D = cfg.prompt.img_context_token_id, cfg.llm.hidden_size
    rows = torch.randn(2, D)
    ids = torch.tensor([[5, img, 7, img], [img, 9, 11, 13]])  # three <IMG_CONTEXT>, two image rows
    with torch.no_grad():
        got = model.embed(ids, rows).numpy()
        alone = model.embed(torch.tensor([[img]]), torch.zeros(0, D)).numpy()
    np.testing.assert_array_equal(got[0, 1], rows[0].numpy())
    np.testing.assert_array_equal(got[0, 3], rows[1].numpy())
    np.testing.assert_allclose(got[1, 0], table[img], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1, 1:], table[[9, 11, 13]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(alone[0, 0], table[img], rtol=0, atol=1e-6)
    assert np.abs(table[img]).max() > 0  # the row is not zeros, which a schema-6 embed gave it


def test_greedy_tokens_reference_loop(oracle, oracle_expected, oracle_ids):
    _, _, model, _ = oracle
    pv = oracle_array(oracle_expected["pixel_values_file"])
    assert reference_greedy(model, oracle_ids, pv, 12) == oracle_expected["astronaut"]["greedy_12_no_eos_ids"]


def test_greedy_tokens_pipeline(oracle, oracle_expected):
    _, path, _, _ = oracle
    exp = oracle_expected["astronaut"]
    r = Pipeline.load(path, backend="torch").generate(ASTRONAUT, QUESTION, max_new_tokens=12, ignore_eos=True).result
    assert r.token_ids == exp["greedy_12_no_eos_ids"]
    assert r.text == oracle_text(exp["greedy_12_no_eos_pieces"])
    assert r.prompt_tokens == exp["num_input_ids"]
    assert (r.grid, r.views, r.gswa_weights) == ((1, 1), exp["num_views"], [1.0])
    assert r.stop_reason == "length" and r.backend == "torch"


# -- 2. init checkpoints and config -------------------------------------------------------------


def test_init_checkpoint_loads_strictly_and_config_round_trips(init_ckpt, tmp_path):
    model, cfg, gen = load_checkpoint(init_ckpt)
    state = read_safetensors(init_ckpt / "model.safetensors")
    assert sorted(state) == sorted(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.gswa is not None and model.gswa.alpha.item() == 1.0  # init: GSWA active

    tiny = PRESETS["tiny"]
    assert (cfg.vision, cfg.llm, cfg.gswa, cfg.image) == (tiny.vision, tiny.llm, tiny.gswa, tiny.image)
    tok = PromptTokenizer.from_file(init_ckpt / "tokenizer.json")
    assert cfg.prompt.img_context_token_id == tok.img_context_id
    assert cfg.prompt.bos_token_id == tok.bos_id
    assert set(cfg.prompt.stop_token_ids) == {tok.im_end_id, tok.eos_id} == set(gen.stop_token_ids)  # <|im_end|>, </s>

    raw = json.loads((init_ckpt / "config.json").read_text())
    assert SleighVLConfig.from_dict(raw) == cfg
    cfg.save(tmp_path / "config.json")
    assert SleighVLConfig.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text()) == raw


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    """A checkpoint is readable by whom the umask lets read it: the staging folder is 0700 and
    safetensors writes 0600 by itself (as onnx's external data, which packages already mend)."""
    import os
    import stat

    from sleigh.sleighvl.init import init_checkpoint

    old = os.umask(0o027)
    try:
        init_checkpoint(tmp_path / "ck", "tiny", 3)
    finally:
        os.umask(old)
    folder = tmp_path / "ck"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_load_rejects_a_wrong_shape(init_ckpt, tmp_path):
    from safetensors.torch import save_file

    state = read_safetensors(init_ckpt / "model.safetensors")
    state["llm.norm.weight"] = torch.ones(3)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(init_ckpt, ckpt)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(SleighError, match=r"wrong shape 1: llm\.norm\.weight"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("make, allowed", [
    (lambda: GSWAConfig(apply="foo"), ["attention", "scale"]),
    (lambda: GSWAConfig(hidden_size=-1), ["positive"]),
    (lambda: GSWAConfig(hidden_size=30, num_heads=4), ["multiple of num_heads"]),
    (lambda: GSWAConfig(min_weight=0.0), ["(0, 1)"]),
    (lambda: VisionConfig(num_heads=0), ["positive integer"]),
    (lambda: VisionConfig(image_size=448, patch_size=30), ["multiple of patch_size"]),
    (lambda: VisionConfig(image_size=448, patch_size=64), ["even"]),
    (lambda: LLMConfig(num_heads=16, num_kv_heads=3), ["multiple of num_kv_heads"]),
])
def test_config_validation_names_what_is_allowed(make, allowed):
    with pytest.raises(SleighError) as e:
        make()
    assert "Expected:" in str(e.value)
    for word in allowed:
        assert word in str(e.value)


def test_config_file_errors(init_ckpt, tmp_path):
    raw = json.loads((init_ckpt / "config.json").read_text())
    path = tmp_path / "config.json"

    def load(d):
        path.write_text(json.dumps(d))
        return SleighVLConfig.load(path)

    with pytest.raises(SleighError, match=r"gswa\.apply.*attention or scale"):
        load({**raw, "gswa": {**raw["gswa"], "apply": "foo"}})
    with pytest.raises(SleighError, match=r"unknown keys \['heads'\].*num_heads"):
        load({**raw, "gswa": {**raw["gswa"], "heads": 2}})
    with pytest.raises(SleighError, match="schema"):
        load({k: v for k, v in raw.items() if k != "schema"})
    assert load({**raw, "gswa": None}).gswa is None
    path.write_text("{not json")
    with pytest.raises(SleighError, match="not valid JSON"):
        SleighVLConfig.load(path)


# -- 3. generation through Pipeline on the tiny init checkpoint ---------------------------------


@pytest.fixture(scope="module")
def init_pipe(init_ckpt) -> Pipeline:
    return Pipeline.load(init_ckpt, backend="torch")


@pytest.fixture(scope="module")
def wide_image() -> Image.Image:
    """Two tiles and a thumbnail."""
    return Image.open(ASTRONAUT).convert("RGB").resize((900, 450))


def test_seeded_sampling_repeats_and_depends_on_the_seed(init_pipe):
    def tokens(sampling):
        return init_pipe.generate(ASTRONAUT, "What is in the picture?", max_new_tokens=16, ignore_eos=True,
                                  sampling=sampling).result.token_ids

    first, again = tokens(SAMPLING), tokens(SAMPLING)
    assert len(first) == 16 and first == again
    assert tokens(replace(SAMPLING, seed=8)) != first
    assert tokens(SamplingOptions()) != first


def test_streamed_pieces_join_to_the_text(init_pipe, wide_image):
    gen = init_pipe.generate(wide_image, "Describe the image.", max_new_tokens=20, ignore_eos=True, sampling=SAMPLING)
    pieces = list(gen)
    assert len(pieces) > 1
    assert "".join(pieces) == gen.result.text
    assert gen.result.text == init_pipe.tokenizer.decode(gen.result.token_ids)


def test_text_only_chat(init_pipe, init_ckpt):
    question = "Hello, who are you?"
    r = init_pipe.generate(None, question, max_new_tokens=8, ignore_eos=True).result
    assert (r.views, r.grid, r.gswa_weights) == (0, None, [])
    ids = init_pipe.tokenizer.encode(build_prompt(question, 0), add_bos=True)
    assert init_pipe.tokenizer.img_context_id not in ids
    assert r.prompt_tokens == len(ids)
    model, _, _ = load_checkpoint(init_ckpt)
    assert r.token_ids == reference_greedy(model, ids, None, 8, init_pipe.tokenizer.vocab_size)


def test_multi_view_greedy_matches_the_reference_loop(init_pipe, init_ckpt, wide_image):
    """KV cache, the GSWA attention bias row kept beside it, and greedy sampling against the cache-free loop."""
    r = init_pipe.generate(wide_image, QUESTION, max_new_tokens=10, ignore_eos=True).result
    tiled = tile_image(wide_image)
    assert r.grid == tiled.grid == (2, 1) and r.views == 3
    model, _, _ = load_checkpoint(init_ckpt)
    with torch.no_grad():
        w = model.encode_images(torch.from_numpy(tiled.pixel_values)).gswa_weights
    assert r.gswa_weights == pytest.approx(w.tolist(), abs=1e-6)
    assert r.gswa_weights[-1] == 1.0 and abs(r.gswa_weights[0] - 1.0) > 1e-3
    _, ids = init_pipe.prepare(wide_image, QUESTION)
    assert r.prompt_tokens == len(ids)
    assert r.token_ids == reference_greedy(model, ids, tiled.pixel_values, 10, init_pipe.tokenizer.vocab_size)


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_is_respected(init_pipe, n):
    r = init_pipe.generate(None, "Count.", max_new_tokens=n, ignore_eos=True, sampling=SAMPLING).result
    assert len(r.token_ids) == n and r.stop_reason == "length"
    r = init_pipe.generate(None, "Count.", max_new_tokens=n, sampling=SAMPLING).result
    assert len(r.token_ids) <= n
    with pytest.raises(SleighError, match="^max_new_tokens "):
        init_pipe.generate(None, "Count.", max_new_tokens=0)


class _ForceStop(Backend):
    """Wraps a backend: from the third generated token on, the stop id wins every argmax."""

    def __init__(self, inner: Backend, stop: int, prompt_len: int):
        self.inner, self.stop, self.prompt_len, self.name = inner, stop, prompt_len, inner.name

    def run(self, module, feeds):
        return self.inner.run(module, feeds)

    def new_cache(self, batch=1):
        return self.inner.new_cache(batch)

    def step(self, cache, *args):
        logits = self.inner.step(cache, *args).copy()
        if cache.length > self.prompt_len + 1:
            logits[:, self.stop] = 1e9
        return logits


def test_stop_token_ends_generation(init_pipe):
    """A stop id is not emitted and ends generation, unless ignore_eos."""
    stop = init_pipe.tokenizer.im_end_id
    assert stop in init_pipe.contract.generation.stop_token_ids
    prompt_len = len(init_pipe.prepare(None, "Hi")[1])
    pipe = Pipeline(_ForceStop(init_pipe.backend, stop, prompt_len), init_pipe.contract, init_pipe.tokenizer)
    r = pipe.generate(None, "Hi", max_new_tokens=10).result
    assert r.stop_reason == "stop" and len(r.token_ids) == 2 and stop not in r.token_ids
    r = pipe.generate(None, "Hi", max_new_tokens=10, ignore_eos=True).result
    assert r.stop_reason == "length" and r.token_ids[2:] == [stop] * 8


def test_context_limit(init_ckpt, tmp_path):
    pipe = Pipeline.load(init_ckpt)
    context = pipe.contract.generation.context_length
    with pytest.raises(SleighError, match=f"exceed the context of {context}"):
        pipe.generate(None, "Hi", max_new_tokens=context).result

    # the exact boundary, on a copy whose context is a few tokens past the prompt
    prompt_len = len(pipe.prepare(None, "Hi")[1])
    small = tmp_path / "small-context"
    shutil.copytree(init_ckpt, small)
    raw = json.loads((small / "config.json").read_text())
    raw["llm"]["max_position_embeddings"] = prompt_len + 4
    (small / "config.json").write_text(json.dumps(raw))
    p = Pipeline.load(small)
    assert len(p.generate(None, "Hi", max_new_tokens=4, ignore_eos=True).result.token_ids) == 4
    with pytest.raises(SleighError, match="context"):
        list(p.generate(None, "Hi", max_new_tokens=5, ignore_eos=True))
    with pytest.raises(SleighError, match="context"):  # an image adds 256 tokens per view
        p.generate(ASTRONAUT, "Hi", max_new_tokens=1).result
    # a default limit (a server's, `sleigh run` without --max-new-tokens) is cut to the 4 left instead
    fitted = p.generate(None, "Hi", max_new_tokens=512, ignore_eos=True, fit_context=True).result
    assert len(fitted.token_ids) == 4 and fitted.stop_reason == "length"
    with pytest.raises(SleighError, match="context"):  # the prompt alone past the context: refused as ever
        p.generate(ASTRONAUT, "Hi", max_new_tokens=512, fit_context=True).result
    cli = run_sleigh("run", "--model", small, "--prompt", "Hi", "--ignore-eos", "--json")
    assert cli.returncode == 0 and len(json.loads(cli.stdout)["token_ids"]) == 4, cli.stderr
    cli = run_sleigh("run", "--model", small, "--prompt", "Hi", "--max-new-tokens", "5")
    assert cli.returncode != 0 and "exceed the context" in cli.stderr
