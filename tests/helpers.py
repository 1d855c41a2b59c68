"""Small utilities shared by the tests.

The model code is not a module: it is the text between the model markers, copied into every
stage script. bench/stage_code.py reads that text from any script and runs it on its own
(load_model_namespace), so a test can build the GPT of train_gpt.py or finetune_sft.py without
running the script's training code.
A stage script itself runs in-process (run_script: no second torch import, ~3 s saved per run)
or as a subprocess where a test needs a real process (signals, torchrun, exit status).
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
from stage_code import MODEL_BEGIN, script_settings  # noqa: E402  # the benchmarks read the scripts the same way
from stage_code import model_namespace as load_model_namespace  # noqa: E402

SAMPLES = REPO_ROOT / "data" / "samples"
SAMPLE_SHARDS = SAMPLES / "fineweb_edu"  # 100 real FineWeb-Edu documents, prepared
SAMPLE_SFT = SAMPLES / "sft"  # 500 real Raschka instruction rows, prepared
HELLASWAG = SAMPLES / "hellaswag_val_200.jsonl"  # the first 200 rows of the real val set
RASCHKA = SAMPLES / "raschka_instruction_500.json"

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)  # a model that runs in milliseconds on a CPU


def make_checkpoint(path, arch="gpt2", chat=False, seed=0, script=REPO_ROOT / "train_gpt.py", settings=None, **config):
    """Save a small random model in train_gpt.py's checkpoint format (with its default settings) to path
    (a file; parent dirs are made) and return the model. config overrides GPTConfig fields; the default size is TINY."""
    ns = load_model_namespace(script)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ns["GPT"](ns["GPTConfig"](arch=arch, **{**TINY, **config}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "chat": chat, "optimizers": [],
                "config": {**script_settings("train_gpt.py"), "arch": arch, **(settings or {})}, "step": 0,
                "best_val_loss": float("inf")}, path)
    return model


def run_script(script, *args):
    """Run a stage script in this process, from the repo root, as `python script args` would, and return
    its globals. A UserError propagates (the test asserts on it). The run-dir lock, the signal handlers
    and the excepthook the script takes are given back afterwards."""
    path = REPO_ROOT / script
    namespace = {"__name__": "__main__", "__file__": str(path)}
    argv, hook, cwd = sys.argv, sys.excepthook, os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [script, *map(str, args)]
    os.chdir(REPO_ROOT)
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        return namespace
    finally:
        if namespace.get("lock") is not None:
            namespace["lock"].close()
        sys.argv, sys.excepthook = argv, hook
        os.chdir(cwd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def script_head(script, *args):
    """The globals of a stage script run up to its setup section (settings, model, helper functions such
    as the learning-rate schedule) with these command-line args: what a test of those pieces needs."""
    path = REPO_ROOT / script
    text = path.read_text()
    namespace = {"__name__": "__main__", "__file__": str(path)}
    argv, hook = sys.argv, sys.excepthook
    sys.argv = [script, *map(str, args)]
    try:
        head = text[: text.index(MODEL_BEGIN.replace("model\n", "setup"))]
        exec(compile(head, str(path), "exec"), namespace)
    finally:
        sys.argv, sys.excepthook = argv, hook
    return namespace


def run_cli(*args, env=None, timeout=300):
    """`python args...` in a subprocess from the repo root, as a user types it."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_one_line_error(result, message):
    """A refused command: exit status 1, nothing but `error: ...message...` on one line of stderr."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def metrics(out_dir):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(out_dir):
    """The deterministic part of each logged training step (timings differ between runs)."""
    return [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in metrics(out_dir) if "loss" in r]


def wait_for_steps(out_dir, n, timeout=120):
    """Wait until a running training script has logged n steps (complete lines only: it may be
    halfway through writing one)."""
    path, deadline = Path(out_dir) / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if text[: text.rfind("\n") + 1].count('"loss"') >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path}: fewer than {n} steps logged after {timeout} s")


def wait_for_text(path, text, proc, timeout=120):
    """Wait until the file a subprocess writes its output to holds text; fail (not hang) if the process
    ends first or the timeout passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in Path(path).read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before printing {text!r}: "
                                 f"{Path(path).read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)
    raise TimeoutError(f"{path}: no {text!r} after {timeout} s")
