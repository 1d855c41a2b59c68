"""
A run's plumbing, shared by the stage scripts: what may change on resume, the run dir (overwrite
guard, lock, log), device and autocast, DDP and stop signals. Nothing here decides what a run
computes; the scripts do. Settings parsing is in data/settings.py.
"""

import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import REPO_ROOT, UserError, refuse_clobber


def changed_settings(saved, config, keys):
    """`key old -> new` for each of keys whose value differs between a checkpoint's settings and this run's."""
    return [f"{k} {saved[k]} -> {config[k]}" for k in keys if k in saved and k in config and saved[k] != config[k]]


def refuse_architecture_change(saved, config, source, fields):
    """A resumed run keeps the model's shape: fields, the GPTConfig fields (settings of those names)."""
    changed = changed_settings(saved, config, fields)
    if changed:
        raise UserError(f"{source}: a resumed run keeps its architecture ({', '.join(changed)}); drop those flags, "
                        "or train the new shape from scratch in another out_dir")


RUN_FILES = ("log.txt", "metrics.jsonl", "config.json", "curves.png", "run.lock", "ckpt.pt", "ckpt.pt.tmp", "code")


def refuse_run_dir_clobber(out_dir, reads):
    """A run writes out_dir's own files (RunLog's, the checkpoints): none of them may be an input of the run,
    and out_dir may not be one either. reads: (path, setting) pairs, as for refuse_clobber."""
    names = [Path(out_dir) / name for name in RUN_FILES]
    refuse_clobber([(out_dir, "--out_dir", False), *((n, "--out_dir", n.name == "code") for n in names)], reads)


def refuse_to_overwrite(out_dir):
    """A new run must not destroy another run's checkpoints."""
    if any(Path(out_dir).glob("ckpt*.pt")):
        raise UserError(f"{out_dir} already holds a run's checkpoint; continue it with --init_from=resume, or start "
                        f"over in another --out_dir (or delete {out_dir} first)")


def lock_run_dir(out_dir):
    """Create out_dir and hold an advisory lock on it for this process's life (the OS drops it when the
    process dies, however it dies), so two runs never write one run dir at once. Keep the returned file."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / "run.lock", "a")
    except OSError as e:
        raise UserError(f"cannot write to out_dir={out_dir} ({e.strerror}); pick another --out_dir") from None
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, no guard
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"another run is using out_dir={out_dir} (it holds {path / 'run.lock'}); wait for it to "
                        "end or pick another --out_dir") from None
    return handle


# -----------------------------------------------------------------------------
# device, distributed, signals


def pick_device(device="auto"):
    """The device to run on: `device` itself, or for "auto" the best one here (cuda > mps > cpu)."""
    if device != "auto":
        kind = device.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device={device}, but this torch ({torch.__version__}) sees no CUDA GPU; "
                            "use --device=cpu or install a CUDA build of torch")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device={device}, but MPS is not available here; use --device=cpu")
        if kind not in ("cuda", "mps", "cpu"):
            raise UserError(f"--device={device}: use auto, cuda, cuda:N, mps or cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_autocast(device, dtype="auto"):
    """(dtype, context) for the forward passes: "auto" is bfloat16 autocast on CUDA, float32 elsewhere."""
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"--dtype={dtype}: use bfloat16 or float32")
    if dtype == "float32":
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


PEAK_FLOPS = {  # dense bf16 tensor-core FLOP/s by GPU name (vendor datasheets); the first match wins
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A6000": 155e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
}


def gpu_peak_flops(device):
    """The peak bf16 FLOP/s of the GPU at device, for MFU; 0.0 off CUDA or for a GPU not in PEAK_FLOPS."""
    if torch.device(device).type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def init_distributed(device):
    """Join the process group when launched by torchrun; returns (ddp, rank, world_size, device)."""
    device = pick_device(device)
    if "RANK" not in os.environ:
        return False, 0, 1, device
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def duration(seconds):
    """A time at a glance: 42 -> '42s', 125 -> '2m05s', 3725 -> '1h02m'."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def param_norm(model):
    """The global L2 norm of model's weights: a 0-d tensor on their device, no host sync. Its fp32 squares
    overflow to inf once any weight passes ~1e19, so blown-up weights read as non-finite too."""
    return torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()])


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, checkpoint and exit cleanly, instead of dying mid-write.
    A second signal exits at once, without a checkpoint (the last one written stays good)."""

    def __init__(self):
        self.signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signals:
            print("second stop signal: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signals.append(signum)
        print("stop signal: finishing this step, then writing a checkpoint (again to exit at once)",
              file=sys.stderr, flush=True)

    def __call__(self, ddp, device):
        """True when a signal came; under DDP when one came to any rank, so all stop at the same step
        (one rank leaving alone would leave the others waiting in all_reduce forever)."""
        stop = bool(self.signals)
        if ddp:
            import torch.distributed as dist

            flag = torch.tensor(float(stop), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


# -----------------------------------------------------------------------------
# the run log


def versions():
    """One line naming what produced a run, so a log can be rerun."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or "none"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"python {platform.python_version()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
            f"gpu {gpu} | numpy {np.__version__} | git {commit}")


