"""data/curves.py and the run log's pictures: a PNG per run at each eval and at the end, several runs on
one figure, and a run that never stops for want of matplotlib; the progress a training log line gives."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_script

from data import UserError
from data.curves import draw_curves, read_metrics
from data.run import RunLog

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir, steps=60, seed=0.0):
    """A run dir whose metrics.jsonl has what train_gpt.py logs: train records every step, evals every 20."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(steps + 1):
        if step % 20 == 0:
            lines.append({"step": step, "val_loss": 10.0 - step / 10 + seed, **({"hellaswag": 0.25 + step / 1000}
                                                                               if step else {})})
        if step:
            lines.append({"step": step, "loss": 10.0 - step / 10 + seed, "lr_factor": 1.0, "grad_norm": 1.0 + step % 3,
                          "param_norm": 40.0 + step, "tokens_per_sec": 1000.0, "mfu": 0.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 61, "lo')
    return run_dir


def test_draw_one_run_and_several(tmp_path):
    one = draw_curves([fake_run(tmp_path / "muon")], tmp_path / "one.png")
    two = draw_curves([tmp_path / "muon", fake_run(tmp_path / "adamw", seed=0.5)], tmp_path / "two.png",
                      labels=["Muon", "AdamW"])
    for path in (one, two):
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
    assert len(read_metrics(tmp_path / "muon")) == 60 + 4  # the torn last line is skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adamw", "muon", "one.png", "two.png"]  # no temp file
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        draw_curves([tmp_path / "nothing"], tmp_path / "x.png")


def test_cli_overlays_runs(tmp_path):
    fake_run(tmp_path / "a"), fake_run(tmp_path / "b", seed=1.0)
    result = subprocess.run([sys.executable, "data/curves.py", tmp_path / "a", tmp_path / "b", "--labels=A,B",
                             f"--out={tmp_path / 'ab.png'}"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ab.png").read_bytes().startswith(PNG)
    result = subprocess.run([sys.executable, "data/curves.py", tmp_path / "a", tmp_path / "b"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: several runs need --out=PICTURE.png (one run's picture defaults to RUN/curves.png)"]


def test_run_log_draws_at_each_eval_and_at_the_end(tmp_path, capsys):
    log = RunLog(tmp_path / "run", __file__, {"lr": 1.0})
    png = tmp_path / "run" / "curves.png"
    log.metrics({"step": 1, "loss": 9.0})
    assert not png.exists()  # train records alone: no redraw
    log.metrics({"step": 1, "val_loss": 9.5})
    assert png.read_bytes().startswith(PNG)
    png.unlink()
    log.close()
    assert not png.exists()  # nothing new since the eval drew
    log.metrics({"step": 2, "loss": 8.0})
    log.close()
    assert png.is_file()
    assert "note" not in capsys.readouterr().out


def test_run_log_without_matplotlib_notes_once_and_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    log = RunLog(tmp_path / "run", __file__, {})
    for step in range(3):
        log.metrics({"step": step, "loss": 9.0, "val_loss": 9.0})
    log.close()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note")]
    assert notes == [f"note: no {tmp_path / 'run' / 'curves.png'}: drawing it needs matplotlib "
                     "(pip install matplotlib)"]
    assert not (tmp_path / "run" / "curves.png").exists() and len(read_metrics(tmp_path / "run")) == 3


def test_training_logs_progress_and_leaves_curves(smoke_run, tmp_path, capsys):
    """The shared smoke run, then fine-tuning it for 2 steps: each run dir holds its curves.png, and the
    log lines say ms/step, elapsed time and ETA, and no MFU on a CPU (no peak FLOP/s known)."""
    run_script("finetune_sft.py", "configs/sft_smoke.toml", "--device=cpu", "--max_iters=2", "--eval_interval=2",
               "--sample_interval=0", "--log_interval=1", "--batch_size=2", "--total_batch_size=2",
               "--val_examples=8", f"--init_from={smoke_run}", f"--out_dir={tmp_path / 'sft'}")
    printed = capsys.readouterr().out
    for run_dir, log, steps in ((smoke_run, (smoke_run / "log.txt").read_text(), 6), (tmp_path / "sft", printed, 2)):
        assert (run_dir / "curves.png").read_bytes().startswith(PNG), run_dir
        lines = [line for line in log.splitlines() if re.match(rf"step \d+/{steps}: loss", line)]
        assert len(lines) == steps, log
        for line in lines:
            assert re.search(r", \d+ ms/step \| \d+s elapsed, ETA \d+s$", line), line
            assert "MFU" not in line, line


def test_panels_are_the_measured_metrics_with_honest_axes(tmp_path):
    from data.curves import curves_figure

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "val_loss": 10.8}] + [{"step": s, "loss": 6 - s / 100, "lr_factor": 1.0}
                                                 for s in range(1, 101)]
    records += [{"step": 100, "val_loss": 5.1, "hellaswag": 0.26}, {"step": 50, "hellaswag": 0.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    axes = {ax.get_title(): ax for ax in curves_figure([run]).axes if ax.get_visible()}
    assert set(axes) == {"loss", "HellaSwag acc_norm", "learning rate (x each group's peak)"}  # nothing "not measured"
    low, high = axes["loss"].get_ylim()
    assert low < 5.1 and high > 10.8  # the step-0 val point is inside the axis
    low, high = axes["HellaSwag acc_norm"].get_ylim()
    assert low <= 0.2 and high >= 0.4  # one question in 50 does not fill the panel
    assert any(line.get_label() == "chance" and set(line.get_ydata()) == {0.25} for line in
               axes["HellaSwag acc_norm"].get_lines())


def test_a_clipped_point_is_marked_on_the_edge_and_hellaswag_says_its_rows(tmp_path):
    from data.curves import curves_figure

    run = tmp_path / "run"
    run.mkdir()
    losses = [6 - s / 100 for s in range(1, 101)]
    losses[4] = 14.5  # an early spike: the zoomed axis leaves out the first 10% of steps
    records = [{"step": 0, "val_loss": 10.8}] + [{"step": s, "loss": v} for s, v in enumerate(losses, 1)]
    records += [{"step": 100, "val_loss": 5.1, "hellaswag": 0.26, "hellaswag_rows": 50}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    axes = {ax.get_title(): ax for ax in curves_figure([run]).axes if ax.get_visible()}
    loss = axes["loss"]
    low, high = loss.get_ylim()
    assert high < 14.5
    marks = [line for line in loss.get_lines() if line.get_label() == "_clipped"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [5] and list(marks[0].get_ydata()) == [high]
    assert "HellaSwag acc_norm (50 rows)" in axes


def test_metrics_jsonl_stays_json_when_a_value_is_not_finite(tmp_path):
    log = RunLog(tmp_path / "run", __file__, {})
    log.metrics({"step": 1, "val_loss": float("nan"), "grad_norm": float("inf"), "loss": 2.5})
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 1, "val_loss": None, "grad_norm": None, "loss": 2.5}
