"""Task accuracy of every ONNX Runtime precision of one model, and of GSWA switched off, as one
markdown table (the issue-10 table of benchmarks/RESULTS.md).

    python benchmarks/demo_accuracy.py examples/demo-ckpt --data runs/demo-data/heldout.jsonl [--images 200]
    python benchmarks/demo_accuracy.py runs/demo-pkg --checkpoint examples/demo-ckpt --data ...

From one FP32 package (exported here from a checkpoint, or copied, so the original stays untouched):
`sleigh calibrate` on a few images of the same synthetic task (another seed than the held-out split's,
drawn at the held-out split's sizes), then `build-engine` for FP16, INT8 vision (FP32 decoder), INT8
and INT4 decoder weights (FP32 vision), and INT8 vision with INT4 decoder weights (kept whatever the
agreement gate says: this table is the task's own verdict). "GSWA off" is the checkpoint with GSWA's
gate alpha set to 0 (every view weighs 1: what `sleigh convert --gswa identity` writes), exported
again; it needs the checkpoint. Each row is `sleigh eval PKG --engine NAME --json` on the same lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sleigh.evaluate import accuracy_cell, questions_of_first_images

TYPES = ("colour", "shape", "position")
# (row label, build-engine options; None: the package's FP32 modules)
ENGINES = [
    ("FP32", None),
    ("FP16", {"precision": "fp16"}),
    ("INT8 vision", {"precision": "int8", "llm_weights": "fp32"}),
    ("INT8 decoder weights", {"precision": "fp32", "llm_weights": "int8"}),
    ("INT4 decoder weights", {"precision": "fp32", "llm_weights": "int4"}),
    ("INT8 vision + INT4 decoder", {"precision": "int8", "llm_weights": "int4"}),
]
CALIBRATION_SEED = 0  # the training split's seed in TRAINING.md: training-like, never held out


def gswa_off_checkpoint(ckpt: Path, dst: Path) -> Path:
    """A copy of `ckpt` with gswa.alpha = 0 (GSWA's weights all 1: the attention bias is 0)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst)
    state = load_file(str(ckpt / "model.safetensors"))
    state["gswa.alpha"] = state["gswa.alpha"] * 0
    save_file(state, str(dst / "model.safetensors"))
    return dst


def export(ckpt: Path, out: Path, max_tiles: int) -> Path:
    from sleigh.export.exporter import ExportOptions, export_package

    export_package(ckpt, out, ExportOptions(max_tiles=max_tiles, quiet=True))
    return out


def calibration_images(data: Path, folder: Path, n: int) -> Path:
    """`n` synthetic images drawn as the held-out split was (its spec.json), from CALIBRATION_SEED."""
    from sleigh.data.synth import SynthSpec, write_split

    spec_file = data.with_suffix(".spec.json")
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    spec = SynthSpec(**{k: v for k, v in spec.items() if k in SynthSpec.__dataclass_fields__})
    write_split(folder, n, CALIBRATION_SEED, split="calibration", spec=spec)
    return folder / "calibration"


def sleigh_eval(pkg: Path, data: Path, engine: str, limit: int | None) -> dict:
    cmd = [sys.executable, "-m", "sleigh.cli", "eval", str(pkg), "--data", str(data), "--engine", engine, "--json"]
    cmd += ["--limit", str(limit)] if limit else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def markdown(rows: list[tuple[str, dict]]) -> str:
    cols = ["engine", *TYPES, "GSWA top tile"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, r in rows:
        top = r.get("gswa_top_tile")
        lines.append("| " + " | ".join([label, *(accuracy_cell(r, t) for t in TYPES),
                                        f"{100 * top['fraction']:.1f} % of {top['images']}" if top else "-"]) + " |")
    r0 = rows[0][1]
    lines.append(f"\nAccuracy in % ± standard error; {r0['overall']['n']} questions of {r0['data']}; ONNX Runtime "
                 "(each row: `sleigh eval PKG --engine NAME --json`).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="FP32 package (sleigh export) or Sleigh checkpoint")
    ap.add_argument("--data", type=Path, required=True, help="held-out JSONL (sleigh data synth)")
    ap.add_argument("--checkpoint", type=Path, help="the package's checkpoint, for the GSWA-off row")
    ap.add_argument("--images", type=int, help="only the first N images of --data")
    ap.add_argument("--max-tiles", type=int, default=6, help="tiles the packages are exported for (from a checkpoint)")
    ap.add_argument("--calibration-images", type=int, default=16)
    ap.add_argument("--work", type=Path, help="folder for the packages (default: a new temporary one)")
    ap.add_argument("--json", type=Path, help="also write the reports here")
    args = ap.parse_args()

    from sleigh.engines.build_engine import build_engine
    from sleigh.engines.calibration.collect import calibrate_package
    from sleigh.engines.options import EngineOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="sleigh-demo-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint
    pkg = work / "pkg"
    max_tiles = args.max_tiles
    if (args.model / "manifest.json").is_file():
        shutil.copytree(args.model, pkg)
        max_tiles = json.loads((pkg / "manifest.json").read_text())["image"]["max_tiles"]  # GSWA off: the same tiling
    else:
        ckpt = args.model
        export(ckpt, pkg, args.max_tiles)
    limit = questions_of_first_images(args.data, args.images) if args.images else None

    calibrate_package(pkg, calibration_images(args.data, work / "calibration", args.calibration_images), quiet=True)
    rows = []
    for label, options in ENGINES:
        name = "package"
        if options is not None:
            name = build_engine(pkg, EngineOptions(**options, allow_degraded=True, force=True, quiet=True)).name
        rows.append((label, sleigh_eval(pkg, args.data, name, limit)))
        print(f"{label}: {rows[-1][1]['overall']['accuracy']:.3f}", file=sys.stderr)
    if ckpt is not None:
        off = export(gswa_off_checkpoint(ckpt, work / "gswa-off-ckpt"), work / "gswa-off-pkg", max_tiles)
        rows.append(("FP32, GSWA off (alpha = 0)", sleigh_eval(off, args.data, "package", limit)))
    else:
        print("no --checkpoint: the GSWA-off row needs the checkpoint to export again", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(dict(rows), indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
