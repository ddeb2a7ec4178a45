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
    engines = manifest.get("engines", {})
    if isinstance(engine, dict) and engine.get("backend") == "tensorrt":  # an entry being gated by build-engine
        from sleigh.runtime.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend.from_package(pkg, manifest, engine)
    if backend in ("auto", "tensorrt") and not isinstance(engine, dict):
        trt = _tensorrt_entry(manifest, engine, required=backend == "tensorrt")
        if trt is not None:
            from sleigh.runtime.backends.tensorrt_backend import TensorRTBackend

            return TensorRTBackend.from_package(pkg, manifest, trt)
    from sleigh.runtime.backends.onnxruntime_backend import CUDA, OnnxRuntimeBackend, available_providers

    if engine is None:
        engine = best_engine(manifest, "onnxruntime", "cuda" if CUDA in available_providers() else "cpu")
    if engine == PACKAGE_MODULES:
        engine = None
    elif isinstance(engine, str):
        if engine not in engines:
            raise SleighError(f"--engine {engine}", "no such engine in the package",
                              ", ".join([PACKAGE_MODULES, *engines]))
        if engines[engine].get("backend") != "onnxruntime":
            raise SleighError(f"--engine {engine}", f"built for {engines[engine].get('backend')}",
                              "an onnxruntime engine, or --backend tensorrt on a machine with TensorRT")
        engine = {**engines[engine], "name": engine}
    return OnnxRuntimeBackend.from_package(pkg, manifest, threads=threads, engine=engine)


def _tensorrt_entry(manifest: dict, engine: str | None, required: bool) -> dict | None:
    """The TensorRT engine to open: the named one, or the best gated one when TensorRT and a GPU are
    present (for `auto`); None to fall through to ONNX Runtime. `required`: --backend tensorrt."""
    engines = manifest.get("engines", {})
    if engine == PACKAGE_MODULES:
        if required:
            raise SleighError("--engine package", "the exported modules run on ONNX Runtime", "--backend onnxruntime or auto")
        return None
    if engine is not None:
        entry = engines.get(engine)
        if entry is None or entry.get("backend") != "tensorrt":
            if required:
                raise SleighError(f"--engine {engine}", "not a TensorRT engine of this package",
                                  ", ".join(n for n, e in engines.items() if e.get("backend") == "tensorrt") or
                                  "build one with `sleigh build-engine --backend tensorrt`")
            return None
        return {**entry, "name": engine}
    from sleigh.runtime.backends.tensorrt_backend import runtime_status

    ok, _, problem, expected = runtime_status()
    name = best_engine(manifest, "tensorrt", "cuda") if ok else None
    if name is None:
        if required:
            if not ok:
                raise SleighError("--backend tensorrt", problem, expected)
            raise SleighError("--backend tensorrt", "the package has no TensorRT engine that passed its gate",
                              "`sleigh build-engine PKG --backend tensorrt` on the target machine")
        return None
    return {**engines[name], "name": name}
