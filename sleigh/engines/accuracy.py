"""The accuracy gate: an engine against the package's FP32 modules, on image/prompt pairs that
calibration did not see. Quantized engines are judged by cosine and agreement, not max-abs.

Per pair: cosine of every view's image embeddings, max abs difference of the GSWA weights, cosine
and top-1 agreement of the last prompt logits, and how many of the first 32 greedy tokens agree
before the two diverge. Thresholds sit in one table per precision (`GATES`).

With eval data (`build-engine --eval-data`), a second gate judges the task itself: exact-match
accuracy per question type (`sleigh eval`) of the engine against the FP32 modules (`run_task_gate`),
whose numbers are measured once per eval data and kept in the package (`fp32_task_accuracy`).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sleigh.engines.calibration.collect import IMAGE_EXTENSIONS, list_images
from sleigh.errors import SleighError
from sleigh.runtime import DEFAULT_PROMPT
from sleigh.runtime.manifest import LLM_WEIGHTS, PRECISIONS, Calibration, EngineEntry, read_manifest, update_manifest
from sleigh.runtime.package import sha256_file

NUM_TOKENS = 32
PROMPTS = (DEFAULT_PROMPT, "What is the main object in this picture?",
           "What colours do you see?", "Is there any text in the image?", "Where could this photo have been taken?")

# Thresholds, one table per precision: the vision metrics follow the engine's precision, the LLM
# metrics the looser of its decoder weights' (--llm-weights) and its precision's (`llm_gate`).
# embeddings_cos_min and logits_cos_min are minima over all pairs; top1 and tokens are fractions
# (top-1 agreement of the last logits; mean common greedy prefix / NUM_TOKENS). Token agreement is a
# weak signal on random weights (near-flat logits flip on tiny changes), so its floor is low; the
# cosines carry the gate. INT8's floor is measured: FP32 vision with a weight-only INT8 decoder
# (logits cosine 0.9998) scored 0.13 on the small preset and the full INT8 engine 0.17 to 0.33 on the
# tiny one (entropy, percentile, minmax; on an AVX2 EPYC), where the prefix ends at the first
# near-tie; 0.1 still fails an engine whose first tokens already differ.
VISION_GATES: dict[str, dict[str, float]] = {
    "fp32": {"embeddings_cos_min": 0.9999, "gswa_max_abs": 1e-3},
    "fp16": {"embeddings_cos_min": 0.999, "gswa_max_abs": 0.02},
    "int8": {"embeddings_cos_min": 0.99, "gswa_max_abs": 0.5},
}
# INT8 vision's floors are set on the trained demo model (examples/demo-ckpt, the five gate images;
# held-out task accuracy from `sleigh eval`, benchmarks/RESULTS.md "The demo model"): with attention's
# P·V in int8 the engine lost 2.0-3.4 points per question type and the gate read embeddings cosine
# 0.987 and GSWA weights off by 0.88-1.52; with P·V in float (calibration/int8.py) it is within
# 0.2 points of FP32 and reads 0.9989 and 0.33. Trained GSWA weights span ~0-3, so 0.5 separates the two.
# (Those readings are from the previous demo model, 4-layer ViT; the one shipped since reads 0.9993-0.9996
# and 0.05-0.24 over three seeds, and its task accuracy stays within 0.6 points of FP32.)
LLM_GATES: dict[str, dict[str, float]] = {
    "fp32": {"logits_cos_min": 0.9999, "top1": 1.0, "tokens": 0.9},
    "fp16": {"logits_cos_min": 0.999, "top1": 0.8, "tokens": 0.25},
    "int8": {"logits_cos_min": 0.995, "top1": 0.8, "tokens": 0.1},
    "int4": {"logits_cos_min": 0.98, "top1": 0.6, "tokens": 0.1},
}


HIGHER_IS_BETTER = {"embeddings_cos_min": True, "gswa_max_abs": False, "logits_cos_min": True, "top1": True, "tokens": True}


@dataclass
class PairResult:
    image: str
    prompt: str
    views: int
    embeddings_cos_mean: float
    embeddings_cos_min: float
    gswa_max_abs: float
    logits_cos: float
    top1_agree: bool
    tokens_agree: int  # common prefix of the first NUM_TOKENS greedy tokens


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else float(np.array_equal(a, b))


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Side:
    """What one pipeline gives for an image and a prompt: the gate compares two of these."""
    image_embeds: np.ndarray
    gswa_weights: np.ndarray
    logits: np.ndarray
    token_ids: list[int]


def run_side(pipe, image, prompt: str, num_tokens: int = NUM_TOKENS, max_tiles: int | None = None) -> Side:
    state = pipe.prefill(image, prompt, max_new_tokens=num_tokens, max_tiles=max_tiles)
    tokens = pipe.generate_from(state, max_new_tokens=num_tokens, ignore_eos=True).result.token_ids
    return Side(state.image_embeds, state.gswa_weights, state.logits, tokens)


def compare_pair(ref: Side, got: Side, image, prompt: str) -> PairResult:
    views = ref.image_embeds.shape[0]
    per_view = [_cos(got.image_embeds[t], ref.image_embeds[t]) for t in range(views)] or [1.0]
    gswa = float(np.abs(got.gswa_weights - ref.gswa_weights).max()) if views else 0.0
    return PairResult(Path(str(image)).name, prompt, views, float(np.mean(per_view)), float(np.min(per_view)), gswa,
                      _cos(got.logits, ref.logits), int(got.logits.argmax()) == int(ref.logits.argmax()),
                      _prefix(ref.token_ids, got.token_ids))


def llm_gate(precision: str, llm_weights: str) -> dict[str, float]:
    """The LLM metrics' floors: the looser of the decoder weights' and the vision precision's table, since
    the decoder reads the vision engine's embeddings. (INT8 vision with an FP32 decoder on the trained demo
    model: logits cosine 0.99998 but greedy tokens 0.74-0.83 agreeing, against FP32's floor of 0.9, while
    its task accuracy stayed within 0.6 points of FP32; benchmarks/RESULTS.md, "The demo model".)"""
    own, upstream = LLM_GATES[llm_weights], LLM_GATES[precision]
    return {k: min(v, upstream[k]) if HIGHER_IS_BETTER[k] else max(v, upstream[k]) for k, v in own.items()}


def summarize(pairs: list[PairResult], precision: str, llm_weights: str, num_tokens: int = NUM_TOKENS) -> dict:
    gate = {**VISION_GATES[precision], **llm_gate(precision, llm_weights)}
    metrics = {
        "embeddings_cos_mean": float(np.mean([p.embeddings_cos_mean for p in pairs])),
        "embeddings_cos_min": float(np.min([p.embeddings_cos_min for p in pairs])),
        "gswa_max_abs": float(np.max([p.gswa_max_abs for p in pairs])),
        "logits_cos_min": float(np.min([p.logits_cos for p in pairs])),
        "logits_cos_mean": float(np.mean([p.logits_cos for p in pairs])),
        "top1": float(np.mean([p.top1_agree for p in pairs])),
        "tokens": float(np.mean([p.tokens_agree for p in pairs]) / num_tokens),
    }
    checks = []
    for key, threshold in gate.items():
        value = metrics[key]
        ok = value >= threshold if HIGHER_IS_BETTER[key] else value <= threshold
        margin = value - threshold if HIGHER_IS_BETTER[key] else threshold - value
        checks.append({"metric": key, "value": value, "threshold": threshold, "ok": ok, "margin": margin})
    return {"precision": precision, "llm_weights": llm_weights, "passed": all(c["ok"] for c in checks), "metrics": metrics, "checks": checks,
            "pairs": [asdict(p) for p in pairs], "num_tokens": num_tokens}


def check_gate_fits(manifest, tiles: int, context: int) -> None:
    """Before a build: the agreement gate's longest prompt (each of PROMPTS with an image of `tiles`
    tiles) and its NUM_TOKENS fit the engine's `context` (a run on the engine is held to it), so a
    build is not refused at its gate after every module is converted."""
    from sleigh.runtime.image import max_views
    from sleigh.runtime.prompt import PromptTokenizer, Turn

    c = manifest.contract
    tok = PromptTokenizer.from_file(manifest.path(manifest.tokenizer, "manifest.json: tokenizer.file"))
    views = max_views(tiles, c.image.thumbnail)
    prompt = max(len(tok.encode_chat([Turn("user", p)], views, system=c.prompt.system_message,
                                     tokens_per_view=c.prompt.tokens_per_view)) for p in PROMPTS)
    if prompt + NUM_TOKENS > context:
        raise SleighError(f"--max-context {context}", f"the accuracy gate's prompts with {views} views take up to {prompt} "
                          f"tokens, and it generates {NUM_TOKENS}", f"--max-context {prompt + NUM_TOKENS} or more, or "
                          "a smaller --max-tiles")


def gate_images(images: Path | None, calibration: Calibration | None) -> list[Path]:
    """Images for the gate: a folder's images that calibration did not use (by content; by name for a
    calibration made before it recorded sha256), else the photo shipped with sleigh plus mirrored and
    cropped versions of it (written to a temporary folder)."""
    if images is not None:
        listed = list_images(Path(images))
        if not listed:
            raise SleighError(str(images), "holds no images", f"a folder of images ({', '.join(IMAGE_EXTENSIONS)})")
        if calibration is not None and calibration.image_sha256:
            used = set(calibration.image_sha256)
            found = [p for p in listed if sha256_file(p) not in used]
        else:
            used = set(calibration.images if calibration else ())
            found = [p for p in listed if p.name not in used]
        if not found:
            raise SleighError(str(images), f"all {len(listed)} images were used for calibration",
                              "a folder of images held out from calibration")
        return found
    return shipped_variants()


GATE_FOLDER = "sleigh-gate"  # the gate's images are written to a staging folder of this name in the temp folder


def shipped_variants() -> list[Path]:
    import tempfile

    from PIL import Image, ImageOps

    from sleigh import staging
    from sleigh.runtime.package import shipped_photo

    src = Image.open(shipped_photo()).convert("RGB")
    w, h = src.size
    staging.clean_stale(Path(tempfile.gettempdir()), GATE_FOLDER)  # left by killed gates
    folder = staging.make(Path(tempfile.gettempdir()), GATE_FOLDER)
    variants = {"photo.png": src, "mirror.png": ImageOps.mirror(src), "crop.png": src.crop((w // 4, 0, w, h // 2)),
                "tall.png": src.crop((0, 0, w // 3, h)).resize((w // 3, h * 2)), "small.png": src.resize((w // 3, h // 3))}
    paths = []
    for name, im in variants.items():
        im.save(folder / name)
        paths.append(folder / name)
    return paths


def run_gate(pkg: Path, engine: str | EngineEntry, *, images: Path | None = None, num_pairs: int = 5, progress=None) -> dict:
    """`engine` is a name in the manifest or an entry not yet registered (during a build)."""
    from sleigh.runtime.pipeline import Pipeline

    manifest = read_manifest(pkg)
    entry = manifest.engines.get(engine) if isinstance(engine, str) else engine
    if entry is None:
        raise SleighError(f"--engine {engine}", "no such engine in the package",
                          ", ".join(manifest.engines) or "build one with `sleigh build-engine`")
    weights = entry.llm_weights or entry.precision
    if entry.precision not in PRECISIONS or weights not in LLM_WEIGHTS:  # a newer sleigh's kind: no gate known here
        raise SleighError(f"engine {entry.name}", f"is {entry.precision} with {weights} decoder weights, a kind this "
                          "sleigh has no accuracy gate for", f"an engine of {' | '.join(PRECISIONS)} with decoder weights "
                          f"{' | '.join(LLM_WEIGHTS)}: rebuild it with this sleigh (`sleigh build-engine --force`)")
    backend = entry.backend
    imgs = gate_images(images, entry.calibration or manifest.calibration)  # the engine's own, where it says
    try:
        cases = [(imgs[i % len(imgs)], PROMPTS[i % len(PROMPTS)])
                 for i in range(max(num_pairs, len(imgs)) if images is not None else num_pairs)]
        sides = []
        tiles = manifest.most_tiles(entry)  # both sides see the views the engine was built for
        # one pipeline open at a time (full size: the FP32 modules alone are 8 GB), each released
        # before the next opens and before the build goes on
        for kind, which in (("onnxruntime", "package"), (backend, engine)):  # the FP32 modules, then the engine
            with Pipeline.from_package(pkg, backend=kind, engine=which) as pipe:
                sides.append([])
                for image, prompt in cases:
                    sides[-1].append(run_side(pipe, image, prompt, max_tiles=tiles))
                    if progress:
                        progress.advance(0.5)  # a pair is two runs
        pairs = [compare_pair(r, g, image, prompt) for (image, prompt), r, g in zip(cases, *sides)]
    finally:
        if images is None:
            shutil.rmtree(imgs[0].parent, ignore_errors=True)
    report = summarize(pairs, entry.precision, entry.llm_weights or entry.precision)
    report["images_held_out"] = sorted({p.image for p in pairs})
    return report


def run_task_gate(pkg: Path, entry: EngineEntry, data: Path, tolerance: float) -> dict:
    """Task accuracy (`sleigh eval`) of the package's FP32 modules and of engine `entry` on `data`:
    passed when no question type's accuracy falls more than `tolerance` points below FP32's. One
    pipeline is open at a time."""
    from sleigh.evaluate import evaluate

    tiles = None  # FP32 reads the views the engine reads: fewer where it was built for fewer
    if entry.max_views is not None:
        manifest = read_manifest(pkg)
        tiles = manifest.most_tiles(entry)
        tiles = None if tiles == manifest.most_tiles() else tiles
    ref = fp32_task_accuracy(pkg, data, tiles)
    got = evaluate(pkg, data, backend=entry.backend, engine=entry, quiet=True)
    types = {}
    for t, r in ref["types"].items():
        g = got["types"].get(t)
        if g is None or g["n"] != r["n"]:  # lines the engine skipped and FP32 scored (a shorter context): not comparable
            types[t] = {"n": r["n"], "engine_n": 0 if g is None else g["n"], "fp32": r["accuracy"],
                        "engine": None if g is None else g["accuracy"], "drop_points": None, "ok": False}
            continue
        drop = 100 * (r["accuracy"] - g["accuracy"])
        types[t] = {"n": r["n"], "fp32": r["accuracy"], "engine": g["accuracy"], "drop_points": drop, "ok": drop <= tolerance}
    return {"data": ref["data"], "tolerance_points": tolerance, "passed": all(v["ok"] for v in types.values()),
            "types": types, "skipped": ref["skipped"], "engine_skipped": got["skipped"]}


# How `sleigh eval` scores, for the cached FP32 record: 2, untyped lines are "untyped" (they were "all",
# the report's total) and lines whose image or prompt the pipeline refuses are skipped. Older records
# are measured again.
TASK_ACCURACY_VERSION = 2


def fp32_task_accuracy(pkg: Path, data: Path, max_tiles: int | None = None) -> dict:
    """`sleigh eval` of the package's FP32 modules on `data` ("data", "types", "skipped"), evaluated once
    per data, modules and tiles: kept in the manifest's parity section (`task_accuracy`) by the sha256 of
    the JSONL and its images (and `max_tiles`, an engine's fewer tiles, where given), with the modules'
    sha256s it was measured on."""
    from sleigh.data.qa import read_qa
    from sleigh.evaluate import evaluate

    manifest, qa = read_manifest(pkg), read_qa(data)
    digest = hashlib.sha256(qa.path.read_bytes())
    for image in sorted({str(item.image) for item in qa.items}):
        digest.update(sha256_file(Path(image)).encode())
    key = digest.hexdigest() + ("" if max_tiles is None else f"-tiles-{max_tiles}")
    modules = {rel: manifest.files[rel].sha256 for rel in manifest.module_files()}
    cached = ((manifest.parity or {}).get("task_accuracy") or {}).get(key)
    if isinstance(cached, dict) and cached.get("fp32_modules") == modules and cached.get("version") == TASK_ACCURACY_VERSION:
        return {**cached, "data": str(qa.path)}
    ref = evaluate(pkg, data, backend="onnxruntime", engine="package", quiet=True, max_tiles=max_tiles)
    record = {"version": TASK_ACCURACY_VERSION, "fp32_modules": modules, "data": ref["data"], "types": ref["types"],
              "skipped": ref["skipped"]}

    def store(m: dict) -> None:
        parity = m.get("parity") or {}
        m["parity"] = {**parity, "task_accuracy": {**(parity.get("task_accuracy") or {}), key: record}}

    update_manifest(pkg, store)
    return record


def task_rows(report: dict) -> list[tuple[str, ...]]:
    def verdict(v: dict) -> str:
        if v["ok"]:
            return "ok"
        if v["drop_points"] is None:
            return f"FAIL: the engine scored {v['engine_n']} of these {v['n']} lines (it skipped the others)"
        return f"FAIL: {v['drop_points']:.1f} points below (at most {report['tolerance_points']})"

    return [(t, str(v["n"]), f"{100 * v['fp32']:.1f} %", "-" if v["engine"] is None else f"{100 * v['engine']:.1f} %",
             verdict(v)) for t, v in report["types"].items()]


def report_rows(report: dict) -> list[tuple[str, ...]]:
    return [(c["metric"], f"{c['value']:.5f}", ("≥ " if HIGHER_IS_BETTER[c["metric"]] else "≤ ") + f"{c['threshold']}",
             "ok" if c["ok"] else f"FAIL by {abs(c['margin']):.5f}") for c in report["checks"]]
