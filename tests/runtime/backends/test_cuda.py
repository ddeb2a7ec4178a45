"""The CUDA runtime helpers of the GPU paths (runtime/backends/cuda.py), through ctypes on libcudart
(no cuda-python needed). Without a GPU: the failure is one line. With one (`-m gpu`, the prepared
scripts/gpu_check.sh): a step's new keys/values land in the right cache slots."""

import numpy as np
import pytest

from sleigh.errors import SleighError
from sleigh.runtime.backends.cuda import Cuda, ctypes_cudart

RT = ctypes_cudart()
pytestmark = pytest.mark.skipif(RT is None, reason="no CUDA runtime library (libcudart) on this machine")


def gpu_present() -> bool:
    return RT is not None and RT.cudaSetDevice(0)[0] == 0


@pytest.mark.skipif(gpu_present(), reason="a GPU is present")
def test_without_a_gpu_cuda_fails_in_one_line():
    with pytest.raises(SleighError) as e:
        Cuda(RT, 0)
    text = str(e.value)
    assert "\n" not in text and text.startswith("cuda | cudaSetDevice failed (")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present(), reason="needs a GPU")
def test_copy_rows_writes_new_positions_into_slots():
    cuda = Cuda(RT, 0)
    B, KV, C, S, P, hd = 2, 3, 16, 2, 5, 8
    rng = np.random.default_rng(0)
    slots = rng.standard_normal((B, KV, C, hd)).astype(np.float32)
    new = rng.standard_normal((B, KV, S, hd)).astype(np.float32)
    row = hd * 4
    d_slots, d_new = cuda.malloc(slots.nbytes), cuda.malloc(new.nbytes)
    cuda.upload(d_slots, slots)
    cuda.upload(d_new, new)
    cuda.copy_rows(d_slots + P * row, C * row, d_new, S * row, S * row, B * KV)
    got = np.empty_like(slots)
    cuda.download(got, d_slots)
    cuda.sync()
    expected = slots.copy()
    expected[:, :, P:P + S] = new
    np.testing.assert_array_equal(got, expected)
    cuda.zero(d_slots, slots.nbytes)
    cuda.download(got, d_slots)
    cuda.sync()
    assert not got.any()
    cuda.free(d_slots)
    cuda.free(d_new)
    cuda.close()
