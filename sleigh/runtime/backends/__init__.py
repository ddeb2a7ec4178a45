"""Backends for packages, chosen by name. `auto` picks the best one that is installed, and the best
engine of it whose files are all there. Before a backend opens anything, the files it will read
are checked against the manifest (runtime/package.check_files)."""

from __future__ import annotations

import math
from pathlib import Path

from sleigh.errors import SleighError, flag
from sleigh.runtime.backends.base import Backend, warn
from sleigh.runtime.manifest import EngineEntry, Manifest
from sleigh.runtime.memory import size_text
from sleigh.runtime.package import REEXPORT, check_files, inside

PACKAGE_BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
PACKAGE_MODULES = "package"  # --engine package: the exported FP32 modules themselves


# Which engine `auto` takes, best first, by the device ONNX Runtime runs on: FP16 kernels are a GPU's
# strength; on a CPU they mostly add casts, while INT8 and weight-only INT8/INT4 cut memory traffic.
ENGINE_PREFERENCE = {"cpu": ("int8", "fp32", "fp16"), "cuda": ("fp16", "int8", "fp32")}
WEIGHT_PREFERENCE = ("int4", "int8", "fp16", "fp32")
# Between engines of one precision and decoder weights, float32 KV slots first: they are exact, and the
# memory budget that might want float16 ones (--max-memory) is not known when the engine is chosen;
# `--engine NAME` runs the other. An entry without kv_dtype predates --kv-dtype: its slots were float32
# unless its decoder is FP16, and then every engine it ties with has float16 slots too.
KV_PREFERENCE = ("float32", "float16")


def ranked_engines(manifest: Manifest, backend: str, device: str) -> list[str]:
    """The engines that passed their accuracy gate for this backend and device, best first; between
    equals, the one built for more views and the longer context. An ONNX Runtime engine built for fewer
    views or a shorter context than the package's (`narrowed`) runs only when named: its graphs take any
    size, so its limits are a choice for one use, and `auto` must not narrow every run of the package."""
    order = ENGINE_PREFERENCE[device]
    rank = lambda e: (_index(order, e.precision), _index(WEIGHT_PREFERENCE, e.llm_weights or "fp32"),  # noqa: E731
                      _index(KV_PREFERENCE, e.kv_dtype or "float32"), -manifest.most_tiles(e),
                      -(e.max_context or math.inf))  # no shapes recorded: the model's
    return [e.name for e in sorted((e for e in manifest.engines.values() if e.backend == backend and e.accuracy_passed
                                    and not (backend == "onnxruntime" and narrowed(manifest, e))), key=rank)]


def narrowed(manifest: Manifest, entry: EngineEntry) -> bool:
    """Built for fewer views or a shorter context than the package takes (build-engine --max-tiles,
    --max-context)."""
    return manifest.most_tiles(entry) < manifest.most_tiles() or \
        (entry.max_context or math.inf) < manifest.contract.generation.context_length


def _index(order: tuple, value) -> int:
    return order.index(value) if value in order else len(order)  # a precision this sleigh does not rank: last


def rebuild_command(pkg: Path, entry: EngineEntry) -> str:
    """The command that builds this engine again, from the options it was built with."""
    opts = entry.build_options or {}
    args = [f"--backend {opts.get('backend') or entry.backend}", f"--precision {opts.get('precision') or entry.precision}"]
    shown = {"max_memory": size_text}  # recorded in bytes; shown as the flag reads it ('2.5G')
    args += [f"{flag(k)} {shown.get(k, str)(v)}" for k, v in opts.items()  # as given (None: the default)
             if k not in ("backend", "precision", "gate_images", "allow_degraded") and v is not None and not isinstance(v, bool)]
    return f"sleigh build-engine {pkg} {' '.join(args)} --force"


def engine_files(manifest: Manifest, name: str) -> list[str]:
    entry = manifest.engines[name]
    return list(dict.fromkeys([*entry.modules.values(), *(entry.files or ())]))


def run_files(pkg: Path, manifest: Manifest, name: str | None) -> dict[str, str]:
    """The files a run on engine `name` (None: the package's own modules) reads, tokenizer included,
    each with what to do when it is missing or damaged: re-export a package file, rebuild an engine's."""
    reexport = f"the file as exported: {REEXPORT}"
    if name is None:
        files = dict.fromkeys(manifest.module_files(), reexport)
    else:
        rebuild = f"the engine's file as built: rebuild the engine (`{rebuild_command(pkg, manifest.engines[name])}`)"
        files = dict.fromkeys(engine_files(manifest, name), rebuild)
    return {**files, manifest.tokenizer: reexport}


def missing_files(pkg: Path, manifest: Manifest, name: str) -> list[str]:
    """The files of engine `name` that are not there (a deleted engine folder)."""
    return [rel for rel in engine_files(manifest, name) if not inside(pkg, rel, "manifest.json").is_file()]


