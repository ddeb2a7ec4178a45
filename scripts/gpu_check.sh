#!/usr/bin/env bash
# The one prepared GPU check (issue 9, item 6), for a session that is lent a GPU machine. Run on the
# device machine after the onnxruntime-gpu parts made by scripts/ort_gpu_parts.sh (4 parts) or
# ../shared/gpu/prepare-ort-gpu.sh (5) have been carried there (into $PARTS, default /tmp/parts), one
# call per part. The first call also starts step 3 (the full-size package: no GPU needed, minutes of
# CPU) in the background, so it runs while the other parts travel; the last call runs the rest:
#
#   (PREPARE=1 setsid nohup bash scripts/gpu_check.sh > /tmp/prepare.log 2>&1 < /dev/null &)   # first call
#   bash scripts/gpu_check.sh          # last call: results under $OUT (or ./gpu-out); table.md is the summary
#
# (where step 3 was not started ahead, the last call makes the package itself).
# Finishes within $BUDGET_S seconds (default 530: under 9 minutes with the start). Seen on an H200
# (session 27, benchmarks/RESULTS.md): a machine's start ~35 s and 4 part calls, install ~15 s, tiny
# checks ~75 s, full-size init 30-41 s + export --no-verify 76-116 s (made ahead), FP32 bench 38 s, HF
# anchor 22 s, FP16 engine 161 s up to its gate, benches ~40 s each. Every step after the install gets what is left of
# the budget (timeout); a step that fails or runs out leaves its row marked in the table and the
# script goes on. Steps:
#   1. onnxruntime-gpu from the carried parts (scripts/install_ort_parts.py: either form); CUDAExecutionProvider must be listed (else one line, exit 2)
#   2. what CUDA's GroupQueryAttention takes (benchmarks/gqa_cuda_probe.py: float16/float32, with and
#      without attention_bias; the source says float16 only, no bias), then tiny packages (export with
#      parity): the standard decoder (its slots on the device), the fused one (its decoder opens on the CPU
#      beside CUDA) and
#      fused-cuda (FP16 engine, decode steps captured as a CUDA graph): CUDA greedy tokens == CPU greedy
#      tokens on a multi-tile image and across a 256-slot growth; the FP16 engine's logits step by step
#      against the CPU's (benchmarks/cuda_steps_check.py), also with cuDNN's attention off, and the
#      attention kernel ONNX Runtime picks; the CUDA copy helpers' tests (-m gpu); `sleigh train` on the
#      GPU (tiny, 3 steps) and one step's GPU peak against the memory guard's bound
#   3. full size (internvl2-2b, random weights): init, export --no-verify --decoder $DECODER (default
#      fused-cuda: GroupQueryAttention in place on the device buffers; `DECODER=standard` for the other)
#   4. build-engine --precision fp16 (--allow-degraded: kept if its gate fails, the verdict in its log),
#      then sleigh's bench of that engine by name on CUDA: with the decode steps replayed as a CUDA graph
#      (fused-cuda), again with SLEIGH_CUDA_GRAPH=0, and with cuDNN's attention off; GPU memory sampled
#      with nvidia-smi
#   5. HF transformers eager, bf16, the same views and prompt tokens (benchmarks/hf_anchor.py)
#   6. the FP32 package (its float32 fused-cuda decoder opens on the CPU beside CUDA: one capped run)
#   7. one table (benchmarks/gpu_table.py), the device named: copy it to benchmarks/RESULTS.md
#
# ONLY="NAME ..." runs those steps alone (a second call that repeats what failed; the table marks the
# rows it did not bench). Unexpected errors print their traceback (SLEIGH_DEBUG=1) into the step's log.
#
# REHEARSAL=1 runs every step on the CPU (CPUExecutionProvider in place of CUDA, the tiny preset in
# place of internvl2-2b, the HF anchor in float32 on the CPU, no install): tests/test_gpu_check.py
# runs it so that the script still matches the CLI it calls when a GPU is at last lent.
set -uo pipefail
out=${OUT:-gpu-out}
parts=${PARTS:-/tmp/parts}
budget=${BUDGET_S:-530}
decoder=${DECODER:-fused-cuda}
work=${WORK:-/tmp/g}
if [ "${REHEARSAL:-0}" = 1 ]; then
  provider=CPUExecutionProvider preset=tiny hf=(--device cpu --dtype float32) torchdev=cpu
else
  provider=CUDAExecutionProvider preset=internvl2-2b hf=(--device cuda --dtype bfloat16) torchdev=cuda
