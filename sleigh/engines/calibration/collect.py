"""`sleigh calibrate`: activation ranges of the vision module from a folder of images.

    images/*.jpg ─tile_image (the package's tiling)─► pixel_values [T,3,S,S]
      ─one view at a time─► FP32 vision.onnx in ONNX Runtime, with the activation inputs of every
        MatMul / Gemm / Conv of the main graph added as graph outputs
      ─► RunningStats per tensor (min, max, max|x|, |x| histogram) ─method─► amax, scale = amax/127
      ─► calibration/vision_ranges.json, calibration/vision.calib.cache (TensorRT 10.x),
         manifest.json["calibration"] (written last, atomically)

Only the vision module is calibrated: the decoder's INT8 is weight-only (DESIGN.md, Precision), so
its activations stay in floating point and need no ranges.

Memory: only the tensors that get quantized are exposed (not every intermediate: `quantize_static`
peaked near 20 GB on the full-size encoder, FACTS.md), and views run one at a time. That is exact,
because the vision module reads each view alone; GSWA, the one op that mixes views, is a module of
its own (gswa.onnx), FP32 in every engine and not calibrated.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from sleigh.onnx_files import versions
from sleigh.engines.calibration.int8 import CACHE_FILE, CALIBRATION_DIR, INT8_MAX, RANGES_FILE, activation_tensors
from sleigh.engines.calibration.stats import METHODS, RunningStats, compute_amax
from sleigh.engines.calibration.trt_cache import TRT_CACHE_VERSION, header, write_calibration_cache
from sleigh.errors import SleighError, first_line
from sleigh.progress import progress
from sleigh.runtime.compat import session_options
from sleigh.runtime.image import tile_image
from sleigh.runtime.manifest import Calibration, read_manifest, update_manifest
from sleigh.runtime.package import check_folder_slot, check_sources, file_entry, sha256_file, write_json_atomic
from sleigh.staging import check_apart

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIEWS_PER_RUN = 1  # bounds memory: the full-size encoder's attention probabilities are ~67 MB per view per layer
VISION_INPUT = "pixel_values"


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (not recursive), by extension, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "not a folder"
        raise SleighError(str(folder), what, "a folder of images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class VisionCollector:
    """Runs the FP32 vision module with its quantizable activations as extra outputs and keeps
    running statistics for each. `add(pixel_values)` once per image."""

    def __init__(self, vision_onnx: Path, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        vision_onnx = Path(vision_onnx)
        model = onnx.load(str(vision_onnx), load_external_data=False)  # graph only: weights stay on disk
        self.tensors = activation_tensors(model)
        if not self.tensors:
            raise SleighError(str(vision_onnx), "has no MatMul, Gemm or Conv to calibrate", "a vision.onnx from `sleigh export`")
        graph_inputs = {i.name for i in model.graph.input}
        existing = {o.name for o in model.graph.output}
        self._from_feed = [t for t in self.tensors if t in graph_inputs]
        self._outputs = [t for t in self.tensors if t not in graph_inputs]
        for name in self._outputs:
            if name not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        opts = session_options(threads)
        # Saved beside the original, so external weight files (<name>.onnx.data) resolve; the session
        # reads it at creation and it is deleted right after.
        fd, tmp = tempfile.mkstemp(prefix=".calibrate-", suffix=".onnx", dir=vision_onnx.parent)
        os.close(fd)
        try:
            onnx.save(model, tmp)
            self.session = ort.InferenceSession(tmp, sess_options=opts, providers=["CPUExecutionProvider"])
        except OSError as e:  # a full disk or a read-only package: not the package's fault (the CLI names it)
            e.filename = e.filename or tmp
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            raise SleighError(str(vision_onnx), f"ONNX Runtime cannot run it for calibration ({first_line(e)})",
                              "an intact package (check with `sleigh inspect --verify`)") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.stats = {name: RunningStats() for name in self.tensors}
        self.views = 0

    def add(self, pixel_values: np.ndarray) -> None:
        for start in range(0, pixel_values.shape[0], VIEWS_PER_RUN):
            feed = {VISION_INPUT: np.ascontiguousarray(pixel_values[start:start + VIEWS_PER_RUN])}
            values = dict(zip(self._outputs, self.session.run(self._outputs, feed), strict=True))
            values.update({name: feed[name] for name in self._from_feed})
            for name, value in values.items():
                try:
                    self.stats[name].update(value)
                except ValueError as e:
                    raise SleighError(f"calibration tensor {name!r}", str(e),
                                      "finite activations (is the model or the image corrupt?)") from None
            self.views += feed[VISION_INPUT].shape[0]


def ranges_from_stats(stats: dict[str, RunningStats], method: str) -> dict[str, dict]:
    """{tensor: {min, max, amax, scale}}. amax and scale are float32 values, scale = amax / 127, so the
    JSON, the Q/DQ model and the TensorRT cache hold the same numbers. amax 0 (a tensor that was
    always 0) gets scale 1.0, as ONNX Runtime's quantizer does; a zero scale is invalid in Q/DQ."""
    out = {}
    for name, s in stats.items():
        amax = float(np.float32(compute_amax(s, method)))
        scale = float(np.float32(amax / INT8_MAX)) if amax > 0 else 1.0
        out[name] = {"min": float(s.min), "max": float(s.max), "amax": amax, "scale": scale}
    return out


