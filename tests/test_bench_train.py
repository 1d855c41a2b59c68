"""bench/bench_train.py on a CPU with the smoke model: both loops (ours, nanoGPT's) run and report, and nothing is
written."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def files_under(root):
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts and ".git" not in p.parts}


def test_smoke_bench_reports_both_loops_and_writes_nothing(tmp_path):
    before = files_under(REPO_ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: a second thread on a busy machine only waits
    command = [sys.executable, REPO_ROOT / "bench/bench_train.py", REPO_ROOT / "configs/smoke.toml", "--device=cpu",
               "--steps=2", "--warmup_steps=1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bench_train: gpt2 2x64") and "2 x 4 x 64 = 512 tokens/step" in lines[0]
    for loop, optimizer in (("fast", "Muon+AdamW"), ("nanogpt", "AdamW")):
        line = next(line for line in lines if line.startswith(f"{loop} "))
        assert f"({optimizer})" in line and "over 2 steps" in line, line
        assert float(re.search(r"([\d,]+) tokens/s", line).group(1).replace(",", "")) > 0, line
    assert not list(tmp_path.iterdir()) and files_under(REPO_ROOT) == before


def test_bad_bench_flag_is_one_line():
    result = subprocess.run([sys.executable, "bench/bench_train.py", "--loops=fast,slow", "--device=cpu"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr == "error: --loops=fast,slow: use fast, nanogpt or fast,nanogpt\n"
