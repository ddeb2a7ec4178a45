"""Parity of exported modules against the PyTorch reference (Polygraphy-style reports).

Every comparison checks shape, then dtype, then values, and reports max abs, mean abs, cosine and
the smallest absolute tolerance that would have passed at the table's relative tolerance.
Tolerances sit in one table per precision, keyed by output name (first matching prefix wins).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sleigh.runtime import DEFAULT_PROMPT
from sleigh.runtime.image import tile_image
from sleigh.runtime.kv_cache import LOGITS, NEW, PAST, SlotCache
from sleigh.runtime.manifest import IN_PLACE_FORMS, KVCacheSection, kv_names
from sleigh.runtime.multimodal import image_attention_bias, no_image_rows
from sleigh.runtime.package import TOKENIZER
from sleigh.runtime.prompt import PromptTokenizer

COMPARE_BLOCK = 1 << 22  # elements per block when comparing large outputs

# (atol, rtol) per output-name prefix; "*" is the default.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "fp32": {"gswa_weights": (1e-4, 1e-4), LOGITS: (1e-3, 1e-3), NEW + ".": (1e-3, 1e-3),
             "image_embeds": (1e-3, 1e-3), "cls_tokens": (1e-3, 1e-3), "*": (1e-4, 1e-4)},
}


@dataclass
class Comparison:
    case: str
    output: str
    ok: bool
    max_abs: float
    mean_abs: float
    cosine: float
    atol: float
    rtol: float
    needed_atol: float  # the smallest atol that would have passed at this rtol
    note: str = ""


def tolerance(name: str, precision: str = "fp32") -> tuple[float, float]:
    table = TOLERANCES[precision]
    for prefix, tol in table.items():
        if prefix != "*" and name.startswith(prefix):
            return tol
    return table["*"]


def compare(case: str, name: str, got: np.ndarray, ref: np.ndarray, precision: str = "fp32") -> Comparison:
    atol, rtol = tolerance(name, precision)
    if got.shape != ref.shape:
        return Comparison(case, name, False, np.inf, np.inf, 0.0, atol, rtol, np.inf, f"shape {got.shape} != {ref.shape}")
    if got.dtype != ref.dtype:
        return Comparison(case, name, False, np.inf, np.inf, 0.0, atol, rtol, np.inf, f"dtype {got.dtype} != {ref.dtype}")
    if got.size == 0:
        return Comparison(case, name, True, 0.0, 0.0, 1.0, atol, rtol, 0.0, "empty")
    # In blocks with float64 sums: whole float64 copies of full-size outputs (the logits of every
    # position were ~0.7 GB before the decoder returned the last position's alone) ran an export out of memory.
    g_all, r_all = got.reshape(-1), ref.reshape(-1)
    max_abs = needed = sum_abs = gg = rr = gr = 0.0
    for start in range(0, g_all.size, COMPARE_BLOCK):
        g = g_all[start:start + COMPARE_BLOCK].astype(np.float64)
        r = r_all[start:start + COMPARE_BLOCK].astype(np.float64)
        if not np.isfinite(g).all():
            return Comparison(case, name, False, np.inf, np.inf, 0.0, atol, rtol, np.inf, "non-finite values")
        diff = np.abs(g - r)
        max_abs = max(max_abs, float(diff.max()))
        needed = max(needed, float((diff - rtol * np.abs(r)).max()))
        sum_abs += float(diff.sum())
        gg, rr, gr = gg + float(g @ g), rr + float(r @ r), gr + float(g @ r)
    denom = np.sqrt(gg) * np.sqrt(rr)
    cosine = gr / denom if denom > 0 else float(np.array_equal(got, ref))
    return Comparison(case, name, needed <= atol, max_abs, sum_abs / g_all.size, cosine, atol, rtol, needed)


def _ort(path: Path, threads: int | None = None):
    from sleigh.runtime.backends.onnxruntime_backend import CPU, session_options
    from sleigh.runtime.compat import import_onnxruntime

    ort = import_onnxruntime()

    # no arena: parity opens the (full-size: gigabyte) modules one after another
    return ort.InferenceSession(str(path), sess_options=session_options(threads, arena=False), providers=[CPU])


def _run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _compare_all(case, got: dict, ref: dict, precision) -> list[Comparison]:
    return [compare(case, name, got[name], ref[name], precision) for name in ref]


@torch.inference_mode()
def verify_package(pkg: Path, model, real_image, *, precision: str = "fp32", seed: int = 0,
                   progress=None, kv_form: str = "slots", release=None) -> list[Comparison]:
    """Run vision, gswa, embed and decoder in ONNX Runtime (CPU) against `model` (a SleighVL).
    `kv_form`: the decoder's (manifest kv_cache.form); a fused one ("shared", "weighted") runs through the
    runtime's backend.
    The decoder's references are all computed before its session opens; `release()`, when given, is
    called in between, so a caller that needs the model no more frees its weights before the decoder
    (full size: 8.8 GB of torch weights and a 7 GB session would otherwise be held at once)."""
    from sleigh.export.modules import DecoderModule, EmbedModule, GswaModule, VisionModule

    pkg = Path(pkg)
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    results: list[Comparison] = []
    step = progress.advance if progress else (lambda *a, **k: None)
    vision, gswa, embed, decoder = VisionModule(model), GswaModule(model), EmbedModule(model), DecoderModule(model)

    # vision: random views at T = 1 and T = 13, then a real image; gswa on each case's reference CLS tokens
    s_vis, s_gswa = _ort(pkg / "vision.onnx"), _ort(pkg / "gswa.onnx")
    size = cfg.vision.image_size
    tiled = tile_image(real_image, min_tiles=cfg.image.min_tiles, max_tiles=cfg.image.max_tiles, size=size,
                       thumbnail=cfg.image.thumbnail, mean=cfg.image.mean, std=cfg.image.std)
    cases = [("vision random T=1", rng.standard_normal((1, 3, size, size)).astype(np.float32)),
             ("vision random T=13", rng.standard_normal((13, 3, size, size)).astype(np.float32)),
             (f"vision image T={tiled.num_views}", tiled.pixel_values)]
    for case, pv in cases:
        emb, cls = vision(torch.from_numpy(pv))
        results += _compare_all(case, _run(s_vis, {"pixel_values": pv}),
                                {"image_embeds": emb.numpy(), "cls_tokens": cls.numpy()}, precision)
        results += _compare_all(case.replace("vision", "gswa"), _run(s_gswa, {"cls_tokens": cls.numpy()}),
                                {"gswa_weights": gswa(cls).numpy()}, precision)
    step()

    # embed: a real prompt with the image's rows, and a random batch of 2 with text only
    s_emb = _ort(pkg / "embed.onnx")
    tok = PromptTokenizer.from_file(pkg / TOKENIZER)
    ids = np.asarray([tok.encode_prompt(DEFAULT_PROMPT, tiled.num_views,
                                        tokens_per_view=cfg.vision.tokens_per_view)], np.int64)
    img_out = _run(s_vis, {"pixel_values": tiled.pixel_values})
    img_out |= _run(s_gswa, {"cls_tokens": img_out["cls_tokens"]})
    del s_vis, s_gswa  # one module's session at a time: full-size modules are gigabytes each
    rows = img_out["image_embeds"].reshape(-1, cfg.llm.hidden_size)
    rand_ids = rng.integers(0, cfg.llm.vocab_size, (2, 9)).astype(np.int64)
    rand_ids[1, 4] = cfg.prompt.img_context_token_id  # past the (no) image rows: its table row
    for case, feeds in [("embed image prompt", {"input_ids": ids, "image_embeds": rows}),
                        ("embed random B=2", {"input_ids": rand_ids, "image_embeds": no_image_rows(cfg.llm.hidden_size)})]:
        ref = embed(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["image_embeds"])).numpy()
        results += _compare_all(case, _run(s_emb, feeds), {"inputs_embeds": ref}, precision)
    step()

    # decoder: prefill of the real prompt (no cache), then two greedy decode steps on the runtime's
    # slot cache with its unused slots filled with noise (they must be masked out), and random batches
    # of 2 with left padding: a prefill (no cache) and a step on 8 slots, two of them unused. The
    # decoder returns the last position's logits alone, (B, 1, V); with left padding that position
    # is a real token in every row, so every row's logits are compared.
    bias = np.zeros(ids.shape, np.float32)
    if model.gswa is not None and cfg.gswa.apply == "attention":
        bias = image_attention_bias(ids, img_out["gswa_weights"], cfg.prompt.img_context_token_id,
                                    cfg.vision.tokens_per_view, cfg.gswa.min_weight)
    inputs = _run(s_emb, {"input_ids": ids, "image_embeds": rows})["inputs_embeds"]
    del s_emb
    if kv_form in IN_PLACE_FORMS:
        cases = _shared_references(decoder, embed, inputs, bias, cfg, rng)
    else:
        cases = _slot_references(decoder, embed, inputs, bias, cfg, rng)
    del model, vision, gswa, embed, decoder
    if release is not None:
        release()
    if kv_form in IN_PLACE_FORMS:
        results += _shared_cases(pkg / "decoder.onnx", cases, cfg, precision, kv_form)
    else:
        s_dec = _ort(pkg / "decoder.onnx")
        for case, feeds, ref in cases:
            results += _compare_all(case, _run(s_dec, feeds), ref, precision)
    step()
    return results


def _slot_references(decoder, embed, inputs, bias, cfg, rng) -> list[tuple[str, dict, dict]]:
    """(case, feeds, reference outputs) of the standard decoder's cases."""
    L, KV, hd = cfg.llm.num_layers, cfg.llm.num_kv_heads, cfg.llm.head_dim
    past_names, new_names = kv_names(L, PAST), kv_names(L, NEW)
    order = ["inputs_embeds", "attention_mask", "attention_bias", "position_ids", *past_names]
    cases = []
    cache = SlotCache(past_names, 1, KV, hd)
    mask, P = np.ones(inputs.shape[:2], np.int64), 0
    for case in ["decoder prefill (no cache)", "decoder decode step 1 (slots)", "decoder decode step 2 (slots)"]:
        S = inputs.shape[1]
        feeds = {"inputs_embeds": inputs, "position_ids": np.arange(P, P + S, dtype=np.int64)[None], **cache.feeds(mask, bias)}
        feeds = {n: np.array(a) for n, a in feeds.items()}  # a copy: the slots change below
        ref = dict(zip([LOGITS, *new_names], [t.numpy() for t in decoder(*[torch.from_numpy(feeds[n]) for n in order])]))
        cases.append((case, feeds, ref))
        cache.append({p: ref[n] for p, n in zip(past_names, new_names)}, mask, bias)  # continue from the reference's keys
        for slots in cache.slots.values():
            slots[:, :, cache.length:] = 10 * rng.standard_normal(slots[:, :, cache.length:].shape)  # unused: must be masked out
        P += S
        token = int(ref[LOGITS][0, -1].argmax())
        inputs = embed(torch.tensor([[token]]), torch.zeros(0, cfg.llm.hidden_size)).numpy()
        mask, bias = np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32)
    B, S = 2, 5
    for case, C, pad in [("decoder prefill B=2 left padding (no cache)", 0, 2), ("decoder random B=2 slots 8", 8, 3)]:
        mask = np.ones((B, C + S), np.int64)
        mask[1, :pad] = 0  # left padding in row 1 (in the new positions without a cache)
        mask[:, 6:C] = 0  # two unused slots
        feeds = {"inputs_embeds": rng.standard_normal((B, S, cfg.llm.hidden_size)).astype(np.float32),
                 "attention_mask": mask, "attention_bias": (0.1 * rng.standard_normal((B, C + S))).astype(np.float32),
                 "position_ids": np.tile(np.arange(6, 6 + S, dtype=np.int64), (B, 1)),
                 **{n: rng.standard_normal((B, KV, C, hd)).astype(np.float32) for n in past_names}}
        cases.append((case, feeds, dict(zip([LOGITS, *new_names], [t.numpy() for t in decoder(*[torch.from_numpy(feeds[n]) for n in order])]))))
    return cases


