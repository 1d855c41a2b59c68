"""
Learning per token: train_gpt.py under several recipes, side by side, at small widths and several seeds.
Each run is a real `python train_gpt.py` on the CPU; the bench prints final val loss (mean and spread
over seeds) and how many steps each recipe needs to reach the best AdamW recipe's final val loss.

    python data/fineweb_edu.py --source=../shared/data/python_docs/python3.11_docs.jsonl \\
        --out_dir=data/python_docs --val_fraction=0.02                      # once: ~3.4M train tokens
    python bench/bench_recipe.py --data_dir=data/python_docs                  # the table: ~1 hour on 2 cores
    python bench/bench_recipe.py --data_dir=data/python_docs --widths=64 --seeds=1 \\
        --recipes="new=;muon 0.04=--muon_lr=0.04"                           # a quick comparison of your own

A recipe is `label=ARGS`: train_gpt.py arguments (configs/*.toml files, --key=value flags) on top of its
defaults; `new=` is the defaults themselves. The bench's own settings (model size, steps, eval) come
after them. A bench run is a short version of the recipe's full run: every setting counted in steps
(warmup_iters, muon_momentum_warmup, lr_decay_iters, grad_clip_late_step) is scaled by steps / max_iters,
so a warmup of 700 of 19,073 steps becomes 9 of 250. Recipes whose label starts with "adamw" form the
AdamW baseline: the one with the lowest mean final val loss sets the target.

Runs are kept in out_dir/w{width}/{label}/s{seed}/ and reused while their arguments and resolved settings
are the same, so an interrupted table continues where it stopped. The mean curves go to out_dir/recipe_w{width}.png.
"""

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stage_code import REPO_ROOT, script_settings  # bench/: puts the repo root on sys.path

from data import UserError, one_line_errors
from data.curves import draw_curves, read_metrics, series
from data.settings import check_settings, parse_config

one_line_errors()

# ----------------------------------------------------------------------------- settings
RECIPES = ";".join([  # the table: label=ARGS, separated by ';'
    "old defaults=configs/recipe_old.toml",
    "new defaults=",
    "adamw lr 1e-3=configs/recipe_nanogpt.toml --learning_rate=1e-3",
    "adamw lr 3e-3=configs/recipe_nanogpt.toml --learning_rate=3e-3",
    "adamw lr 1e-2=configs/recipe_nanogpt.toml --learning_rate=1e-2",
    "modded track 3=configs/recipe_modded.toml",
    "nanochat=configs/recipe_nanochat.toml",
])
recipes = RECIPES
data_dir = "data/samples/fineweb_edu"  # prepared shards (data/fineweb_edu.py); the bundled sample only smoke-tests
widths = "64,128"  # n_embd of each model size; n_head = n_embd / head_dim
head_dim = 32
n_layer = 4
block_size = 64  # T
batch_size = 16  # sequences per step: 16 x 64 = 1,024 tokens per step
steps = 250  # optimizer steps per run: 256K tokens
seeds = "1,2,3"
eval_interval = 25  # steps between val losses, which give the steps-to-target
val_tokens = 8192
jobs = 2  # runs at once, one thread each (two one-thread runs beat one two-thread run on 2 cores)
out_dir = "logs/bench_recipe"
timeout = 7200  # seconds per run before it counts as failed

BENCH = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower() and type(v) in (int, float, str)}
config = parse_config(BENCH, sys.argv[1:])
globals().update(config)
check_settings(config, positive=("head_dim", "n_layer", "block_size", "batch_size", "steps", "eval_interval",
                                 "val_tokens", "jobs", "timeout"))
if not Path(data_dir, "manifest.json").is_file():
    raise UserError(f"--data_dir={data_dir}: no prepared shards there; make them with python data/fineweb_edu.py "
                    "--source=FILES --out_dir=DIR (the docstring of bench/bench_recipe.py shows one)")
WIDTHS = [int(w) for w in widths.split(",")]
SEEDS = [int(s) for s in seeds.split(",")]
if any(w % head_dim for w in WIDTHS):
    raise UserError(f"--widths={widths}: each must be a multiple of head_dim={head_dim}")
TABLE = {}
for entry in filter(None, (e.strip() for e in recipes.split(";"))):
    label, eq, args = entry.partition("=")
    if not eq or not label.strip():
        raise UserError(f"--recipes: {entry!r} is not label=ARGS (ARGS may be empty: 'new=')")
    TABLE[label.strip()] = shlex.split(args)
STEP_SETTINGS = ("warmup_iters", "muon_momentum_warmup", "lr_decay_iters", "grad_clip_late_step")


