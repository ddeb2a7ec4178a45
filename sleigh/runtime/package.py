"""The model package on disk: `manifest.json` is the one contract between export, build-engine and
the runtime (DESIGN.md). Reading, hashing and verifying it needs no torch or onnx."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from sleigh.errors import SleighError, first_line
from sleigh.runtime.fields import Fields, describe

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


def ordinary_mode(folder: bool = False) -> int:
    """The mode an ordinary open() (0666) or mkdir() (0777) would give under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: put it back at once
    return (0o777 if folder else 0o666) & ~umask


def ordinary_modes(folder: Path) -> None:
    """Give `folder` and everything in it the mode an ordinary open() or mkdir() would (0666 or 0777
    & ~umask). mkdtemp makes its folder 0700 and onnx's save_model its external data files 0600,
    which would lock other users out of a package or engine they may read."""
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod(ordinary_mode(path.is_dir()))


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
        os.chmod(tmp, ordinary_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


# -- paths read from a manifest or an index ------------------------------------------------------

def inside(root: Path, rel, what: str) -> Path:
    """`root / rel` for a path read from a manifest or an index (`what` names where it was read),
    when it stays inside `root` once resolved, symlinks included; a one-line SleighError otherwise.
    Every such path is joined through here: a manifest must not open /etc/passwd as a model."""
    expected = f"a relative path inside {root}"
    name = f"{rel!r:.100}"  # a hostile manifest may hold megabytes in one name
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise SleighError(what, f"{name} is not a file name", expected)
    if Path(rel).is_absolute():
        raise SleighError(what, f"{name} is an absolute path", expected)
    path = Path(root) / rel
    try:
        real, base = path.resolve(), Path(root).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop; a name the file system cannot encode
        raise SleighError(what, f"{name} cannot be resolved ({first_line(e, 120)})", expected) from None
    if real == base:
        raise SleighError(what, f"{name} names the folder itself, not a file in it", expected)
    if not real.is_relative_to(base):
        how = "" if ".." in Path(rel).parts else " (through a symlink)"
        raise SleighError(what, f"{name} points outside the folder{how}", expected)
    return path


# -- reading and validating the manifest -----------------------------------------------------------

REEXPORT = "re-export the package with this sleigh (`sleigh export CKPT -o PKG --force`)"


def read_manifest(pkg: Path) -> dict:
    """The package's manifest, validated: every field the runtime, build-engine and inspect read is
    there with its type, and every path in it stays inside the package. Whatever the file holds,
    the only exception is a SleighError."""
    pkg = Path(pkg)
    try:
        is_dir = pkg.is_dir()
        path = pkg / MANIFEST
        if not is_dir:
            raise SleighError(str(pkg), "not a folder", "a model package folder written by `sleigh export`")
        if not path.is_file():
            hint = " (an interrupted or failed export leaves no manifest)" if any(pkg.glob("*.onnx")) else ""
            raise SleighError(str(pkg), f"no manifest.json{hint}", "a complete package from `sleigh export`")
        raw = path.read_bytes()
    except OSError as e:
        raise SleighError(str(pkg), f"cannot be read ({e.strerror or e})", "a readable package folder") from None
    try:
        manifest = json.loads(raw)  # bytes: UTF-8 (or -16/-32, as JSON allows)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, deep nesting
        raise SleighError(str(path), f"not valid JSON ({first_line(e, 120)})", "a manifest written by `sleigh export`") from None
    validate_manifest(manifest, pkg, str(path))
    return manifest


def validate_manifest(manifest, pkg: Path, where: str) -> None:
    """Raise a SleighError naming the first missing field, wrong type or escaping path."""
    from sleigh.runtime.model_info import ModelInfo

    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise SleighError(where, "not a Sleigh package manifest", f"schema {SCHEMA!r}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SleighError(where, f"schema_version is {describe(version)}", f"the integer {SCHEMA_VERSION}; {REEXPORT}")
    if version > SCHEMA_VERSION:
        raise SleighError(where, f"schema_version {version} is newer than this sleigh reads ({SCHEMA_VERSION})",
                          "upgrade sleigh (`pip install -U sleigh`) to run this package")
    if version < SCHEMA_VERSION:
        raise SleighError(where, f"schema_version {version} is from an older sleigh",
                          f"{SCHEMA_VERSION}; {REEXPORT}")
    f = Fields(where, REEXPORT)
    ModelInfo.from_config(f.get(manifest, "model_config", "object"), where, "model_config")
    in_pkg = lambda rel, field: inside(pkg, rel, f"{where}: {field}")  # noqa: E731

    files = f.get(manifest, "files", "object")
    for rel in files:
        in_pkg(rel, "files")
        entry = f.get(files, rel, "object", "files")
        f.get(entry, "sha256", "sha256", f"files.{rel}")
        f.get(entry, "bytes", "count", f"files.{rel}")

    def listed(rel: str, field: str, f: Fields = f) -> None:  # a file the runtime opens has a size and sha256 to check
        in_pkg(rel, field)
        if rel not in files:
            raise f.fail(field, f"{rel!r:.100} is not listed in files", "every file the package uses, with its sha256")

    listed(f.get(f.get(manifest, "tokenizer", "object"), "file", "string", "tokenizer"), "tokenizer.file")
    modules = f.get(manifest, "modules", "object")
    missing = [m for m in MODULE_NAMES if m not in modules]
    if missing:
        raise SleighError(where, f"modules {missing} are missing", f"all of {list(MODULE_NAMES)}; {REEXPORT}")
    for name in modules:  # the three, and any other a newer sleigh may list
        path = f"modules.{name}"
        entry = f.get(modules, name, "object", "modules")
        listed(f.get(entry, "file", "string", path), f"{path}.file")
        for i, rel in enumerate(f.items(f.get(entry, "data_files", "list", path, default=[]), "string", f"{path}.data_files")):
            listed(rel, f"{path}.data_files[{i}]")
        for side in ("inputs", "outputs"):
            for i, io in enumerate(f.items(f.get(entry, side, "list", path), "object", f"{path}.{side}")):
                f.get(io, "name", "string", f"{path}.{side}[{i}]")
                f.get(io, "shape", "list", f"{path}.{side}[{i}]", default=[])
    image = f.get(manifest, "image", "object")
    for key in ("size", "min_tiles", "max_tiles"):
        f.get(image, key, "positive", "image")
    f.get(image, "thumbnail", "bool", "image")
    f.get(f.get(manifest, "prompt", "object"), "tokens_per_view", "positive", "prompt")
    f.get(f.get(manifest, "generation", "object"), "context_length", "positive", "generation")
    for key in ("parity", "created_by", "gswa", "calibration"):
        f.get(manifest, key, "object", null=True, default=None)

    engines = f.get(manifest, "engines", "object", default={})
    f = Fields(where, "an entry as `sleigh build-engine` writes it: rebuild the engine with --force")
    for name in engines:
        path = f"engines.{name}"
        entry = f.get(engines, name, "object", "engines")
        for key in ("backend", "precision"):
            f.get(entry, key, "string", path)
        f.get(entry, "llm_weights", "string", path, null=True, default=None)
        for key in ("accuracy_passed", "degraded"):
            f.get(entry, key, "bool", path, null=True, default=None)
        for key in ("build_options", "accuracy", "versions"):
            f.get(entry, key, "object", path, null=True, default=None)
        if (d := f.get(entry, "dir", "string", path, default=None)) is not None:
            in_pkg(d, f"{path}.dir")
        engine_modules = f.get(entry, "modules", "object", path)
        for module in engine_modules:
            listed(f.get(engine_modules, module, "string", f"{path}.modules"), f"{path}.modules.{module}", f)
        for rel in f.get(entry, "files", "object", path, default={}):
            listed(rel, f"{path}.files", f)


# -- integrity -------------------------------------------------------------------------------------

def verify_files(pkg: Path, manifest: dict) -> list[str]:
    """Problems with the package's files against the manifest's sha256 and sizes (empty = all good)."""
    problems = []
    for rel, entry in sorted(manifest.get("files", {}).items()):
        p = inside(pkg, rel, "manifest.json: files")
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: size {p.stat().st_size} != {entry['bytes']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs")
    return problems


VERIFIED = ".sleigh-verified.json"  # in the package: sha256 already computed, by file version


def check_files(pkg: Path, manifest: dict, files: dict[str, str], *, verify: bool = True) -> None:
    """Check `files` ({relative path: what to do if it is wrong}) against the manifest before a run:
    every size always, and the sha256 unless `verify` is False. A file's sha256 is computed once per
    version of the file, (size, mtime_ns, ctime_ns, inode), and remembered in a small cache (the
    package's `.sleigh-verified.json`, or under $XDG_CACHE_HOME/sleigh when the package is read-only),
    so later runs read no file twice. One SleighError line naming the first file that is wrong."""
    pkg = Path(pkg)
    cache = _HashCache(pkg) if verify else None
    try:
        for rel, remedy in files.items():
            path = inside(pkg, rel, "manifest.json")
            entry = manifest["files"][rel]  # validate_manifest: every file the runtime opens is listed
            try:
                st = path.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise SleighError(str(path), "is not a regular file", remedy)
                if st.st_size != entry["bytes"]:
                    raise SleighError(str(path), f"is {st.st_size} bytes and the manifest lists {entry['bytes']} "
                                      "(truncated or replaced)", remedy)
                if cache is not None and cache.sha256(rel, path, st) != entry["sha256"]:
                    raise SleighError(str(path), "its sha256 differs from the manifest's (damaged or changed since it "
                                      "was written)", remedy)
            except FileNotFoundError:
                raise SleighError(str(path), "is missing", remedy) from None
            except OSError as e:
                raise SleighError(str(path), f"cannot be read ({e.strerror or e})", "read permission on the package files") from None
    finally:
        if cache is not None:
            cache.save()  # what was hashed stays hashed, even when a later file was wrong


class _HashCache:
    """sha256 by file version. Never fails a run: an unreadable or unwritable cache is no cache."""

    def __init__(self, pkg: Path):
        self.paths = [pkg / VERIFIED]
        try:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            key = hashlib.sha256(str(pkg.resolve()).encode()).hexdigest()[:32]
            self.paths.append(base / "sleigh" / "verified" / f"{key}.json")
        except (OSError, RuntimeError):  # no home folder
            pass
        self.records: dict[str, dict] = {}
        for path in reversed(self.paths):  # the package's own cache wins
            try:
                data = json.loads(path.read_bytes())
                self.records.update({k: v for k, v in data["files"].items() if isinstance(v, dict)})
            except Exception:  # noqa: BLE001 - missing, unreadable or damaged: start afresh
                continue
        self.changed = False

    def sha256(self, rel: str, path: Path, st: os.stat_result) -> str:
        version = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        record = self.records.get(rel, {})
        if record.get("version") == version and isinstance(record.get("sha256"), str):
            return record["sha256"]
        digest = sha256_file(path)
        self.records[rel] = {"version": version, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        for path in self.paths:
            try:
                write_json_atomic(path, {"files": self.records})
                return
            except OSError:
                continue


def module_path(pkg: Path, manifest: dict, module: str) -> Path:
    p = inside(pkg, manifest["modules"][module]["file"], f"manifest.json: modules.{module}.file")
    if not p.is_file():
        raise SleighError(str(p), "module file missing", f"the files listed in manifest.json; {REEXPORT}")
    return p


def check_module_io(modules: dict, module: str, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """A module file opened for `module` must have the input and output names `modules` (the
    manifest's `modules`) lists for it: another valid ONNX file copied over it must not run."""
    for side, got in (("inputs", inputs), ("outputs", outputs)):
        want = {io["name"] for io in modules[module][side]}
        if set(got) != want:
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            diff = "; ".join(f"{label} {names[:4]}{' ...' if len(names) > 4 else ''}"
                             for label, names in (("lacks", missing), ("has extra", extra)) if names)
            raise SleighError(str(path), f"is not a {module} module: its {side} differ from the manifest's ({diff})",
                              f"the package's own {module} module; {REEXPORT}, or rebuild the engine")
