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

A checkpoint written by an older version resumes as it would have run there: upgrade_settings and
upgrade_optimizers restate its settings and optimizer states in today's terms.
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
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = upgrade_settings(ckpt["config"])
    return ckpt


# The settings that make a training recipe: finetune_sft.py takes them from its base checkpoint, scaling RATES.
RATES = ("learning_rate", "muon_lr", "embedding_lr", "head_lr", "scalar_lr")
OPTIMIZER_SETTINGS = (*RATES, "optimizer", "weight_decay", "beta1", "beta2", "muon_momentum", "muon_momentum_warmup",
                      "muon_weight_decay", "lr_ref_width", "adam_beta1", "adam_beta2", "adam_eps", "adam_weight_decay")


def last_good_checkpoint(out_dir):
    """What a run that stops on non-finite numbers says about the checkpoint it leaves."""
    path = Path(out_dir) / "ckpt.pt"
    return f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint was written before it"


def upgrade_settings(saved):
    """A checkpoint's settings with the settings added since it was written, set as its run behaved.
    Before per-group learning rates (commit aa02ff6 and earlier), muon mode's AdamW ran every parameter
    outside the block matrices at learning_rate, betas (beta1, beta2), eps 1e-8, weight_decay on the
    embeddings and head, at every width, and Muon's momentum had no warmup; finetune_sft.py's rates were
    its own (lr_scale 1)."""
    if "learning_rate" in saved and "embedding_lr" not in saved:
        lr = saved["learning_rate"]
        saved = {**saved, "embedding_lr": lr, "head_lr": lr, "scalar_lr": lr, "lr_ref_width": 0,
                 "adam_beta1": saved["beta1"], "adam_beta2": saved["beta2"], "adam_eps": 1e-8,
                 "adam_weight_decay": saved["weight_decay"], "muon_momentum_warmup": 0, "lr_scale": 1.0}
    return saved


def upgrade_optimizers(ckpt, model, optimizers):
    """The optimizers that resume ckpt: `optimizers` (configure_optimizers' for the upgraded settings), unless
    the checkpoint predates per-group rates. Its AdamW then held two groups, the 2-D parameters outside the
    blocks and the 1-D ones, all at learning_rate: that AdamW is rebuilt in that layout, so the saved moments
    and group settings (betas, eps, weight decay) load as they were."""
    saved = ckpt["optimizers"][0]["param_groups"]
    sizes = [len(g["params"]) for g in saved]
    if len(optimizers) != 2 or sizes == [len(g["params"]) for g in optimizers[0].param_groups]:
        return optimizers
    outside = [p for n, p in model.named_parameters() if not (n.startswith("transformer.h.") and p.dim() == 2)]
    layout = [[p for p in outside if p.dim() >= 2], [p for p in outside if p.dim() < 2]]
    if [len(ps) for ps in layout] != sizes:
        raise UserError("the checkpoint's AdamW groups fit neither today's layout nor the one before per-group rates")
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps, "lr": ckpt["config"]["learning_rate"]}
              for g, ps in zip(saved, layout, strict=True)]
    return [torch.optim.AdamW(groups), optimizers[1]]


def check_resumable(ckpt, path):
    """A one-line error unless the checkpoint holds all that resuming its run exactly needs."""
    for key, kind in TRAINING_KEYS.items():
        if not isinstance(ckpt.get(key), kind):
            raise UserError(f"{path}: has no valid {key!r}, so the run cannot continue exactly from it; "
                            "fine-tune or sample from it instead, or train a new run")