def _check_args(method: str, num_images: int | None, max_tiles: int | None, min_images: int) -> None:
    if method not in METHODS:
        raise SleighError(f"--method {method}", "unknown calibration method", ", ".join(METHODS))
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
        raise SleighError("min_images", f"got {min_images!r}", "an integer >= 1")
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < min_images):
        raise SleighError(f"--num-images {num_images}", "too few", f"an integer >= {min_images}")
    if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1):
        raise SleighError(f"--max-tiles {max_tiles}", "out of range", "an integer >= 1")


def calibrate_package(pkg: Path, images: Path, *, num_images: int | None = None, method: str = "entropy",
                      max_tiles: int | None = None, quiet: bool = False, min_images: int = 2) -> Calibration:
    """Calibrate the package's vision module on the images in `images`; returns the manifest's new entry.

    Images are tiled as the runtime tiles them (the manifest's size, min/max tiles, thumbnail;
    `max_tiles` overrides the maximum). Unreadable images are skipped and counted; the first
    `num_images` usable ones (all, when None) are used, and fewer than `min_images` is an error.
    """
    _check_args(method, num_images, max_tiles, min_images)
    t0 = time.perf_counter()
    pkg = Path(pkg)
    check_apart(pkg / CALIBRATION_DIR, {"--images": images})  # the calibration files are written there
    manifest = read_manifest(pkg)
    check_folder_slot(pkg / CALIBRATION_DIR)
    check_sources(pkg, manifest, ["vision"])  # the module the ranges are recorded from
    vision = manifest.module_path("vision")
    img = manifest.contract.image
    tiling = {"min_tiles": img.min_tiles, "max_tiles": img.max_tiles if max_tiles is None else max_tiles,
              "size": img.size, "thumbnail": img.thumbnail, "mean": img.mean, "std": img.std}
    if tiling["max_tiles"] < tiling["min_tiles"]:
        raise SleighError(f"--max-tiles {tiling['max_tiles']}", f"below the package's min_tiles {tiling['min_tiles']}",
                          f"at least {tiling['min_tiles']}")
    candidates = list_images(images)
    if not candidates:
        raise SleighError(str(images), "contains no image files", f"files ending in {', '.join(IMAGE_EXTENSIONS)}")
    wanted = len(candidates) if num_images is None else min(num_images, len(candidates))

    collector = VisionCollector(vision)
    used: list[str] = []
    hashes: list[str] = []  # what the accuracy gate holds out: names repeat across folders
    skipped: list[dict] = []
    with progress("calibrate", wanted, quiet) as bar:
        for path in candidates:
            if len(used) == wanted:
                break
            try:
                tiled = tile_image(path, **tiling)
            except SleighError as e:  # unreadable image: counted, not fatal
                skipped.append({"file": path.name, "problem": e.problem})
                continue
            collector.add(tiled.pixel_values)
            used.append(path.name)
            hashes.append(sha256_file(path))
            bar.advance()
    if len(used) < min_images:
        problem = f"only {len(used)} usable image{'s' * (len(used) != 1)}"
        if skipped:
            problem += f" ({len(skipped)} unreadable: {', '.join(s['file'] for s in skipped[:5])})"
        raise SleighError(str(images), problem, f"at least {min_images} readable images for calibration")

    ranges = ranges_from_stats(collector.stats, method)
    (pkg / CALIBRATION_DIR).mkdir(exist_ok=True)
    staged = {RANGES_FILE: _stage(pkg / RANGES_FILE), CACHE_FILE: _stage(pkg / CACHE_FILE)}
    try:
        write_json_atomic(staged[RANGES_FILE], {"module": "vision", "method": method, "num_images": len(used),
                                                "skipped": len(skipped), "views": collector.views, "tensors": ranges})
        write_calibration_cache(staged[CACHE_FILE], {n: r["scale"] for n, r in ranges.items()})
        files = {rel: file_entry(pkg, str(path.relative_to(pkg))) for rel, path in staged.items()}
        calibration = _calibration_entry(method, used, hashes, skipped, collector.views, tiling, ranges, t0)
        _commit(pkg, staged, files, calibration)
    except OSError as e:  # a full disk or a read-only package: the CLI names it; say where
        e.filename = e.filename or str(pkg / CALIBRATION_DIR)
        raise
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return calibration


def _stage(path: Path) -> Path:
    """Where a file is written before any of the calibration's files is put in place."""
    return path.with_name(f".{path.name}.staged-{os.getpid()}")


def _commit(pkg: Path, staged: dict[str, Path], files: dict, calibration: Calibration) -> None:
    """Rename the staged files into place and write the manifest (last). Everything that can fail for
    a full disk or a read-only folder (writing the bytes) has happened by now: a failure before this
    point leaves the previous calibration and manifest as they were."""
    def add(manifest: dict) -> None:  # on the manifest as it is now: keep whatever else changed it meanwhile
        manifest["calibration"] = calibration.to_json()
        manifest["files"].update(files)

    def move_in() -> None:  # the new manifest is on disk; the files it lists go in place just before it
        for rel, path in staged.items():
            path.replace(pkg / rel)

    update_manifest(pkg, add, before_replace=move_in)


def _calibration_entry(method: str, used: list[str], hashes: list[str], skipped: list[dict], views: int, tiling: dict,
                       ranges: dict, t0: float) -> Calibration:
    return Calibration(method=method, images=tuple(used), skipped_files=tuple(skipped), views=views,
                       max_tiles=tiling["max_tiles"], tensors=len(ranges), image_sha256=tuple(hashes),
                       record={"trt_cache_header": header(TRT_CACHE_VERSION), "seconds": round(time.perf_counter() - t0, 2),
                               "created_by": {**versions(), "numpy": np.__version__}})
