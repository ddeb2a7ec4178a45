"""Backends for packages, chosen by name. `auto` picks the best one that is installed."""

from __future__ import annotations

from pathlib import Path

from sleigh.errors import SleighError
from sleigh.runtime.backends.base import Backend

PACKAGE_BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
PACKAGE_MODULES = "package"  # --engine package: the exported FP32 modules themselves


# Which engine `auto` takes, best first, by the device ONNX Runtime runs on: FP16 kernels are a GPU's
# strength; on a CPU they mostly add casts, while INT8 and weight-only INT8/INT4 cut memory traffic.
ENGINE_PREFERENCE = {"cpu": ("int8", "fp32", "fp16"), "cuda": ("fp16", "int8", "fp32")}
WEIGHT_PREFERENCE = ("int4", "int8", "fp16", "fp32")


def best_engine(manifest: dict, backend: str, device: str) -> str | None:
    """The best engine that passed its accuracy gate for this backend and device, or None."""
    candidates = [(name, e) for name, e in manifest.get("engines", {}).items()
                  if e.get("backend") == backend and e.get("accuracy_passed")]
    if not candidates:
        return None
    order = ENGINE_PREFERENCE[device]
    rank = lambda item: (order.index(item[1]["precision"]), WEIGHT_PREFERENCE.index(item[1].get("llm_weights", "fp32")))  # noqa: E731
    return min(candidates, key=rank)[0]


def open_package_backend(pkg: Path, manifest: dict, backend: str = "auto", *, threads: int | None = None,
                         engine: str | dict | None = None) -> Backend:
    """`engine`: a name from the manifest, an unregistered entry (during a build), or None for the
    best built engine (falling back to the package's FP32 modules)."""
    if backend not in PACKAGE_BACKENDS:
        raise SleighError(f"--backend {backend}", "unknown backend", ", ".join(PACKAGE_BACKENDS))
    if backend == "torch":
        raise SleighError("--backend torch", "the torch backend runs Sleigh checkpoints, not packages",
                          "--model CHECKPOINT_DIR with --backend torch, or --backend onnxruntime for a package")
    if backend == "tensorrt":
        raise SleighError("--backend tensorrt", "no TensorRT engine support in this version",
                          "--backend onnxruntime")
    from sleigh.runtime.backends.onnxruntime_backend import CUDA, OnnxRuntimeBackend, available_providers

    engines = manifest.get("engines", {})
    if engine is None:
        engine = best_engine(manifest, "onnxruntime", "cuda" if CUDA in available_providers() else "cpu")
    if engine == PACKAGE_MODULES:
        engine = None
    elif isinstance(engine, str):
        if engine not in engines:
            raise SleighError(f"--engine {engine}", "no such engine in the package",
                              ", ".join([PACKAGE_MODULES, *engines]))
        if engines[engine].get("backend") != "onnxruntime":
            raise SleighError(f"--engine {engine}", f"built for {engines[engine].get('backend')}", "an onnxruntime engine")
        engine = {**engines[engine], "name": engine}
    return OnnxRuntimeBackend.from_package(pkg, manifest, threads=threads, engine=engine)
