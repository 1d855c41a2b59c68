"""
Checkpoints: atomic writes, finding one from a path or run dir, safe loading, RNG state.

A checkpoint is a dict of plain tensors and types, loadable with torch.load(weights_only=True):

    model          the weights (state_dict of the uncompiled model)
    model_config   the GPTConfig fields, to rebuild the model
    chat           True when written by finetune_sft.py (sample.py then uses the chat template)
    config         the run's resolved settings
    step           optimizer steps taken
    best_val_loss  the lowest val loss seen so far
    optimizers     one state_dict per optimizer (AdamW, then Muon when used)
    loader         the train loader's state_dict (one counter plus what must match on resume)
    rng            python, numpy, torch and cuda RNG states (rng_states below)

A checkpoint written by an older version resumes as it would have run there: upgrade_settings restates
its settings in today's terms (data/train.py resume_optimizers its optimizer layout).
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from data import REPO_ROOT, UserError


def rng_states():
    """Every RNG a run draws from, as plain types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states):
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    name, key, *rest = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(obj, out_dir, step, keep_last=0):
    """Write out_dir/ckpt.pt atomically (temp file + rename). With keep_last > 0 also keep
    ckpt_STEP.pt for the last `keep_last` saves (hard links: no extra disk)."""
    out_dir = Path(out_dir)
    tmp = out_dir / "ckpt.pt.tmp"
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its zip writer
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {tmp} ({e}); free disk space in {out_dir} (the last good checkpoint, "
                        "if any, is untouched) and resume with --init_from=resume") from None
    if keep_last > 0:
        numbered = out_dir / f"ckpt_{step:07d}.pt"
        numbered.unlink(missing_ok=True)
        try:
            os.link(tmp, numbered)
        except OSError:  # a file system without hard links
            shutil.copyfile(tmp, numbered)
        for old in sorted(out_dir.glob("ckpt_*.pt"))[:-keep_last]:
            old.unlink()
    os.replace(tmp, out_dir / "ckpt.pt")


