"""bench/bench_recipe.py at toy size on the bundled sample: real train_gpt.py runs, the table with its
AdamW target and steps-to-target, the mean curves, and runs kept and reused."""

import json
import os
import re
import subprocess
import sys

from helpers import REPO_ROOT, SAMPLE_SHARDS

TINY = ["--widths=32", "--head_dim=16", "--n_layer=1", "--block_size=16", "--batch_size=4", "--steps=6",
        "--seeds=1,2", "--eval_interval=2", "--val_tokens=256", f"--data_dir={SAMPLE_SHARDS}",
        "--recipes=adamw lr 1e-3=configs/recipe_nanogpt.toml --learning_rate=1e-3;adamw lr 1e-2=configs/"
        "recipe_nanogpt.toml --learning_rate=1e-2;new="]


def bench(out, *args):
    return subprocess.run([sys.executable, "bench/bench_recipe.py", *TINY, f"--out_dir={out}", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_recipe_table_at_toy_size(tmp_path):
    result = bench(tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines() if line.startswith("| ")}
    best = next(label for label in rows if label.endswith("(best AdamW)"))
    assert best.startswith("adamw lr") and "new defaults" not in rows and "new" in rows
    report = json.loads((tmp_path / "results.json").read_text())
    finals = {k.split("/")[1]: v for k, v in report.items()}
    assert set(finals) == {"adamw lr 1e-3", "adamw lr 1e-2", "new"}
    target = min(finals["adamw lr 1e-3"]["mean"], finals["adamw lr 1e-2"]["mean"])
    assert all(v["target"] == target and len(v["finals"]) == 2 for v in finals.values())
    assert finals[best.split(" (")[0]]["steps_to_target"] == 6  # the best AdamW reaches its own final at the end
    assert re.search(r"\| 6 \| 1\.00 \|$", rows[best])
    # one curve per run, with the step-scaled settings the bench passed
    run_dir = tmp_path / "w32" / "adamw_lr_1e-3" / "s2"
    args = json.loads((run_dir / "bench.json").read_text())["args"]
    assert "--warmup_iters=0" in args and "--seed=2" in args and "--max_iters=6" in args  # 700 x 6 / 19,073 steps
    assert (tmp_path / "recipe_w32.png").stat().st_size > 10_000
    written = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    again = bench(tmp_path)  # every run kept: nothing trains again
    assert again.returncode == 0 and (run_dir / "metrics.jsonl").stat().st_mtime_ns == written
    assert [r for r in again.stdout.splitlines() if r.startswith("| ")] == [
        r for r in result.stdout.splitlines() if r.startswith("| ")]


def test_missing_data_is_one_line(tmp_path):
    result = bench(tmp_path, f"--data_dir={tmp_path / 'nothing'}")
    assert result.returncode == 1 and result.stderr.startswith("error: --data_dir=") and result.stderr.count("\n") == 1
