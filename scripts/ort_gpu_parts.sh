#!/usr/bin/env bash
# The onnxruntime-gpu wheel (1.31.1, CUDA 13, Python 3.12, manylinux_2_28 x86_64) repacked as one
# .tar.xz of its installed files (the TensorRT provider library left out: Sleigh's TensorRT path does
# not go through ONNX Runtime) and split into parts of PART_MB MiB in .whl/pNN.d/ (ignored by git),
# as ../shared/gpu/prepare-ort-gpu.sh lays out its plain split. The wheel's 255 MB become 4 parts of
# 52 MiB instead of 5, one call to the device machine fewer. scripts/gpu_check.sh takes either form.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp" "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
mkdir "$tmp/site"
( cd "$tmp/site" && python3 -m zipfile -e "$tmp"/onnxruntime_gpu-*.whl . && rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so )
tar -C "$tmp/site" -cf - . | xz -T0 -6 > "$tmp/ort.tar.xz"
rm -rf .whl && mkdir -p .whl
( cd .whl && split -b "${PART_MB:-52}M" -d "$tmp/ort.tar.xz" p && for f in p0*; do mkdir "$f.d" && mv "$f" "$f.d/"; done )
ls -d .whl/*.d
