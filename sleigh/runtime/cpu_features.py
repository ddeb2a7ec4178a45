"""The CPU features an engine's accuracy gate ran with, and a warning where the current CPU lacks one.

ONNX Runtime picks its int8 kernels by instruction set: on x86 with AVX2 but no VNNI the u8s8 kernels
sum pairs of products in int16 (VPMADDUBSW) and saturate with full-range 8-bit weights, which is why
ONNX Runtime INT8 engines use 7-bit weights (engines/calibration/int8.py, ORT_WEIGHT_MAX). A gate passed on
one set of kernels says nothing certain about another, so build-engine records the features below
that the building CPU has, and the runtime says so (one line, not an error) when one is missing.

Read from /proc/cpuinfo ("flags" on x86, "Features" on ARM); elsewhere the features are unknown
(None) and nothing is recorded or checked. No torch, no onnx.
"""

from __future__ import annotations

import logging
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# the features that select ONNX Runtime's (MLAS) quantized kernels, by their /proc/cpuinfo names
KERNEL_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",  # x86-64
                   "asimddp", "i8mm", "sve")  # ARM64: dot product, int8 matrix multiply, SVE


def cpu_features(cpuinfo: Path = CPUINFO) -> list[str] | None:
    """The KERNEL_FEATURES this CPU has, sorted; None where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # the first processor speaks for all of them
            have = set(value.split())
            return sorted(f for f in KERNEL_FEATURES if f in have)
    return None


def missing_features(gated: list[str] | None, current: list[str] | None) -> list[str]:
    """Features the gate ran with that the current CPU lacks (empty where either side is unknown)."""
    if not gated or current is None:
        return []
    return sorted(set(gated) - set(current))


def warn_if_missing(entry, current: list[str] | None = None) -> list[str]:
    """One warning line (logged: the CLI prints `warning: ...`) when this CPU lacks a feature that `entry`
    (an engine's EngineEntry) was gated with; returns the missing features."""
    missing = missing_features(entry.cpu_features, cpu_features() if current is None else current)
    if missing:
        logging.getLogger("sleigh").warning(
            "engine %s passed its accuracy gate on a CPU with %s, which this CPU lacks: its accuracy here is "
            "unchecked (`sleigh compare PKG --engine %s` measures it)", entry.name, ", ".join(missing), entry.name)
    return missing
