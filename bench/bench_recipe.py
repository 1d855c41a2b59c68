"""
Learning per token: train_gpt.py's default recipe next to AdamW, with its width-ruled rates swept, on a
ladder of widths and several seeds. Each run is a real `python train_gpt.py` on the CPU (bf16 autocast, as
on a GPU); the bench prints, per width, every run's final val loss (mean and spread over seeds), its worst
logged loss above step 0's, and its steps to the best AdamW's final loss; then, per swept rate, the best
multiple of the default at each width and the exponent of best rate against width that those fit.

    python data/fineweb_edu.py --source=FILES --out_dir=data/web --val_fraction=0.05   # once (RECIPE.md: which)
    python bench/bench_recipe.py --data_dir=data/web                        # gpt2's ladder, 64-768: hours on 2 cores
    python bench/bench_recipe.py --data_dir=data/web --arch=llama           # llama's: embedding, head, Muon
    python bench/bench_recipe.py --data_dir=data/web --widths=64 --layers=4 --sweep= --adamw_lrs=3e-3 \\
        --recipes="muon 0.08=--matrix_lr=0.08"                              # a quick comparison of your own

At each width the runs are: the defaults ("default"); each rate in --sweep at each of --multipliers times
its default ("head_lr x0.25", ...); AdamW as nanoGPT runs it (configs/recipe_nanogpt.toml) at each rate in
--adamw_lrs ("adamw 1e-3", ...), every group at that rate; and each --recipes entry, label=ARGS of
train_gpt.py arguments on top of the defaults. The default, the best AdamW and the recipes run every seed
below --one_seed_from; the rest run the first seed. A run is a short version of the recipe's full run:
every setting counted in steps (warmup_iters, muon_momentum_warmup, lr_decay_iters) is scaled by
steps / max_iters, so the defaults' 5,600 warmup steps of 19,073 become 73 of 250.

Runs are kept in out_dir/ARCH/wWIDTH/LABEL/sSEED/ (their metrics and logs, not their checkpoints) and reused
while their resolved settings are the same, under any label: an interrupted ladder continues where it stopped,
and a moved default reuses the sweep run it now equals; results.json holds every figure and
out_dir/ARCH_wWIDTH.png the mean curves of the default, the AdamW runs and the recipes.
"""

import json
import math
import os
import re
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
arch = "gpt2"  # train_gpt.py's arch: "gpt2" (tied head) or "llama" (untied embedding and head)
widths = "64,128,256,512,768"  # n_embd of each rung; n_head = n_embd / head_dim
layers = "4,4,4,4,2"  # n_layer at each width (2 at 768 keeps a CPU run to ~15 minutes)
sweep = "auto"  # the rates swept around their defaults; auto: head_lr,matrix_lr (gpt2), +embedding_lr (llama)
multipliers = "0.25,0.5,2,4"  # the swept multiples of each default (x1 is the default itself)
adamw_lrs = "3e-4,1e-3,3e-3,1e-2"  # nanoGPT's AdamW at each rate; the best one is the target
recipes = ""  # more runs at every width: label=ARGS entries separated by ';' (ARGS: configs/*.toml, --key=value)
seeds = "1,2,3"  # the default, the best AdamW and the recipes run all of them; the sweep runs the first
one_seed_from = 512  # widths from here run the first seed only
data_dir = "data/samples/fineweb_edu"  # prepared shards (data/fineweb_edu.py); the bundled sample only smoke-tests
head_dim = 32
block_size = 64  # T
batch_size = 16  # sequences per step: 16 x 64 = 1,024 tokens per step
steps = 250  # optimizer steps per run: 256K tokens
eval_interval = 25  # steps between val losses, which give the steps-to-target
val_tokens = 8192
dtype = "bfloat16"  # train_gpt.py's autocast on the CPU: as on a GPU, and 1.5x faster than float32 here
jobs = 2  # runs at once, one thread each (two one-thread runs beat one two-thread run on 2 cores)
out_dir = "logs/bench_recipe"
timeout = 7200  # seconds per run before it counts as failed

BENCH = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower() and type(v) in (int, float, str)}
config = parse_config(BENCH, sys.argv[1:])
globals().update(config)
check_settings(config, positive=("head_dim", "block_size", "batch_size", "steps", "eval_interval", "val_tokens",
                                 "jobs", "timeout"), non_negative=("one_seed_from",),
               choices=dict(arch=("gpt2", "llama"), dtype=("bfloat16", "float32")))


