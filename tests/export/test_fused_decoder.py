"""The fused decoder (export --decoder fused, kv_cache.form "shared") against the reference, and a
package holding it against the standard package: the same greedy tokens through the runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sleigh.errors import SleighError
from sleigh.export import fused_decoder
from sleigh.export.modules import DecoderModule, EmbedModule
from sleigh.export.parity import shared_decoder_cases
from sleigh.onnx_files import describe_io
from sleigh.runtime.multimodal import no_image_rows
from sleigh.runtime.package import file_entry
from sleigh.sleighvl.checkpoint import load_checkpoint
from tests.runtime.package_copies import copy_package, load, save


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)[0].eval()


@pytest.fixture(scope="module")
def fused_pkg(tiny_pkg, tiny_model, tmp_path_factory):
    """A copy of the tiny package whose decoder is the fused form, listed as export would list it."""
    pkg = copy_package(tiny_pkg, tmp_path_factory.mktemp("fused"))
    assert fused_decoder.write(tiny_model.llm, pkg, 18) == ["decoder.onnx"]
    manifest = load(pkg)
    manifest["kv_cache"]["form"] = "shared"
    manifest["modules"]["decoder"].update(describe_io(pkg / "decoder.onnx"))
    manifest["files"]["decoder.onnx"] = file_entry(pkg, "decoder.onnx")
    save(pkg, manifest)
    return pkg


def _case_inputs(model, seed=0):
    """(prompt embeddings (1, 11, D), a GSWA-like bias (1, 11), cfg, rng) for the parity cases."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((1, 11, cfg.llm.hidden_size)).astype(np.float32)
    bias = (0.5 * rng.standard_normal((1, 11))).astype(np.float32)  # GSWA-like log-weights
    return inputs, bias, cfg, rng


def _cases(path, model, seed=0):
    with torch.inference_mode():
        return shared_decoder_cases(path, DecoderModule(model), EmbedModule(model), *_case_inputs(model, seed), "fp32")


def test_the_fused_decoder_matches_the_reference(fused_pkg, tiny_model):
    """Prefill, two decode steps, a left-padded batch of 2, and a batch-of-2 prompt after a cache with
    masked positions (run row by row): logits and the keys/values written into the cache buffers."""
    results = _cases(fused_pkg / "decoder.onnx", tiny_model)
    assert {r.case for r in results} >= {"decoder prefill (no cache)", "decoder decode step 2 (shared)",
                                         "decoder random tokens B=2 after 8 (shared)"}
    assert all(r.ok for r in results), [(r.case, r.output, r.needed_atol) for r in results if not r.ok]


def test_a_fused_decoder_with_another_rope_fails_parity(tiny_model, tmp_path):
    """Negative control: the same weights with RoPE at another base must not pass."""
    import copy
    import dataclasses

    llm = copy.deepcopy(tiny_model.llm)
    llm.cfg = dataclasses.replace(llm.cfg, rope_theta=llm.cfg.rope_theta / 10)
    fused_decoder.write(llm, tmp_path, 18)
    assert not all(r.ok for r in _cases(tmp_path / "decoder.onnx", tiny_model))


def _attention_nodes(path):
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n for n in graph.node if n.op_type in ("GroupQueryAttention", "RotaryEmbedding")]


