"""Bounded peaks: vision in chunks of views, the prompt in chunks of tokens, and a memory budget that
picks both. Every chunked run is compared with the same run in one call (the reference)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.kv_cache import KV_CHUNK
from sleigh.runtime.memory import (BASE_BYTES, GB, MIN_PREFILL_CHUNK, TORCH_BASE_BYTES, MemoryBudget, Shapes, budget_and_need,
                                   module_sizes, parse_size)
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


@pytest.fixture(scope="module")
def four_views(tmp_path_factory) -> Path:  # 3 tiles + thumbnail at the tiny models' 448 px
    return _photo(tmp_path_factory.mktemp("views"), (1344, 448))


def _run_in_chunks(pipe, image, chunk):
    pipe.vision_chunk = chunk
    try:
        state = pipe.prefill(image, PROMPT, max_new_tokens=6)
        return state, pipe.generate_from(state, max_new_tokens=6, ignore_eos=True).result
    finally:
        pipe.vision_chunk = None


@pytest.mark.slow
def test_vision_in_chunks_of_views_equals_one_call_with_gswa(ort_pipe, tiny_ckpt, four_views):
    """GSWA is its own module (schema 5): the vision module reads each view alone, so the views go in
    chunks of any size, and GSWA then weighs all of them at once: the same embeddings, weights and
    tokens as one call, and as the PyTorch reference."""
    assert ort_pipe.contract.gswa.apply == "attention"
    whole, whole_result = _run_in_chunks(ort_pipe, four_views, None)
    assert len(whole.gswa_weights) == 4 and np.abs(whole.gswa_weights[:-1] - 1).max() > 1e-3  # GSWA really acts
    for chunk in (1, 3):  # even and uneven chunks
        state, result = _run_in_chunks(ort_pipe, four_views, chunk)
        np.testing.assert_allclose(state.image_embeds, whole.image_embeds, atol=1e-5)
        np.testing.assert_allclose(state.gswa_weights, whole.gswa_weights, atol=1e-6)
        assert result.token_ids == whole_result.token_ids
    # GSWA over one chunk's views alone would give other weights: why it runs once on all of them
    pixels = ort_pipe.prepare(four_views, PROMPT)[0].pixel_values
    cls = ort_pipe.backend.run("vision", {"pixel_values": pixels})["cls_tokens"]
    alone = ort_pipe.backend.run("gswa", {"cls_tokens": cls[1:]})["gswa_weights"]
    assert not np.allclose(alone, whole.gswa_weights[1:], atol=1e-3)
    with Pipeline.load(tiny_ckpt) as ref:  # the PyTorch reference, in chunks of 1 view
        state, result = _run_in_chunks(ref, four_views, 1)
    np.testing.assert_allclose(state.image_embeds, whole.image_embeds, atol=1e-3, rtol=1e-3)  # export parity's table
    np.testing.assert_allclose(state.gswa_weights, whole.gswa_weights, atol=1e-4, rtol=1e-4)
    assert result.token_ids == whole_result.token_ids


def test_scale_mode_scales_the_embeddings_of_chunked_views(tiny_ckpt, four_views, tmp_path):
    """With gswa.apply "scale" the runtime multiplies each view's embeddings by its weight (the vision
    module returns mlp1's): what the reference model's encode_images returns."""
    import shutil

    import torch

    from sleigh.sleighvl.checkpoint import load_checkpoint

    ckpt = tmp_path / "scale"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["gswa"]["apply"] = "scale"
    (ckpt / "config.json").write_text(json.dumps(config))
    model, _, _ = load_checkpoint(ckpt)
    with Pipeline.load(ckpt) as pipe:
        state, _ = _run_in_chunks(pipe, four_views, 1)
        with torch.inference_mode():
            ref = model.encode_images(torch.from_numpy(state.tiled.pixel_values))
    assert np.abs(ref.gswa_weights.numpy()[:-1] - 1).max() > 1e-3  # scaling changes something
    np.testing.assert_allclose(state.gswa_weights, ref.gswa_weights.numpy(), atol=1e-5)
    np.testing.assert_allclose(state.image_embeds, ref.image_embeds.numpy(), atol=1e-5, rtol=1e-5)


def test_a_budget_that_forces_chunks_gives_the_tokens_of_no_budget(tiny_pkg, ort_pipe, tmp_path):
    image = _photo(tmp_path, (896, 448))
    reference = ort_pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
    roomy = Pipeline.load(tiny_pkg, max_memory=64 * GB)
    assert roomy.reserve_generation and not ort_pipe.reserve_generation  # a budget counts the KV once: no growth copy
    views, tokens = reference.views, reference.prompt_tokens
    whole = roomy.budget.plan(views, tokens, 10)
    assert (whole.vision_chunk, whole.prefill_chunk) == (views, tokens)
    # Halfway between one call per stage and the smallest chunks (each load measures its modules' resident
    # bytes afresh, and two loads differ by some pages): the plan must chunk the views or the prompt to fit.
    smallest = roomy.budget.estimate(tokens, 10, 1, min(tokens, MIN_PREFILL_CHUNK), views)
    assert whole.estimate - smallest > 4 * 2**20  # room for the noise of a measurement
    limit = (whole.estimate + smallest) // 2
    tight = Pipeline.load(tiny_pkg, max_memory=limit)
    plan = tight.budget.plan(views, tokens, 10)
    assert (plan.vision_chunk < views or plan.prefill_chunk < tokens) and plan.estimate <= limit
    got = tight.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
    assert got.token_ids == reference.token_ids


def test_a_budget_below_every_module_holds_them_a_stage_at_a_time(tiny_pkg, ort_pipe, tmp_path, monkeypatch):
    """Between the largest stage and all modules together: vision and GSWA close before the prompt is
    read, the decoder before the next image, each opening again when next run; the tokens stay. What
    opening a module adds to the process is taken as 0 here, so both loads count the files alone: a
    real measurement swings by up to 10 MiB with what the heap holds (a module opened into pages that
    earlier work freed adds nothing), more than the gap between the two sides."""
    monkeypatch.setattr("sleigh.runtime.backends.onnxruntime_backend.resident_bytes", lambda: 0)
    image = _photo(tmp_path, (896, 448))
    reference = ort_pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
    with Pipeline.load(tiny_pkg, max_memory=64 * GB) as roomy:
        budget = roomy.budget
        views, tokens = reference.views, reference.prompt_tokens
        # between the largest stage and every module held, at the smallest chunks: halfway, because each
        # load measures its modules' resident bytes afresh and the two loads differ by some pages
        smallest = (tokens, 10, 1, min(tokens, MIN_PREFILL_CHUNK), views)
        held, stage = budget.estimate(*smallest, staged=False), budget.estimate(*smallest, staged=True)
        assert held - stage > 4 * 2**20  # room for the noise of a measurement
        limit = (held + stage) // 2
    with Pipeline.load(tiny_pkg, max_memory=limit) as pipe:
        plan = pipe.budget.plan(views, tokens, 10)
        assert plan.staged and plan.estimate <= limit
        # under a budget the load opened (and measured) one module at a time and kept the decoder
        assert set(pipe.backend.sessions) == {"decoder"} and set(pipe.backend.resident) == set(pipe.backend.files)
        decoder = pipe.backend.sessions["decoder"]
        got = pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result
        assert got.token_ids == reference.token_ids
        assert set(pipe.backend.sessions) == {"embed", "decoder"} and pipe.backend.sessions["decoder"] is not decoder
        assert pipe.generate(image, PROMPT, max_new_tokens=10, ignore_eos=True).result.token_ids == reference.token_ids
    with pytest.raises(SleighError, match="at the smallest chunks"):  # the same limit, every module held
        MemoryBudget(limit, budget.shapes, budget.weights).plan(views, tokens, 10)


def test_a_budget_too_small_is_refused_in_one_line(tiny_pkg):
    proc = run_sleigh("run", EXAMPLES / "chelsea.jpg", "--model", tiny_pkg, "--max-memory", "180M",
                      "--max-new-tokens", "2")
    line = one_error_line(proc)
    assert line.startswith("error: --max-memory 0.18 GB |") and "--max-tiles" in line and "int4" in line
    proc = run_sleigh("run", "--model", tiny_pkg, "--max-memory", "50M")  # the weights and runtime alone
    assert "the model alone needs" in one_error_line(proc)
    assert "not a memory size" in one_error_line(run_sleigh("run", "--model", tiny_pkg, "--max-memory", "lots"))


def test_a_refused_budget_and_its_need_never_read_the_same():
    """`--max-memory 170M` read "0.17 GB | the model alone needs 0.17 GB": a need is rounded up and
    given the decimals that part it from the budget, and a budget of the need as printed fits."""
    from sleigh.runtime.manifest import Contract
    from sleigh.sleighvl.config import PRESETS

    config = json.loads(json.dumps(PRESETS["internvl2-2b"].to_dict()))
    shapes = Shapes.from_contract(Contract.from_config(config, "internvl2-2b preset"))  # unread: the weights alone are refused
    for weights in (int(0.0005 * GB), int(0.001 * GB), int(0.00999 * GB)):
        limit = BASE_BYTES + weights - 1  # just under: the two agree in two decimals
        with pytest.raises(SleighError) as e:
            MemoryBudget(limit, shapes, weights=weights)
        budget = e.value.what.removeprefix("max_memory=")
        need = e.value.problem.removeprefix("the model alone needs ").split(" (")[0]
        assert budget != need, (budget, need)
        MemoryBudget(parse_size(need.replace(" ", "").removesuffix("B")), shapes, weights=weights)  # fits
    assert budget_and_need(int(0.176 * GB), int(0.1765 * GB)) == ("0.176 GB", "0.177 GB")
    assert budget_and_need(int(1.5 * GB), int(1.75 * GB)) == ("1.50 GB", "1.75 GB")


def test_a_size_shown_to_users_reads_back_to_its_bytes():
    """What a rebuild command shows for --max-memory (recorded in bytes): the flag's own units, exact."""
    from sleigh.runtime.memory import size_text

    assert [size_text(n) for n in (8 * 1024**3, int(2.5 * 1024**3), 900 * 1024**2, 1536, 1000)] == ["8G", "2.5G", "900M", "1.5K", "1000"]
    rng = np.random.default_rng(0)
    for n in [*rng.integers(1, 2**44, 200).tolist(), 1, 1023, 1024**4]:
        assert parse_size(size_text(int(n))) == n
    assert size_text(1024**3 + 1) == "1073741825"  # no unit reads it back in a few decimals: bytes


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
    with pytest.raises(SleighError, match="fewer tiles"):  # the 4K-slot FP32 KV cache alone leaves no room
        budget.plan(13, 4064, 32)
    plan = MemoryBudget(int(8 * GB), full, weights=int(2.0 * GB)).plan(13, 4064, 32)
    assert plan.vision_chunk < 13 and plan.prefill_chunk < 4064 and plan.estimate <= 8 * GB and not plan.staged
    # The full-size INT8/INT4 engine's files (vision + GSWA + embedding, decoder + embedding) with
    # float16 slots: refused with every module held, planned a stage at a time
    fp16 = Shapes.from_contract(Contract.from_config(config, "internvl2-2b preset"), kv_dtype="float16")
    stages = (int(0.73 * GB), int(1.28 * GB))
    with pytest.raises(SleighError, match="at the smallest chunks"):
        MemoryBudget(int(2.5 * GB), fp16, weights=int(1.8 * GB)).plan(13, 4064, 32)
    plan = MemoryBudget(int(2.5 * GB), fp16, weights=int(1.8 * GB), stages=stages).plan(13, 4064, 32)
    assert plan.staged and plan.estimate <= 2.5 * GB
    with pytest.raises(SleighError, match="a stage at a time"):  # the same, past even the staged floor
        MemoryBudget(int(1.6 * GB), fp16, weights=int(1.8 * GB), stages=stages).plan(13, 4064, 32)