def run_args(args, width, seed):
    """The whole train_gpt.py command line of one run: the recipe, its step counts scaled to this run's
    length, then the bench's size, data and eval settings."""
    recipe = parse_config(script_settings("train_gpt.py"), args)  # also catches a typo before any run starts
    scaled = [f"--{k}={round(recipe[k] * steps / recipe['max_iters'])}" for k in STEP_SETTINGS if recipe[k]]
    return [*args, *scaled, f"--n_embd={width}", f"--n_head={width // head_dim}", f"--n_layer={n_layer}",
            f"--block_size={block_size}", f"--batch_size={batch_size}", f"--total_batch_size={batch_size * block_size}",
            f"--max_iters={steps}", f"--seed={seed}", f"--data_dir={data_dir}", f"--val_tokens={val_tokens}",
            f"--eval_interval={eval_interval}", f"--log_interval={eval_interval}", "--hellaswag_interval=0",
            "--sample_interval=0", f"--checkpoint_interval={steps}", "--keep_last=0", "--device=cpu",
            "--compile=False", "--wandb_log=False"]


def run(label, width, seed):
    """One training run (or the kept result of the same one): its val losses as {step: loss}."""
    run_dir = Path(out_dir) / f"w{width}" / label.replace(" ", "_") / f"s{seed}"
    args = run_args(TABLE[label], width, seed)
    settings = parse_config(script_settings("train_gpt.py"), args)  # a changed default changes the run too
    done = run_dir / "bench.json"
    if done.is_file() and json.loads(done.read_text()) == {"args": args, "settings": settings}:
        return dict(zip(*series(read_metrics(run_dir), "val_loss"), strict=True))
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # glibc hands the big logits buffers back to the OS every step without these: 40% of a step in page faults
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**31),
           "MALLOC_TRIM_THRESHOLD_": str(2**31)}
    cmd = [sys.executable, "train_gpt.py", *args, f"--out_dir={run_dir}"]
    try:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{label}, width {width}, seed {seed}: no result after --timeout={timeout} s") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{label}, width {width}, seed {seed} failed: {last} (run: {shlex.join(cmd)})")
    done.write_text(json.dumps({"args": args, "settings": settings}))
    return dict(zip(*series(read_metrics(run_dir), "val_loss"), strict=True))


def steps_to_reach(curve, target):
    """The first step at which a curve ({step: loss}) reaches target, interpolated between evals; None if never."""
    points = sorted(curve.items())
    for (s0, l0), (s1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- the runs
print(f"{len(TABLE)} recipes x widths {WIDTHS} x seeds {SEEDS}: {n_layer} layers, T={block_size}, "
      f"{batch_size * block_size:,} tokens/step, {steps} steps, data {data_dir}; runs in {out_dir}", flush=True)
cells = [(label, w, s) for w in WIDTHS for s in SEEDS for label in TABLE]
with ThreadPoolExecutor(max_workers=jobs) as pool:
    curves = dict(zip(cells, pool.map(lambda cell: run(*cell), cells), strict=True))

# ----------------------------------------------------------------------------- the table
report = {}
for width in WIDTHS:
    means = {}  # label -> {step: mean val loss over seeds}
    for label in TABLE:
        runs = [curves[(label, width, s)] for s in SEEDS]
        means[label] = {step: statistics.mean(r[step] for r in runs) for step in sorted(set.intersection(
            *(set(r) for r in runs)))}
    finals = {label: [curves[(label, width, s)][steps] for s in SEEDS] for label in TABLE}
    adamw = [label for label in TABLE if label.startswith("adamw")]
    best = min(adamw, key=lambda label: statistics.mean(finals[label])) if adamw else None
    target = statistics.mean(finals[best]) if best else math.nan
    target_steps = steps_to_reach(means[best], target) if best else None
    print(f"\nwidth {width} ({n_layer} layers, {width // head_dim} heads): final val loss over seeds {SEEDS}"
          + (f"; target = {best}'s {target:.4f}" if best else ""))
    print(f"| recipe | final val loss | spread (std) | steps to {target:.3f} | x AdamW's steps |")
    print("|---|---|---|---|---|")
    for label in TABLE:
        reach = steps_to_reach(means[label], target) if best else None
        ratio = f"{reach / target_steps:.2f}" if reach is not None and target_steps else "-"
        print(f"| {label}{' (best AdamW)' if label == best else ''} | {statistics.mean(finals[label]):.4f} | "
              f"{spread(finals[label]):.4f} | {f'{reach:.0f}' if reach is not None else 'not reached'} | {ratio} |")
        report[f"w{width}/{label}"] = dict(finals=finals[label], mean=statistics.mean(finals[label]),
                                           std=spread(finals[label]), steps_to_target=reach, target=target)
        mean_dir = Path(out_dir) / f"w{width}" / "mean" / label.replace(" ", "_")
        mean_dir.mkdir(parents=True, exist_ok=True)
        (mean_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                        for s, v in means[label].items()))
    try:
        picture = draw_curves([Path(out_dir) / f"w{width}" / "mean" / label.replace(" ", "_") for label in TABLE],
                              Path(out_dir) / f"recipe_w{width}.png", labels=list(TABLE))
        print(f"mean val loss curves: {picture}")
    except ModuleNotFoundError:
        print("(no matplotlib: no picture; pip install matplotlib)")
(Path(out_dir) / "results.json").write_text(json.dumps(report, indent=1))
