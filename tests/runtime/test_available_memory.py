"""What the machine can still give a process (runtime/memory.available_bytes): MemAvailable, or less
where a memory cgroup on the process's path limits it, cgroup v2 or v1, at the process's own level or a
parent's, its inactive file cache not counted as used; "no limit" and unreadable files are no limit.
Fake /proc and /sys/fs/cgroup trees stand in for containers and systemd units."""

from __future__ import annotations

from pathlib import Path

import pytest

from sleigh.runtime.memory import available_bytes

GiB = 1024**3


def fake(tmp_path: Path, cgroup_lines: str, files: dict[str, str], mem_available_kb: int = 20 * 1024**2):
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {32 * 1024**2} kB\nMemAvailable:   {mem_available_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    for rel, text in files.items():
        (cgroups / rel).parent.mkdir(parents=True, exist_ok=True)
        (cgroups / rel).write_text(text)
    return proc, cgroups


def test_no_cgroup_limit_leaves_memavailable(tmp_path):
    proc, cgroups = fake(tmp_path, "0::/user.slice\n", {"user.slice/memory.max": "max\n", "user.slice/memory.current": "5\n"})
    assert available_bytes(proc, cgroups) == 20 * GiB


def test_a_v2_limit_on_a_parent_counts_and_its_inactive_cache_is_not_used_memory(tmp_path):
    """A systemd unit's MemoryMax sits on a parent of the process's own cgroup, not at the mount's root."""
    proc, cgroups = fake(tmp_path, "0::/system.slice/app.service/worker\n", {
        "system.slice/app.service/memory.max": f"{8 * GiB}\n",
        "system.slice/app.service/memory.current": f"{3 * GiB}\n",
        "system.slice/app.service/memory.stat": f"anon {2 * GiB}\nfile {GiB}\ninactive_file {GiB}\n",
        "system.slice/app.service/worker/memory.max": "max\n",
        "system.slice/app.service/worker/memory.current": f"{3 * GiB}\n",
    })
    assert available_bytes(proc, cgroups) == 6 * GiB  # 8 - (3 - 1 of reclaimable cache)


def test_v1_limits_and_its_no_limit_value(tmp_path):
    lines = "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/\n"
    files = {"memory/docker/abc/memory.limit_in_bytes": f"{4 * GiB}\n",
             "memory/docker/abc/memory.usage_in_bytes": f"{GiB}\n",
             "memory/docker/abc/memory.stat": "cache 100\ntotal_inactive_file 0\n",
             "memory/docker/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
             "memory/docker/memory.usage_in_bytes": f"{GiB}\n"}
    proc, cgroups = fake(tmp_path, lines, files)
    assert available_bytes(proc, cgroups) == 3 * GiB
    proc, cgroups = fake(tmp_path / "roomy", lines, {**files, "memory/docker/abc/memory.limit_in_bytes": f"{64 * GiB}\n"})
    assert available_bytes(proc, cgroups) == 20 * GiB  # the machine has less than the container may take


def test_nothing_readable_is_unknown(tmp_path):
    assert available_bytes(tmp_path / "none", tmp_path / "none") is None


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux")
def test_this_machine_is_read_and_within_its_memory():
    total = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    assert 0 <= available_bytes() <= total