def _raw_prompt(path, embeds: np.ndarray, positions: np.ndarray, kv_heads: int, head_dim: int) -> np.ndarray:
    """A prompt into an empty cache through the decoder's own session (no runtime, no check) -> logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    B, S, _ = embeds.shape
    feeds = {"input_ids": np.full((1, 1), -1, np.int64), "inputs_embeds": embeds, "attention_mask": np.ones((B, S), np.int64),
             "attention_bias": np.zeros((B, S), np.float32), "position_ids": positions}
    feeds.update({i.name: np.zeros((B, kv_heads, S, head_dim), np.float32)
                  for i in session.get_inputs() if i.name.startswith("past_key_values.")})
    return session.run(["logits"], feeds)[0][:, -1]


def test_attention_turns_q_and_k_at_the_given_positions_and_a_first_prompt_from_its_first(fused_pkg, tiny_pkg):
    """The fused decoder's GroupQueryAttention takes q, k and v packed and turns q and k itself, at
    position_ids: a prompt from position 3, a chunk after it with gaps, and a decode step give the
    standard package's logits (its own RoPE). ONNX Runtime turns a prompt into an empty cache at the
    first row's first position and on, whatever else position_ids holds (seen through the session
    itself: if that ever changes, the check can go), so the runtime refuses such positions there."""
    from onnx.helper import get_attribute_value

    from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from sleigh.runtime.manifest import read_manifest

    nodes = _attention_nodes(fused_pkg / "decoder.onnx")
    assert {n.op_type for n in nodes} == {"GroupQueryAttention"}
    assert all(n.input[1] == n.input[2] == "" and n.input[9] == "position_ids" for n in nodes)
    assert all({a.name: get_attribute_value(a) for a in n.attribute}["do_rotary"] == 1 for n in nodes)

    contract = read_manifest(fused_pkg).contract
    D, kv = contract.model.hidden_size, contract.kv_cache
    pieces = [(np.arange(3, 9), 6), (np.array([9, 10, 12, 15, 23]), 5), (np.array([34]), 1)]  # (positions, S)
    logits, gapped = {}, np.array([[0, 2, 4]])
    for pkg in (tiny_pkg, fused_pkg):
        with OnnxRuntimeBackend.from_package(pkg, read_manifest(pkg)) as backend:
            cache, rng = backend.new_cache(1), np.random.default_rng(3)
            logits[pkg] = [backend.step(cache, rng.standard_normal((1, S, D)).astype(np.float32), np.ones((1, S), np.int64),
                                        np.zeros((1, S), np.float32), pos[None]) for pos, S in pieces]
            embeds = rng.standard_normal((2, 3, D)).astype(np.float32)
            if pkg == tiny_pkg:
                logits["gapped"] = backend.step(backend.new_cache(1), embeds[:1], np.ones((1, 3), np.int64),
                                                np.zeros((1, 3), np.float32), gapped)
            else:
                for bad, shown in ((gapped, "0, 2, 4"), (np.array([[4, 5, 6], [0, 1, 2]]), "4, 5, 6, 0, 1, ...")):
                    with pytest.raises(SleighError, match=f"position_ids.*empty cache is at {shown}.*turns such a prompt at {bad[0, 0]}"):
                        backend.step(backend.new_cache(len(bad)), embeds[:len(bad)], np.ones(bad.shape, np.int64),
                                     np.zeros(bad.shape, np.float32), bad)
    for got, want in zip(logits[fused_pkg], logits[tiny_pkg]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    raw = {name: _raw_prompt(fused_pkg / "decoder.onnx", embeds[:1], positions, kv.num_kv_heads, kv.head_dim)
           for name, positions in (("gapped", gapped), ("contiguous", np.arange(3)[None]))}
    assert np.abs(raw["gapped"] - logits["gapped"]).max() > 1e-2  # not at 0, 2, 4 ...
    np.testing.assert_allclose(raw["gapped"], raw["contiguous"], rtol=0, atol=1e-5)  # ... but at 0, 1, 2


def test_heads_that_attention_cannot_turn_keep_rotary_nodes_and_match_the_reference(tiny_model, tmp_path):
    """Heads of 8 dims (not a multiple of ROTARY_INSIDE_HEAD_MULTIPLE, which ONNX Runtime's CPU kernel
    needs to turn q and k itself): RotaryEmbedding nodes on split q and k, and the reference's outputs.
    Such a decoder turns a prompt into an empty cache at any positions, and none is refused."""
    import dataclasses

    from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from sleigh.runtime.kv_cache import NEW, PAST
    from sleigh.runtime.manifest import ROTARY_INSIDE_HEAD_MULTIPLE, KVCacheSection, kv_names
    from sleigh.sleighvl.model import SleighVL

    cfg = tiny_model.cfg
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_heads=8, num_kv_heads=4))
    L, KV, hd, D = cfg.llm.num_layers, cfg.llm.num_kv_heads, cfg.llm.head_dim, cfg.llm.hidden_size
    assert hd % ROTARY_INSIDE_HEAD_MULTIPLE
    torch.manual_seed(0)
    model = SleighVL(cfg).eval()
    fused_decoder.write(model.llm, tmp_path, 18)
    path = tmp_path / "decoder.onnx"
    assert {n.op_type for n in _attention_nodes(path)} == {"GroupQueryAttention", "RotaryEmbedding"}
    results = _cases(path, model)
    assert all(r.ok for r in results), [(r.case, r.output, r.needed_atol) for r in results if not r.ok]
    embeds = np.random.default_rng(0).standard_normal((1, 3, D)).astype(np.float32)
    section = KVCacheSection(KV, hd, tuple(kv_names(L, PAST)), tuple(kv_names(L, NEW)), "shared")
    with OnnxRuntimeBackend({"decoder": path}, section) as backend:
        gapped = backend.step(backend.new_cache(1), embeds, np.ones((1, 3), np.int64), np.zeros((1, 3), np.float32),
                              np.array([[0, 2, 4]]))
    np.testing.assert_allclose(gapped, _raw_prompt(path, embeds, np.array([[0, 2, 4]]), KV, hd), rtol=0, atol=1e-5)
    assert np.abs(gapped - _raw_prompt(path, embeds, np.arange(3)[None], KV, hd)).max() > 1e-2  # turned at 0, 2, 4


def _photo(folder):
    from PIL import Image

    image = folder / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(image)
    return image


def test_a_fused_package_generates_the_standard_packages_tokens(fused_pkg, tiny_pkg, monkeypatch):
    """Through Pipeline: the prompt (1,980 positions) in the backend's chunks of 256, in one call, and in
    chunks of 5 (later chunks after a cache); its slots reserved for the whole generation before the
    prefill (on the CPU, where that is free: the standard decoder's steps read every reserved slot, so
    its cache grows instead) in lazily mapped buffers (every size, here), and past a growth of the
    cache (256 slots) where they are not reserved."""
    from sleigh.runtime import kv_cache
    from sleigh.runtime.kv_cache import grown_capacity
    from sleigh.runtime.pipeline import Pipeline

    monkeypatch.setattr(kv_cache, "LAZY_SLOTS_BYTES", 0)
    image = _photo(fused_pkg.parent)
    with Pipeline.load(tiny_pkg) as standard, Pipeline.load(fused_pkg) as fused:
        assert fused.contract.kv_cache.form == "shared" and standard.contract.kv_cache.form == "slots"
        assert fused.reserve_generation and not standard.reserve_generation
        want = standard.generate(image, max_new_tokens=300, ignore_eos=True).result.token_ids
        state = fused.prefill(image, max_new_tokens=300)
        P = len(state.ids)
        assert state.cache.capacity == grown_capacity(P + 300) > grown_capacity(P)
        assert isinstance(next(iter(state.cache.slots.values())).base.base.obj, kv_cache.mmap.mmap)
        generation = fused.generate_from(state, max_new_tokens=300, ignore_eos=True)
        cache = state.cache
        assert list(generation) and generation.result.token_ids == want and cache.capacity == grown_capacity(P + 300)
        for chunk in (10**6, 5):
            fused.prefill_chunk = chunk
            assert fused.generate(image, max_new_tokens=8, ignore_eos=True).result.token_ids == want[:8]
        fused.prefill_chunk = None
        fused.reserve_generation = False  # the prompt's slots only: the cache grows while decoding
        assert fused.generate(image, max_new_tokens=300, ignore_eos=True).result.token_ids == want


def test_a_fused_decoder_on_the_cpu_prefills_in_chunks_of_256_unless_told_otherwise(fused_pkg, tiny_pkg):
    """GroupQueryAttention's CPU kernel scores a call's every query against all its keys, so the backend
    asks for prompts in chunks of PREFILL_CHUNK (the standard decoder, whose calls attend over every
    reserved slot anyway, for none). The Pipeline prefills so by default and under a memory budget that
    would allow more; without a budget, a chunk the caller sets wins. The chunks give the one call's logits,
    for an image prompt (embeddings in) and a text prompt (token ids in, `step_tokens`)."""
    from sleigh.runtime.backends.onnxruntime_backend import PREFILL_CHUNK
    from sleigh.runtime.pipeline import Pipeline

    image = _photo(fused_pkg.parent)
    with Pipeline.load(tiny_pkg) as standard:
        assert standard.backend.prefill_chunk is None
    for budget in (None, "64G"):
        with Pipeline.load(fused_pkg, max_memory=budget) as pipe:
            assert pipe.backend.prefill_chunk == PREFILL_CHUNK == 256
            calls, step = [], pipe.backend.step
            pipe.backend.step = lambda cache, embeds, *a: calls.append(embeds.shape[1]) or step(cache, embeds, *a)
            chunked = pipe.prefill(image)
            P = len(chunked.ids)
            in_chunks = [min(PREFILL_CHUNK, P - start) for start in range(0, P, PREFILL_CHUNK)]
            assert P > 3 * PREFILL_CHUNK and calls == in_chunks
            calls.clear()
            pipe.prefill_chunk = P
            whole = pipe.prefill(image)
            assert calls == ([P] if budget is None else in_chunks)
            np.testing.assert_allclose(chunked.logits, whole.logits, rtol=0, atol=1e-5)
            text = "Count the colours: " + "red green blue " * 120
            pipe.prefill_chunk = None
            calls, step_tokens = [], pipe.backend.step_tokens
            pipe.backend.step_tokens = lambda cache, ids, *a: calls.append(ids.shape[1]) or step_tokens(cache, ids, *a)
            chunked = pipe.prefill(None, text)
            assert len(chunked.ids) > PREFILL_CHUNK and calls[0] == PREFILL_CHUNK and sum(calls) == len(chunked.ids)
            pipe.prefill_chunk = len(chunked.ids)
            np.testing.assert_allclose(chunked.logits, pipe.prefill(None, text).logits, rtol=0, atol=1e-5)


def test_float16_kv_on_a_fused_decoder_halves_the_cache_and_keeps_the_fp32_tokens(fused_pkg):
    """--kv-dtype float16 on an FP32 fused decoder: GroupQueryAttention computes in float16 on float16
    cache buffers (casts around it, the weights stay float32; its cos and sin caches are float16, as
    its query). It passes the FP32 gate on its own, and
    generates the FP32 package's greedy tokens, the prompt in chunks that read the cache included."""
    import onnx

    from sleigh.engines.build_engine import build_engine
    from sleigh.engines.options import EngineOptions
    from sleigh.runtime.pipeline import Pipeline
    from tests.helpers import EXAMPLES

    entry = build_engine(fused_pkg, EngineOptions(precision="fp32", kv_dtype="float16", quiet=True))
    assert entry.name == "onnxruntime-fp32-kv-fp16" and entry.kv_dtype == "float16" and entry.accuracy_passed
    dec = onnx.load(str(fused_pkg / entry.modules["decoder"]), load_external_data=False)
    io = {v.name: v.type.tensor_type.elem_type for v in (*dec.graph.input, *dec.graph.output)}
    kv = {n for n in io if n.startswith(("past_key_values.", "new_key_values."))}
    assert kv and {io[n] for n in kv} == {onnx.TensorProto.FLOAT16}
    assert {t for n, t in io.items() if n not in kv} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    fp16 = {t.name for t in dec.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert fp16 <= {"cos_cache_fp16", "sin_cache_fp16"}  # the weights stay float32
    assert not [n for n in dec.graph.node if n.op_type == "Cast" and set(n.input) & kv]  # the cache is never cast

    image, prompt = EXAMPLES / "coffee.jpg", "Describe the image in detail."
    with Pipeline.load(fused_pkg, engine="package") as ref, Pipeline.load(fused_pkg, engine=entry.name) as eng:
        ref.prefill_chunk = eng.prefill_chunk = 40
        got, want = eng.prefill(image, prompt), ref.prefill(image, prompt)
        assert len(got.ids) > 80 and {b.dtype for b in got.cache.slots.values()} == {np.dtype(np.float16)}
        assert 0 < np.abs(got.logits - want.logits).max() < 1e-2 * np.abs(want.logits).max()
        tokens = [p.generate(image, prompt, max_new_tokens=40, ignore_eos=True).result.token_ids for p in (ref, eng)]
        assert tokens[0] == tokens[1]


def _decoder_on_the_cpu_beside_cuda(pkg, caplog):
    """With CUDA first: the decoder's session asked for on the CPU provider, its slots numpy arrays, one
    warning, and the CPU's greedy tokens -> (the backend, closed after its generation, and the warning).
    The CUDA provider is absent here: ONNX Runtime falls back to the CPU for the other modules by itself,
    so what is checked is what the backend asks for and the tokens it then gives."""
    import logging

    from sleigh.runtime.backends.onnxruntime_backend import CPU, CUDA, OnnxRuntimeBackend
    from sleigh.runtime.kv_cache import HostSlots
    from sleigh.runtime.manifest import read_manifest
    from sleigh.runtime.pipeline import Pipeline

    with Pipeline.load(pkg, engine="package") as ref:
        want = ref.generate(None, "Hello", max_new_tokens=10, ignore_eos=True).result.token_ids
        with caplog.at_level(logging.WARNING, logger="sleigh"):
            backend = OnnxRuntimeBackend.from_package(pkg, read_manifest(pkg), providers=[CUDA, CPU])
        assert backend.providers == [CUDA, CPU] and backend.decoder_providers == [CPU]
        assert backend.device == "cpu" and isinstance(backend.slot_storage, HostSlots)
        [warning] = [r.getMessage() for r in caplog.records if r.name == "sleigh"]
        assert "decoder runs on the CPU" in warning
        with Pipeline(backend, ref.contract, ref.tokenizer) as pipe:
            assert pipe.generate(None, "Hello", max_new_tokens=10, ignore_eos=True).result.token_ids == want
    return backend, warning


def test_where_cuda_comes_first_a_fused_decoder_opens_on_the_cpu_and_says_so(fused_pkg, tiny_pkg, caplog):
    """ONNX Runtime's CUDA GroupQueryAttention is not checked with the attention bias that carries GSWA's
    weights (onnxruntime_backend.FUSED_NOT_ON_CUDA), so with CUDA first the fused decoder's session opens
    on the CPU provider, and one warning says why and what to export instead."""
    from sleigh.runtime.backends.onnxruntime_backend import CPU, CUDA, decoder_providers
    from sleigh.runtime.manifest import read_manifest

    backend, warning = _decoder_on_the_cpu_beside_cuda(fused_pkg, caplog)
    assert backend.describe().endswith("(CUDA, decoder on CPU)")
    assert "--decoder fused-cuda" in warning
    # the standard decoder and the weighted-values one are asked to open on CUDA as the other modules are
    standard = read_manifest(tiny_pkg).contract.kv_cache.form
    assert standard == "slots" and decoder_providers([CUDA, CPU], standard) == [CUDA, CPU]
    assert decoder_providers([CUDA, CPU], "weighted", "float16") == [CUDA, CPU]
    assert decoder_providers([CUDA, CPU], "weighted", "float32") == [CPU]
    assert decoder_providers([CPU], "shared") == [CPU]


@pytest.fixture(scope="module")
def weighted_pkg(tiny_ckpt, tmp_path_factory):
    """`sleigh export --decoder fused-cuda` of the tiny checkpoint, parity checked (kv_cache.form "weighted")."""
    from sleigh.export.exporter import ExportOptions, export_package

    out = tmp_path_factory.mktemp("weighted") / "pkg"
    result = export_package(tiny_ckpt, out, ExportOptions(decoder="fused-cuda", quiet=True))
    assert result.parity and all(r.ok for r in result.parity)
    return out


def test_the_weighted_values_form_matches_the_reference_and_the_bias_form(weighted_pkg, fused_pkg, tiny_model):
    """export --decoder fused-cuda: no attention_bias into GroupQueryAttention (what CUDA's kernel
    refuses), values kept as (w v, w) in padded heads; the reference's logits and keys/values (read back
    out of that layout) on every parity case, and the bias form's greedy tokens through the runtime,
    an image prompt (GSWA's weights in play) and text past a growth of the cache."""
    import onnx

    from sleigh.runtime.manifest import read_manifest
    from sleigh.runtime.pipeline import Pipeline
    from tests.helpers import EXAMPLES

    kv = read_manifest(weighted_pkg).contract.kv_cache
    cfg = tiny_model.cfg.llm
    assert kv.form == "weighted" and kv.head_dim == fused_decoder.padded_head_dim(cfg.head_dim) > cfg.head_dim
    graph = onnx.load(str(weighted_pkg / "decoder.onnx")).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == cfg.num_layers and all(len(n.input) == 7 for n in gqa)  # no attention_bias input
    with torch.inference_mode():
        results = shared_decoder_cases(weighted_pkg / "decoder.onnx", DecoderModule(tiny_model), EmbedModule(tiny_model),
                                       *_case_inputs(tiny_model), "fp32", form="weighted")
    assert all(r.ok for r in results), [(r.case, r.output, r.needed_atol) for r in results if not r.ok]
    # 40 tokens each (a long greedy run on random weights meets near ties, where 1e-6 apart may pick
    # either); the text prompt is long enough that its 40 tokens cross the 256-slot growth
    long_text = "Tell me a story about " + "a cat, a dog and a cup of coffee; " * 3
    with Pipeline.load(fused_pkg) as bias_form, Pipeline.load(weighted_pkg) as weighted:
        assert 216 < len(weighted.prepare(None, long_text)[1]) < 256
        for image, prompt in ((EXAMPLES / "coffee.jpg", "Describe it."), (None, long_text)):
            want = bias_form.generate(image, prompt, max_new_tokens=40, ignore_eos=True).result
            got = weighted.generate(image, prompt, max_new_tokens=40, ignore_eos=True).result
            assert got.token_ids == want.token_ids


def test_parity_runs_on_the_cpu_where_onnxruntime_gpu_offers_cuda(weighted_pkg, tiny_model, monkeypatch):
    """With onnxruntime-gpu (CUDA listed first by default) export's parity of a fused decoder still runs
    on the CPU provider, whose slots are the host arrays its cases write (on an H200 it asked for CUDA
    slots: "'OrtValue' object does not support item assignment")."""
    from sleigh.runtime.backends import onnxruntime_backend

    monkeypatch.setattr(onnxruntime_backend, "available_providers", lambda: [onnxruntime_backend.CUDA, onnxruntime_backend.CPU])
    assert onnxruntime_backend.default_providers()[0] == onnxruntime_backend.CUDA
    with torch.inference_mode():
        results = shared_decoder_cases(weighted_pkg / "decoder.onnx", DecoderModule(tiny_model), EmbedModule(tiny_model),
                                       *_case_inputs(tiny_model), "fp32", form="weighted")
    assert results and all(r.ok for r in results)


def test_where_cuda_comes_first_a_float32_weighted_decoder_opens_on_the_cpu(weighted_pkg, caplog):
    """CUDA's GroupQueryAttention has no float32 kernel: on an H200 ONNX Runtime ran that node on the CPU
    with the cache copied each step (4 tokens/s at full size) and the tiny package's greedy tokens were
    not the CPU's. With CUDA first the FP32 weighted-values package's decoder opens on the CPU provider
    (no fixed buffers, which are for a CUDA graph), says so once, and points to an FP16 engine; it gives
    the CPU's tokens."""
    backend, warning = _decoder_on_the_cpu_beside_cuda(weighted_pkg, caplog)
    assert backend.static_capacity is None and not backend.cuda_graph
    assert "not float16" in warning and "--precision fp16" in warning


def test_every_cuda_session_keeps_float32_in_float32(fused_pkg, monkeypatch):
    """ONNX Runtime's CUDA provider runs float32 MatMuls as TF32 unless told not to: every session the
    backend opens on CUDA asks for use_tf32 0 (and the decoder's with CUDA graphs keeps that too), so the
    FP32 package computes on a GPU what its parity report checked. (No CUDA here: what the backend asks
    ONNX Runtime for is recorded, each session then opened on the CPU.)"""
    import onnxruntime as ort

    from sleigh.runtime.backends.onnxruntime_backend import CPU, CUDA, OnnxRuntimeBackend, session_providers
    from sleigh.runtime.manifest import read_manifest

    asked, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, sess_options=None, providers=None: (
        asked.append(providers), real(path, sess_options=sess_options, providers=[CPU]))[1])
    with OnnxRuntimeBackend.from_package(fused_pkg, read_manifest(fused_pkg), providers=[CUDA, CPU]):
        pass
    cuda = [p for providers in asked for p in providers if p != CPU]
    assert cuda and all(p == (CUDA, {"use_tf32": "0"}) for p in cuda), asked  # vision, embed, gswa; the decoder on the CPU
    assert session_providers([CUDA, CPU], cuda_graph=True) == [(CUDA, {"use_tf32": "0", "enable_cuda_graph": "1"}), CPU]


