"""TensorRT 10.x calibration cache files (text), written from Sleigh's calibration ranges.

    TRT-100300-EntropyCalibration2
    pixel_values: 3c8e4b2a
    layer_norm: 3d0f1e22
    ...

Line 1 names the TensorRT version that the cache is for (NV_TENSORRT_VERSION: major·10000 + minor·100
+ patch for TensorRT 10, so 10.3.0 -> 100300) and the calibrator. Each other line is a tensor name,
": ", and its scale (amax / 127) as the float32 bit pattern in 8 big-endian hex digits.

TensorRT 11 removed implicit calibration, so it never reads these; TensorRT 10.x (JetPack 6 ships
10.3) reads one through an IInt8Calibrator's `read_calibration_cache`. The explicit Q/DQ ONNX
(`sleigh.engines.calibration.qdq`) is the primary INT8 path; this file is the fallback for 10.x tools.
"""

from __future__ import annotations

import struct
from pathlib import Path

from sleigh.errors import SleighError
from sleigh.runtime.package import write_bytes_atomic

TRT_CACHE_VERSION = "100300"  # TensorRT 10.3.0, what JetPack 6 ships
CALIBRATOR = "EntropyCalibration2"
_EXPECTED = "a TensorRT calibration cache: a 'TRT-<version>-<Calibrator>' line, then 'tensor: <8 hex digits>' lines"


def header(version: str = TRT_CACHE_VERSION, calibrator: str = CALIBRATOR) -> str:
    return f"TRT-{version}-{calibrator}"


def scale_to_hex(scale: float) -> str:
    """float32 bit pattern, big-endian, 8 lower-case hex digits (`struct.pack('!f', s).hex()`)."""
    return struct.pack("!f", scale).hex()


def hex_to_scale(text: str) -> float:
    # some third-party writers drop leading zeros: read the bits as an integer, not as 4 bytes
    return struct.unpack("!f", struct.pack("!I", int(text, 16)))[0]


def format_calibration_cache(scales: dict[str, float], version: str = TRT_CACHE_VERSION) -> str:
    lines = [header(version)]
    for name, scale in scales.items():
        if "\n" in name or "\r" in name or not name:
            raise SleighError(f"tensor {name!r}", "cannot be written to a calibration cache",
                              "a non-empty tensor name on one line")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(path: Path, scales: dict[str, float], version: str = TRT_CACHE_VERSION) -> None:
    """Write `scales` (tensor name -> amax/127) as a TensorRT cache, atomically (temp file, then rename)."""
    write_bytes_atomic(path, format_calibration_cache(scales, version).encode("utf-8"))


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
