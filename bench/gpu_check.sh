#!/usr/bin/env bash
# The GPU figures of bench/NOTES.md in ONE device call of under 8 minutes (H100/H200), run from the repo root.
#
# The device machine cannot see ../shared: before the call, copy the HellaSwag val set into the git-ignored
# .device_payload/ and carry it:
#     mkdir -p .device_payload && cp ../shared/data/hellaswag/hellaswag_val.jsonl .device_payload/
#     run(command="bash bench/gpu_check.sh", carry=[".device_payload"], timeout_s=560)
# Without it the HellaSwag part falls back to the 200 rows in data/samples/ (and says so).
#
# Each part writes $OUT/NN_name.txt as it goes and one line to $OUT/summary.txt (exit status, seconds), under
# the smaller of its own limit and what is left of BUDGET seconds, so a part that overruns costs only itself.
# Random weights throughout: speed does not depend on them. Expected: ~6.5 minutes in all.
set -u
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-460}
PY=${PY:-$(command -v python3 || command -v python)}
HS=.device_payload/hellaswag_val.jsonl
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

part() {  # part NAME LIMIT COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee "$OUT/$name.txt"
  timeout -k 5 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' >> "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc, $((SECONDS - start)) s of a $limit s limit$([ "$rc" = 124 ] && echo ': TIMED OUT')" \
    | tee -a "$OUT/summary.txt"
  grep -E "${SHOW:-^(bench_|fast|plain|decode|hellaswag,|  |gpt2_124m|fgpt|error|Traceback|[A-Za-z]*Error)}" "$OUT/$name.txt"
}

SHOW=. part 00_env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  $PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
  torch.cuda.get_device_name(), torch.backends.cudnn.version())'; git rev-parse --short HEAD 2>/dev/null; \
  git status --porcelain 2>/dev/null | head -5; ls -la $HS 2>&1"
[ -f "$HS" ] || echo "NOTE: $HS missing: HellaSwag runs on the 200 bundled rows only" | tee -a "$OUT/summary.txt"

# which attention kernel SDPA picks at the presets' head shapes, and what each backend costs
part 01_attention 60 "$PY" bench/bench_attention.py
# training: train_gpt.py's step vs the plain loop, T=1024, 524,288 tokens/step (1 warm-up step holds the compile)
part 02_train_gpt2_124m 150 "$PY" bench/bench_train.py configs/gpt2_124m.toml --steps=3 --warmup_steps=1 --phases
# decoding (batch 1, 512 tokens: plain / cached / item / compiled) and HellaSwag (cold / warm / old, 3 batch sizes);
# perf_hints name any reason the CUDA graph was skipped
part 03_inference 170 env TORCH_LOGS=recompiles,perf_hints "$PY" bench/bench_inference.py --device=cuda \
  $([ -f "$HS" ] && echo "--data=$HS")
part 04_train_llama_124m 130 "$PY" bench/bench_train.py configs/llama_124m.toml --steps=3 --warmup_steps=1
part 05_train_fgpt_600m_flash 200 "$PY" bench/bench_train.py configs/fgpt_600m_flash.toml --steps=2 --warmup_steps=1
# peak memory per micro-batch size (compiled; a new batch size recompiles once): only if time is left
part 06_memory_gpt2_124m 120 "$PY" bench/bench_train.py configs/gpt2_124m.toml --loops=fast --steps=1 \
  --warmup_steps=1 --memory_batch_sizes=16,64
echo "done in $SECONDS s; files in $OUT:" && ls "$OUT"
