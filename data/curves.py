"""
A run's curves as a picture: train and val loss, HellaSwag, the learning-rate factor, tokens/s, the grad
norm, the weights' and the head's norm and the logits' spread, read from metrics.jsonl. The training scripts
redraw out_dir/curves.png at each eval and at the end (data/run.py RunLog); several runs on one figure compare
them, one colour per run:

    python data/curves.py logs/smoke                                    # logs/smoke/curves.png
    python data/curves.py logs/muon logs/adamw --out=muon_vs_adamw.png  # overlaid
    python data/curves.py logs/muon logs/adamw --labels=Muon,AdamW --out=compare.png

matplotlib is optional: it is imported when a picture is drawn, never before.
"""

import json
import math
import os
import sys
from pathlib import Path

if not __package__:  # run as a script: data/ is not a package on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import ArgumentParser, UserError, one_line_errors, refuse_clobber  # noqa: E402

# (title, [(metrics.jsonl key, legend suffix)], zoom): one panel each, for the metrics a run measured. zoom: the
# y range leaves out the first 10% of train steps (the loss starts near ln(50304) = 10.8 and would flatten
# the rest; the val points up to the first one stay inside) and, for grad norm, spikes above 3x the median.
PANELS = [
    ("loss", [("loss", "train"), ("val_loss", "val")], True),
    ("HellaSwag acc_norm", [("hellaswag", "")], False),
    ("learning rate (x each group's peak)", [("lr_factor", ""), ("lr", "rate (older runs)")], False),
    ("tokens/s", [("tokens_per_sec", "")], False),
    ("grad norm (before clipping)", [("grad_norm", "")], True),
    ("weight norms", [("param_norm", "all"), ("head_norm", "head")], False),
    ("logit std (rises before a loss spike)", [("logit_std", "")], False),
]


def read_metrics(run_dir):
    """The records of run_dir/metrics.jsonl; a line torn by a crash is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found; pass the out_dir of a train_gpt.py or finetune_sft.py run")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def series(records, key):
    """(steps, values) of one metric; a resumed run logs some steps twice, the later record wins."""
    points = {r["step"]: r[key] for r in records  # beyond 1e100: a diverged run's overflow, which no axis can span
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and abs(r[key]) < 1e100}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def smooth(values, beta=0.9):
    """Exponential moving average, debiased as in Adam, so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def draw_curves(runs, out, labels=None):
    """Draw the runs (run dirs) on one figure and write it to `out` (a PNG), through a temp file, so a
    reader never sees half a picture. Raises ModuleNotFoundError without matplotlib."""
    fig = curves_figure(runs, labels)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def mark_clipped(ax, low, high):
    """Points of the panel's lines outside its y range, drawn on its edge as open triangles pointing out, so a
    clipped spike still shows where it happened."""
    import numpy as np

    for line in list(ax.get_lines()):
        steps, values = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
        for edge, outside, marker in ((high, values > high, "^"), (low, values < low, "v")):
            if outside.any():
                ax.plot(steps[outside], [edge] * int(outside.sum()), marker, color=line.get_color(), markersize=6,
                        markerfacecolor="none", clip_on=False, label="_clipped")


def curves_figure(runs, labels=None):
    """The matplotlib Figure of the runs' curves: a panel per metric that some run measured."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state in a training process

    runs = [Path(r) for r in runs]
    labels = labels or [r.resolve().name for r in runs]
    data = [read_metrics(r) for r in runs]
    # one panel per metric some run measured: an SFT run has no HellaSwag, a CPU run no MFU
    panels = [panel for panel in PANELS if any(series(records, key)[0] for records in data for key, _ in panel[1])]
    if not panels:
        raise UserError(f"{', '.join(map(str, runs))}: no metrics recorded yet, so nothing to draw")
    rows, cols = math.ceil(len(panels) / 3), min(3, len(panels))
    fig = Figure(figsize=(max(4 * cols, 8), 3.25 * rows + (0.25 * len(runs) if len(runs) > 2 else 0.5)), dpi=80,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, keys, zoom) in zip(axes, panels, strict=False):
        late = []
        for records, label, color in zip(data, labels, colors, strict=True):
            for key, suffix in keys:
                steps, values = series(records, key)
                if not steps:
                    continue
                name = " ".join(part for part in (label if len(runs) > 1 else "", suffix) if part) or None
                if key in ("val_loss", "hellaswag"):  # a few points: markers, inside the axis up to the first one
                    ax.plot(steps, values, "o-", color=color, markersize=4, linewidth=1.5, label=name)
                    late += [v for v in values if v <= values[0]] if key == "val_loss" else values
                elif len(values) > 50 and key in ("loss", "grad_norm"):  # noisy: faint raw line, smoothed on top
                    ax.plot(steps, values, "-", color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(steps, smooth(values), "-", color=color, linewidth=1.2, label=name)
                else:
                    ax.plot(steps, values, "-", color=color, linewidth=1.2, alpha=0.7 if key == "loss" else 1,
                            label=name)
                if key != "val_loss":
                    late += [v for s, v in zip(steps, values, strict=True) if s >= 0.1 * steps[-1]]
        rows = {r["hellaswag_rows"] for records in data for r in records if isinstance(r.get("hellaswag_rows"), int)}
        if title.startswith("HellaSwag") and rows:  # 50 rows and 10,042 are not the same measurement
            title += f" ({', '.join(f'{n:,}' for n in sorted(rows))} rows)"
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if title.startswith("HellaSwag"):  # 4 endings: 0.25 is chance; a range where one question in 50 is a blip
            ax.axhline(0.25, color="gray", linestyle="--", linewidth=1, label="chance")
            ax.set_ylim(min(0.2, min(late) - 0.02), max(0.4, max(late) + 0.02))
        elif zoom and late:
            low, high = min(late), max(late)
            if title.startswith("grad norm"):
                high = min(high, 3 * sorted(late)[len(late) // 2])
            pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.1
            ax.set_ylim(low - pad, high + pad)
            mark_clipped(ax, low - pad, high + pad)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    summary = []
    for records, label in zip(data, labels, strict=True):
        steps, values = series(records, "val_loss")
        summary.append(f"{label}: val loss {values[-1]:.4f} at step {steps[-1]}" if steps else f"{label}: no val loss")
    fig.suptitle(("\n" if len(runs) > 2 else " | ").join(summary), fontsize=10)  # many runs: a line each
    return fig


def main(argv=None):
    parser = ArgumentParser(description="Draw runs' metrics.jsonl curves to a PNG; several runs overlay.")
    parser.add_argument("runs", nargs="+", help="run dirs (out_dir of train_gpt.py or finetune_sft.py)")
    parser.add_argument("--out", default="", help="the PNG to write; default RUN/curves.png for one run")
    parser.add_argument("--labels", default="", help="comma-separated legend names, one per run; default the dir names")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.runs)} runs; give one per run")
    if not args.out and len(args.runs) > 1:
        raise UserError("several runs need --out=PICTURE.png (one run's picture defaults to RUN/curves.png)")
    out = Path(args.out or Path(args.runs[0]) / "curves.png")
    refuse_clobber([(out, "--out", False)], [(Path(run) / "metrics.jsonl", "the metrics of") for run in args.runs])
    if not out.resolve().parent.is_dir():
        raise UserError(f"--out={out}: the folder {out.parent} does not exist; make it first")
    try:
        draw_curves(args.runs, out, labels)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        raise UserError("drawing curves needs matplotlib: pip install matplotlib") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    one_line_errors()
    main()
