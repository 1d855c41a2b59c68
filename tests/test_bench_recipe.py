"""bench/bench_recipe.py at toy size on the bundled sample: real train_gpt.py runs, the ladder's table with its
AdamW target, the sweep's best multiples and exponent, the mean curves, runs kept and reused, and every bad
setting refused in one line before anything trains."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, SAMPLE_SHARDS

TINY = ["--widths=32,64", "--layers=1", "--head_dim=16", "--block_size=16", "--batch_size=4", "--steps=6",
        "--seeds=1,2", "--one_seed_from=64", "--eval_interval=2", "--val_tokens=256", "--sweep=head_lr",
        "--multipliers=2",
        "--adamw_lrs=1e-3,1e-2", "--recipes=seq=--loader_mode=sequential;same=--head_lr=0.032",
        f"--data_dir={SAMPLE_SHARDS}"]


def bench(out, *args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, REPO_ROOT / "bench/bench_recipe.py", *TINY, f"--out_dir={out}", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_ladder_at_toy_size(tmp_path):
    result = bench(tmp_path / "out", cwd=tmp_path)  # from another folder: the paths are the user's
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    report = json.loads((tmp_path / "out" / "gpt2" / "results.json").read_text())
    for width in ("32", "64"):
        table = report["widths"][width]["rows"]
        assert list(table) == ["default", "head_lr x2", "adamw 0.001", "adamw 0.01", "seq", "same"]
        best = report["widths"][width]["target"]
        assert best in ("adamw 0.001", "adamw 0.01")
        assert min(table["adamw 0.001"]["mean"], table["adamw 0.01"]["mean"]) == table[best]["mean"]
        seeds = {label: len(row["finals"]) for label, row in table.items()}
        repeated = ("default", "seq", "same", best) if width == "32" else ()  # from --one_seed_from=64, one seed
        assert seeds == {k: 2 if k in repeated else 1 for k in table}
        assert table[best]["steps_to_target"] == 6  # the best AdamW reaches its own final at the end
        assert all(row["rise"] >= 0 for row in table.values())  # the worst logged loss is at least step 0's
    sweep = report["sweeps"]["head_lr"]
    assert set(sweep) == {"32", "64", "exponent"} and isinstance(sweep["exponent"], float)
    assert all(sweep[w]["best_multiple"] in (1.0, 2.0) and sweep[w]["edge"] for w in ("32", "64"))  # two points
    assert any(row[0] == "| head_lr" and row[-1].endswith(" |") for row in rows)  # the exponent row
    # one run's command line: the bench's settings, the step counts scaled (5,600 x 6 / 19,073 = 2 warmup steps)
    run_dir = tmp_path / "out" / "gpt2" / "w32" / "head_lr_x2" / "s1"
    args = json.loads((run_dir / "bench.json").read_text())["args"]
    assert "--head_lr=0.064" in args and "--warmup_iters=2" in args and "--dtype=bfloat16" in args
    assert f"--data_dir={SAMPLE_SHARDS}" in args and "--log_interval=1" in args
    assert (tmp_path / "out" / "gpt2_w32.png").stat().st_size > 10_000
    assert not list((tmp_path / "out").rglob("ckpt*.pt"))  # the bench keeps metrics, not 0.5 GB checkpoints
    same, default = (tmp_path / "out" / "gpt2" / "w32" / label / "s1" / "log.txt" for label in ("same", "default"))
    assert same.read_text() == default.read_text()  # the same settings under another label: kept, not trained
    written = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    again = bench(tmp_path / "out", cwd=tmp_path)  # every run kept: nothing trains again
    assert again.returncode == 0 and (run_dir / "metrics.jsonl").stat().st_mtime_ns == written
    assert [r for r in again.stdout.splitlines() if r.startswith("| ")] == [
        r for r in result.stdout.splitlines() if r.startswith("| ")]


@pytest.mark.parametrize("args, message", [
    (["--widths=abc"], "--widths=abc: use ints separated by commas"),
    (["--seeds="], "--seeds is empty"),
    (["--layers=1,2,3"], "--layers=1,2,3: give one n_layer, or one per width (2)"),
    (["--multipliers=-1"], "--multipliers=-1: every value must be above 0"),
    (["--sweep=beta1"], "--sweep: 'beta1' is not one of"),
    (["--recipes=../../x=--seed=2"], "--recipes: '../../x=--seed=2' is not label=ARGS"),
    (["--recipes=late=--no_such_setting=1"], "unknown setting 'no_such_setting'"),
    (["--data_dir=nothing"], "--data_dir=nothing: no prepared shards there"),
])
def test_bad_settings_are_one_line_before_any_run(tmp_path, args, message):
    result = bench(tmp_path / "out", *args, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
