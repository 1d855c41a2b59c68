#!/usr/bin/env bash
# The GPU figures of bench/NOTES.md in one run of about 8 minutes on one H100/H200. On a machine with the GPU, in a
# clone with the dependencies installed (README.md, "On a GPU"):
#     python eval_hellaswag.py --download_only     # once: the HellaSwag val set, into data/hellaswag/
#     bash bench/gpu_check.sh                      # from any folder; the results land in OUT (/tmp/gpu_check)
# The HellaSwag part reads data/hellaswag/hellaswag_val.jsonl; without it, it scores the 200 rows bundled in
# data/samples/ (and says so). Part 00 records the commit and the changed files from git, where the clone has it.
#
# The parts run in order of value, each under the smaller of its own limit and what is left of BUDGET seconds,
# so a part that overruns costs only itself and the rest. Each writes $OUT/NN_name.txt as it goes and a line to
# $OUT/summary.txt (exit status, seconds; 124 or 137 = its limit killed it). The last line of the summary names
# every part that failed, timed out or was skipped, and the exit status is 1 unless each part asked for passed.
# To rerun a part that was cut, call it alone: PARTS=04 bash bench/gpu_check.sh. Random weights everywhere but 04.
#
# DEVICE=cpu runs every part at toy size on a CPU, HellaSwag on the bundled rows (tests/test_gpu_check.py does): it
# proves the plumbing only.
# Settings, from the environment: OUT (/tmp/gpu_check), BUDGET (480 s, a whole number), DEVICE (cuda or cpu),
# PARTS (00,01,...,07, comma-separated), PY (the Python to run; python3, else python, on PATH).
set -u
case "${1:-}" in  # -h / --help: this header, as the Python scripts answer it
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "error: $1: gpu_check.sh takes no arguments; set OUT, BUDGET, DEVICE, PARTS, PY in the environment" >&2
     exit 1 ;;
esac
ALL_PARTS=00,01,02,03,04,05,06,07
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-$ALL_PARTS}
PY=${PY:-$(command -v python3 || command -v python)}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac  # OUT and PY are the caller's paths: resolved before the cd below
case $PY in /*|"") ;; */*) PY=$PWD/$PY ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

fail() { echo "error: $*" >&2; exit 1; }
[[ $BUDGET =~ ^[0-9]{1,9}$ ]] || fail "BUDGET=$BUDGET: must be a whole number of seconds, like BUDGET=480"
BUDGET=$((10#$BUDGET))
[ "$BUDGET" -ge 20 ] || fail "BUDGET=$BUDGET: a part needs at least 20 s; raise BUDGET (480 runs them all)"
case $DEVICE in
  cuda|cpu) ;;
  *) fail "DEVICE=$DEVICE: use cuda (the GPU figures) or cpu (the plumbing at toy size)" ;;
esac
IFS=, read -ra wanted <<< "$PARTS"
for p in "${wanted[@]}"; do
  case ",$ALL_PARTS," in
    *",$p,"*) ;;
    *) fail "PARTS=$PARTS: use some of $ALL_PARTS, comma-separated, like PARTS=01,04" ;;
  esac
done
[ -e "$OUT" ] && [ ! -d "$OUT" ] && fail "OUT=$OUT is a file; set OUT to a folder for the results"
[ -n "$PY" ] || fail "no python3 or python on PATH; set PY to the Python that has the project's dependencies"
torch_sees=$("$PY" -c 'import torch; print("gpu" if torch.cuda.is_available() else "no gpu")' 2>/dev/null)
case $torch_sees in
  gpu|"no gpu") ;;
  *) fail "PY=$PY cannot import torch; set PY to the Python that has the project's dependencies (README.md)" ;;
esac
[ "$DEVICE" = cuda ] && [ "$torch_sees" != gpu ] && fail "DEVICE=cuda, but torch in PY=$PY sees no GPU; run it" \
  "on a machine with an NVIDIA GPU and a CUDA build of torch, or set DEVICE=cpu for the plumbing at toy size"
{ mkdir -p "$OUT" 2>/dev/null && [ -w "$OUT" ]; } || fail "OUT=$OUT cannot be written; set OUT to a writable folder"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
q() { printf %q "$1"; }  # a path inside a bash -c command line
echo "=== gpu_check.sh: DEVICE=$DEVICE PARTS=$PARTS BUDGET=$BUDGET PY=$PY, $(date -u +%FT%TZ)" >> "$OUT/summary.txt"

NOT_PASSED=()
RESULT_LINES="^(bench_|fast|nanogpt|decode|hellaswag|step [0-9]+(:|/)|.*SDPA picks|.*Graph break|.*Recompil|ceiling|"
RESULT_LINES+="error|Traceback|.*(OutOfMemory|[A-Za-z]*Error))"
part() {  # part NN_NAME LIMIT COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc why
  shift 2
  case ",$PARTS," in *",${name%%_*},"*) ;; *) return ;; esac
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.txt"
    NOT_PASSED+=("$name (skipped)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee "$OUT/$name.txt"
  timeout -k 5 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' >> "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) why="" ;;
    124|137) why=": TIMED OUT (its limit)"; NOT_PASSED+=("$name (timed out)") ;;
    *) why=": FAILED"; NOT_PASSED+=("$name (exit $rc)") ;;
  esac
  echo "$name: exit $rc, $((SECONDS - start)) s of a $limit s limit$why" | tee -a "$OUT/summary.txt"
  grep -E "${SHOW:-$RESULT_LINES}" "$OUT/$name.txt" | head -40
}