def open_package_backend(pkg: Path, manifest: Manifest, backend: str = "auto", *, threads: int | None = None,
                         engine: str | EngineEntry | None = None, verify: bool = True, budgeted: bool = False) -> Backend:
    """`engine`: a name from the manifest, an unregistered entry (during a build, opened unchecked),
    or None for the best gated engine whose files are there (falling back to the package's FP32
    modules). The files the run reads are checked first: sizes always, sha256 unless `verify` is False.
    `budgeted`: runs under a memory budget (an engine with a budget of its own is too), so a backend
    that can opens its modules one at a time."""
    if backend not in PACKAGE_BACKENDS:
        raise SleighError(f"backend={backend}", "unknown backend", ", ".join(PACKAGE_BACKENDS))
    if backend == "torch":
        raise SleighError("backend=torch", "the torch backend runs Sleigh checkpoints, not packages",
                          "a checkpoint folder for backend torch, or backend onnxruntime for a package")
    if isinstance(engine, EngineEntry):  # an entry being gated by build-engine: just written, not registered yet
        return _open(pkg, manifest, engine, threads, budgeted)
    name = _choose(pkg, manifest, backend, engine)
    check_files(pkg, manifest, run_files(pkg, manifest, name), verify=verify)
    if name is None:
        return _open(pkg, manifest, None, threads, budgeted)
    entry = manifest.engines[name]
    if not entry.gated:
        warn(f"engine {name} did not pass its accuracy gate (kept with --allow-degraded): its answers may differ "
             "from the FP32 modules' (`sleigh compare` shows by how much)")
    return _open(pkg, manifest, entry, threads, budgeted)


def _open(pkg: Path, manifest: Manifest, entry: EngineEntry | None, threads: int | None, budgeted: bool) -> Backend:
    if entry is not None and entry.backend == "tensorrt":
        from sleigh.runtime.backends.tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend.from_package(pkg, manifest, entry)
    else:
        from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        lazy = budgeted or (entry is not None and entry.max_memory is not None)
        backend = OnnxRuntimeBackend.from_package(pkg, manifest, threads=threads, engine=entry, lazy=lazy)
    backend.entry = entry
    if entry is not None:  # what it was built (and gated) for: build-engine --max-tiles / --max-context
        backend.max_views = entry.max_views
        if entry.max_context is not None:
            backend.max_context = min(backend.max_context or entry.max_context, entry.max_context)
    return backend


def _choose(pkg: Path, manifest: Manifest, backend: str, engine: str | None) -> str | None:
    """The engine to run by name (None: the package's modules), as `backend` and `engine` ask."""
    engines = manifest.engines
    if engine == PACKAGE_MODULES:
        if backend == "tensorrt":
            raise SleighError(f"engine={PACKAGE_MODULES}", "the exported modules run on ONNX Runtime", "backend onnxruntime or auto")
        return None
    if engine is not None:
        entry = engines.get(engine)
        if entry is None:
            raise SleighError(f"engine={engine}", "no such engine in the package", ", ".join([PACKAGE_MODULES, *engines]))
        if backend == "tensorrt" and entry.backend != "tensorrt":
            raise SleighError(f"engine={engine}", "not a TensorRT engine of this package",
                              ", ".join(n for n, e in engines.items() if e.backend == "tensorrt") or
                              "build one with `sleigh build-engine --backend tensorrt`")
        if backend == "onnxruntime" and entry.backend != "onnxruntime":
            raise SleighError(f"engine={engine}", f"built for {entry.backend}",
                              "an onnxruntime engine, or backend tensorrt on a machine with TensorRT")
        if entry.backend not in ("onnxruntime", "tensorrt"):
            raise SleighError(f"engine={engine}", f"built for {entry.backend!r}", "an onnxruntime or tensorrt engine")
        return engine
    skipped: list[str] = []
    if backend in ("auto", "tensorrt"):
        from sleigh.runtime.backends.tensorrt_backend import runtime_status

        ok, what, problem, expected = runtime_status()
        if not ok and backend == "tensorrt":
            raise SleighError(what, problem, expected)
        name = _first_present(pkg, manifest, ranked_engines(manifest, "tensorrt", "cuda") if ok else [], skipped)
        if name is not None:
            _warn_skipped(pkg, manifest, skipped, name)
            return name
        if backend == "tensorrt":
            if skipped:
                raise SleighError(f"engine {skipped[0]}", f"its file {missing_files(pkg, manifest, skipped[0])[0]} is missing",
                                  f"rebuild the engine (`{rebuild_command(pkg, engines[skipped[0]])}`)")
            raise SleighError("backend=tensorrt", "the package has no TensorRT engine that passed its gate",
                              "`sleigh build-engine PKG --backend tensorrt` on the target machine")
    from sleigh.runtime.backends.onnxruntime_backend import CUDA, available_providers

    device = "cuda" if CUDA in available_providers() else "cpu"
    name = _first_present(pkg, manifest, ranked_engines(manifest, "onnxruntime", device), skipped)
    _warn_skipped(pkg, manifest, skipped, name)
    return name


def _first_present(pkg: Path, manifest: Manifest, names: list[str], skipped: list[str]) -> str | None:
    for name in names:
        if not missing_files(pkg, manifest, name):
            return name
        skipped.append(name)
    return None


def _warn_skipped(pkg: Path, manifest: Manifest, skipped: list[str], chosen: str | None) -> None:
    if skipped:
        first = missing_files(pkg, manifest, skipped[0])[0]
        warn(f"engine{'s' if len(skipped) > 1 else ''} {', '.join(skipped)}: files missing ({first}); running "
             f"{f'engine {chosen}' if chosen else 'the package modules'} instead "
             f"(rebuild with `{rebuild_command(pkg, manifest.engines[skipped[0]])}`)")
