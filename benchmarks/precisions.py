"""Every ONNX Runtime precision of one package, measured in one run against its FP32 modules:
file sizes, vision ms per view, time to first token, decode tokens/s, and the accuracy gate.

    python benchmarks/precisions.py runs/small-pkg --reference runs/small

Calibration uses examples/chelsea.jpg and mirrored/cropped/recoloured versions of it; the accuracy
gate uses sleigh's shipped photo (examples/coffee.jpg) and its variants, which calibration never saw.
The package is copied, so the original stays untouched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from sleigh.bench import machine, run_bench
from sleigh.engines.calibration.collect import calibrate_package
from sleigh.engines.build_engine import build_engine
from sleigh.engines.options import EngineOptions
from sleigh.runtime import DEFAULT_PROMPT
from sleigh.runtime.package import shipped_photo
from sleigh.runtime.manifest import read_manifest

ROOT = Path(__file__).parents[1]
ENGINES = [EngineOptions(precision="fp16"), EngineOptions(precision="int8"),
           EngineOptions(precision="fp32", llm_weights="int8"), EngineOptions(precision="fp32", llm_weights="int4")]


def calibration_images(folder: Path) -> Path:
    cat = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB")
    w, h = cat.size
    variants = [cat, ImageOps.mirror(cat), cat.crop((0, 0, w // 2, h)), cat.crop((w // 3, h // 4, w, h)),
                ImageEnhance.Color(cat).enhance(0.3), ImageEnhance.Brightness(cat).enhance(1.4),
                cat.rotate(90, expand=True), cat.resize((w * 3, h))]
    for i, im in enumerate(variants):
        im.save(folder / f"cat{i}.jpg", quality=92)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package", type=Path)
    ap.add_argument("--reference", type=Path, help="the checkpoint, to time the torch backend too")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the full report here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sleigh-precisions-"))
    pkg = work / "pkg"
    shutil.copytree(args.package, pkg)
    cal = calibrate_package(pkg, calibration_images(Path(tempfile.mkdtemp(prefix="calib-"))), method="entropy", quiet=True)
    built = {}
    for opts in ENGINES:
        opts = EngineOptions(precision=opts.precision, llm_weights=opts.llm_weights, allow_degraded=True, quiet=True)
        built[opts.engine_name] = build_engine(pkg, opts).json  # the entry as listed in the manifest
    manifest = read_manifest(pkg).json
    targets = [("fp32 (package)", pkg, "onnxruntime", "package")]
    targets += [(name, pkg, "onnxruntime", name) for name in built]
    if args.reference:
        targets.append(("torch reference", args.reference, "torch", None))
    bench = run_bench(targets, shipped_photo(), DEFAULT_PROMPT, runs=args.runs,
                      max_new_tokens=args.max_new_tokens, quiet=True)

    fp32_bytes = sum(e["bytes"] for rel, e in manifest["files"].items() if rel.endswith((".onnx", ".onnx.data"))
                     and not rel.startswith("engines/"))
    print(f"Machine: {machine()['cpu']}, {machine()['cores']} cores. Calibration: {cal.num_images} images "
          f"({cal.method}). Gate: {len(next(iter(built.values()))['accuracy']['pairs'])} held-out pairs.\n")
    cols = ["engine", "MB", "vision ms/view", "prefill ms", "TTFT ms", "decode tok/s", "emb cos min", "gswa max abs",
            "logits cos min", "top-1", "tokens (32)", "gate"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in bench["rows"]:
        name = row["target"]
        if name in built:
            e = built[name]
            m = e["accuracy"]["metrics"]
            acc = [f"{m['embeddings_cos_min']:.5f}", f"{m['gswa_max_abs']:.4f}", f"{m['logits_cos_min']:.5f}",
                   f"{m['top1']:.2f}", f"{m['tokens']:.2f}", "passed" if e["accuracy"]["passed"] else "DEGRADED"]
            size = e["files_bytes"]
        else:
            acc = ["-"] * 6 if name != "fp32 (package)" else ["1 (ref)", "0 (ref)", "1 (ref)", "1 (ref)", "1 (ref)", "ref"]
            size = fp32_bytes if name == "fp32 (package)" else None
        print("| " + " | ".join([name, f"{size / 1e6:.1f}" if size else "-", f"{row['vision_ms_per_view']:.1f}",
                                 f"{row['prefill_ms']:.0f}", f"{row['time_to_first_token_ms']:.0f}",
                                 f"{row['decode_tokens_per_s']:.1f}", *acc]) + " |")
    if args.json:
        args.json.write_text(json.dumps({"bench": bench, "engines": built, "calibration": cal}, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