def test_the_weighted_values_form_is_not_blind_to_the_bias(weighted_pkg, tiny_model):
    """Negative control: the same prefill with GSWA's bias and without gives other logits (the weights
    reach the attention), and the bias form's logits with it (parity above)."""
    import onnxruntime as ort

    cfg = tiny_model.cfg.llm
    sess = ort.InferenceSession(str(weighted_pkg / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x, bias = _case_inputs(tiny_model)[:2]
    S, hp = x.shape[1], fused_decoder.padded_head_dim(cfg.head_dim)
    feeds = {"input_ids": np.full((1, 1), -1, np.int64), "inputs_embeds": x, "attention_mask": np.ones((1, S), np.int64),
             "position_ids": np.arange(S, dtype=np.int64)[None],
             **{i.name: np.zeros((1, cfg.num_kv_heads, S, hp), np.float32) for i in sess.get_inputs() if i.name.startswith("past_")}}
    with_bias = sess.run(["logits"], {**feeds, "attention_bias": bias})[0]
    without = sess.run(["logits"], {**feeds, "attention_bias": np.zeros_like(bias)})[0]
    assert np.abs(with_bias - without).max() > 1e-3 * np.abs(without).max()


def test_decode_steps_on_fixed_buffers_give_the_ordinary_steps_tokens(weighted_pkg):
    """What a CUDA graph replays (runtime/backends/static_steps.py), run on the CPU: a batch-1
    generation borrows the backend's buffers of context-length slots and decodes with a mask and bias
    as wide as them, bound once; the same tokens as the ordinary steps. A second generation while the
    first holds them takes the ordinary path; a closed generation gives them back."""
    from sleigh.runtime.backends.base import module_files
    from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from sleigh.runtime.manifest import read_manifest
    from sleigh.runtime.pipeline import Pipeline
    from tests.helpers import EXAMPLES

    m = read_manifest(weighted_pkg)
    C = m.contract.generation.context_length
    with Pipeline.load(weighted_pkg) as ref:
        assert ref.backend.static_capacity is None  # the CPU provider: ordinary steps unless asked
        prompts = [(EXAMPLES / "coffee.jpg", "What is in the cup?"), (None, "Tell me a story.")]
        want = [ref.generate(i, p, max_new_tokens=30, ignore_eos=True).result.token_ids for i, p in prompts]
        backend = OnnxRuntimeBackend(module_files(m, None), m.contract.kv_cache, manifest_modules=m.modules, static_capacity=C)
        with Pipeline(backend, ref.contract, ref.tokenizer) as pipe:
            assert pipe.generate(*prompts[0], max_new_tokens=30, ignore_eos=True).result.token_ids == want[0]
            static = backend._static
            assert static.steps == 29 and static.borrower is None and static.capacity == C
            gens = [pipe.generate(i, p, max_new_tokens=30, ignore_eos=True) for i, p in prompts]
            its = [iter(g) for g in gens]
            while any([next(it, None) is not None for it in its]):
                pass
            assert [g.result.token_ids for g in gens] == want
            assert static.steps == 29 + 29  # one of the two held the buffers, the other ran the ordinary way
        # a generation longer than the fixed buffers moves to buffers of its own halfway, and goes on
        prompt_tokens = len(ref.prepare(None, "Tell me a story.")[1])
        want = ref.generate(None, "Tell me a story.", max_new_tokens=80, ignore_eos=True).result.token_ids
        small = OnnxRuntimeBackend(module_files(m, None), m.contract.kv_cache, manifest_modules=m.modules,
                                   static_capacity=prompt_tokens + 40)
        with Pipeline(small, ref.contract, ref.tokenizer) as pipe:
            assert pipe.generate(None, "Tell me a story.", max_new_tokens=80, ignore_eos=True).result.token_ids == want
            assert small._static.steps == 40 and small._static.borrower is None


def test_logits_of_a_step_on_fixed_buffers_stay_as_returned(weighted_pkg):
    """A decode step on the fixed buffers returns the caller's own float32 logits (batch, vocab): on the
    CPU the bound output is read back as a view, which the next step writes again."""
    from sleigh.runtime.backends.base import module_files
    from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from sleigh.runtime.manifest import read_manifest

    m = read_manifest(weighted_pkg)
    backend = OnnxRuntimeBackend(module_files(m, None), m.contract.kv_cache, manifest_modules=m.modules, static_capacity=64)
    no_image = no_image_rows(m.contract.model.hidden_size)
    cache, one = backend.new_cache(1), np.ones((1, 1), np.int64)
    backend.step_tokens(cache, np.array([[5, 6, 7]]), np.ones((1, 3), np.int64), np.zeros((1, 3), np.float32),
                        np.arange(3)[None], no_image)
    first = backend.step_tokens(cache, np.array([[8]]), one, np.zeros((1, 1), np.float32), np.array([[3]]), no_image)
    kept = first.copy()
    second = backend.step_tokens(cache, np.array([[9]]), one, np.zeros((1, 1), np.float32), np.array([[4]]), no_image)
    assert backend._static.steps == 2 and first.dtype == np.float32 and first.shape == (1, backend.vocab)
    assert not np.shares_memory(first, second) and not np.array_equal(first, second)
    np.testing.assert_array_equal(first, kept)
    cache.close()
    backend.close()


def test_which_decoders_take_fixed_buffers_and_a_cuda_graph():
    from sleigh.runtime.backends.onnxruntime_backend import CPU, CUDA, decoder_on_cpu, static_plan

    assert static_plan(True, "weighted", 4096) == (4096, True)
    assert static_plan(True, "weighted", None) == (None, False)  # SLEIGH_CUDA_GRAPH=0
    assert static_plan(True, "slots", 4096) == (None, False)
    assert static_plan(False, "weighted", 300) == (300, False)  # the CPU: fixed buffers as asked
    assert static_plan(False, "slots", 300) == (None, False)
    # a weighted decoder is on CUDA only with a float16 cache (CUDA's GroupQueryAttention: float16 only)
    assert [decoder_on_cpu([CUDA, CPU], "weighted", d) is None for d in ("float16", "float32", None)] == [True, False, False]


def test_a_graph_that_onnxruntime_refuses_falls_back_with_one_warning(weighted_pkg, monkeypatch, caplog):
    """The two fallbacks of the CUDA-graph path, run on the CPU: a session that ONNX Runtime will not open
    with `enable_cuda_graph` opens without it, and a decode step whose capture fails runs again the
    ordinary way, as does every later one; one warning each, and the same tokens."""
    import logging

    from sleigh.runtime.backends import static_steps
    from sleigh.runtime.backends.base import module_files
    from sleigh.runtime.backends.onnxruntime_backend import CPU, OnnxRuntimeBackend
    from sleigh.runtime.manifest import read_manifest
    from sleigh.runtime.pipeline import Pipeline

    m = read_manifest(weighted_pkg)
    with Pipeline.load(weighted_pkg) as ref:
        want = ref.generate(None, "Hello", max_new_tokens=12, ignore_eos=True).result.token_ids
        backend = OnnxRuntimeBackend(module_files(m, None), m.contract.kv_cache, manifest_modules=m.modules, static_capacity=512)
        ort = backend.ort
        refused = lambda *a, providers, **k: (_ for _ in ()).throw(RuntimeError("graph capture needs every node on CUDA"))  # noqa: E731
        monkeypatch.setattr(ort, "InferenceSession", refused)
        backend.cuda_graph = True
        with caplog.at_level(logging.WARNING, logger="sleigh"):
            assert backend._open_with_graphs(backend.files["decoder"], [CPU]) is None
        assert (backend.cuda_graph, backend.static_capacity, backend._graph_off) == (False, None, None)
        monkeypatch.undo()

        backend = OnnxRuntimeBackend(module_files(m, None), m.contract.kv_cache, manifest_modules=m.modules, static_capacity=512)
        backend.cuda_graph = True  # as on CUDA: a failed step falls back instead of raising
        calls = []

        def capture_fails(self, *args):
            calls.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(static_steps.StaticSteps, "step", capture_fails)
        with caplog.at_level(logging.WARNING, logger="sleigh"), Pipeline(backend, ref.contract, ref.tokenizer) as pipe:
            assert pipe.generate(None, "Hello", max_new_tokens=12, ignore_eos=True).result.token_ids == want
        assert calls == [1] and backend._static is None and not backend.cuda_graph
    warnings = [r.getMessage() for r in caplog.records if r.name == "sleigh"]
    assert len(warnings) == 2 and all(w.startswith("decode steps run without a CUDA graph") for w in warnings)


def test_build_engine_refuses_what_a_fused_decoder_cannot_be(fused_pkg):
    from sleigh.engines.build_engine import build_engine
    from sleigh.engines.options import EngineOptions

    with pytest.raises(SleighError, match="--backend tensorrt .*fused form"):
        build_engine(fused_pkg, EngineOptions(backend="tensorrt", precision="fp16", quiet=True))


def test_large_weights_stream_into_external_data(tiny_model, tmp_path, monkeypatch):
    """Over EXTERNAL_DATA_BYTES the weights go to decoder.onnx.data, written tensor by tensor at aligned
    offsets; ONNX Runtime reads the same logits as from the self-contained file."""
    import onnxruntime as ort

    inline, external = tmp_path / "inline", tmp_path / "external"
    inline.mkdir(), external.mkdir()
    fused_decoder.write(tiny_model.llm, inline, 18)
    monkeypatch.setattr(fused_decoder, "EXTERNAL_DATA_BYTES", 1024)
    assert fused_decoder.write(tiny_model.llm, external, 18) == ["decoder.onnx", "decoder.onnx.data"]
    assert (external / "decoder.onnx").stat().st_size < 100_000 < (external / "decoder.onnx.data").stat().st_size
    cfg = tiny_model.cfg.llm
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (1, 5)), "inputs_embeds": np.zeros((1, 1, cfg.hidden_size), np.float32),
             "attention_mask": np.ones((1, 5), np.int64), "attention_bias": np.zeros((1, 5), np.float32),
             "position_ids": np.arange(5)[None],
             **{f"past_key_values.{i}.{t}": np.zeros((1, cfg.num_kv_heads, 8, cfg.head_dim), np.float32)
                for i in range(cfg.num_layers) for t in ("key", "value")}}
    got, want = (ort.InferenceSession(str(d / "decoder.onnx")).run(["logits"], feeds)[0] for d in (external, inline))
    np.testing.assert_array_equal(got, want)


