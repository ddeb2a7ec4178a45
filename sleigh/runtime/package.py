"""The model package on disk: `manifest.json` is the one contract between export, build-engine and
the runtime (DESIGN.md). Reading, hashing and verifying it needs no torch or onnx."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from sleigh.errors import SleighError, check_folder, first_line
from sleigh.runtime.fields import is_int

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"  # a package's tokenizer, as a checkpoint's
CHECKPOINT_CONFIG = "config.json"  # a Sleigh checkpoint's (sleighvl/checkpoint.py writes it; the runtime reads its contract)
MODEL_FOLDER = "a model package (sleigh export) or a Sleigh checkpoint folder"
SCHEMA = "sleigh.package"
SCHEMA_VERSION = 7  # 2: the decoder takes cache slots and returns only the new keys/values; 3: logits of the
# last position only, and no reduction over an empty axis (schema-2 decoders fail on onnxruntime <= 1.31);
# 4: the contract sections (model, image, prompt, generation, gswa, kv_cache) replace model_config;
# 5: GSWA is a module of its own (gswa: cls_tokens -> gswa_weights) and vision returns mlp1's image_embeds
# and the CLS tokens, so the runtime runs vision in chunks of views and GSWA once over all of them;
# 6: a fused decoder takes input_ids beside inputs_embeds and embeds a decode step's tokens itself;
# 7: the embed module takes no image rows for text alone, and an <IMG_CONTEXT> past its image rows (a
# generated one) keeps its token-table row, as in a fused decoder (schema-6 embed modules zeroed it)
MODULE_NAMES = ("vision", "gswa", "embed", "decoder")
REEXPORT = "re-export the package with this sleigh (`sleigh export CKPT -o PKG --force`)"


def model_kind(path: Path) -> str:
    """"package" or "checkpoint": what a model folder given to run, bench, eval or serve holds. A
    folder with .onnx files and no manifest is an unfinished package (reading it says so)."""
    check_folder(path, MODEL_FOLDER)
    if (path / MANIFEST).is_file() or any(Path(path).glob("*.onnx")):
        return "package"
    if (path / CHECKPOINT_CONFIG).is_file():
        return "checkpoint"
    raise SleighError(str(path), f"neither {MANIFEST} nor {CHECKPOINT_CONFIG} found",
                      "a model package (sleigh export) or a Sleigh checkpoint (sleigh init / sleigh convert)")


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


def write_bytes_atomic(path: Path, data, *, before_replace: Callable[[], None] | None = None) -> None:
    """Write `data` (bytes or any buffer) to a temporary file beside `path`, then rename it into place.
    `before_replace` runs once the new file is on disk, just before it takes the old one's place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))  # e.g. TensorRT's IHostMemory: no extra copy
            f.flush()
            os.fsync(f.fileno())  # a power cut on a device must not leave an empty file
        os.chmod(tmp, ordinary_mode())  # mkstemp makes it 0600
        if before_replace is not None:
            before_replace()
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


# -- JSON files -------------------------------------------------------------------------------------