HS=data/hellaswag/hellaswag_val.jsonl
BUNDLED_HS=data/samples/hellaswag_val_200.jsonl
if [ "$DEVICE" = cpu ]; then
  HS=$BUNDLED_HS
elif [ ! -f "$HS" ]; then
  case ",$PARTS," in *,03,*) echo "NOTE: no $HS (python eval_hellaswag.py --download_only fetches it): HellaSwag" \
    "scores the 200 rows of $BUNDLED_HS only" | tee -a "$OUT/summary.txt" ;; esac
  HS=$BUNDLED_HS
fi
if [ "$DEVICE" = cpu ]; then  # toy sizes: the plumbing, in about a minute
  TRAIN="configs/smoke.toml --device=cpu --steps=1 --warmup_steps=0"
  DECODE="--device=cpu --parts=decode --decode_models=2x64 --decode_tokens=8"
  HSWAG="--device=cpu --parts=hellaswag --hellaswag_model=2x64 --examples=8 --old=False --data=$HS"
  RUN="configs/smoke.toml --device=cpu --block_size=64 --batch_size=4 --total_batch_size=256"
  ATTN="--device=cpu --shapes=tiny:2x2x16 --seq=64 --repeats=2"
  LLAMA="$TRAIN --arch=llama"
  FGPT="$TRAIN --n_layer=1"
  MATMUL=256
  STEPS=3
else
  TRAIN="configs/gpt2_124m.toml --steps=3 --warmup_steps=1"
  DECODE="--device=cuda --parts=decode"
  HSWAG="--device=cuda --parts=hellaswag --data=$HS"
  RUN="configs/gpt2_124m.toml --batch_size=8 --total_batch_size=65536"
  ATTN=""
  LLAMA="configs/llama_124m.toml --steps=3 --warmup_steps=1"
  FGPT="configs/fgpt_600m_flash.toml --steps=2 --warmup_steps=1"
  MATMUL=8192
  STEPS=15
fi

# 00: the machine, the code (the commit and the changed files, from git), and the bf16 matmul ceiling that MFU is
# measured against
SHOW=. part 00_env 40 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  2>/dev/null || echo 'no nvidia-smi'; $(q "$PY") -c 'import torch, sys; print(sys.version.split()[0], \
  torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\", \
  torch.backends.cudnn.version())'; echo commit \$(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git)'); \
  git status --porcelain 2>/dev/null | head -5; ls -la $HS 2>&1; \
  $(q "$PY") -c 'import time, torch
n, dev = $MATMUL, \"$DEVICE\"
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
sync = torch.cuda.synchronize if dev == \"cuda\" else (lambda: None)
a @ b; sync(); t0, k = time.perf_counter(), 0
while time.perf_counter() - t0 < 2: a @ b; k += 1; sync() if k % 10 == 0 else None
sync(); print(f\"matmul ceiling: {2 * n**3 * k / (time.perf_counter() - t0) / 1e12:.1f} TFLOP/s bf16 ({n}x{n}, 2 s)\")'"

# 01: training, GPT-2 124M, T=1024, 524,288 tokens/step: train_gpt.py's step vs nanoGPT's (compiled, fused AdamW),
# with graph breaks and recompiles logged, each step's phases, and the attention kernel SDPA picks
part 01_train_gpt2_124m 150 env TORCH_LOGS=graph_breaks,recompiles "$PY" bench/bench_train.py $TRAIN --phases
# 02: decoding at batch 1, 512 tokens: plain / cached / item / compiled (CUDA graph)
part 02_decode 90 env TORCH_LOGS=recompiles,perf_hints "$PY" bench/bench_inference.py $DECODE
# 03: HellaSwag, all 10,042 rows: cold, warm, at 3 batch sizes, and the old path
part 03_hellaswag 90 "$PY" bench/bench_inference.py $HSWAG
# 04: a real train_gpt.py run on the bundled shards: 15 steps with a checkpoint, then a resume to 30
RUNDIR=$(q "$OUT/run04")
part 04_train_gpt_run 110 bash -c "rm -rf $RUNDIR && $(q "$PY") train_gpt.py $RUN --data_dir=data/samples/fineweb_edu \
  --val_tokens=8192 --max_iters=$STEPS --lr_decay_iters=$((2 * STEPS)) --warmup_iters=5 --eval_interval=$STEPS \
  --log_interval=5 --hellaswag_interval=0 --sample_interval=0 --checkpoint_interval=$STEPS --out_dir=$RUNDIR && \
  $(q "$PY") train_gpt.py --out_dir=$RUNDIR --init_from=resume --max_iters=$((2 * STEPS))"
# 05-07, if time is left: the Llama-style 124M, the 600M preset, the attention backends
part 05_train_llama_124m 100 "$PY" bench/bench_train.py $LLAMA
part 06_train_fgpt_600m_flash 150 "$PY" bench/bench_train.py $FGPT
part 07_attention 60 "$PY" bench/bench_attention.py $ATTN

if [ ${#NOT_PASSED[@]} -eq 0 ]; then
  echo "every part asked for passed ($PARTS)" | tee -a "$OUT/summary.txt"
else
  printf -v listed '%s, ' "${NOT_PASSED[@]}"
  echo "NOT PASSED: ${listed%, }" | tee -a "$OUT/summary.txt"
fi
echo "done in $SECONDS s; files in $OUT:" && ls "$OUT"
[ ${#NOT_PASSED[@]} -eq 0 ]
