#!/usr/bin/env bash
# The one prepared GPU check, for a session that is lent a GPU machine (never run yet: the session
# that wrote it had none). Run on the device machine in ONE call, after the onnxruntime-gpu wheel
# parts have been carried to /tmp/parts (see ../shared/gpu/prepare-ort-gpu.sh and DEVELOPERS notes):
#
#   bash scripts/gpu_check.sh          # results under $OUT (or ./gpu-out)
#
# It installs the wheel, makes a tiny and a small package on the spot (no weights travel), then:
#   0. the CUDA copy helpers (tests/runtime/test_cuda_helpers.py -m gpu): new keys/values land in the
#      right device cache slots;
#   1. ONNX Runtime CUDA provider: greedy tokens equal the CPU provider's on a multi-tile image and
#      across a cache growth (the KV slots stay on the GPU, written in place);
#   2. FP16 engine on CUDA vs FP32 (the accuracy gate);
#   3. sleigh bench on CUDA for the small preset (FP32 package and FP16 engine).
set -euo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
if [ -d /tmp/parts ]; then
  cat /tmp/parts/p0* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/onnxruntime_gpu-*.whl
  SP=$(python3 -c "import sys; print([p for p in sys.path if p.endswith('site-packages')][0])")
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(ls -d "$SP"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" | tee "$out/providers.txt"
python3 -m pytest -q -m gpu tests/runtime/test_cuda_helpers.py 2>&1 | tee "$out/cuda-helpers.txt" || true
python3 -m sleigh.cli init /tmp/g/tiny --preset tiny --force
python3 -m sleigh.cli export /tmp/g/tiny -o /tmp/g/tiny-pkg --force --json > "$out/export-tiny.json"
python3 - <<'PY' 2>&1 | tee "$out/cuda-vs-cpu.txt"
from sleigh.runtime.pipeline import Pipeline
from sleigh.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, CPU, CUDA
from sleigh.runtime.package import read_manifest
from pathlib import Path
pkg = Path("/tmp/g/tiny-pkg"); m = read_manifest(pkg)
cpu = Pipeline.from_package(pkg, engine="package")
cuda = Pipeline(OnnxRuntimeBackend.from_package(pkg, m, providers=[CUDA, CPU]), cpu.info, cpu.tokenizer)
a = cpu.generate("examples/chelsea.jpg", max_new_tokens=24, ignore_eos=True).result
b = cuda.generate("examples/chelsea.jpg", max_new_tokens=24, ignore_eos=True).result
print("backend", b.backend, "same tokens", a.token_ids == b.token_ids, "gswa max diff", max(abs(x - y) for x, y in zip(a.gswa_weights, b.gswa_weights)))
cache = cuda.backend._cache
print("kv slots", type(cache).__name__, {type(v).__name__ for v in cache.slots.values()}, cuda.backend.device, "capacity", cache.host.capacity)
a = cpu.generate(None, "Tell me a story.", max_new_tokens=300, ignore_eos=True).result  # crosses a 256-slot growth
b = cuda.generate(None, "Tell me a story.", max_new_tokens=300, ignore_eos=True).result
print("text-only 300 tokens, same tokens", a.token_ids == b.token_ids, "capacity", cuda.backend._cache.host.capacity)
PY
python3 -m sleigh.cli init /tmp/g/small --preset small --force
python3 -m sleigh.cli export /tmp/g/small -o /tmp/g/small-pkg --force --json > "$out/export-small.json"
python3 -m sleigh.cli build-engine /tmp/g/small-pkg --precision fp16 --json > "$out/fp16-engine.json" || true
python3 -m sleigh.cli bench /tmp/g/small-pkg --engine onnxruntime-fp16 --runs 3 --max-new-tokens 64 2>&1 | tee "$out/bench-small.md"
