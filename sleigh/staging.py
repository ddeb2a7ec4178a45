"""Staging folders: where export and build-engine build a result before it is moved into place,
and the check that an output never overlaps an input.

A staging folder sits hidden beside its destination and its name says who owns it:

    .NAME.tmp-<pid>-<start>-<random>    a result being built (export, build-engine, the gate's images)
    .NAME.old-<pid>-<start>-<random>    a previous result moved aside while a new one is swapped in

`<start>` is the owner's start time (clock ticks since boot, from /proc; 0 where unknown), so a
reused pid is not taken for the owner. A later run removes the folders whose owner is dead
(`clean_stale`), never a live process's, and `sleigh inspect` lists them (`stale`). Folders named
by older versions of sleigh (`.NAME.tmp-XXXXXXXX`, no owner) count as stale once a day old.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from sleigh.errors import SleighError, first_line

KINDS = ("tmp", "old")
LEGACY_STALE_S = 24 * 3600  # an ownerless staging folder of an older sleigh: stale once untouched this long
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[A-Za-z0-9_]+$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]{8}$")  # tempfile.mkdtemp's suffix


def prepare_output_dir(dst: Path, force: bool) -> None:
    """Refuse a non-empty destination unless force; check that its parent is writable."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise SleighError(str(dst), "exists and is not a folder", "a new or empty folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise SleighError(str(dst), "folder is not empty", "an empty folder, or --force to replace it")
    parent = dst.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SleighError(str(dst), f"cannot create parent folder {parent} ({e.strerror})", "a writable location") from None
    if not os.access(parent, os.W_OK):
        raise SleighError(str(dst), f"parent folder {parent} is not writable", "a writable location")


def check_output_file(out: Path, expected: str = "a file name") -> None:
    """A file that can be written later (write_bytes_atomic makes its missing folders): checked before
    any work, so a bad location costs nothing. Its nearest existing folder must be writable (a file
    made there once and removed: /proc says it is writable to root and is not), and no file may stand
    where a folder of its path goes."""
    out = Path(out)
    if out.is_dir():
        raise SleighError(str(out), "is a folder", expected)
    folder = _writable_folder_of(out)
    try:
        fd, probe = tempfile.mkstemp(prefix=".sleigh-probe-", dir=folder)
    except OSError as e:
        raise SleighError(str(out), f"folder {folder} cannot be written ({e.strerror or first_line(e)})",
                          "a writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(out: Path) -> None:
    """A folder that a long job (training) writes only at its end: checked before any work, so a bad
    location costs nothing. No file where it or one of its folders goes, and a folder can be made in
    its nearest existing folder (made once and removed: /proc says it is writable to root and is not)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SleighError(str(out), "exists and is a file, not a folder", "a new or empty folder")
    try:
        make(_writable_folder_of(out), out.name).rmdir()
    except SleighError as e:  # named by the output asked for, not the probe's folder
        raise SleighError(str(out), e.problem, e.expected) from None


def _writable_folder_of(out: Path) -> Path:
    """`out`'s nearest existing folder, which must be a writable folder."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SleighError(str(out), f"{parent} is a file, not a folder", "a path whose folders are folders")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SleighError(str(out), f"folder {parent} is not writable", "a writable location")
    return parent


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # after the command name, which may hold spaces
    except (IndexError, ValueError):
        return None


def _owner() -> str:
    pid = os.getpid()
    return f"{pid}-{process_start(pid) or 0}"


def owner_alive(pid: int, start: int) -> bool:
    """Whether process `pid`, started at `start` (0: unknown), still runs."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    now = process_start(pid)
    return not (start and now is not None and now != start)  # same pid, another process: the owner is gone


def make(parent: Path, name: str) -> Path:
    """A new staging folder for `name` in `parent`, owned by this process."""
    parent = Path(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{_owner()}-", dir=parent))
    except FileNotFoundError as e:  # a folder that takes no new folders though it says it is writable (/proc
        # as root); permissions, a read-only mount or a full disk reach the CLI's own lines (cli._system_error)
        raise SleighError(str(parent / name), f"cannot make a folder in {parent} ({e.strerror})",
                          "a writable location") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    return tmp


def aside_name(dst: Path) -> Path:
    """A name beside `dst` to move it aside to while its replacement moves in (restored by `clean_stale` if
    the owner dies before the destination is back)."""
    return dst.with_name(f".{dst.name}.old-{_owner()}-{secrets.token_hex(4)}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def install(staging: Path, dst: Path) -> None:
    """Put a complete staging folder at `dst`. What was at `dst` stays whole until the new folder is
    in place (one atomic exchange where the system has it, else moved aside and put back on failure),
    and is removed after."""
    staging, dst = Path(staging), Path(dst)
    if not dst.exists():
        os.replace(staging, dst)
        return
    if _exchange(staging, dst):
        shutil.rmtree(staging, ignore_errors=True)  # it holds the old folder now
        return
    aside = aside_name(dst)
    os.replace(dst, aside)
    try:
        os.replace(staging, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _parse(entry: str) -> tuple[str, str, int | None, int] | None:
    """(destination name, kind, pid or None for an ownerless legacy folder, start) of a staging name."""
    m = _OWNED.match(entry)
    if m:
        return m["name"], m["kind"], int(m["pid"]), int(m["start"])
    m = _LEGACY.match(entry)
    if m:
        return m["name"], "tmp", None, 0
    return None


def stale(parent: Path, name: str | None = None) -> list[Path]:
    """Staging folders in `parent` (for destination `name`, or any) whose owner is no longer running."""
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        parsed = _parse(path.name)
        if parsed is None or (name is not None and parsed[0] != name) or path.is_symlink() or not path.is_dir():
            continue
        _, _, pid, start = parsed
        if pid is None:
            try:
                old = time.time() - path.stat().st_mtime > LEGACY_STALE_S
            except OSError:
                continue
            if old:
                found.append(path)
        elif not owner_alive(pid, start):
            found.append(path)
    return found


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove the stale staging folders of `stale(parent, name)`; a moved-aside folder whose destination
    is missing (its owner died mid-swap) is put back instead. Returns the folders dealt with."""
    done = []
    for path in stale(parent, name):
        dest_name, kind, _, _ = _parse(path.name)
        dest = path.with_name(dest_name)
        try:
            if kind == "old" and not dest.exists():
                os.replace(path, dest)
            else:
                shutil.rmtree(path)
        except OSError:  # read-only, or removed meanwhile: report it next time
            continue
        done.append(path)
    return done


def check_apart(output: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse an output folder that is one of the inputs, lies inside one, or contains one (symlinks
    resolved): writing or replacing it would destroy or mix with what is being read.
    `inputs` maps a label (`checkpoint`, `--images`) to a path; None entries are skipped."""
    out = Path(output).resolve()
    for label, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if out == src:
            problem = f"is the {label} itself"
        elif src in out.parents:
            problem = f"is inside the {label} {path}"
        elif out in src.parents:
            problem = f"contains the {label} {path}"
        else:
            continue
        raise SleighError(str(output), problem,
                          f"an output folder apart from the {label} (neither it, inside it, nor around it)")
