"""Staging folders (sleigh/staging.py): owners recorded in the name, only dead owners' folders
cleaned, a swap that keeps the old folder until the new one is in place, and outputs kept apart
from inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sleigh import staging
from sleigh.errors import SleighError

HAS_PROC = staging.process_start(os.getpid()) is not None


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def owned(parent: Path, name: str, kind: str, pid: int, start: int) -> Path:
    path = parent / f".{name}.{kind}-{pid}-{start}-abc123"
    path.mkdir()
    (path / "big.bin").write_bytes(b"x" * 10)
    return path


def test_owner_alive():
    me = os.getpid()
    assert staging.owner_alive(me, staging.process_start(me) or 0)
    assert staging.owner_alive(me, 0)  # start time unknown: the pid decides
    assert not staging.owner_alive(dead_pid(), 0)
    assert not staging.owner_alive(0, 0)
    if HAS_PROC:  # the same pid with another start time: the pid was reused, the owner is gone
        assert not staging.owner_alive(me, staging.process_start(me) + 1)


def test_make_names_this_process_as_owner(tmp_path):
    tmp = staging.make(tmp_path, "pkg")
    assert tmp.parent == tmp_path and tmp.name.startswith(f".pkg.tmp-{os.getpid()}-")
    assert tmp.stat().st_mode & 0o777 == 0o755
    assert staging.stale(tmp_path) == []  # a live process's folder is never stale


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")
def test_a_folder_where_no_staging_folder_can_be_made_is_one_error():
    """/proc takes no new folders, whatever os.access tells root (who found `sleigh init /proc/x`
    ending in "unexpected FileNotFoundError")."""
    with pytest.raises(SleighError) as e:
        staging.make(Path("/proc"), "x")
    assert str(e.value).startswith("/proc/x | cannot make a folder in /proc (") and "a writable location" in str(e.value)


def test_stale_lists_only_dead_owners_and_clean_removes_only_those(tmp_path):
    me, start = os.getpid(), staging.process_start(os.getpid()) or 0
    live = staging.make(tmp_path, "pkg")
    dead = owned(tmp_path, "pkg", "tmp", dead_pid(), 0)
    other_name = owned(tmp_path, "other-pkg", "tmp", dead_pid(), 0)
    legacy_old = tmp_path / ".pkg.tmp-k3j_x9ab"  # an older sleigh's mkdtemp name, no owner
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 2 * staging.LEGACY_STALE_S,) * 2)
    legacy_new = tmp_path / ".pkg.tmp-q8w7e6r5"
    legacy_new.mkdir()
    unrelated = [tmp_path / ".git", tmp_path / "pkg.tmp-123-0-abc", tmp_path / ".pkg.tmp-notes"]
    for u in unrelated:
        u.mkdir()
    (tmp_path / ".pkg.tmp-12345678").write_text("a file, not a folder")
    expected = {dead, legacy_old}
    if HAS_PROC:
        expected.add(owned(tmp_path, "pkg", "tmp", me, start + 1))  # our pid, another process's start time

    assert set(staging.stale(tmp_path, "pkg")) == expected
    assert set(staging.stale(tmp_path)) == expected | {other_name}
    assert set(staging.clean_stale(tmp_path, "pkg")) == expected
    assert all(not p.exists() for p in expected)
    for kept in (live, other_name, legacy_new, *unrelated):
        assert kept.is_dir()
    assert staging.stale(tmp_path / "missing") == []


def test_a_dead_owners_aside_folder_is_put_back_where_its_destination_is_missing(tmp_path):
    """Killed between moving the old folder aside and moving the new one in: the old one returns."""
    aside = owned(tmp_path, "pkg", "old", dead_pid(), 0)
    assert staging.clean_stale(tmp_path, "pkg") == [aside]
    assert (tmp_path / "pkg" / "big.bin").read_bytes() == b"x" * 10 and not aside.exists()
    aside = owned(tmp_path, "pkg", "old", dead_pid(), 0)  # destination present: the swap had finished
    staging.clean_stale(tmp_path, "pkg")
    assert not aside.exists() and (tmp_path / "pkg").is_dir()


@pytest.mark.parametrize("exchange", [True, False])
def test_install_replaces_the_destination_only_when_the_new_folder_is_there(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    dst = tmp_path / "pkg"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    new = staging.make(tmp_path, "pkg")
    (new / "new.txt").write_text("new")
    staging.install(new, dst)
    assert [p.name for p in dst.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # nothing left beside it
    fresh = staging.make(tmp_path, "fresh")
    staging.install(fresh, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir()


def test_install_fallback_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    dst = tmp_path / "pkg"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    new = staging.make(tmp_path, "pkg")
    real = os.replace

    def failing(src, target):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        return real(src, target)

    monkeypatch.setattr(staging.os, "replace", failing)
    with pytest.raises(OSError):
        staging.install(new, dst)
    assert (dst / "old.txt").read_text() == "old"


def test_check_apart(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    link = tmp_path / "link-to-ckpt"
    link.symlink_to(src)
    refused = {
        src: "is the checkpoint itself",
        tmp_path / "ckpt" / "." : "is the checkpoint itself",
        tmp_path / "x" / ".." / "ckpt": "is the checkpoint itself",
        link: "is the checkpoint itself",  # a symlink to it
        src / "pkg": "is inside the checkpoint",
        src / "sub" / "deeper" / "pkg": "is inside the checkpoint",
        link / "pkg": "is inside the checkpoint",
        tmp_path: "contains the checkpoint",
        tmp_path.parent: "contains the checkpoint",
    }
    for out, needle in refused.items():
        with pytest.raises(SleighError) as e:
            staging.check_apart(out, {"checkpoint": src})
        assert needle in str(e.value) and "\n" not in str(e.value), out
    for out in (tmp_path / "pkg", tmp_path / "ckpt-pkg", tmp_path / "ckpt2" / "pkg"):  # a shared prefix is not inside
        staging.check_apart(out, {"checkpoint": src})
    staging.check_apart(src, {"--images": None})
    with pytest.raises(SleighError, match="is inside the checkpoint"):  # the link named as the input
        staging.check_apart(src / "pkg", {"checkpoint": link})


def test_atomic_dir_keeps_the_old_folder_on_failure_and_replaces_through_a_link(tmp_path):
    """save_checkpoint's folder swap (init --force, convert --force) on the staging helpers."""
    from sleigh.sleighvl.checkpoint import atomic_dir

    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(real, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in real.iterdir()] == ["old.txt"]
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_dir(link, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and [p.name for p in real.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