def test_a_fused_decoders_prompt_in_one_call_is_counted_against_every_reserved_slot():
    """GroupQueryAttention (a fused decoder, kv_cache.form "shared") sizes a call's scores by the whole
    cache buffer, the first call's too; the standard decoder's first call scores the prompt alone.
    Chunks after the first read every reserved slot in both."""
    import dataclasses

    from sleigh.runtime.manifest import Contract
    from sleigh.sleighvl.config import PRESETS

    config = json.loads(json.dumps(PRESETS["small"].to_dict()))
    config["prompt"].update(img_context_token_id=7, stop_token_ids=[2])  # `sleigh init` sets its tokenizer's ids
    contract = Contract.from_config(config, "small preset")
    fused_contract = dataclasses.replace(contract, kv_cache=dataclasses.replace(contract.kv_cache, form="shared"))
    standard, fused = Shapes.from_contract(contract), Shapes.from_contract(fused_contract)
    assert not standard.scores_span_slots and fused.scores_span_slots
    P, N, K = 300, 200, 512  # K: the slots reserved for P + N
    on_standard, on_fused = (MemoryBudget(8 * GB, shapes, weights=GB) for shapes in (standard, fused))
    assert on_standard.prefill_bytes(P, N, P) == standard.prefill_bytes(P, P)
    assert on_fused.prefill_bytes(P, N, P) == standard.prefill_bytes(P, K) > on_standard.prefill_bytes(P, N, P)
    assert on_fused.prefill_bytes(P, N, 64) == on_standard.prefill_bytes(P, N, 64) == standard.prefill_bytes(64, K + 64)