@dataclass
class SharedCase:
    """One step of a fused decoder's parity: the cache as the step finds it (its slots in use, their
    mask and bias), the step's inputs and the reference's outputs."""
    name: str
    slots: dict  # past_key_values name -> (B, KV, P, hd)
    past_mask: np.ndarray
    past_bias: np.ndarray
    x: np.ndarray
    mask: np.ndarray
    bias: np.ndarray
    pos: np.ndarray
    ref: dict
    ids: np.ndarray | None = None  # a decode step's token ids (x is their embedding): fed as ids where the decoder takes them


def _shared_references(decoder, embed, inputs, bias, cfg, rng) -> list[SharedCase]:
    """The fused form's cases (those of the standard form), on the reference alone: the real prompt's
    prefill and two greedy steps (each continuing from the reference's keys), then random batches of
    2 with left padding, a prefill and a prompt after 8 positions (two of them masked: GroupQueryAttention
    runs it row by row)."""
    L, KV, hd = cfg.llm.num_layers, cfg.llm.num_kv_heads, cfg.llm.head_dim
    past_names, new_names = kv_names(L, PAST), kv_names(L, NEW)
    cases = []

    def case(name, cache, x, mask, bias_new, pos, ids=None):
        P = cache.length
        attention = cache.attention(mask, bias_new, shared=True)
        used = {n: np.array(cache.slots[n][:, :, :P]) for n in past_names}
        ref_out = decoder(*[torch.from_numpy(a) for a in (x, attention["attention_mask"], attention["attention_bias"], pos)],
                          *[torch.from_numpy(used[n]) for n in past_names])
        ref = dict(zip([LOGITS, *new_names], [t.numpy() for t in ref_out]))
        cases.append(SharedCase(name, used, cache.mask[:, :P].copy(), cache.bias[:, :P].copy(), x, mask, bias_new, pos, ref, ids))
        cache.append({p: ref[n] for p, n in zip(past_names, new_names)}, mask, bias_new)
        return ref[LOGITS]

    cache = SlotCache(past_names, 1, KV, hd)
    mask, P, ids = np.ones((1, inputs.shape[1]), np.int64), 0, None
    for name in ["decoder prefill (no cache)", "decoder decode step 1 (shared)", "decoder decode step 2 (shared)"]:
        S = inputs.shape[1]
        logits = case(name, cache, inputs, mask, bias, np.arange(P, P + S, dtype=np.int64)[None], ids)
        P += S
        ids = np.array([[int(logits[0, -1].argmax())]], np.int64)
        inputs = embed(torch.from_numpy(ids), torch.zeros(0, cfg.llm.hidden_size)).numpy()
        mask, bias = np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32)
    B, S = 2, 5
    for name, C, pad in [("decoder prefill B=2 left padding (no cache)", 0, 2), ("decoder random tokens B=2 after 8 (shared)", 8, 3)]:
        cache = SlotCache(past_names, B, KV, hd)
        if C:
            cache.reserve(C + S)
            for n in past_names:
                cache.slots[n][:, :, :C] = rng.standard_normal((B, KV, C, hd))
            past_mask = np.ones((B, C), np.int64)
            past_mask[:, 6:] = 0  # two masked positions in the cache
            cache.advance(past_mask, (0.1 * rng.standard_normal((B, C))).astype(np.float32))
        mask = np.ones((B, S), np.int64)
        if not C:
            mask[1, :pad] = 0  # left padding in row 1
        x, ids = rng.standard_normal((B, S, cfg.llm.hidden_size)).astype(np.float32), None
        if C:  # random tokens: their ids where the decoder takes them, their embeddings elsewhere
            ids = rng.integers(0, cfg.llm.vocab_size, (B, S)).astype(np.int64)
            x = embed(torch.from_numpy(ids), torch.zeros(0, cfg.llm.hidden_size)).numpy()
        case(name, cache, x, mask, (0.1 * rng.standard_normal((B, S))).astype(np.float32),
             np.tile(np.arange(C, C + S, dtype=np.int64), (B, 1)), ids)
    return cases


