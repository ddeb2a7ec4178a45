"""The model package on disk: `manifest.json` is the one contract between export, build-engine and
the runtime (DESIGN.md). Reading, hashing and verifying it needs no torch or onnx."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from sleigh.errors import SleighError

MANIFEST = "manifest.json"
SCHEMA = "sleigh.package"
SCHEMA_VERSION = 3  # 2: the decoder takes cache slots and returns only the new keys/values; 3: logits of the
# last position only, and no reduction over an empty axis (schema-2 decoders fail on onnxruntime <= 1.31)
MODULE_NAMES = ("vision", "embed", "decoder")


def shipped_photo() -> Path:
    """The CC0 photo inside the sleigh package (examples/coffee.jpg): export's parity image, the
    accuracy gate's default images and bench's default input."""
    from importlib import resources

    return Path(str(resources.files("sleigh") / "assets" / "parity.jpg"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict:
    p = Path(root) / rel
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


def write_bytes_atomic(path: Path, data) -> None:
    """Write `data` (bytes or any buffer) to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))  # e.g. TensorRT's IHostMemory: no extra copy
            f.flush()
            os.fsync(f.fileno())  # a power cut on a device must not leave an empty file
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def read_manifest(pkg: Path) -> dict:
    pkg = Path(pkg)
    if not pkg.is_dir():
        raise SleighError(str(pkg), "not a folder", "a model package folder written by `sleigh export`")
    path = pkg / MANIFEST
    if not path.is_file():
        hint = " (an interrupted or failed export leaves no manifest)" if any(pkg.glob("*.onnx")) else ""
        raise SleighError(str(pkg), f"no manifest.json{hint}", "a complete package from `sleigh export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SleighError(str(path), f"not valid JSON ({e})", "a manifest written by `sleigh export`") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise SleighError(str(path), "not a Sleigh package manifest", f"schema {SCHEMA!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SleighError(str(path), f"schema_version {manifest.get('schema_version')!r} is not supported",
                          f"{SCHEMA_VERSION} (re-export with this version of sleigh)")
    missing = [m for m in MODULE_NAMES if m not in manifest.get("modules", {})]
    if missing:
        raise SleighError(str(path), f"modules {missing} are missing", f"all of {list(MODULE_NAMES)}")
    return manifest


def verify_files(pkg: Path, manifest: dict) -> list[str]:
    """Problems with the package's files against the manifest's sha256 and sizes (empty = all good)."""
    problems = []
    for rel, entry in sorted(manifest.get("files", {}).items()):
        p = Path(pkg) / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: size {p.stat().st_size} != {entry['bytes']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs")
    return problems


def module_path(pkg: Path, manifest: dict, module: str) -> Path:
    p = Path(pkg) / manifest["modules"][module]["file"]
    if not p.is_file():
        raise SleighError(str(p), "module file missing", "the files listed in manifest.json (sleigh inspect --verify)")
    return p