def read_json(path: Path, expected: str) -> dict:
    """A JSON object from a file (a manifest, a checkpoint's config.json, a calibration file): a
    missing, unreadable or malformed file is one SleighError line; `expected` says what it should be."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SleighError(str(path), "file not found", expected) from None
    except OSError as e:
        raise SleighError(str(path), f"cannot be read ({e.strerror or e})", expected) from None
    try:
        data = json.loads(raw)  # bytes: UTF-8 (or -16/-32, as JSON allows)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, deep nesting
        raise SleighError(str(path), f"not valid JSON ({first_line(e, 120)})", expected) from None
    if not isinstance(data, dict):
        raise SleighError(str(path), "not a JSON object", expected)
    return data


# -- integrity -------------------------------------------------------------------------------------

def verify_files(pkg: Path, manifest) -> list[str]:
    """Problems with the package's files against the manifest's (a runtime.manifest.Manifest) sha256
    and sizes (empty = all good)."""
    problems = []
    for rel, entry in sorted(manifest.files.items()):
        p = inside(pkg, rel, "manifest.json: files")
        if (data := unlisted_data(pkg, rel, manifest.files)) is not None:
            problems.append(f"{data}: not listed in the manifest, and {rel} reads it")
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry.bytes:
            problems.append(f"{rel}: size {p.stat().st_size} != {entry.bytes}")
        elif sha256_file(p) != entry.sha256:
            problems.append(f"{rel}: sha256 differs")
    return problems


VERIFIED = ".sleigh-verified.json"  # in the package: sha256 already computed, by file version


def unlisted_data(pkg: Path, rel: str, listed) -> str | None:
    """The external data beside ONNX file `rel` (`<file>.data`, as sleigh writes it, onnx_files.save_onnx)
    where the manifest does not list it: ONNX Runtime would read weights no sha256 covers."""
    data = f"{rel}.data"
    if rel.endswith(".onnx") and data not in listed and (Path(pkg) / data).exists():
        return data
    return None


def check_sources(pkg: Path, manifest, modules, extra: dict[str, str] | None = None) -> None:
    """Before a tool reads the package's own files to make new ones (calibrate, build-engine): the
    `modules`' files (external data included) and `extra` ({relative path: remedy}) against the
    manifest, sha256 included (check_files), so a damaged or changed source is one line naming it, not
    an ONNX parse error or an engine built from edited data."""
    files = {rel: f"the file as exported: {REEXPORT}"
             for m in modules for rel in (manifest.modules[m].file, *manifest.modules[m].data_files)}
    check_files(pkg, manifest, {**files, **(extra or {})})


def check_folder_slot(path: Path) -> None:
    """A folder the package keeps (engines/, calibration/): absent or a folder, checked before any work."""
    if path.exists() and not path.is_dir():
        raise SleighError(str(path), "is a file where the package keeps a folder", f"remove it; {path.name}/ is made here")


def check_files(pkg: Path, manifest, files: dict[str, str], *, verify: bool = True) -> None:
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
            entry = manifest.files[rel]  # read_manifest: every file the runtime opens is listed
            if (data := unlisted_data(pkg, rel, manifest.files)) is not None:
                raise SleighError(str(pkg / data), f"{rel} reads it and the manifest does not list it (edited or "
                                  "stale)", remedy)
            try:
                st = path.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise SleighError(str(path), "is not a regular file", remedy)
                if st.st_size != entry.bytes:
                    raise SleighError(str(path), f"is {st.st_size} bytes and the manifest lists {entry.bytes} "
                                      "(truncated or replaced)", remedy)
                if cache is not None and cache.sha256(rel, path, st) != entry.sha256:
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
        self.fresh: dict[str, dict] = {}  # what this run hashed

    def sha256(self, rel: str, path: Path, st: os.stat_result) -> str:
        version = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        record = self.records.get(rel, {})
        if record.get("version") == version and isinstance(record.get("sha256"), str):
            return record["sha256"]
        digest = sha256_file(path)
        self.records[rel] = self.fresh[rel] = {"version": version, "sha256": digest}
        return digest

    def save(self) -> None:
        """This run's hashes added to what the cache holds now: runs started together on a fresh package
        (each hashing its engine's files) once kept only the last one's records, the file read before hashing."""
        if not self.fresh:
            return
        for path in self.paths:
            try:
                now = json.loads(path.read_bytes())["files"]
                now = {k: v for k, v in now.items() if isinstance(v, dict)} if isinstance(now, dict) else {}
            except Exception:  # noqa: BLE001 - missing, unreadable or damaged: this run's records alone
                now = {}
            try:
                write_json_atomic(path, {"files": {**now, **self.fresh}})
                return
            except OSError:
                continue


def check_module_io(modules: dict, module: str, path: Path, inputs: dict[str, list], outputs: list[str]) -> None:
    """A module file opened for `module` must have the input and output names `modules` (the
    manifest's ModuleEntry by name) lists for it, and its inputs (`inputs`: name -> shape) the fixed
    sizes listed there: another valid ONNX file copied over it must not run."""
    for side, got in (("inputs", list(inputs)), ("outputs", outputs)):
        want = set(modules[module].names(side))
        if set(got) != want:
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            diff = "; ".join(f"{label} {names[:4]}{' ...' if len(names) > 4 else ''}"
                             for label, names in (("lacks", missing), ("has extra", extra)) if names)
            raise SleighError(str(path), f"is not a {module} module: its {side} differ from the manifest's ({diff})",
                              f"the package's own {module} module; {REEXPORT}, or rebuild the engine")
    for t in modules[module].inputs:  # fixed sizes are ints; the others are names (or None)
        got = list(inputs[t.name])
        if len(got) != len(t.shape) or any(is_int(w) and is_int(g) and w != g for w, g in zip(t.shape, got)):
            raise SleighError(str(path), f"is not the {module} module the manifest lists: its input {t.name} is "
                              f"{got}, the manifest's {list(t.shape)}", f"the package's own {module} module; {REEXPORT}")