def test_inspect_names_the_decoder_form_and_counts_onnxruntime_ops(fused_pkg, tiny_model):
    """ONNX Runtime's contrib operators are counted by type, not listed as custom ops."""
    from sleigh.engines.inspect import inspect_package

    report = inspect_package(fused_pkg)
    decoder = report["modules"]["decoder"]
    assert report["kv_cache"]["form"] == "shared" and decoder["custom_ops"] == []
    assert decoder["onnxruntime_ops"]["GroupQueryAttention"] == tiny_model.cfg.llm.num_layers


def _one_step_both_ways(backend, hidden: int, vocab: int, token: int | None = None):
    """(logits of a decode step fed token ids, logits of the same step fed the embed module's rows),
    each after the same 6-token prefill; the step's token is `token`, else a random one."""
    rng = np.random.default_rng(3)
    no_image = no_image_rows(hidden)
    prompt, token = rng.integers(0, vocab, (1, 6)), rng.integers(0, vocab, (1, 1)) if token is None else np.array([[token]])
    got = []
    for by_ids in (True, False):
        cache = backend.new_cache(1)
        embeds = backend.run("embed", {"input_ids": prompt, "image_embeds": no_image})["inputs_embeds"]
        backend.step(cache, embeds, np.ones((1, 6), np.int64), np.zeros((1, 6), np.float32), np.arange(6)[None])
        args = (cache, np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32), np.array([[6]]))
        if by_ids:
            got.append(backend.step_tokens(args[0], token, *args[1:], no_image))
        else:
            embeds = backend.run("embed", {"input_ids": token, "image_embeds": no_image})["inputs_embeds"]
            got.append(backend.step(args[0], embeds, *args[1:]))
        cache.close()
    return got


