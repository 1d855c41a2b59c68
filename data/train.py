"""
What train_gpt.py and finetune_sft.py do alike around their training loops: continue a run from its
checkpoint, set each group's rate at a step, read a step's figures in one host sync and stop on
non-finite ones (the NaN guard), the val loss, and the end of a run. The loops, and what a step
computes, stay in the scripts.
"""

import math
import sys

import torch
import torch.distributed as dist

from data import UserError
from data.checkpoint import last_good_checkpoint, set_rng_states
from data.run import changed_settings, param_norm


def resume_optimizers(checkpoint, model, config, source):
    """configure_optimizers' optimizers for settings `config`, holding the checkpoint's moments and step
    counts. Settings changed since the checkpoint apply from here: each group keeps what config gives it,
    where load_state_dict alone would bring back the saved betas, eps and weight decay.

    A checkpoint from before per-group rates held its AdamW in two groups, the 2-D and the 1-D parameters
    (outside the block matrices under Muon), at one rate and with weight decay on the 2-D group: that AdamW
    is rebuilt in that layout, so its moments load where they were."""
    saved = checkpoint["optimizers"]
    was = checkpoint["config"].get("optimizer", config["optimizer"])
    if was != config["optimizer"]:
        raise UserError(f"{source}: a resumed run keeps its optimizer (optimizer {was} -> {config['optimizer']}): "
                        "the moments of one cannot continue in the other; drop --optimizer, or start a new run")
    optimizers = model.configure_optimizers(config)
    sizes = [len(g["params"]) for g in saved[0]["param_groups"]]
    if sizes != [len(g["params"]) for g in optimizers[0].param_groups]:
        optimizers[0] = legacy_adamw(model, config, sizes, source)
    for opt, state in zip(optimizers, saved, strict=True):
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(state)
        for group, own in zip(opt.param_groups, settings, strict=True):
            group.update(own)
    return optimizers


def legacy_adamw(model, config, sizes, source):
    """The two-group AdamW of a checkpoint from before per-group rates, with config's betas, eps and decay."""
    params = [p for n, p in model.named_parameters()
              if config["optimizer"] == "adamw" or not (n.startswith("transformer.h.") and p.dim() == 2)]
    layout = [[p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]]
    if [len(ps) for ps in layout] != sizes:
        raise UserError(f"{source}: its AdamW groups fit neither today's layout nor the one before per-group rates")
    probe = model.configure_optimizers(config)[0]  # the rates config gives the groups this AdamW merges
    rates = {g["lr"] for g in probe.param_groups} | ({config["matrix_lr"]} if config["optimizer"] == "adamw" else set())
    if len(rates) > 1:
        raise UserError(f"{source}: its AdamW predates per-group rates and runs all its parameters at one rate; "
                        f"resume with embedding_lr, head_lr and scalar_lr (and matrix_lr under optimizer=adamw) "
                        f"equal and lr_ref_width=0, as the checkpoint's settings have them")
    return torch.optim.AdamW([dict(name="2-D", params=layout[0], weight_decay=config["adam_weight_decay"]),
                              dict(name="1-D", params=layout[1], weight_decay=0.0)], lr=rates.pop(),
                             betas=(config["adam_beta1"], config["adam_beta2"]), eps=config["adam_eps"])


def restore(checkpoint, loader):
    """Continue a run where its checkpoint stopped: the loader's position and every RNG, so the resumed run
    takes bitwise the steps the uninterrupted one would have. Returns (step, best_val_loss, evaluated)."""
    loader.load_state_dict(checkpoint["loader"])
    set_rng_states(checkpoint["rng"])
    return checkpoint["step"], checkpoint["best_val_loss"], checkpoint["evals_done"]


def resume_notes(saved, config, step, lr_factor):
    """What the log says when a run resumes: every setting that differs from the checkpoint's (each applies
    from here), and a warning when the schedule's factor jumps at this step (lr_factor: the script's)."""
    changed = changed_settings(saved, config, [k for k in config if k not in ("init_from", "out_dir")])
    notes = [f"resume: these settings differ from the checkpoint's and apply from here: {', '.join(changed)}"
             if changed else "resume: the settings are the checkpoint's"]
    was, now = lr_factor(step, saved), lr_factor(step, config)
    if not math.isclose(was, now):
        notes.append(f"warning: the schedule's factor at step {step} jumps {was:.3f} -> {now:.3f}; to lengthen a "
                     "run smoothly, set lr_decay_iters to its final length from the start")
    return notes


def set_rates(optimizers, base_lrs, factor, momentum):
    """Each group's rate at this step: its peak (base_lrs, per optimizer and group) times the schedule's
    factor; Muon's momentum too."""
    for opt, lrs in zip(optimizers, base_lrs, strict=True):
        for group, lr in zip(opt.param_groups, lrs, strict=True):
            group["lr"] = lr * factor
            if isinstance(opt, torch.optim.Muon):
                group["momentum"] = momentum


def group_rates(optimizers, base_lrs):
    """Each group's peak rate, for the log: 'matrices (Muon) 0.04, embedding+head (AdamW) 0.008, ...'."""
    return ", ".join(f"{group.get('name', f'group {i}')} ({type(opt).__name__}) {lr:.3g}"
                     for opt, lrs in zip(optimizers, base_lrs, strict=True)
                     for i, (group, lr) in enumerate(zip(opt.param_groups, lrs, strict=True)))


def read_figures(loss, grad_norm, model, logits):
    """A step's figures, read in one host sync: the loss, the gradient norm before clipping, the weights'
    norm, the output matrix's norm (gpt2's tied embedding) and the logits' spread, their std over the vocab
    averaged over the rows of `logits` (B, vocab): a sample. The last two rise before a loss spike does."""
    head = model.lm_head.weight.detach()
    spread = logits.float().std(dim=-1).mean()
    values = torch.stack([loss.float(), grad_norm.float(), param_norm(model).float(), head.norm().float(), spread])
    return dict(zip(("loss", "grad_norm", "param_norm", "head_norm", "logit_std"), values.tolist(), strict=True))


def stop_if_diverged(figures, step, out_dir, log):
    """The NaN guard: a step whose loss, gradients or resulting weights are not finite stops the run before
    they are ever evaluated, sampled or saved."""
    if all(map(math.isfinite, (figures["loss"], figures["grad_norm"], figures["param_norm"]))):
        return
    log.print(f"step {step}: loss {figures['loss']}, grad norm {figures['grad_norm']}, param norm "
              f"{figures['param_norm']}: stopping; {last_good_checkpoint(out_dir)} (try a lower learning rate or "
              "grad_clip)")
    sys.exit(1)


@torch.no_grad()
def evaluate(model, batches, autocast, stop_requested, ddp, device):
    """The mean loss per target token (targets of -1 do not count) over the fixed val batches, all ranks
    together; None when a stop signal cut it short (under DDP the ranks must agree, so it runs on)."""
    model.eval()
    total = torch.zeros(2, device=device)
    for x, y in batches:
        if stop_requested.signals and not ddp:
            model.train()
            return None
        with autocast:
            _, loss = model(x, y)
        n = (y != -1).sum()
        total += torch.stack([loss.float() * n, n.float()])
    if ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def finish(ddp):
    """The end of a run on every rank."""
    if ddp:
        dist.barrier()  # gloo aborts a rank that leaves while another is still writing the checkpoint
        dist.destroy_process_group()
