"""bench/gpu_check.sh, the GPU check a user runs on a GPU machine, in its CPU mode at toy size: every part runs and
reports, the environment part records the commit and a matmul ceiling, and the real train_gpt.py run checkpoints and
resumes. (It proves the plumbing; the figures come from a GPU.) The exit status says whether every part passed; a bad
setting is one line before any part runs. The quick tests stand a shell script in for the Python (PY) that answers
for the benchmark scripts at once and hands everything else to this Python."""

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"
PARTS = ["00_env", "01_train_gpt2_124m", "02_decode", "03_hellaswag", "04_train_gpt_run", "05_train_llama_124m",
         "06_train_fgpt_600m_flash", "07_attention"]


def gpu_check(cwd, timeout=60, **env):
    return subprocess.run(["bash", str(SCRIPT)], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def stand_in_python(path, answers, gpu=False):
    """An executable at path that exits with answers[script] = (status, seconds) for `PY bench/SCRIPT.py ...`
    (after a line of output, as a benchmark prints) and runs this Python for anything else (gpu_check's own
    `PY -c ...`); with gpu=True it says that torch sees a GPU."""
    cases = "".join(f'  bench/{script}) echo "bench_stand_in {script}"; sleep {sleep}; exit {status} ;;\n'
                    for script, (status, sleep) in answers.items())
    if gpu:
        cases += '  -c) case "$2" in *cuda.is_available*) echo gpu; exit 0 ;; esac ;;\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$*" >> {path}.calls\ncase "$1" in\n{cases}esac\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def summary(out):
    return (out / "summary.txt").read_text().splitlines()


def test_gpu_check_runs_every_part_in_cpu_mode_from_any_folder(tmp_path):
    """Run from another folder, with OUT relative to it: the script finds the repo and the caller's OUT."""
    (tmp_path / "elsewhere").mkdir()
    result = gpu_check(tmp_path / "elsewhere", timeout=900, DEVICE="cpu", OUT="out", BUDGET="600",
                       OMP_NUM_THREADS="1", PY=sys.executable)
    out = tmp_path / "elsewhere" / "out"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = summary(out)
    assert [line.split(":")[0] for line in lines if ": exit " in line] == PARTS
    assert all(": exit 0," in line for line in lines if ": exit " in line), lines
    assert lines[-1] == "every part asked for passed (00,01,02,03,04,05,06,07)"
    env_txt = (out / "00_env.txt").read_text()
    commit = re.search(r"\ncommit (\S+)", env_txt)
    assert commit and (re.fullmatch("[0-9a-f]{40}", commit[1]) or not (REPO_ROOT / ".git").exists()), env_txt
    assert "matmul ceiling: " in env_txt
    assert "nanogpt (AdamW" in (out / "01_train_gpt2_124m.txt").read_text()
    hellaswag = (out / "03_hellaswag.txt").read_text()
    assert hellaswag.splitlines()[0].endswith(" --data=data/samples/hellaswag_val_200.jsonl")  # the bundled rows
    run = (out / "04_train_gpt_run.txt").read_text()
    assert "step 3: checkpoint written" in run and "resumed at step 3" in run and "step 6/6" in run


def test_a_failed_or_timed_out_part_makes_the_exit_status_1_after_the_rest_ran(tmp_path):
    py = stand_in_python(tmp_path / "py", {"bench_train.py": (3, 0), "bench_inference.py": (0, 0),
                                           "bench_attention.py": (124, 0)})
    result = gpu_check(tmp_path, DEVICE="cpu", OUT=str(tmp_path / "out"), PARTS="01,02,07", PY=str(py))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in summary(tmp_path / "out") if not line.startswith(("===", "NOTE"))]
    assert [re.sub(r", \d+ s of", ", N s of", line) for line in lines] == [
        "01_train_gpt2_124m: exit 3, N s of a 150 s limit: FAILED",
        "02_decode: exit 0, N s of a 90 s limit",
        "07_attention: exit 124, N s of a 60 s limit: TIMED OUT (its limit)",
        "NOT PASSED: 01_train_gpt2_124m (exit 3), 07_attention (timed out)"]
    assert "NOT PASSED: 01_train_gpt2_124m (exit 3), 07_attention (timed out)" in result.stdout


