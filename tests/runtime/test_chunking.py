"""Bounded peaks: vision in chunks of views, the prompt in chunks of tokens, and a memory budget that
picks both. Every chunked run is compared with the same run in one call (the reference)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.kv_cache import KV_CHUNK
from sleigh.runtime.memory import GB, MemoryBudget, Shapes, parse_size
from sleigh.runtime.pipeline import Pipeline
from tests.helpers import one_error_line, run_sleigh

EXAMPLES = Path(__file__).parents[2] / "examples"
PROMPT = "What is in the picture, and where?"


def _photo(tmp_path: Path, size=(1792, 1344)) -> Path:  # 12 tiles + thumbnail at the tiny models' 448 px
    path = tmp_path / f"photo_{size[0]}x{size[1]}.png"
    Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def ort_pipe(tiny_pkg):
    return Pipeline.load(tiny_pkg)


def _whole_and_chunked(pipe, image, **chunks):
    """The same greedy generation in one call per stage, then in the given chunks."""
    whole = pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
    whole_state = pipe.prefill(image, PROMPT)
    try:
        for name, value in chunks.items():
            setattr(pipe, name, value)
        chunked = pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
        chunked_state = pipe.prefill(image, PROMPT)
    finally:
        for name in chunks:
            setattr(pipe, name, None)
    return whole, whole_state, chunked, chunked_state


@pytest.mark.parametrize("chunk", [1, 37, 256])
def test_prefill_in_chunks_equals_one_call_on_onnxruntime(ort_pipe, tmp_path, chunk):
    whole, ws, chunked, cs = _whole_and_chunked(ort_pipe, _photo(tmp_path, (896, 448)), prefill_chunk=chunk)
    assert len(ws.ids) > chunk  # really in several calls
    assert chunked.token_ids == whole.token_ids
    np.testing.assert_allclose(cs.logits, ws.logits, atol=1e-4, rtol=1e-4)
    assert cs.cache.length == ws.cache.length == len(ws.ids)


def test_prefill_in_chunks_equals_one_call_on_torch(tiny_ckpt, tmp_path):
    pipe = Pipeline.load(tiny_ckpt)
    whole, ws, chunked, cs = _whole_and_chunked(pipe, _photo(tmp_path, (896, 448)), prefill_chunk=100)
    assert chunked.token_ids == whole.token_ids
    np.testing.assert_allclose(cs.logits, ws.logits, atol=1e-4, rtol=1e-4)


def test_vision_in_chunks_of_views_equals_one_call_without_gswa(oracle_ckpts, tmp_path):
    """A model without GSWA: its views are independent, so the pipeline may run them in chunks."""
    pipe = Pipeline.load(oracle_ckpts["none"])
    assert pipe.contract.gswa is None
    whole, ws, chunked, cs = _whole_and_chunked(pipe, _photo(tmp_path), vision_chunk=4, prefill_chunk=512)
    assert whole.views == 13
    assert np.abs(cs.image_embeds - ws.image_embeds).max() < 1e-5
    assert chunked.token_ids == whole.token_ids


def test_gswa_needs_all_views_in_one_call(ort_pipe, tmp_path):
    """Why a GSWA model's views are never split: the ViT part of vision.onnx is per view (its image
    embeddings from chunks equal the whole call's in attention mode), but GSWA's weights come from
    attention over every view's CLS token, so a chunk of views gets other weights."""
    pixels = ort_pipe.prepare(_photo(tmp_path), PROMPT)[0].pixel_values
    whole = ort_pipe.backend.run("vision", {"pixel_values": pixels})
    parts = [ort_pipe.backend.run("vision", {"pixel_values": pixels[i:i + 5]}) for i in range(0, len(pixels), 5)]
    assert ort_pipe.contract.gswa.apply == "attention"
    np.testing.assert_allclose(np.concatenate([p["image_embeds"] for p in parts]), whole["image_embeds"], atol=1e-5)
    assert not np.allclose(np.concatenate([p["gswa_weights"] for p in parts]), whole["gswa_weights"], atol=1e-3)
    ort_pipe.vision_chunk = 5  # asked for, but not applied to a GSWA model
    try:
        state = ort_pipe.prefill(_photo(tmp_path), PROMPT)
    finally:
        ort_pipe.vision_chunk = None
    np.testing.assert_allclose(state.gswa_weights, whole["gswa_weights"], atol=1e-6)


