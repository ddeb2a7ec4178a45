#!/usr/bin/env bash
# Full-size (InternVL2-2B shapes, random weights) init + export with parity, timed, with peak memory.
# Usage: benchmarks/full_size_export.sh [WORKDIR]   (needs ~20 GB of disk and ~20 GB of RAM)
set -euo pipefail
work=${1:-runs/full}
mkdir -p "$work"
/usr/bin/time -v sleigh init "$work/ckpt" --preset internvl2-2b --force 2> "$work/init.time"
/usr/bin/time -v sleigh export "$work/ckpt" -o "$work/pkg" --force 2> "$work/export.time" | tee "$work/export.out"
for f in init export; do
  echo "$f: $(grep -E 'Elapsed \(wall' "$work/$f.time" | awk '{print $NF}') wall, peak RSS $(grep 'Maximum resident' "$work/$f.time" | awk '{printf "%.1f GB", $NF/1048576}')"
done
du -sh "$work/ckpt" "$work/pkg"