def test_a_decode_step_embeds_its_token_inside_the_decoder(fused_pkg, tiny_model, monkeypatch):
    """Schema 6: a decode step feeds the fused decoder its token id, and gets the logits that the embed
    module's row for that token gives; a generation runs the embed module once for an image prompt (to
    merge the image rows), never for a text prompt, and never per token."""
    from sleigh.runtime.pipeline import Pipeline
    from tests.helpers import EXAMPLES

    cfg = tiny_model.cfg.llm
    with Pipeline.load(fused_pkg, engine="package") as pipe:
        backend = pipe.backend
        assert backend.reads_ids
        by_ids, by_embeds = _one_step_both_ways(backend, cfg.hidden_size, cfg.vocab_size)
        np.testing.assert_array_equal(by_ids, by_embeds)
        # schema 7: a generated <IMG_CONTEXT> is its table row through the embed module too (it was zeros)
        img = tiny_model.cfg.prompt.img_context_token_id
        by_ids, by_embeds = _one_step_both_ways(backend, cfg.hidden_size, cfg.vocab_size, token=img)
        np.testing.assert_array_equal(by_ids, by_embeds)
        runs, run = [], backend.run
        monkeypatch.setattr(backend, "run", lambda module, feeds: runs.append(module) or run(module, feeds))
        assert len(pipe.generate(None, "Hello", max_new_tokens=12, ignore_eos=True).result.token_ids) == 12
        assert runs == []
        assert len(pipe.generate(EXAMPLES / "coffee.jpg", max_new_tokens=12, ignore_eos=True).result.token_ids) == 12
        assert runs == ["vision", "gswa", "embed"]