def test_a_part_skipped_for_want_of_budget_is_not_a_pass(tmp_path):
    py = stand_in_python(tmp_path / "py", {"bench_train.py": (0, 3), "bench_inference.py": (0, 0)})
    result = gpu_check(tmp_path, DEVICE="cpu", OUT=str(tmp_path / "out"), PARTS="01,02", BUDGET="22", PY=str(py))
    lines = summary(tmp_path / "out")
    assert result.returncode == 1 and "02_decode: skipped, " in "\n".join(lines), lines
    assert lines[-1].startswith("NOT PASSED: ") and lines[-1].endswith("02_decode (skipped)")


def test_the_python_is_py_else_python3_on_the_path(tmp_path):
    """PY=... runs every part; unset, python3 on PATH does (here a stand-in first on PATH, which logs its calls)."""
    py = stand_in_python(tmp_path / "bin" / "python3", {"bench_inference.py": (0, 0)})
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if k != "PY"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env={**env, "PATH": path, "DEVICE": "cpu",
                            "PARTS": "02", "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bench/bench_inference.py --device=cpu --parts=decode" in (tmp_path / "bin" / "python3.calls").read_text()
    assert f"PY={py}" in summary(tmp_path / "out")[0]


def test_the_hellaswag_part_reads_the_download_or_says_it_falls_back(tmp_path):
    """On a GPU (a stand-in Python that sees one) part 03 scores data/hellaswag/hellaswag_val.jsonl, from
    eval_hellaswag.py --download_only; without it, the 200 bundled rows, and the summary says so."""
    py = stand_in_python(tmp_path / "py", {"bench_inference.py": (0, 0)}, gpu=True)
    result = gpu_check(tmp_path, DEVICE="cuda", OUT=str(tmp_path / "out"), PARTS="03", PY=str(py))
    assert result.returncode == 0, result.stdout + result.stderr
    calls, lines = (tmp_path / "py.calls").read_text(), summary(tmp_path / "out")
    if (REPO_ROOT / "data" / "hellaswag" / "hellaswag_val.jsonl").is_file():
        assert "--data=data/hellaswag/hellaswag_val.jsonl" in calls and not any("NOTE" in line for line in lines)
    else:
        assert "--device=cuda --parts=hellaswag --data=data/samples/hellaswag_val_200.jsonl" in calls
        assert lines[1] == ("NOTE: no data/hellaswag/hellaswag_val.jsonl (python eval_hellaswag.py --download_only "
                            "fetches it): HellaSwag scores the 200 rows of data/samples/hellaswag_val_200.jsonl only")


@pytest.mark.parametrize("setting, value, message", [
    ("DEVICE", "cuda", "DEVICE=cuda, but torch in PY="), ("DEVICE", "tpu", "DEVICE=tpu: use cuda"),
    ("PARTS", "08", "PARTS=08: use some of 00,"), ("PARTS", "1,2", "PARTS=1,2: use some of"),
    ("OUT", "a file", "is a file; set OUT to a folder"), ("BUDGET", "abc", "BUDGET=abc: must be a whole number"),
    ("BUDGET", "1.5", "BUDGET=1.5: must be a whole number"), ("BUDGET", "5", "BUDGET=5: a part needs at least 20 s"),
    ("PY", "a python without torch", "cannot import torch; set PY to the Python"),
    ("PY", "nowhere/python", "cannot import torch")])
def test_a_bad_setting_is_one_line_before_any_part_runs(tmp_path, setting, value, message):
    if setting == "DEVICE" and value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {"DEVICE": "cpu", "OUT": str(tmp_path / "out"), "PY": sys.executable, "PARTS": "00"}
    if value == "a file":
        (tmp_path / "afile").write_text("keep")
        value = str(tmp_path / "afile")
    elif value == "a python without torch":
        (tmp_path / "py").write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "py").chmod(0o755)
        value = str(tmp_path / "py")
    env[setting] = value
    result = gpu_check(tmp_path, **env)
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert re.fullmatch(rf"error: .*{re.escape(message)}.*\n", result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
    if setting == "OUT":
        assert (tmp_path / "afile").read_text() == "keep"


def test_gpu_check_help_prints_its_header_and_runs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    for flag in ("-h", "--help"):
        result = subprocess.run(["bash", "bench/gpu_check.sh", flag], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.startswith("The GPU figures of bench/NOTES.md in one run")
        assert "python eval_hellaswag.py --download_only" in result.stdout and "set -u" not in result.stdout
        assert "PARTS=04 bash bench/gpu_check.sh" in result.stdout
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--budget=10"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: --budget=10: gpu_check.sh takes no arguments")
    assert not (tmp_path / "out").exists()