def test_the_budget_counts_the_weights_the_backend_opened(tiny_ckpt, tiny_pkg, tmp_path):
    """Package or checkpoint, the budget's weights are those of the modules the loaded backend opened
    (its `files`, or what opening them measured), not whatever else lies in the folder."""
    import shutil

    from sleigh.runtime.manifest import read_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "old-weights.safetensors").write_bytes(bytes(2**20))  # left there, never read
    with Pipeline.load(ckpt, max_memory=64 * GB) as pipe:
        assert pipe.budget.weights == (ckpt / "model.safetensors").stat().st_size
        # the PyTorch reference counts torch's own import (a small checkpoint ran 24 % over its budget)
        assert pipe.budget.base == BASE_BYTES + TORCH_BASE_BYTES and "sleigh export" in pipe.budget.smaller
    with pytest.raises(SleighError, match="the model alone needs") as e:
        Pipeline.load(ckpt, max_memory=BASE_BYTES + TORCH_BASE_BYTES // 2 + (ckpt / "model.safetensors").stat().st_size)
    assert "whose runtime needs no torch" in str(e.value)
    with Pipeline.load(tiny_pkg, engine="package", max_memory=64 * GB) as pipe:
        # ONNX Runtime measures what each module added to the process as it opened; the budget counts
        # that where it is more than the module's files (prepacked weights), else the files
        assert set(pipe.backend.resident) == set(pipe.backend.files) == {"vision", "gswa", "embed", "decoder"}
        listed = read_manifest(tiny_pkg).module_files()  # the modules with their external data
        files = {m: sum((tiny_pkg / rel).stat().st_size for rel in listed if Path(rel).name.split(".")[0] == m)
                 for m in pipe.backend.files}
        assert sum(module_sizes(pipe.backend.files).values()) == sum(files.values()) > 0  # nothing measured
        assert pipe.budget.weights == sum(max(files[m], pipe.backend.resident[m]) for m in files)
        bigger = {**pipe.backend.resident, "decoder": files["decoder"] + 12345}
        assert module_sizes(pipe.backend.files, bigger)["decoder"] == files["decoder"] + 12345


def test_serve_and_bench_load_with_the_budget(tiny_pkg):
    pytest.importorskip("fastapi")
    from sleigh.bench import run_bench
    from sleigh.serve.app import ServeSettings, load_worker

    worker = load_worker(ServeSettings(model=tiny_pkg, max_memory=64 * GB))
    try:
        assert worker.pipeline.budget.limit == 64 * GB
    finally:
        worker.close()
    with pytest.raises(SleighError, match="the model alone needs"):
        run_bench([("tiny", tiny_pkg, "auto", None)], None, "Hi", runs=1, max_new_tokens=1, quiet=True,
                  max_memory=50 * 1024**2)