fi
mkdir -p "$out" "$work"
left() { echo $((budget - SECONDS > 5 ? budget - SECONDS : 5)); }
step() {  # [CAP=S] step NAME CMD...: run with the time left (at most S s), log to $out/NAME.log, never stop the script
  local name=$1; shift
  local t0=$SECONDS limit
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    echo "step $name: skipped (not in ONLY)" >> "$out/steps.txt"
    return 0
  fi
  limit=$(left)
  [ -n "${CAP:-}" ] && [ "$CAP" -lt "$limit" ] && limit=$CAP
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "step $name: rc=$rc in $((SECONDS - t0)) s (budget left $((budget - SECONDS)) s)" | tee -a "$out/steps.txt"
  return $rc
}
mem_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/$1.mem" 2>/dev/null & echo $!; }
mem_stop() { kill "$1" 2>/dev/null; wait "$1" 2>/dev/null; true; }

full_size() {  # step 3
  step full-init python3 -m sleigh.cli init "$work/full" --preset "$preset" --force
  step full-export python3 -m sleigh.cli export "$work/full" -o "$work/full-pkg" --decoder "$decoder" --no-verify --force --json
}
ahead=$work/ahead
if [ "${PREPARE:-0}" = 1 ]; then  # step 3 alone, started in the background by the first call (it needs no GPU)
  rm -rf "$ahead" && mkdir -p "$ahead" && echo $$ > "$ahead/pid" && echo "$decoder" > "$ahead/decoder"
  out=$ahead budget=${BUDGET_S:-900} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 SLEIGH_DEBUG=1 ONLY=
  export PYTHONPATH PYTHONUNBUFFERED SLEIGH_DEBUG
  full_size
  touch "$ahead/done"
  exit 0
fi

# 1. onnxruntime-gpu
if [ "${REHEARSAL:-0}" = 1 ]; then
  export PYTHONPATH=$PWD
elif ! python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  python3 scripts/install_ort_parts.py "$parts" /tmp/site || exit 2
  SP=$(python3 -c "import sys; print([p for p in sys.path if p.endswith('site-packages')][0])")
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(ls -d "$SP"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 SLEIGH_DEBUG=1
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), '| torch', torch.__version__)" | tee "$out/providers.txt"
if ! grep -q "$provider" "$out/providers.txt"; then
  echo "error: onnxruntime-gpu | CUDAExecutionProvider is not available (see $out/providers.txt). Expected: the CUDA libraries on LD_LIBRARY_PATH"
  exit 2
fi
device=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
[ "${REHEARSAL:-0}" = 1 ] && device="CPU rehearsal"
export GPU_CHECK_PROVIDER=$provider
echo "device: $device" | tee -a "$out/providers.txt"

# 2. what CUDA's GroupQueryAttention takes; tiny: CUDA == CPU, from an empty cache and across a growth
step gqa-probe python3 benchmarks/gqa_cuda_probe.py --provider "$provider"
step tiny-init python3 -m sleigh.cli init "$work/tiny" --preset tiny --force
step tiny-export python3 -m sleigh.cli export "$work/tiny" -o "$work/tiny-pkg" --decoder standard --force --json
step tiny-export-fused python3 -m sleigh.cli export "$work/tiny" -o "$work/tiny-fused" --decoder fused --force --json
step tiny-export-cuda python3 -m sleigh.cli export "$work/tiny" -o "$work/tiny-cuda" --decoder fused-cuda --force --json
# kept where its gate fails (--allow-degraded): the checks below say where CUDA parts from the CPU
step tiny-fp16-cuda python3 -m sleigh.cli build-engine "$work/tiny-cuda" --precision fp16 --allow-degraded --json
# does ONNX Runtime open that FP16 decoder with CUDA graphs on (every node but shape computations on CUDA)?
step cuda-kernels python3 benchmarks/gqa_cuda_probe.py --provider "$provider" \
  --model "$work/tiny-cuda/engines/onnxruntime-fp16/decoder.onnx" "$work/tiny-fused/decoder.onnx"
