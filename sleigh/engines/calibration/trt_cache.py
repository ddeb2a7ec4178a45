"""TensorRT 10.x calibration cache files (text), written from Sleigh's calibration ranges.

    TRT-100300-EntropyCalibration2
    pixel_values: 3c8e4b2a
    layer_norm: 3d0f1e22
    ...

Line 1 names the TensorRT version that the cache is for (NV_TENSORRT_VERSION: major·10000 + minor·100
+ patch for TensorRT 10, so 10.3.0 -> 100300) and the calibrator. Each other line is a tensor name,
": ", and its scale (amax / 127) as the float32 bit pattern in 8 big-endian hex digits.

TensorRT 11 removed implicit calibration, so it never reads these; TensorRT 10.x (JetPack 6 ships
10.3) reads one through an IInt8Calibrator. The explicit Q/DQ ONNX
(`sleigh.engines.calibration.qdq`) is the primary INT8 path; this file is the fallback for 10.x tools.
"""

from __future__ import annotations

import struct
from pathlib import Path

from sleigh.errors import SleighError
from sleigh.runtime.package import write_bytes_atomic

TRT_CACHE_VERSION = "100300"  # TensorRT 10.3.0, what JetPack 6 ships
CALIBRATOR = "EntropyCalibration2"


def header(version: str = TRT_CACHE_VERSION, calibrator: str = CALIBRATOR) -> str:
    return f"TRT-{version}-{calibrator}"


def scale_to_hex(scale: float) -> str:
    """float32 bit pattern, big-endian, 8 lower-case hex digits (`struct.pack('!f', s).hex()`)."""
    return struct.pack("!f", scale).hex()


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