def _shared_cases(path: Path, cases: list[SharedCase], cfg, precision, form: str = "shared") -> list[Comparison]:
    """A fused decoder (kv_cache.form "shared" or "weighted", export/fused_decoder.py) through the
    runtime's ONNX Runtime backend, which binds each cache buffer as the input and the output of its
    layer, on `_shared_references`' cases. A step that continues the previous one's sequence keeps its
    cache (and the binding on it), with the slots in use set to the reference's keys (laid out as the
    "weighted" form keeps them, for that form); new keys are compared where the mask is 1 (a padded
    position's keys are never read, and its fully masked query averages other keys than the
    reference's: GroupQueryAttention leaves out the later ones)."""
    from sleigh.export.fused_decoder import from_weighted_cache, padded_head_dim, to_weighted_cache
    from sleigh.runtime.backends.onnxruntime_backend import CPU, OnnxRuntimeBackend

    L, KV, hd = cfg.llm.num_layers, cfg.llm.num_kv_heads, cfg.llm.head_dim
    weighted = form == "weighted"
    past_names, new_names = kv_names(L, PAST), kv_names(L, NEW)
    results = []
    section = KVCacheSection(KV, padded_head_dim(hd) if weighted else hd, tuple(past_names), tuple(new_names), form)
    # on the CPU provider, as every parity check (the record says so): onnxruntime-gpu would put the slots on
    # the GPU, which these cases write and read as host arrays
    with OnnxRuntimeBackend({"decoder": path}, section, providers=[CPU]) as backend:
        cache = None
        for c in cases:
            (B, P), S = c.past_mask.shape, c.x.shape[1]
            if cache is None or cache.batch != B or cache.length != P:
                cache = backend.new_cache(B)
                cache.reserve(P + S)
                cache.advance(c.past_mask, c.past_bias)
            weights = np.exp(c.past_bias) * (c.past_mask > 0)
            for n in past_names:
                cache.slots[n][:, :, :P] = to_weighted_cache(n, c.slots[n], weights) if weighted else c.slots[n]
            if c.ids is not None and backend.reads_ids:  # the token's embedding inside the decoder
                got = backend.step_tokens(cache, c.ids, c.mask, c.bias, c.pos, no_image_rows(c.x.shape[-1]))[:, None]
            else:
                got = backend.step(cache, c.x, c.mask, c.bias, c.pos)[:, None]
            real = c.mask[:, None, :, None]
            written = {n: (from_weighted_cache(n, cache.slots[p][:, :, P:P + S], hd) if weighted else cache.slots[p][:, :, P:P + S])
                       * real for p, n in zip(past_names, new_names)}
            results.extend(_compare_all(c.name, {LOGITS: got, **written}, {LOGITS: c.ref[LOGITS], **{n: c.ref[n] * real for n in new_names}},
                                        precision))
    return results


