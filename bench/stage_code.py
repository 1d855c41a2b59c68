"""The code the benchmarks time is the stage scripts' own: their model section (the text between the
model markers, the same in every stage script), train_gpt.py's training step section and its settings
block, each run on its own, without the script's setup or loop. Nothing else is imported from the
scripts, so nothing runs."""

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # data/ imports from the repo root, wherever the bench is started

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data import UserError  # noqa: E402
from data.sync_model import MODEL_BEGIN, MODEL_END, RULE  # noqa: E402
from data.tokenizer import VOCAB_SIZE  # noqa: E402
from data.train import read_figures  # noqa: E402

SETTINGS_BEGIN, SETTINGS_END = f"{RULE} settings\n", "\nconfig = parse_settings("
STEP_BEGIN, STEP_END = f"{RULE} training step\n", f"{RULE} setup\n"


def _between(script, begin, end):
    """The text of script from the line `begin` up to `end`, after blank lines that keep the script's line
    numbers, so a traceback points at the right line of the script."""
    text = (REPO_ROOT / script).read_text()
    if text.count(begin) != 1 or end not in text:
        raise UserError(f"{script}: expected one {begin.strip()!r} line followed by {end.strip()!r}")
    start = text.index(begin)
    return "\n" * text.count("\n", 0, start) + text[start : text.index(end, start)]


def model_namespace(script="train_gpt.py"):
    """A stage script's model section, run alone: its names (GPT, GPTConfig, KVCache, sample_logits, ...)."""
    namespace = dict(__name__=f"model_of_{Path(script).stem}", math=math, dataclass=dataclass, torch=torch, nn=nn,
                     F=F, UserError=UserError, VOCAB_SIZE=VOCAB_SIZE)
    exec(compile(_between(script, MODEL_BEGIN, MODEL_END), str(REPO_ROOT / script), "exec"), namespace)
    return namespace


def step_namespace(script="train_gpt.py"):
    """A training script's model and training step sections, run alone: the model's names, lr_factor and the
    train_step the script's loop calls."""
    namespace = model_namespace(script)
    namespace.update(contextlib=contextlib, dist=dist, read_figures=read_figures)
    exec(compile(_between(script, STEP_BEGIN, STEP_END), str(REPO_ROOT / script), "exec"), namespace)
    return namespace


def script_settings(script="train_gpt.py"):
    """A stage script's settings block run alone: {name: default} for its int/float/bool/str settings."""
    namespace = {}
    exec(compile(_between(script, SETTINGS_BEGIN, SETTINGS_END), str(REPO_ROOT / script), "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and type(v) in (int, float, bool, str)}


def median_ms(fn, repeats, cuda):
    """Median milliseconds of fn over repeats calls: by CUDA events on the GPU (its kernels, not the host's
    launch time), by the clock elsewhere."""
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
