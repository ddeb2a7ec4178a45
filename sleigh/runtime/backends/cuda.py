"""The few CUDA runtime calls Sleigh makes without PyTorch, through cuda-python (`cuda.bindings.runtime`).

Used by the TensorRT backend (all of its device memory) and by the ONNX Runtime backend on the CUDA
provider (writing a step's new keys/values into the device KV cache slots). Imported only when one
of those is opened on a GPU. Where cuda-python is not installed, the ONNX Runtime path calls the
CUDA runtime that onnxruntime-gpu has already loaded through ctypes (`ctypes_cudart`), so
`pip install onnxruntime-gpu` alone is enough for it.

UNVERIFIED: no GPU was available where this was written; the calls follow cuda-python's runtime API
(12.x/13.x: every call returns (error, *results)) and the CUDA runtime's C signatures.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from sleigh.errors import SleighError

CUDA_PYTHON_EXPECTED = "cuda-python 12+ (pip install cuda-python, or 'sleigh[tensorrt]'; it provides cuda.bindings.runtime)"


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+, 13), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


class _MemcpyKind:
    cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3


class _CtypesRuntime:
    """cuda-python's calling convention ((error, *results) tuples) over libcudart through ctypes:
    only the calls `Cuda` makes for copies, memsets and its stream."""

    cudaMemcpyKind = _MemcpyKind
    cudaStreamNonBlocking = 1

    def __init__(self, lib):
        P, Z = ctypes.c_void_p, ctypes.c_size_t
        self.lib = lib
        for name, args in (("cudaSetDevice", [ctypes.c_int]), ("cudaStreamCreateWithFlags", [ctypes.POINTER(P), ctypes.c_uint]),
                           ("cudaStreamSynchronize", [P]), ("cudaStreamDestroy", [P]),
                           ("cudaMemcpy2DAsync", [P, Z, P, Z, Z, Z, ctypes.c_int, P]),
                           ("cudaMemcpyAsync", [P, P, Z, ctypes.c_int, P]), ("cudaMemsetAsync", [P, ctypes.c_int, Z, P]),
                           ("cudaMalloc", [ctypes.POINTER(P), Z]), ("cudaFree", [P])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int

    def __getattr__(self, name: str):
        """The calls whose only result is the error code, returned as cuda-python does: `(err,)`."""
        if not name.startswith("cuda"):
            raise AttributeError(name)
        fn = getattr(self.lib, name)
        return lambda *args: (fn(*args),)

    def cudaStreamCreateWithFlags(self, flags):
        stream = ctypes.c_void_p()
        return self.lib.cudaStreamCreateWithFlags(ctypes.byref(stream), flags), stream.value or 0

    def cudaMalloc(self, nbytes):
        ptr = ctypes.c_void_p()
        return self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), ptr.value or 0


CUDART_SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so", "cudart64_13.dll", "cudart64_12.dll")


def ctypes_cudart():
    """The CUDA runtime library through ctypes: the one already in the process (onnxruntime-gpu
    loads the one it was built for) before any other on the library path; None when there is none."""
    noload = getattr(os, "RTLD_NOLOAD", None)
    modes = ([noload | ctypes.RTLD_GLOBAL] if noload is not None else []) + [ctypes.DEFAULT_MODE]
    for mode in modes:
        for name in CUDART_SONAMES:
            try:
                return _CtypesRuntime(ctypes.CDLL(name, mode=mode))
            except (OSError, AttributeError):
                continue
    return None


def any_cudart():
    """cuda-python's runtime where installed, else `ctypes_cudart()`, else None."""
    try:
        return import_cudart()
    except ImportError:
        return ctypes_cudart()


def check(err, call: str) -> None:
    if int(err) != 0:
        raise SleighError("cuda", f"{call} failed ({err})", "a working CUDA device (see nvidia-smi)")


class Cuda:
    """The few cuda-python runtime calls the backend needs, with errors checked."""

    def __init__(self, cudart, device: int):
        self.rt = cudart
        check(cudart.cudaSetDevice(device)[0], "cudaSetDevice")
        err, self.stream = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)  # never the default stream
        check(err, "cudaStreamCreateWithFlags")
        self.stream_handle = int(self.stream)
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def malloc(self, nbytes: int) -> int:
        err, ptr = self.rt.cudaMalloc(max(int(nbytes), 256))  # never 0 bytes: TensorRT wants a real address
        if int(err) != 0:
            raise SleighError("cuda", f"cudaMalloc of {nbytes / 2**20:.1f} MiB failed ({err})",
                              "enough free GPU memory (an engine rebuilt with a smaller --max-context or --max-batch)")
        return int(ptr)

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        if array.nbytes:
            check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, self._h2d, self.stream)[0], "cudaMemcpyAsync")

    def download(self, array: np.ndarray, ptr: int) -> None:
        if array.nbytes:
            check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, self._d2h, self.stream)[0], "cudaMemcpyAsync")

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        """Device-to-device copy of `rows` rows of `width` bytes between pitched layouts (one
        cudaMemcpy2DAsync): how a step's keys (B, KV, S, hd) land in slots P..P+S-1 of (B, KV, C, hd)."""
        if width and rows:
            check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, self._d2d, self.stream)[0],
                  "cudaMemcpy2DAsync")

    def zero(self, ptr: int, nbytes: int) -> None:
        """Unused cache slots must hold finite values (they are masked, and 0 * NaN is NaN)."""
        if nbytes:
            check(self.rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream)[0], "cudaMemsetAsync")

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.stream)[0], "cudaStreamSynchronize")

    def close(self) -> None:
        self.rt.cudaStreamDestroy(self.stream)
