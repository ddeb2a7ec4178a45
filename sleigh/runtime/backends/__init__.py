"""Backends for packages, chosen by name. `auto` picks the best one that is installed."""

from __future__ import annotations

from pathlib import Path

from sleigh.errors import SleighError
from sleigh.runtime.backends.base import Backend

PACKAGE_BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def open_package_backend(pkg: Path, manifest: dict, backend: str = "auto", *, threads: int | None = None,
                         engine: str | None = None) -> Backend:
    if backend not in PACKAGE_BACKENDS:
        raise SleighError(f"--backend {backend}", "unknown backend", ", ".join(PACKAGE_BACKENDS))
    if backend == "torch":
        raise SleighError("--backend torch", "the torch backend runs Sleigh checkpoints, not packages",
                          "--model CHECKPOINT_DIR with --backend torch, or --backend onnxruntime for a package")
    if backend == "tensorrt":
        raise SleighError("--backend tensorrt", "no TensorRT engine support in this version",
                          "--backend onnxruntime")
    from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    entry = None
    if engine is not None:
        engines = manifest.get("engines", {})
        if engine not in engines:
            raise SleighError(f"--engine {engine}", "no such engine in the package", ", ".join(engines) or "build one with `sleigh build-engine`")
        entry = engines[engine]
    return OnnxRuntimeBackend.from_package(pkg, manifest, threads=threads, engine=entry)