step cuda-vs-cpu python3 - "$work/tiny-pkg" "$work/tiny-fused" "$work/tiny-cuda" "$work/tiny-cuda:onnxruntime-fp16" <<'PY'
import os
import sys
import traceback
from pathlib import Path
from sleigh.errors import first_line
from sleigh.runtime.backends.onnxruntime_backend import CPU, CUDA, OnnxRuntimeBackend
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.pipeline import Pipeline
from sleigh.runtime.prompt import PromptTokenizer
ok = True
for arg in sys.argv[1:]:
    pkg, _, engine = arg.partition(":")
    pkg, engine = Path(pkg), engine or None
    if not (pkg / "manifest.json").is_file():  # its export failed, or ONLY did not run it
        print(f"{arg}: not made")
        ok &= bool(os.environ.get("ONLY"))
        continue
    try:
        m = read_manifest(pkg)
        entry = m.engines[engine] if engine else None
        cpu_backend = OnnxRuntimeBackend.from_package(pkg, m, providers=[CPU], engine=entry)  # not auto: it would take CUDA
        cpu = Pipeline(cpu_backend, m.contract, PromptTokenizer.from_file(m.path(m.tokenizer, "tokenizer")))
        providers = [os.environ.get("GPU_CHECK_PROVIDER", CUDA), CPU]  # both CPU in a rehearsal
        backend = OnnxRuntimeBackend.from_package(pkg, m, providers=list(dict.fromkeys(providers)), engine=entry)
        print(f"{arg}: decoder on {backend.decoder_providers[0]}, CUDA graph {backend.cuda_graph}")
        cuda = Pipeline(backend, cpu.contract, cpu.tokenizer)
        for image, prompt, n in [("examples/chelsea.jpg", "Describe the image.", 24), (None, "Tell me a story.", 300)]:
            a = cpu.generate(image, prompt, max_new_tokens=n, ignore_eos=True).result
            b = cuda.generate(image, prompt, max_new_tokens=n, ignore_eos=True).result
            same = a.token_ids == b.token_ids
            ok &= same
            static = backend._static.steps if backend._static else 0
            print(f"{arg} ({m.contract.kv_cache.form}): {image or 'text only'}, {n} tokens on {b.backend}: same tokens {same}"
                  f" (graph-replayed steps so far {static}, CUDA graph {backend.cuda_graph})")
    except Exception as e:  # one package failing must not hide the others' results
        ok = False
        traceback.print_exc()
        print(f"{arg}: FAILED {type(e).__name__}: {first_line(e)}")
sys.exit(0 if ok else 1)
PY
# the FP16 engine's logits on CUDA against the CPU's, step by step, CUDA graph on and off: which step parts
# first; again with cuDNN's fused attention off (ONNX Runtime 1.31 prefers it for GroupQueryAttention on
# Hopper; its padded heads, 24 here and 136 at full size, are unchecked there), and which attention kernel
# each GroupQueryAttention call takes (ONNX Runtime's own debug print, two steps)
step cuda-steps python3 benchmarks/cuda_steps_check.py "$work/tiny-cuda:onnxruntime-fp16" --provider "$provider" --steps 300
ORT_ENABLE_CUDNN_FLASH_ATTENTION=0 step cuda-steps-no-cudnn python3 benchmarks/cuda_steps_check.py \
  "$work/tiny-cuda:onnxruntime-fp16" --provider "$provider" --steps 300
ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1 step attention-kernels python3 benchmarks/cuda_steps_check.py \
  "$work/tiny-cuda:onnxruntime-fp16" --provider "$provider" --steps 2
step cuda-helpers python3 -m pytest -q -m gpu tests/runtime/backends/test_cuda.py -p no:cacheprovider
# training on the GPU (`sleigh train` takes CUDA where torch sees it; never run there before session 29):
# a few steps of the tiny preset, everything trained, in parts of 2, with the memory guard reading the GPU's
# free memory; and one step's peak GPU allocation against the guard's bound
rm -rf "$work/synth"
step train-data python3 -m sleigh.cli data synth "$work/synth" --n 8 --max-size 900
rm -rf "$work/tiny-trained"
step train-cuda python3 -m sleigh.cli train "$work/tiny" --data "$work/synth/train.jsonl" -o "$work/tiny-trained" \
  --train all --steps 3 --batch 4 --micro-batch 2
step train-step-memory python3 benchmarks/train_step_memory.py "$work/tiny" "$work/synth/train.jsonl" --batch 4 \
  --train all --device "$torchdev"