def start_wandb(project, name, config):
    """The wandb module with a run started (offline too: WANDB_MODE=offline). Called before anything is
    written, so a missing package or login is a one-line refusal that leaves no run dir."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb, or pass --wandb_log=False") from None
    try:
        wandb.init(project=project, name=name or None, config=config)
    except Exception as e:  # wandb raises its own types (UsageError, CommError, ...) for login and network
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"wandb_log=True: wandb.init failed ({reason}); run wandb login, set WANDB_MODE=offline, "
                        "or pass --wandb_log=False") from None
    return wandb


class RunLog:
    """out_dir/log.txt (readable), out_dir/metrics.jsonl (one JSON object per logged step) and
    out_dir/curves.png (data/curves.py), redrawn at each eval record and by close().

    A run begins its log with the command, versions and resolved config, and copies the code that
    produced it (the script and data/*.py) to out_dir/code/. On resume from `resume_step`, what
    the interrupted run logged after that step is dropped from both files, since the resumed run
    logs those steps again; a line torn by a crash is dropped too."""

    def __init__(self, out_dir, script, config, resume_step=None, enabled=True, wandb=None):
        self.out_dir, self.enabled, self.wandb = Path(out_dir), enabled, wandb  # wandb: start_wandb's, or None
        self.curves, self.undrawn = True, False  # curves: False once drawing failed; undrawn: records to draw
        self.metrics_path, self.log_path = self.out_dir / "metrics.jsonl", self.out_dir / "log.txt"
        if not enabled:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.metrics_path.write_text("")
                self.log_path.write_text("")
            else:
                self._truncate(resume_step)
            code = self.out_dir / "code"
            (code / "data").mkdir(parents=True, exist_ok=True)
            (code / Path(script).name).write_text(Path(script).read_text())
            for path in sorted((REPO_ROOT / "data").glob("*.py")):
                (code / "data" / path.name).write_text(path.read_text())
            (self.out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        except OSError as e:  # a full disk: the checkpoint and the logs so far are as they were
            raise UserError(f"cannot write the run's files in {self.out_dir} ({e.strerror}); free disk space there "
                            "and start again (a resume continues from the checkpoint, which is untouched)") from None
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        self.print(f"=== {when} {'resumed at step ' + str(resume_step) if resume_step is not None else 'new run'}")
        self.print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        self.print(versions())
        self.print("config: " + json.dumps(config))

    def _truncate(self, resume_step):
        def metric_step(line):
            try:
                return json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                return None  # torn by a crash mid-write

        def log_step(line):
            head = line.split(":")[0].split()
            return int(head[1].split("/")[0]) if len(head) >= 2 and head[0] == "step" and head[1][0].isdigit() else 0

        for path, step_of in ((self.metrics_path, metric_step), (self.log_path, log_step)):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                kept = [line for line in lines if (n := step_of(line)) is not None and n <= resume_step]
                tmp = path.with_name(f".{path.name}.tmp")  # through a temp file: a full disk keeps the old log
                try:
                    tmp.write_text("".join(line + "\n" for line in kept))
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
    def print(self, text):
        if not self.enabled:
            return
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def evals(self, step, record):
        """A step's evaluations ({"val_loss": ..., ...}): a line in log.txt, a record in metrics.jsonl."""
        self.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" if type(v) is float else f"{k} {v}"
                                                for k, v in record.items()))
        self.metrics({"step": step, **record})

    def metrics(self, record):
        """Append one record ({"step": ..., ...}) to metrics.jsonl, and to wandb when it is on."""
        if not self.enabled:
            return
        record = {k: None if type(v) is float and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.metrics_path, "a") as f:  # NaN is not JSON: a reader of metrics.jsonl gets null
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self.undrawn = True
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if "val_loss" in record:
            self.draw()

    def draw(self):
        """Redraw out_dir/curves.png. A picture is never worth a run: without matplotlib, or on any
        failure to draw, one note and no more pictures."""
        if not (self.enabled and self.curves and self.undrawn):
            return
        try:
            from data.curves import draw_curves

            draw_curves([self.out_dir], self.out_dir / "curves.png")
            self.undrawn = False
        except ModuleNotFoundError as e:
            self.curves = False
            name = (e.name or "matplotlib").split(".")[0]
            self.print(f"note: no {self.out_dir / 'curves.png'}: drawing it needs {name} (pip install {name})")
        except Exception as e:
            self.curves = False
            self.print(f"note: no more {self.out_dir / 'curves.png'}: drawing failed ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})")

    def close(self):
        """The end of a run: the final picture, unless the last eval drew everything already."""
        self.draw()
