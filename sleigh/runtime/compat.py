"""The onnxruntime versions Sleigh runs on (the range CI tests, checked before a session opens), and
the session settings every ONNX Runtime session of Sleigh uses: the backend's, calibration's, parity's.

CI (`.ci/run`) runs the runtime and engine tests with the newest onnxruntime, with 1.31.1 (the newest
onnxruntime-gpu, what CUDA users get) and with ONNXRUNTIME_MIN, the oldest Sleigh supports. An older
one is refused in one line instead of failing somewhere inside a graph. `pyproject.toml` declares the
same floor (a test holds the two together). Torch-free: the runtime imports it.
"""

from __future__ import annotations

import re

from sleigh.errors import SleighError

# Tested in CI (runtime tests, and engines built by the newest). 1.21 cannot run INT8 weight-only decoders
# (MatMulNBits with 8 bits); JetPack 6's Jetson AI Lab builds are 1.22 and 1.23 (README "Install").
ONNXRUNTIME_MIN = (1, 22, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    """'1.31.1' / '1.20.0.dev20240101' / '1.22.0+cu126' -> (1, 31, 1); missing parts are 0."""
    parts = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text.strip())
    if parts is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p or 0) for p in parts.groups())  # type: ignore[return-value]


def older_than(installed: str, floor: tuple[int, int, int]) -> bool:
    """Whether version `installed` is older than `floor`; a local build with an odd version string
    is not (let it try)."""
    try:
        return parse_version(installed) < floor
    except ValueError:
        return False


def check_onnxruntime(installed: str) -> None:
    """Refuse an onnxruntime older than the oldest one CI tests (one SleighError line)."""
    if older_than(installed, ONNXRUNTIME_MIN):
        floor = ".".join(map(str, ONNXRUNTIME_MIN))
        raise SleighError(f"onnxruntime {installed}", f"older than {floor}, the oldest version Sleigh is tested with",
                          f"pip install 'onnxruntime>={floor}' (or 'onnxruntime-gpu>={floor}' for CUDA)")


def import_onnxruntime():
    """`import onnxruntime`, checked against the supported range."""
    import onnxruntime

    check_onnxruntime(onnxruntime.__version__)
    return onnxruntime


def session_options(threads: int | None = None, *, arena: bool = True):
    """Sleigh's ONNX Runtime session settings: quiet logs, `threads` intra-op threads when given,
    and no CPU memory arena where a caller opens large modules one after another (an arena keeps its peak)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def trim_heap() -> None:
    """Hand the heap's freed blocks back to the OS: glibc keeps blocks under its mmap threshold
    otherwise, so the resident size stays at its peak after large tensors are freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: whatever the allocator returns by itself
        pass