def shared_decoder_cases(path: Path, decoder, embed, inputs, bias, cfg, rng, precision, form: str = "shared") -> list[Comparison]:
    """The fused forms' parity cases (`_shared_references`, then `_shared_cases`)."""
    return _shared_cases(path, _shared_references(decoder, embed, inputs, bias, cfg, rng), cfg, precision, form)


def summarize(results: list[Comparison]) -> dict:
    """Manifest form: pass/fail plus, per case and output, the numbers (non-finite ones as null:
    strict JSON has no Infinity)."""
    clean = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v  # noqa: E731
    return {"passed": all(r.ok for r in results),
            "checks": [{k: clean(v) for k, v in asdict(r).items()} for r in results]}


def table_rows(results: list[Comparison], fold_kv: bool = True) -> list[tuple[str, ...]]:
    """Short printable rows: one per case and output, the KV tensors folded into one worst row."""
    rows, folded = [], {}
    for r in results:
        if fold_kv and r.output.startswith(NEW + "."):
            key = r.case
            worst = folded.get(key)
            if worst is None or r.needed_atol > worst.needed_atol or not r.ok:
                folded[key] = r
            continue
        rows.append(r)
    for r in folded.values():
        rows.append(Comparison(r.case, f"{NEW}.* (worst: {r.output})", all(x.ok for x in results if x.case == r.case and x.output.startswith(NEW + ".")),
                               r.max_abs, r.mean_abs, r.cosine, r.atol, r.rtol, r.needed_atol, r.note))
    order = {c: i for i, c in enumerate(dict.fromkeys(r.case for r in results))}
    rows.sort(key=lambda r: order[r.case])
    return [(r.case, r.output, "ok" if r.ok else "FAIL", f"{r.max_abs:.2e}", f"{r.mean_abs:.2e}", f"{r.cosine:.6f}",
             f"{r.needed_atol:.2e}", f"{r.atol:.0e}") for r in rows]