def resolve_checkpoint(path):
    """A checkpoint file, or a run dir holding ckpt.pt; '' means the newest logs/*/ckpt.pt."""
    if not path:
        found = sorted((REPO_ROOT / "logs").glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no checkpoint found under {REPO_ROOT / 'logs'}/*/ckpt.pt; train one with "
                            "python train_gpt.py or pass --ckpt=PATH")
        return found[-1]
    p = Path(path)
    if p.is_dir():
        if (p / "ckpt.pt").is_file():
            return p / "ckpt.pt"
        raise UserError(f"run dir {p} has no ckpt.pt; pass a checkpoint file or a run dir that has one")
    if p.is_file():
        return p
    raise UserError(f"checkpoint {p} not found (looked for the file and for {p}/ckpt.pt)")


TRAINING_KEYS = {"config": dict, "step": int, "best_val_loss": float, "optimizers": list, "loader": dict,
                 "rng": dict, "chat": bool, "evals_done": bool}


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint with weights_only=True: plain tensors and types, no pickled code. A file that
    is not one of ours is a one-line error."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a checkpoint written by train_gpt.py or finetune_sft.py (no model weights)")
    config = ckpt.get("model_config")
    if not isinstance(config, dict) or not all(isinstance(k, str) and type(v) in (int, float, bool, str)
                                               for k, v in config.items()):
        raise UserError(f"{path}: its model_config is missing or damaged; it cannot rebuild a model")
    bad = next((name for name, w in ckpt["model"].items() if isinstance(w, torch.Tensor) and w.is_floating_point()
                and not torch.isfinite(w).all()), None)
    if bad is not None:  # one check here, so no stage scores, samples, tunes or exports such weights
        raise UserError(f"{path}: weight {bad} holds NaN or inf, so the model cannot run; use an earlier checkpoint "
                        "(ckpt_STEP.pt beside it) or train again")
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = upgrade_settings(ckpt["config"], config)
    return ckpt


# The settings that make a training recipe: finetune_sft.py takes them from its base checkpoint, scaling RATES.
RATES = ("matrix_lr", "embedding_lr", "head_lr", "scalar_lr")
OPTIMIZER_SETTINGS = (*RATES, "optimizer", "lr_ref_width", "head_lr_exponent", "muon_momentum", "muon_momentum_warmup",
                      "muon_weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "adam_weight_decay")


def last_good_checkpoint(out_dir):
    """What a run that stops on non-finite numbers says about the checkpoint it leaves."""
    path = Path(out_dir) / "ckpt.pt"
    return f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint was written before it"


def upgrade_settings(saved, model_config):
    """A checkpoint's settings restated in today's names, with the values that make its run continue as it
    ran. Two layouts came before today's:

    1. Before per-group rates, muon mode's AdamW ran every parameter outside the block matrices at
       learning_rate, betas (beta1, beta2), eps 1e-8 and weight_decay, at every width; Muon's momentum had
       no warmup, and finetune_sft.py's rates were its own (lr_scale 1).
    2. Then per-group rates (muon_lr for Muon) with nanochat's width rule: the token embedding (gpt2's tied
       head too) at embedding_lr and an untied head at head_lr, both x sqrt(lr_ref_width / n_embd);
       optimizer="adamw" took learning_rate, beta1, beta2 and weight_decay for every parameter.

    3. Then the tied matrix became a head at head_lr, with muP's width rule (head x lr_ref_width / n_embd,
       the embedding unscaled).

    Today the head's width rule has an exponent, head_lr_exponent (1 restates rule 3), Muon's rate is
    matrix_lr, both optimizers share the adam_* settings, and finetune_sft.py counts its step in examples
    (total_batch_size) where it counted micro-batches.
    model_config (the checkpoint's) gives the width and whether the head is tied."""
    saved = dict(saved)
    if "learning_rate" in saved and "embedding_lr" not in saved:  # 1 -> 2
        lr = saved["learning_rate"]
        saved = {**saved, "embedding_lr": lr, "head_lr": lr, "scalar_lr": lr, "lr_ref_width": 0,
                 "adam_beta1": saved["beta1"], "adam_beta2": saved["beta2"], "adam_eps": 1e-8,
                 "adam_weight_decay": saved["weight_decay"], "muon_momentum_warmup": 0, "lr_scale": 1.0}
    if "muon_lr" in saved:  # 2 -> today
        old = {k: saved.pop(k) for k in ("muon_lr", "learning_rate", "beta1", "beta2", "weight_decay",
                                         "grad_clip_late", "grad_clip_late_step") if k in saved}
        if saved.get("optimizer") == "adamw":
            lr = old["learning_rate"]
            saved.update(matrix_lr=lr, embedding_lr=lr, head_lr=lr, scalar_lr=lr, lr_ref_width=0,
                         adam_beta1=old["beta1"], adam_beta2=old["beta2"], adam_eps=1e-8,
                         adam_weight_decay=old["weight_decay"])
        else:
            width, ref = model_config["n_embd"], saved["lr_ref_width"]
            was = (ref / width) ** 0.5 if ref else 1.0  # what rule 2 multiplied both rates by
            head = saved["embedding_lr"] if model_config.get("arch", "gpt2") == "gpt2" else saved["head_lr"]
            saved.update(matrix_lr=old["muon_lr"], embedding_lr=saved["embedding_lr"] * was,
                         head_lr=head * was * (width / ref if ref else 1.0))
    if "lr_ref_width" in saved and "head_lr_exponent" not in saved:  # 1, 2 and 3 -> today
        saved["head_lr_exponent"] = 1.0
    if "gradient_accumulation_steps" in saved:  # finetune_sft.py counted its step in micro-batches of batch_size
        saved["total_batch_size"] = saved.pop("gradient_accumulation_steps") * saved["batch_size"]
    return saved


def check_resumable(ckpt, path):
    """A one-line error unless the checkpoint holds all that resuming its run exactly needs."""
    for key, kind in TRAINING_KEYS.items():
        if not isinstance(ckpt.get(key), kind):
            raise UserError(f"{path}: has no valid {key!r}, so the run cannot continue exactly from it; "
                            "fine-tune or sample from it instead, or train a new run")
