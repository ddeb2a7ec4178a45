"""Copies of the exported tiny package to damage, and engines made of its own modules (so the engine
choice and its checks are tested without building anything)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sleigh.runtime.package import MANIFEST, VERIFIED, file_entry


def copy_package(tiny_pkg, tmp_path) -> Path:
    """A private copy of the exported tiny package (without any verification cache of its own)."""
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, dst, ignore=shutil.ignore_patterns(VERIFIED))
    return dst


def load(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST).read_text())


def save(pkg: Path, manifest: dict) -> None:
    (pkg / MANIFEST).write_text(json.dumps(manifest, indent=2))


def add_engine(pkg: Path, name: str, precision: str, *, passed: bool = True, degraded: bool = False) -> None:
    """Register engines/NAME holding copies of the package's FP32 modules, as build-engine would list it."""
    manifest = load(pkg)
    folder = pkg / "engines" / name
    folder.mkdir(parents=True)
    modules, files = {}, {}
    for module, entry in manifest["modules"].items():
        for rel in [entry["file"], *entry.get("data_files", [])]:
            shutil.copy(pkg / rel, folder / rel)
            files[f"engines/{name}/{rel}"] = file_entry(pkg, f"engines/{name}/{rel}")
        modules[module] = f"engines/{name}/{entry['file']}"
    manifest["engines"][name] = {
        "name": name, "backend": "onnxruntime", "precision": precision, "llm_weights": precision,
        "dir": f"engines/{name}", "modules": modules, "files": files,
        "files_bytes": sum(f["bytes"] for f in files.values()),
        "build_options": {"backend": "onnxruntime", "precision": precision, "llm_weights": None, "max_tiles": None},
        "accuracy_passed": passed, "degraded": degraded,
    }
    manifest["files"].update(files)
    save(pkg, manifest)