def numbers(key, kind, allow_empty=False):
    """A comma-separated setting as a list of kind, or a one-line error naming it."""
    text = config[key].strip()
    try:
        values = [kind(v) for v in text.split(",")] if text else []
    except ValueError:
        raise UserError(f"--{key}={text}: use {kind.__name__}s separated by commas, like "
                        f"--{key}={BENCH[key]}") from None
    if not values and not allow_empty:
        raise UserError(f"--{key} is empty; give at least one value, like --{key}={BENCH[key]}")
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise UserError(f"--{key}={text}: every value must be above 0")
    return values


WIDTHS, LAYERS, SEEDS = numbers("widths", int), numbers("layers", int), numbers("seeds", int)
MULTIPLIERS, ADAMW_LRS = numbers("multipliers", float, True), numbers("adamw_lrs", float, True)
if len(LAYERS) == 1:
    LAYERS *= len(WIDTHS)
if len(LAYERS) != len(WIDTHS):
    raise UserError(f"--layers={layers}: give one n_layer, or one per width ({len(WIDTHS)})")
if any(w % head_dim for w in WIDTHS):
    raise UserError(f"--widths={widths}: each must be a multiple of head_dim={head_dim}")
DEFAULTS = script_settings("train_gpt.py")
SWEEP = (["head_lr", "matrix_lr"] + (["embedding_lr"] if arch == "llama" else []) if sweep == "auto"
         else [k.strip() for k in sweep.split(",") if k.strip()])
for key in SWEEP:
    if key not in ("embedding_lr", "head_lr", "matrix_lr", "scalar_lr"):
        raise UserError(f"--sweep: {key!r} is not one of embedding_lr, head_lr, matrix_lr, scalar_lr")
# paths as the user typed them, from where they typed them; the runs start in the repo root
DATA, OUT = Path(data_dir).resolve(), Path(out_dir).resolve()
if not (DATA / "manifest.json").is_file():
    raise UserError(f"--data_dir={data_dir}: no prepared shards there; make them with python data/fineweb_edu.py "
                    "--source=FILES --out_dir=DIR (bench/RECIPE.md names the corpus)")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .,_=+-]*$")  # a label becomes a folder name: no '/', no '..' prefix


def table():
    """{label: train_gpt.py args} of every run at a width, in the order they print."""
    runs = {"default": []}
    for key in SWEEP:
        for m in MULTIPLIERS:
            runs[f"{key} x{m:g}"] = [f"--{key}={DEFAULTS[key] * m:.6g}"]
    for lr in ADAMW_LRS:
        runs[f"adamw {lr:g}"] = ["configs/recipe_nanogpt.toml",
                                 *(f"--{k}={lr:g}" for k in ("matrix_lr", "embedding_lr", "head_lr", "scalar_lr"))]
    for entry in filter(None, (e.strip() for e in recipes.split(";"))):
        label, eq, args = entry.partition("=")
        label = label.strip()
        if not eq or not LABEL.match(label) or label in runs:
            raise UserError(f"--recipes: {entry!r} is not label=ARGS with a new label of letters, digits, spaces "
                            "and .,_=+- (it names a folder); ARGS may be empty")
        runs[label] = shlex.split(args)
    # a config file as the user named it (from where they are), else one of the repo's (configs/...)
    return {label: [str(Path(a).resolve() if Path(a).is_file() else REPO_ROOT / a) if a.endswith(".toml") else a
                    for a in args] for label, args in runs.items()}


TABLE = table()
STEP_SETTINGS = ("warmup_iters", "muon_momentum_warmup", "lr_decay_iters")


def run_args(label, width, layer_count, seed):
    """The whole train_gpt.py command line of one run: the recipe, its step counts scaled to this run's
    length, then the bench's size, data and eval settings."""
    args = TABLE[label]
    recipe = parse_config(DEFAULTS, args)  # a typo is refused here, before any run starts
    scaled = [f"--{k}={round(recipe[k] * steps / recipe['max_iters'])}" for k in STEP_SETTINGS if recipe[k]]
    return [*args, *scaled, f"--arch={arch}", f"--n_embd={width}", f"--n_head={width // head_dim}",
            f"--n_layer={layer_count}", f"--block_size={block_size}", f"--batch_size={batch_size}",
            f"--total_batch_size={batch_size * block_size}", f"--max_iters={steps}", f"--seed={seed}",
            f"--data_dir={DATA}", f"--val_tokens={val_tokens}", f"--eval_interval={eval_interval}",
            "--log_interval=1", "--hellaswag_interval=0", "--sample_interval=0", f"--checkpoint_interval={steps}",
            "--keep_last=0", "--device=cpu", f"--dtype={dtype}", "--compile=False", "--wandb_log=False"]


