"""Calibration images made from the example photos, the vision module run on ONNX Runtime's CPU
provider, and independent readers of what calibration writes (Q/DQ models, TensorRT caches): what the
engine tests share that is not a fixture (those are in conftest.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from sleigh.engines.calibration.int8 import QUANTIZED_OP_TYPES
from sleigh.engines.calibration.qdq import weight_axis
from sleigh.errors import SleighError
from sleigh.onnx_files import save_onnx

from tests.helpers import EXAMPLES, ORACLE, ROOT

PHOTOS = (EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg", ORACLE / "astronaut.png")
HELD_OUT = ROOT / "sleigh" / "assets" / "parity.jpg"  # never among the calibration images
NUM_CALIBRATION_IMAGES = 6


def make_variants(dst: Path, count: int = NUM_CALIBRATION_IMAGES) -> list[Path]:
    """`count` images from the example photos: crops, mirror images, colour and brightness shifts,
    some small (one tile), some wide (several tiles)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        photo = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = photo.size
        if i % 2:
            photo = ImageOps.mirror(photo)
        box = (w // 8 * (i % 3), h // 10 * (i % 2), w - w // 10 * (i % 4), h - h // 12 * (i % 3))
        photo = photo.crop(box)
        photo = ImageEnhance.Color(photo).enhance(0.5 + 0.3 * i)
        photo = ImageEnhance.Brightness(photo).enhance(0.8 + 0.08 * i)
        if i % 3 == 0:
            photo = photo.resize((photo.width // 2, photo.height // 2))
        path = dst / f"calib_{i:02d}.{'png' if i % 2 else 'jpg'}"
        photo.save(path)
        out.append(path)
    return out


def run_vision(path: Path, pixel_values: np.ndarray, fused: bool = True) -> dict[str, np.ndarray]:
    """The vision module's outputs on ONNX Runtime's CPU provider: with its default graph
    optimisations (fused int8 kernels), or none (`fused=False`: every Q/DQ op run as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixel_values": pixel_values}), strict=True))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_symmetric(onnx_path: Path) -> list[str]:
    """Problems that stop TensorRT from taking the Q/DQ model as it is (empty = good): non-zero or
    non-int8 zero points, missing zero points, non-positive scales, and weight DequantizeLinear nodes
    whose scale is not one per output channel (with the right axis) of the op they feed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))
    problems = []
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.op_type} {n.name or n.output[0]!r}"
        scale = values.get(n.input[1]) if len(n.input) > 1 else None
        if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: scale has non-positive or non-finite values")
        if len(n.input) < 3 or not n.input[2]:
            if n.op_type == "QuantizeLinear":
                problems.append(f"{where}: no zero point (defaults to uint8; TensorRT needs int8, zero point 0)")
            continue
        zp = values.get(n.input[2])
        if zp is None:
            problems.append(f"{where}: zero point {n.input[2]!r} is not a constant")
        elif zp.dtype != np.int8:
            problems.append(f"{where}: zero point is {zp.dtype}, not int8")
        elif np.any(zp != 0):
            problems.append(f"{where}: zero point is not 0 (max |zp| = {int(np.abs(zp.astype(np.int32)).max())})")
        if n.op_type != "DequantizeLinear" or n.input[0] not in values:
            continue
        w = values[n.input[0]]
        for op, k in consumers.get(n.output[0], []):
            expected = weight_axis(op, k, w.ndim)
            if expected is None or op.op_type not in QUANTIZED_OP_TYPES:
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            axis = axis + w.ndim if axis < 0 else axis
            want = w.shape[expected]
            if scale is None or scale.ndim != 1 or scale.shape[0] != want or axis != expected:
                got = "?" if scale is None else list(scale.shape)
                problems.append(f"{where} -> {op.op_type} {op.name!r}: weight scale {got} on axis {axis}, "
                                f"expected per output channel: [{want}] on axis {expected}")
    return problems


def scale_activation_scales(onnx_path: Path, out_path: Path, factor: float) -> int:
    """Copy a Q/DQ model with every activation scale (those of QuantizeLinear nodes and of the
    DequantizeLinear nodes that read them) multiplied by `factor`: a deliberately broken model for
    accuracy-gate tests (factor 1/100 clips almost everything). Returns the number of scales changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    q_outputs = {}
    names = set()
    for n in graph.node:
        if n.op_type == "QuantizeLinear":
            names.add(n.input[1])
            q_outputs[n.output[0]] = n
    names |= {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs}
    changed = 0
    for init in graph.initializer:
        if init.name in names:
            value = numpy_helper.to_array(init).astype(np.float32) * np.float32(factor)
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
            changed += 1
    save_onnx(model, Path(out_path))
    return changed


_EXPECTED = "a TensorRT calibration cache: a 'TRT-<version>-<Calibrator>' line, then 'tensor: <8 hex digits>' lines"


def hex_to_scale(text: str) -> float:
    # some third-party writers drop leading zeros: read the bits as an integer, not as 4 bytes
    return struct.unpack("!f", struct.pack("!I", int(text, 16)))[0]


def read_calibration_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(header line, {tensor name: scale}) from a TensorRT calibration cache. Scales are float32 values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SleighError(str(path), "no such file", _EXPECTED) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SleighError(str(path), f"cannot be read ({e})", _EXPECTED) from None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("TRT-") or lines[0].count("-") < 2:
        raise SleighError(str(path), f"first line is {lines[0][:60]!r}" if lines else "empty file", _EXPECTED)
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")  # names may contain ': ', hex never does
        try:
            if not sep or not name or len(value) > 8:
                raise ValueError
            scales[name] = hex_to_scale(value)
        except ValueError:
            raise SleighError(f"{path}:{number}", f"cannot read {line[:80]!r}", _EXPECTED) from None
    return lines[0], scales