@pytest.mark.parametrize("options", [dict(precision="fp32", llm_weights="int4", allow_degraded=True),
                                     dict(precision="fp16")], ids=["int4", "fp16"])
def test_an_engines_decoder_embeds_a_token_as_its_embed_module_does(fused_pkg, tiny_model, options):
    """build-engine converts the fused decoder's copy of the table as the embed module's (INT8 rows
    beside INT4/INT8 weights, float16 in an FP16 engine), so a token's embedding is the same in a
    prefill and in a decode step."""
    import onnx
    import onnxruntime

    from sleigh.engines.build_engine import WEIGHT_ONLY_ORT_MIN, build_engine
    from sleigh.engines.options import EngineOptions
    from sleigh.runtime.compat import parse_version
    from sleigh.runtime.pipeline import Pipeline

    if "llm_weights" in options and parse_version(onnxruntime.__version__) < WEIGHT_ONLY_ORT_MIN:
        pytest.skip("weight-only engines are built with onnxruntime 1.31 or newer (the refusal: test_build_engine.py)")
    entry = build_engine(fused_pkg, EngineOptions(quiet=True, **options))
    dec = onnx.load(str(fused_pkg / entry.modules["decoder"]), load_external_data=False)
    tables = {t.name: t.data_type for t in dec.graph.initializer if t.name.startswith("embed_tokens.weight")}
    want = onnx.TensorProto.INT8 if "llm_weights" in options else onnx.TensorProto.FLOAT16
    assert want in tables.values(), tables
    cfg = tiny_model.cfg.llm
    with Pipeline.load(fused_pkg, engine=entry.name) as pipe:
        for token in (None, tiny_model.cfg.prompt.img_context_token_id):  # a random one, a generated <IMG_CONTEXT>
            by_ids, by_embeds = _one_step_both_ways(pipe.backend, cfg.hidden_size, cfg.vocab_size, token)
            np.testing.assert_allclose(by_ids, by_embeds, rtol=0, atol=1e-5 * np.abs(by_embeds).max())