def run_dir(label, width, seed):
    return OUT / arch / f"w{width}" / label.replace(" ", "_") / f"s{seed}"


def run(label, width, layer_count, seed):
    """One training run (or the kept result of the same one): its metrics records."""
    where = run_dir(label, width, seed)
    args = run_args(label, width, layer_count, seed)
    settings = parse_config(DEFAULTS, args)  # a changed default changes the run too
    done = where / "bench.json"
    if done.is_file() and json.loads(done.read_text())["settings"] == settings:
        return read_metrics(where)
    shutil.rmtree(where, ignore_errors=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    for kept in (OUT / arch).glob("w*/*/s*/bench.json"):  # the same run under another label (a moved default)
        if json.loads(kept.read_text())["settings"] == settings:
            shutil.copytree(kept.parent, where)
            done.write_text(json.dumps({"args": args, "settings": settings}))
            return read_metrics(where)
    # glibc hands the big logits buffers back to the OS every step without these: 40% of a step in page faults
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**31),
           "MALLOC_TRIM_THRESHOLD_": str(2**31)}
    cmd = [sys.executable, "train_gpt.py", *args, f"--out_dir={where}"]
    try:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{label}, width {width}, seed {seed}: no result after --timeout={timeout} s") from None
    diverged = result.returncode == 1 and "stopping; " in result.stdout  # the NaN guard: a result, not a failure
    if result.returncode != 0 and not diverged:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{label}, width {width}, seed {seed} failed: {last} (run: {shlex.join(cmd)})")
    for ckpt in where.glob("ckpt*.pt"):  # the bench reads the metrics; a 768-wide run's checkpoint is 0.5 GB
        ckpt.unlink()
    done.write_text(json.dumps({"args": args, "settings": settings}))
    return read_metrics(where)


def final_loss(records):
    """A run's val loss at its last step; inf for a run the NaN guard stopped."""
    points = dict(zip(*series(records, "val_loss"), strict=True))
    return points.get(steps, math.inf)