# 3. full size: made here, or ahead by PREPARE=1 (above), waited for; made here too where that run
# died before it was done
if [ -f "$ahead/pid" ]; then
  t0=$SECONDS
  while [ ! -f "$ahead/done" ] && kill -0 "$(cat "$ahead/pid")" 2>/dev/null && [ $((budget - SECONDS)) -gt 5 ]; do sleep 1; done
  cp "$ahead"/*.log "$out/" 2>/dev/null
  grep '^step ' "$ahead/steps.txt" >> "$out/steps.txt"
  echo "full size made ahead (PREPARE=1, decoder $(cat "$ahead/decoder" 2>/dev/null)): waited $((SECONDS - t0)) s for it" \
    | tee -a "$out/steps.txt"
  [ -f "$ahead/done" ] || full_size
else
  full_size
fi

# Every bench reads a 4:3 photo: 12 tiles and the thumbnail, 13 views (the issue's first-token target is
# at 13 views), and names what it times (`sleigh bench` would also time the package's auto pick, which
# skips a degraded engine and takes an FP16 one once gated): engine "package" is the FP32 package
python3 -c "from PIL import Image; import sys; Image.open('examples/coffee.jpg').convert('RGB').resize((1600, 1200)).save(sys.argv[1])" "$work/views13.jpg"
cat > "$work/bench_engine.py" <<'PY'
import json, sys
from pathlib import Path
from sleigh.bench import run_bench
from sleigh.runtime import DEFAULT_PROMPT
pkg, image, engine, runs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
report = run_bench([(f"{pkg} [{engine}]", pkg, "auto", engine)], image, DEFAULT_PROMPT, runs=runs,
                   max_new_tokens=64, quiet=True)
print(json.dumps(report, default=str))
PY
bench=(python3 "$work/bench_engine.py" "$work/full-pkg" "$work/views13.jpg")

# 4. FP16 engine, kept where its gate fails (--allow-degraded; the verdict is in the log) so that its
# speed is measured; first, as it matters most. Its gate reads one single-tile photo: the gate's FP32
# side runs its decoder on the CPU (a float32 cache), and the shipped five images at up to 13 views
# would cost minutes of the budget there
mkdir -p "$work/gate" && python3 -c "from PIL import Image; import sys; Image.open('examples/coffee.jpg').convert('RGB').resize((448, 448)).save(sys.argv[1])" "$work/gate/one.jpg"
step fp16-engine python3 -m sleigh.cli build-engine "$work/full-pkg" --backend onnxruntime --precision fp16 --allow-degraded \
  --images "$work/gate" --json
pid=$(mem_start bench-fp16)
step bench-fp16 "${bench[@]}" onnxruntime-fp16 2
mem_stop "$pid"
pid=$(mem_start bench-fp16-nograph)
SLEIGH_CUDA_GRAPH=0 step bench-fp16-nograph "${bench[@]}" onnxruntime-fp16 2
mem_stop "$pid"
# and with cuDNN's fused attention off (flash attention, its 192-wide kernel for the 136-wide heads)
pid=$(mem_start bench-fp16-no-cudnn)
ORT_ENABLE_CUDNN_FLASH_ATTENTION=0 step bench-fp16-no-cudnn "${bench[@]}" onnxruntime-fp16 2
mem_stop "$pid"

# 5. HF eager anchor, bf16, the bench's shapes
read -r views tokens < <(python3 - "$out/bench-fp16.log" <<'PY' 2>/dev/null || echo "13 3516"
import json, sys
row = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["rows"][0]
print(row["views"], row["prompt_tokens"])
PY
)
step hf-anchor python3 benchmarks/hf_anchor.py --preset "$preset" --views "$views" --prompt-tokens "$tokens" \
  "${hf[@]}" --runs 2 --new-tokens 64

# 6. the FP32 package: its decoder opens on the CPU beside CUDA (a float32 cache; onnxruntime_backend.
# FLOAT32_NOT_ON_CUDA), so one run, at most 150 s
pid=$(mem_start bench-fp32)
CAP=150 step bench-fp32 "${bench[@]}" package 1
mem_stop "$pid"

# 7. one table
python3 benchmarks/gpu_table.py --device "$device, onnxruntime-gpu $(python3 -c 'import onnxruntime as o; print(o.__version__)')" \
  --floor-tokens-per-s 1230 \
  "FP16 engine, $decoder decoder (CUDA)=$out/bench-fp16.log@$out/bench-fp16.mem" \
  "FP16 engine, $decoder decoder, no CUDA graph=$out/bench-fp16-nograph.log@$out/bench-fp16-nograph.mem" \
  "FP16 engine, $decoder decoder, no cuDNN attention=$out/bench-fp16-no-cudnn.log@$out/bench-fp16-no-cudnn.mem" \
  "$out/hf-anchor.log" "FP32 package, $decoder decoder=$out/bench-fp32.log@$out/bench-fp32.mem" | tee "$out/table.md"
echo "total $SECONDS s" | tee -a "$out/steps.txt"