def test_the_token_steps_benchmark_runs_and_finds_both_ways_equal(fused_pkg):
    """benchmarks/token_steps.py (RESULTS.md's decode-step numbers) on the tiny fused package: its
    first step's logits through ids and through the embed module agree, and it prints both sides."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "token_steps.py"), str(fused_pkg), "--positions", "20",
                           "--rounds", "2", "--steps", "4", "--settle", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "ids against embed: max abs difference 0\n" in proc.stdout
    assert "2 rounds x 4 steps after 3 untimed" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines()[-2:]] == ["ids", "embed"]


def test_the_weighted_decoder_benchmark_runs(tiny_ckpt):
    """benchmarks/weighted_decoder.py (RESULTS.md's CPU numbers for --decoder fused-cuda) on the tiny
    checkpoint: both forms run, and it prints their medians and ratios."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "weighted_decoder.py"), str(tiny_ckpt), "--positions", "16",
                           "--rounds", "2", "--steps", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:2]] == ["bias", "weighted"]
    assert lines[2].startswith("weighted/bias over 2 rounds, 16 positions: prefill ")


def test_a_weighted_decoder_given_its_past_and_present_as_two_buffers_keeps_its_tokens(weighted_pkg):
    """benchmarks/gqa_two_buffers.py: what ONNX Runtime's copies make of the in-place binding (a float32
    GroupQueryAttention placed on the CPU inside a CUDA session) gives the in-place greedy tokens on the
    CPU and writes every slot in use, so the other tokens an H200 gave on that path (RESULTS.md) come
    from elsewhere."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gqa_two_buffers.py"), str(weighted_pkg / "decoder.onnx")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "largest difference over the 32 positions in use: 0.0 | slots in use never written (NaN): []" in proc.stdout