def steps_to_reach(curve, target):
    """The first step at which a curve ({step: loss}) reaches target, interpolated between evals; None if never."""
    points = sorted(curve.items())
    for (s0, l0), (s1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def best_multiple(losses):
    """The multiple of the default ({multiple: final loss}) that a parabola through the lowest point and its
    two neighbours (in log2 of the multiple) puts lowest: the grid's best when it lies on an edge."""
    grid = sorted(losses)
    i = min(range(len(grid)), key=lambda j: losses[grid[j]])
    if i in (0, len(grid) - 1):
        return grid[i], True
    (x0, x1, x2), (y0, y1, y2) = [math.log2(grid[j]) for j in (i - 1, i, i + 1)], [losses[grid[j]] for j in
                                                                                 (i - 1, i, i + 1)]
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denominator
    vertex = -b / (2 * a) if a > 0 else x1
    return 2 ** min(max(vertex, x0), x2), False


def fit_exponent(points):
    """The least-squares slope of log(rate) against log(width): rate ~ width ** slope."""
    xs, ys = [math.log(w) for w, _ in points], [math.log(r) for _, r in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


# ----------------------------------------------------------------------------- the runs
def seeds_at(width):
    return SEEDS if width < one_seed_from else SEEDS[:1]


for w, n in zip(WIDTHS, LAYERS, strict=True):  # every command line is checked before the first run starts
    for label in TABLE:
        run_args(label, w, n, SEEDS[0])
print(f"bench_recipe: {arch}, widths {WIDTHS} ({LAYERS} layers), T={block_size}, {batch_size * block_size:,} "
      f"tokens/step, {steps} steps, seeds {SEEDS} (one from width {one_seed_from}), {dtype}, data {DATA}; "
      f"runs in {OUT / arch}", flush=True)
adamw = [label for label in TABLE if label.startswith("adamw ")]
repeated = ["default", *[label for label in TABLE if label not in adamw and label != "default" and " x" not in label]]
first = [(label, w, n, SEEDS[0]) for w, n in zip(WIDTHS, LAYERS, strict=True) for label in TABLE]
with ThreadPoolExecutor(max_workers=jobs) as pool:
    records = dict(zip(first, pool.map(lambda cell: run(*cell), first), strict=True))
    finals = {cell[:3]: final_loss(r) for cell, r in records.items()}
    best_adamw = {w: min(adamw, key=lambda label: finals[(label, w, n)]) for w, n in zip(WIDTHS, LAYERS, strict=True)
                  if adamw}
    more = [(label, w, n, s) for w, n in zip(WIDTHS, LAYERS, strict=True) for s in seeds_at(w)[1:]
            for label in [*repeated, *([best_adamw[w]] if adamw else [])]]
    records.update(zip(more, pool.map(lambda cell: run(*cell), more), strict=True))

# ----------------------------------------------------------------------------- the tables
report = {"settings": config, "widths": {}, "sweeps": {}}
for w, n in zip(WIDTHS, LAYERS, strict=True):
    rows = {}
    for label in TABLE:
        runs = [records[(label, w, n, s)] for s in seeds_at(w) if (label, w, n, s) in records]
        curves = [dict(zip(*series(r, "val_loss"), strict=True)) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        mean_curve = {s: statistics.mean(c[s] for c in curves) for s in common}
        losses = [series(r, "loss")[1] + series(r, "val_loss")[1] for r in runs]
        rise = max(max(v) - c[0] for v, c in zip(losses, curves, strict=True))  # worst logged loss over step 0's
        final = [final_loss(r) for r in runs]
        rows[label] = dict(finals=final, mean=statistics.mean(final), std=spread(final), rise=rise, curve=mean_curve)
    target_label = best_adamw.get(w)
    target = rows[target_label]["mean"] if target_label else math.nan
    target_steps = steps_to_reach(rows[target_label]["curve"], target) if target_label else None
    print(f"\n{arch} width {w} ({n} layers, {w // head_dim} heads)"
          + (f": target = {target_label}'s {target:.4f}" if target_label else ""))
    print(f"| run | final val loss | spread (std, seeds) | worst loss - step 0's | steps to {target:.3f} | "
          "x AdamW's steps |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        reach = steps_to_reach(row["curve"], target) if target_label else None
        row["steps_to_target"] = reach
        ratio = f"{reach / target_steps:.2f}" if reach is not None and target_steps else "-"
        print(f"| {label}{' (best AdamW)' if label == target_label else ''} | {row['mean']:.4f} | "
              f"{row['std']:.4f} ({len(row['finals'])}) | {row['rise']:+.2f} | "
              f"{f'{reach:.0f}' if reach is not None else 'not reached'} | {ratio} |")
    report["widths"][w] = dict(layers=n, target=target_label, rows=rows)
    mean_dirs = []
    for label in ["default", *adamw, *[lb for lb in repeated if lb != "default"]]:
        mean_dir = OUT / arch / f"w{w}" / "mean" / label.replace(" ", "_")
        mean_dir.mkdir(parents=True, exist_ok=True)
        (mean_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                        for s, v in rows[label]["curve"].items()))
        mean_dirs.append(mean_dir)
    try:
        picture = draw_curves(mean_dirs, OUT / f"{arch}_w{w}.png",
                              labels=[d.name.replace("_", " ") for d in mean_dirs])
        print(f"mean val loss curves: {picture}")
    except ModuleNotFoundError:
        print("(no matplotlib: no picture; pip install matplotlib)")

if SWEEP and MULTIPLIERS:
    print(f"\n{arch}: the best multiple of each swept default at each width (a parabola through the grid's lowest "
          "point and its neighbours; 'edge' = the grid's end, so the best may lie beyond), and rate ~ width^k fitted "
          "to the best rates")
    print("| rate | " + " | ".join(f"width {w}" for w in WIDTHS) + " | exponent k |")
    print("|---|" + "---|" * (len(WIDTHS) + 1))
    for key in SWEEP:
        cells, points = [], []
        for w in WIDTHS:
            rows = report["widths"][w]["rows"]
            losses = {1.0: rows["default"]["finals"][0], **{m: rows[f"{key} x{m:g}"]["mean"] for m in MULTIPLIERS}}
            multiple, edge = best_multiple(losses)
            ref, k = DEFAULTS["lr_ref_width"], DEFAULTS["head_lr_exponent"]
            rate = DEFAULTS[key] * multiple * ((ref / w) ** k if key == "head_lr" and ref else 1.0)
            points.append((w, rate))
            cells.append(f"x{multiple:.2f} ({rate:.3g}){' edge' if edge else ''}")
            report["sweeps"].setdefault(key, {})[w] = dict(losses=losses, best_multiple=multiple, edge=edge,
                                                           best_rate=rate)
        k = fit_exponent(points) if len(points) > 1 else math.nan
        report["sweeps"][key]["exponent"] = k
        print(f"| {key} | " + " | ".join(cells) + f" | {k:.2f} |")
(OUT / arch).mkdir(parents=True, exist_ok=True)
(OUT / arch / "results.json").write_text(json.dumps(report, indent=1, default=str))
print(f"\nfigures: {OUT / arch / 'results.json'}")