def test_a_budget_that_forces_chunks_gives_the_tokens_of_no_budget(tiny_pkg, ort_pipe, tmp_path):
    image = _photo(tmp_path, (896, 448))
    reference = ort_pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
    roomy = Pipeline.load(tiny_pkg, max_memory=64 * GB)
    assert roomy.reserve_generation and not ort_pipe.reserve_generation  # a budget counts the KV once: no growth copy
    views, tokens = reference.views, reference.prompt_tokens
    whole = roomy.budget.plan(views, tokens, 10, split_views=False)
    assert (whole.vision_chunk, whole.prefill_chunk) == (views, tokens)
    # Just under what one call per stage needs: the plan must chunk the prompt to fit.
    tight = Pipeline.load(tiny_pkg, max_memory=whole.estimate - 1)
    plan = tight.budget.plan(views, tokens, 10, split_views=False)
    assert plan.prefill_chunk < tokens and plan.estimate <= whole.estimate - 1
    got = tight.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
    assert got.token_ids == reference.token_ids


def test_a_budget_too_small_is_refused_in_one_line(tiny_pkg):
    proc = run_sleigh("run", EXAMPLES / "chelsea.jpg", "--model", tiny_pkg, "--max-memory", "200M",
                      "--max-new-tokens", "2")
    line = one_error_line(proc)
    assert line.startswith("error: --max-memory 0.20 GB |") and "--max-tiles" in line and "int4" in line
    proc = run_sleigh("run", "--model", tiny_pkg, "--max-memory", "50M")  # the weights and runtime alone
    assert "the model alone needs" in one_error_line(proc)
    assert "not a memory size" in one_error_line(run_sleigh("run", "--model", tiny_pkg, "--max-memory", "lots"))


def test_budget_refuses_what_would_not_fit_and_parses_sizes():
    assert parse_size("2.5G") == int(2.5 * 1024**3) and parse_size("900MiB") == 900 * 1024**2 and parse_size("4096") == 4096
    for bad in ("", "-1G", "2.5X", "0"):
        with pytest.raises(SleighError, match="not a memory size"):
            parse_size(bad)
    from sleigh.runtime.manifest import Contract
    from sleigh.sleighvl.config import PRESETS

    config = json.loads(json.dumps(PRESETS["internvl2-2b"].to_dict()))  # as config.json holds it
    full = Shapes.from_contract(Contract.from_config(config, "internvl2-2b preset"))
    # The full-size KV cache: 2 x 24 layers x 8 heads x 128 x 4 bytes = 196,608 bytes per slot (DESIGN.md),
    # counted once: the Pipeline reserves the slots before the prefill, so no growth holds two copies.
    assert full.kv_bytes(4096) == 196_608 * 4096 and full.kv_bytes(4097) == 196_608 * (4096 + KV_CHUNK)
    budget = MemoryBudget(int(2.5 * GB), full, weights=int(2.0 * GB))
    with pytest.raises(SleighError, match="fewer tiles"):  # 13 views in one call (GSWA) do not fit 0.3 GB
        budget.plan(13, 4064, 32, split_views=False)
    plan = MemoryBudget(int(8 * GB), full, weights=int(2.0 * GB)).plan(13, 4064, 32, split_views=True)
    assert plan.vision_chunk < 13 and plan.prefill_chunk < 4064 and plan.estimate <= 8 * GB


def test_the_budget_counts_the_weights_the_backend_opened(tiny_ckpt, tiny_pkg, tmp_path):
    """Package or checkpoint, the budget's weights are the files the loaded backend read (its `files`),
    not whatever else lies in the folder."""
    import shutil

    from sleigh.runtime.manifest import read_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "old-weights.safetensors").write_bytes(bytes(2**20))  # left there, never read
    with Pipeline.load(ckpt, max_memory=64 * GB) as pipe:
        assert pipe.budget.weights == (ckpt / "model.safetensors").stat().st_size
    with Pipeline.load(tiny_pkg, engine="package", max_memory=64 * GB) as pipe:
        listed = read_manifest(tiny_pkg).module_files()  # the modules with their external data
        assert pipe.budget.weights == sum((tiny_pkg / rel).stat().st_size for rel in listed) > 0


def test_serve_and_bench_load_with_the_budget(tiny_pkg):
    pytest.importorskip("fastapi")
    from sleigh.bench import run_bench
    from sleigh.serve.app import ServeSettings, load_worker

    assert load_worker(ServeSettings(model=tiny_pkg, max_memory=64 * GB)).pipeline.budget.limit == 64 * GB
    with pytest.raises(SleighError, match="the model alone needs"):
        run_bench([("tiny", tiny_pkg, "auto", None)], None, "Hi", runs=1, max_new_tokens=1, quiet=True,
                  max_memory=50 * 1024**2)
