"""bench/gpu_check.sh, the one prepared device call, in its CPU mode at toy size: every part runs and reports,
the environment part records the commit and a matmul ceiling, and the real train_gpt.py run checkpoints and
resumes. (It proves the plumbing; the figures come from a GPU.)"""

import os
import subprocess

from helpers import REPO_ROOT


def test_gpu_check_runs_every_part_in_cpu_mode(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "BUDGET": "600", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    parts = [line.split(":")[0] for line in summary if ": exit " in line]
    assert parts == ["00_env", "01_train_gpt2_124m", "02_decode", "03_hellaswag", "04_train_gpt_run",
                     "05_train_llama_124m", "06_train_fgpt_600m_flash", "07_attention"]
    assert all(": exit 0," in line for line in summary if ": exit " in line), summary
    env_txt = (tmp_path / "00_env.txt").read_text()
    assert "\ncommit " in env_txt and "matmul ceiling: " in env_txt
    assert "nanogpt (AdamW" in (tmp_path / "01_train_gpt2_124m.txt").read_text()
    run = (tmp_path / "04_train_gpt_run.txt").read_text()
    assert "step 3: checkpoint written" in run and "resumed at step 3" in run and "step 6/6" in run


def test_gpu_check_help_prints_its_header_and_runs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    for flag in ("-h", "--help"):
        result = subprocess.run(["bash", "bench/gpu_check.sh", flag], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.startswith("The GPU figures of bench/NOTES.md in ONE")
        assert "PARTS=04 bash bench/gpu_check.sh" in result.stdout and "set -u" not in result.stdout
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--budget=10"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: --budget=10: gpu_check.sh takes no arguments")
    assert not (tmp_path / "out").exists()
