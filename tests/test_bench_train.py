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


def test_the_bench_times_the_step_that_train_gpt_runs(tmp_path):
    """bench_train.py's fast loop calls train_gpt.py's own train_step (its training step section): replayed
    from the same weights, batches and rates, it gives bitwise the figures a real run logged."""
    import contextlib

    import torch
    from helpers import metrics, run_script

    from data.loaders import BatchLoader
    from data.train import set_rates

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from stage_code import script_settings, step_namespace

    out = tmp_path / "run"
    args = ["configs/smoke.toml", "--device=cpu", "--max_iters=3", "--warmup_iters=2", "--log_interval=1",
            "--eval_interval=1000", "--hellaswag_interval=0", "--sample_interval=0", f"--out_dir={out}"]
    ns = run_script("train_gpt.py", *args)
    logged = [{k: r[k] for k in ("loss", "grad_norm", "param_norm", "head_norm", "logit_std")}
              for r in metrics(out) if "loss" in r]

    bench = step_namespace("train_gpt.py")
    assert bench["train_step"].__code__.co_filename == str(REPO_ROOT / "train_gpt.py")
    config = ns["config"]
    assert config == {**script_settings("train_gpt.py"), **{k: config[k] for k in config}}  # train_gpt.py's settings
    torch.manual_seed(config["seed"])
    model = bench["GPT"](bench["GPTConfig"].from_settings(config))
    optimizers = model.configure_optimizers(config)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    loader = BatchLoader(config["data_dir"] if os.path.isabs(config["data_dir"]) else REPO_ROOT / config["data_dir"],
                         "train", config["batch_size"], config["block_size"], seed=config["seed"])
    replayed = []
    for step in range(3):
        set_rates(optimizers, base_lrs, bench["lr_factor"](step, config), bench["muon_momentum_at"](step, config))
        replayed.append(bench["train_step"](model, model, optimizers, loader.next_batch, ns["grad_accum"],
                                            config["grad_clip"], contextlib.nullcontext()))
    assert replayed == logged
