#!/usr/bin/env bash
# The GPU figures of bench/NOTES.md in ONE device call of about 8 minutes (H100/H200), run from the repo root.
#
# The device machine sees neither ../shared nor .git: before the call, put the HellaSwag val set and the commit
# into the git-ignored .device_payload/ and carry it:
#     mkdir -p .device_payload && cp ../shared/data/hellaswag/hellaswag_val.jsonl .device_payload/ \
#         && git rev-parse HEAD > .device_payload/commit && git status --porcelain > .device_payload/dirty
#     run(command="bash bench/gpu_check.sh", carry=[".device_payload"], timeout_s=540)
# Without the val set the HellaSwag part scores the 200 rows in data/samples/ (and says so).
#
# The parts run in order of value, each under the smaller of its own limit and what is left of BUDGET seconds,
# so a part that overruns costs only itself and the rest. Each writes $OUT/NN_name.txt as it goes and a line to
# $OUT/summary.txt (exit status, seconds; 124 or 137 = its limit killed it). To rerun a part that was cut, call
# it alone: PARTS=04 bash bench/gpu_check.sh. Random weights everywhere but part 04.
#
# DEVICE=cpu runs every part at toy size on a CPU (tests/test_gpu_check.py does): it proves the plumbing only.
# Settings, from the environment: OUT (/tmp/gpu_check), BUDGET (480 s), DEVICE (cuda), PARTS (00,...,07).
set -u
case "${1:-}" in  # -h / --help: this header, as the Python scripts answer it
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "error: $1: gpu_check.sh takes no arguments; set OUT, BUDGET, DEVICE, PARTS in the environment" >&2; exit 1 ;;
esac
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-00,01,02,03,04,05,06,07}
PY=${PY:-$(command -v python3 || command -v python)}
HS=.device_payload/hellaswag_val.jsonl
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

part() {  # part NN_NAME LIMIT COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc why
  shift 2
  case ",$PARTS," in *",${name%%_*},"*) ;; *) return ;; esac
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee "$OUT/$name.txt"
  timeout -k 5 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' >> "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  case $rc in 0) why="" ;; 124|137) why=": TIMED OUT (its limit)" ;; *) why=": FAILED" ;; esac
  echo "$name: exit $rc, $((SECONDS - start)) s of a $limit s limit$why" | tee -a "$OUT/summary.txt"
  grep -E "${SHOW:-^(bench_|fast|nanogpt|decode|hellaswag|step [0-9]+(:|/)|.*SDPA picks|.*Graph break|.*Recompil|ceiling|error|Traceback|.*(OutOfMemory|[A-Za-z]*Error))}" \
    "$OUT/$name.txt" | head -40
}

if [ "$DEVICE" = cpu ]; then  # toy sizes: the plumbing, in about a minute
  TRAIN="configs/smoke.toml --device=cpu --steps=1 --warmup_steps=0"
  DECODE="--device=cpu --parts=decode --decode_models=2x64 --decode_tokens=8"
  HSWAG="--device=cpu --parts=hellaswag --hellaswag_model=2x64 --examples=8 --old=False"
  RUN="configs/smoke.toml --device=cpu --block_size=64 --batch_size=4 --total_batch_size=256"
  ATTN="--device=cpu --shapes=tiny:2x2x16 --seq=64 --repeats=2"
  LLAMA="$TRAIN --arch=llama"
  FGPT="$TRAIN --n_layer=1"
  MATMUL=256
  STEPS=3
else
  TRAIN="configs/gpt2_124m.toml --steps=3 --warmup_steps=1"
  DECODE="--device=cuda --parts=decode"
  HSWAG="--device=cuda --parts=hellaswag $([ -f "$HS" ] && echo "--data=$HS")"
  RUN="configs/gpt2_124m.toml --batch_size=8 --total_batch_size=65536"
  ATTN=""
  LLAMA="configs/llama_124m.toml --steps=3 --warmup_steps=1"
  FGPT="configs/fgpt_600m_flash.toml --steps=2 --warmup_steps=1"
  MATMUL=8192
  STEPS=15
fi

# 00: the machine, the code (the commit from the payload), and the bf16 matmul ceiling that MFU is measured against
SHOW=. part 00_env 40 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, \
  torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\", \
  torch.backends.cudnn.version())'; echo commit \$(cat .device_payload/commit 2>/dev/null || git rev-parse HEAD \
  2>/dev/null || echo unknown); cat .device_payload/dirty 2>/dev/null | head -5; ls -la $HS 2>&1; \
  $PY -c 'import time, torch
n, dev = $MATMUL, \"$DEVICE\"
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
sync = torch.cuda.synchronize if dev == \"cuda\" else (lambda: None)
a @ b; sync(); t0, k = time.perf_counter(), 0
while time.perf_counter() - t0 < 2: a @ b; k += 1; sync() if k % 10 == 0 else None
sync(); print(f\"matmul ceiling: {2 * n**3 * k / (time.perf_counter() - t0) / 1e12:.1f} TFLOP/s bf16 ({n}x{n}, 2 s)\")'"
[ -f "$HS" ] || echo "NOTE: $HS missing: HellaSwag scores the 200 bundled rows only" | tee -a "$OUT/summary.txt"

# 01: training, GPT-2 124M, T=1024, 524,288 tokens/step: train_gpt.py's step vs nanoGPT's (compiled, fused AdamW),
# with graph breaks and recompiles logged, each step's phases, and the attention kernel SDPA picks
part 01_train_gpt2_124m 150 env TORCH_LOGS=graph_breaks,recompiles "$PY" bench/bench_train.py $TRAIN --phases
# 02: decoding at batch 1, 512 tokens: plain / cached / item / compiled (CUDA graph)
part 02_decode 90 env TORCH_LOGS=recompiles,perf_hints "$PY" bench/bench_inference.py $DECODE
# 03: HellaSwag, all 10,042 rows: cold, warm, at 3 batch sizes, and the old path
part 03_hellaswag 90 "$PY" bench/bench_inference.py $HSWAG
# 04: a real train_gpt.py run on the bundled shards: 15 steps with a checkpoint, then a resume to 30
RUNDIR=$OUT/run04
rm -rf "$RUNDIR"
part 04_train_gpt_run 110 bash -c "$PY train_gpt.py $RUN --data_dir=data/samples/fineweb_edu --val_tokens=8192 \
  --max_iters=$STEPS --lr_decay_iters=$((2 * STEPS)) --warmup_iters=5 --eval_interval=$STEPS --log_interval=5 \
  --hellaswag_interval=0 --sample_interval=0 --checkpoint_interval=$STEPS --out_dir=$RUNDIR && $PY train_gpt.py \
  --out_dir=$RUNDIR --init_from=resume --max_iters=$((2 * STEPS))"
# 05-07, if time is left: the Llama-style 124M, the 600M preset, the attention backends
part 05_train_llama_124m 100 "$PY" bench/bench_train.py $LLAMA
part 06_train_fgpt_600m_flash 150 "$PY" bench/bench_train.py $FGPT
part 07_attention 60 "$PY" bench/bench_attention.py $ATTN
echo "done in $SECONDS s; files in $OUT:" && ls "$OUT"
