#!/usr/bin/env bash
# A/B of the decoder's KV cache: schema 1 (the decoder returns Concat(past, new), the whole cache,
# every step) against schema 2 (cache slots written in place; only the new positions come out).
# Each side is exported and run by its own version of sleigh; the runs alternate so both see the
# same machine load.
#
#   benchmarks/kv_cache_ab.sh CKPT OUT [OLD_COMMIT]     # CKPT: e.g. runs/small (sleigh init --preset small)
set -euo pipefail
CKPT=$(realpath "$1"); OUT=$(mkdir -p "$2" && realpath "$2"); OLD=${3:-da2a2f2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
[ -d "$OUT/old-src" ] || git -C "$HERE" worktree add --detach "$OUT/old-src" "$OLD"
# run from $OUT: `python -m` puts the working directory first on sys.path, before PYTHONPATH
old() { (cd "$OUT" && PYTHONPATH="$OUT/old-src" python "$@"); }
new() { (cd "$OUT" && PYTHONPATH="$HERE" python "$@"); }
for side in old new; do
  pkg="$OUT/pkg-$side"
  [ -f "$pkg/manifest.json" ] || $side -m sleigh.cli export "$CKPT" -o "$pkg" --no-verify
  [ -d "$pkg/engines/onnxruntime-fp32-llm-int4" ] || $side -m sleigh.cli build-engine "$pkg" --backend onnxruntime \
      --precision fp32 --llm-weights int4 --allow-degraded >/dev/null
done
for round in 1 2 3; do
  for engine in package onnxruntime-fp32-llm-int4; do
    for side in old new; do
      $side "$HERE/benchmarks/decode_speed.py" "$OUT/pkg-$side" --engine "$engine" --runs 1 --label "$side r$round"
    done
  done
done
