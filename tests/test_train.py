"""train_gpt.py: the model's basic contracts, the optimizer split, the learning-rate schedule, and whole
runs as a user starts them (configs/smoke.toml on the bundled FineWeb-Edu sample): metrics, checkpoints,
exact resume, DDP, the NaN guard, signals, and every refusal as one line."""

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO_ROOT as ROOT
from helpers import (
    SAMPLES,
    assert_one_line_error,
    load_model_namespace,
    metrics,
    run_cli,
    run_script,
    script_head,
    script_settings,
    train_records,
    wait_for_steps,
    wait_for_text,
)

from data import UserError
from data.checkpoint import upgrade_settings
from data.fineweb_edu import main as prep
from data.run import StopRequest, gpu_peak_flops, lock_run_dir
from data.settings import parse_config

NS = load_model_namespace(ROOT / "train_gpt.py")
GPT, GPTConfig = NS["GPT"], NS["GPTConfig"]
SETTINGS = script_settings("train_gpt.py")  # the defaults
TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
ARCHS = ["gpt2", "llama"]


def tiny_model(arch, **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, **{**TINY, **overrides}))


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_loss_is_near_uniform(arch):
    x, y = torch.randint(0, 50304, (2, 4, 32), generator=torch.Generator().manual_seed(1))
    _, loss = tiny_model(arch)(x, y)  # y independent of x: a tied head would otherwise favour the input token
    assert abs(loss.item() - math.log(50304)) < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(arch):
    model = tiny_model(arch, vocab_size=512)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 512
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_receives_a_gradient(arch):
    model = tiny_model(arch, vocab_size=512)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_overfits_one_batch(arch, optimizer):
    model = tiny_model(arch, vocab_size=512)
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    opts = model.configure_optimizers({**SETTINGS, "optimizer": optimizer, "matrix_lr": 0.05 if optimizer == "muon"
                                       else 1e-2, "embedding_lr": 1e-2, "head_lr": 1e-2, "scalar_lr": 1e-2,
                                       "lr_ref_width": 0})
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert loss.item() < 0.5


def test_lr_schedules():
    lr_factor = script_head("train_gpt.py")["lr_factor"]
    run = {**SETTINGS, "max_iters": 100, "warmup_iters": 10, "min_lr_frac": 0.1, "lr_decay_iters": 0}
    cosine = [lr_factor(s, run) for s in range(101)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == 1.0 and cosine[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[9:-1], cosine[10:], strict=True))  # never rises after warmup
    wsd = [lr_factor(s, {**run, "lr_schedule": "wsd", "min_lr_frac": 0.0, "decay_frac": 0.2}) for s in range(101)]
    assert wsd[10:81] == [1.0] * 71 and wsd[90] == pytest.approx(0.5) and wsd[100] == 0.0
    no_warmup = [lr_factor(s, {**run, "lr_schedule": "wsd", "warmup_iters": 0}) for s in range(3)]
    assert no_warmup == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA GeForce RTX 4090", 165e12),
                                        ("Some New GPU", 0.0)])
def test_mfu_peak_is_looked_up_by_gpu_name_and_the_first_match_wins(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_peak_flops("cuda:0") == peak
    assert gpu_peak_flops("cpu") == 0.0  # no MFU off CUDA


def test_muon_momentum_warms_up_from_085():
    momentum_at = script_head("train_gpt.py")["muon_momentum_at"]
    run = {**SETTINGS, "muon_momentum": 0.95, "muon_momentum_warmup": 100}
    assert [momentum_at(s, run) for s in (0, 50, 100, 1000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert momentum_at(0, {**run, "muon_momentum_warmup": 0}) == 0.95


def test_ignored_targets_give_zero_loss_not_nan():
    model = tiny_model("gpt2", vocab_size=512)
    x = torch.randint(0, 512, (2, 8))
    _, loss = model(x, torch.full_like(x, -1))
    assert loss.item() == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_muon_takes_the_block_matrices_and_adamw_the_rest_in_groups_at_their_own_rates(arch):
    model = tiny_model(arch)  # n_embd 32
    named = dict(model.named_parameters())
    settings = {**SETTINGS, "optimizer": "muon", "matrix_lr": 0.03, "embedding_lr": 0.2, "head_lr": 0.005,
                "scalar_lr": 0.04, "lr_ref_width": 128, "head_lr_exponent": 0.5, "adam_weight_decay": 0.01}
    adamw, muon = model.configure_optimizers(settings)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    block_matrices = {n for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {n for n, p in named.items() if any(p is q for q in muon.param_groups[0]["params"])} == block_matrices
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in block_matrices)
    assert muon.param_groups[0]["lr"] == 0.03
    names = lambda group: {n for n, p in named.items() if any(p is q for q in group["params"])}  # noqa: E731
    width = (128 / 32) ** 0.5  # head_lr is set at lr_ref_width; this model is 32 wide; the embedding's is not scaled
    token, rest, *head = adamw.param_groups
    assert names(token) == {"transformer.wte.weight"}  # gpt2's is the tied head too
    assert names(rest) == {n for n, p in named.items() if p.dim() == 1} | ({"transformer.wpe.weight"} if arch == "gpt2"
                                                                           else set())
    assert [names(g) for g in head] == ([] if arch == "gpt2" else [{"lm_head.weight"}])
    lrs = [0.005 * width, 0.04] if arch == "gpt2" else [0.2, 0.04, 0.005 * width]  # a tied matrix is a head
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx(lrs)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0] + ([] if arch == "gpt2" else [0.01])
    assert [g["name"] for g in adamw.param_groups] == (["embedding+head", "rest"] if arch == "gpt2" else
                                                       ["embedding", "rest", "head"])
    assert adamw.defaults["betas"] == (SETTINGS["adam_beta1"], SETTINGS["adam_beta2"])
    assert adamw.defaults["eps"] == SETTINGS["adam_eps"]
    unscaled, _ = model.configure_optimizers({**settings, "lr_ref_width": 0})
    assert [g["lr"] for g in unscaled.param_groups] == ([0.005, 0.04] if arch == "gpt2" else [0.2, 0.04, 0.005])
    mup, _ = model.configure_optimizers({**settings, "head_lr_exponent": 1.0})  # muP's rule: 1 / width
    assert mup.param_groups[0 if arch == "gpt2" else 2]["lr"] == pytest.approx(0.005 * 128 / 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_mode_is_nanogpts_recipe(arch):
    """configs/recipe_nanogpt.toml takes nanoGPT's train.py step, bitwise, whatever Muon's settings say."""
    model, reference = tiny_model(arch), tiny_model(arch)
    recipe = parse_config(SETTINGS, ["configs/recipe_nanogpt.toml", *(f"--{k}=1e-3" for k in
                                                                      ("matrix_lr", "embedding_lr", "head_lr",
                                                                       "scalar_lr"))])
    (ours,) = model.configure_optimizers({**recipe, "muon_momentum": 0.5, "muon_weight_decay": 0.3})
    params = list(reference.parameters())  # nanoGPT's configure_optimizers: decay every >= 2-D tensor
    theirs = torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=0.1),
                                dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                               lr=1e-3, betas=(0.9, 0.95))
    x = torch.randint(0, 50304, (2, 17), generator=torch.Generator().manual_seed(1))
    for m, opt in ((model, ours), (reference, theirs)):
        for _ in range(3):
            m(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- whole runs

SMOKE = ("configs/smoke.toml", "--device=cpu", "--sample_interval=0", "--hellaswag_interval=0", "--eval_interval=1000",
         "--log_interval=1", "--warmup_iters=2", "--checkpoint_interval=10")


def train(out_dir, *args):
    """train_gpt.py on the bundled sample, in this process; returns the script's globals."""
    return run_script("train_gpt.py", *SMOKE, f"--out_dir={out_dir}", *args)


def train_cmd(out_dir, *args):
    return [sys.executable, "train_gpt.py", *SMOKE, f"--out_dir={out_dir}", *args]


def test_smoke_run_logs_each_step_and_evaluates_at_its_intervals(smoke_run):
    records = metrics(smoke_run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert set(steps[0]) >= {"loss", "lr_factor", "grad_norm", "param_norm", "head_norm", "logit_std",
                             "tokens_per_sec", "epoch"}
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert [r["step"] for r in records if 0 <= r.get("hellaswag", -1) <= 1] == [3, 6]


def test_smoke_run_writes_a_weights_only_checkpoint_of_its_last_step(smoke_run):
    ckpt = torch.load(smoke_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["chat"] is False and ckpt["model_config"]["arch"] == "gpt2"
    assert ckpt["loader"]["position"] == 6 * 2  # 2 micro-batches per step in the smoke config
    assert ckpt["evals_done"] is True


def test_smoke_run_dir_holds_the_versions_settings_and_code_that_produced_it(smoke_run):
    log = (smoke_run / "log.txt").read_text()
    assert "torch " + torch.__version__ in log and "step 3 sample: Once upon a time" in log
    assert (smoke_run / "code" / "train_gpt.py").read_text() == (ROOT / "train_gpt.py").read_text()
    for module in (ROOT / "data").glob("*.py"):
        assert (smoke_run / "code" / "data" / module.name).read_text() == module.read_text()
    assert json.loads((smoke_run / "config.json").read_text())["max_iters"] == 6


def test_the_smoke_preset_never_logs_a_loss_above_its_first(tmp_path):
    """A newcomer's first run starts at chance and goes down: the preset as shipped (its warmup of 60 steps),
    every step logged, through the end of warmup and 10 steps past it, where round 1's recipe logged 14.5
    against a start of 10.8 (bench/RECIPE.md). lr_decay_iters keeps the 200-step run's schedule exactly."""
    out = tmp_path / "run"
    run_script("train_gpt.py", "configs/smoke.toml", "--device=cpu", f"--out_dir={out}", "--max_iters=70",
               "--lr_decay_iters=200", "--log_interval=1", "--eval_interval=35", "--hellaswag_interval=0",
               "--sample_interval=0")
    records = metrics(out)
    start = next(r["val_loss"] for r in records if r["step"] == 0 and "val_loss" in r)
    logged = [(r["step"], r[k]) for r in records for k in ("loss", "val_loss") if k in r]
    worst = max(logged, key=lambda point: point[1])
    assert len(logged) == 70 + 3 and worst[1] <= start + 0.1, (start, worst)


def test_the_log_says_how_many_epochs_the_run_takes_and_warns_above_one(tmp_path):
    train(tmp_path / "short", "--max_iters=2")  # the bundled sample: 848 windows of 64 tokens, 512 tokens a step
    log = (tmp_path / "short" / "log.txt").read_text()
    assert "this run: 2 steps x 512 tokens = 1,024 tokens, 0.0189 epochs of the train split" in log
    assert "warning: the run repeats" not in log
    docs = tmp_path / "docs.jsonl"  # 4 documents: a train split a few steps cover
    docs.write_text("".join((SAMPLES / "fineweb_edu_100.jsonl").read_text().splitlines(keepends=True)[:4]))
    prep(["--source", str(docs), "--out_dir", str(tmp_path / "small"), "--val_fraction=0.3", "--num_proc=1"])
    ns = train(tmp_path / "long", f"--data_dir={tmp_path / 'small'}", "--val_tokens=128", "--max_iters=8")
    log = (tmp_path / "long" / "log.txt").read_text()
    assert ns["epochs"] > 1 and f"warning: the run repeats the train split {ns['epochs']:.3g} times" in log


def test_a_val_split_smaller_than_val_tokens_is_a_warning_and_bos_mode_says_its_share(tmp_path):
    train(tmp_path / "fits", "--max_iters=1", "--val_tokens=2048")
    assert "warning: the val split" not in (tmp_path / "fits" / "log.txt").read_text()
    ns = train(tmp_path / "short", "--max_iters=1", "--val_tokens=1000000", "--loader_mode=bos")
    log = (tmp_path / "short" / "log.txt").read_text()
    assert (f"warning: the val split holds {ns['val_data'].tokens:,} tokens in whole batches, fewer than "
            "val_tokens=1,000,000") in log
    assert f"loader_mode=bos: {ns['loader'].n_windows:,} windows, one at each document start, hold " in log


def test_a_checkpoint_from_before_per_group_rates_resumes_at_the_rates_it_was_trained_with(tmp_path):
    """tests/fixtures/run_before_group_lrs holds the step-2 checkpoint of a 4-step run made by the code
    before per-group rates, and that run's record. Today's code resumes it with AdamW in its old two groups
    at the old single rate (3e-3 from configs/smoke.toml), no width rule and no momentum warmup, so
    steps 3 and 4 repeat the record: bitwise on the machine that made it, to float rounding elsewhere."""
    fixture, run = ROOT / "tests" / "fixtures" / "run_before_group_lrs", tmp_path / "run"
    shutil.copytree(fixture, run)
    ns = run_script("train_gpt.py", f"--out_dir={run}", "--init_from=resume", "--device=cpu")
    assert ns["base_lrs"] == [[3e-3, 3e-3], [0.02]]
    assert [(g["eps"], g["weight_decay"]) for g in ns["optimizers"][0].param_groups] == [(1e-8, 0.1), (1e-8, 0.0)]
    assert ns["config"]["muon_momentum_warmup"] == 0 and ns["config"]["lr_ref_width"] == 0
    recorded = [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in metrics(fixture)
                if "loss" in r and r["step"] > 2]
    resumed = [r for r in train_records(run) if r[0] > 2]
    assert [r[0] for r in resumed] == [3, 4]
    for got, want in zip(resumed, recorded, strict=True):  # approx compares flat sequences only
        assert got == pytest.approx(want, rel=1e-5, abs=0)


def test_a_checkpoint_from_before_mups_rule_resumes_at_the_rates_it_was_trained_with(tmp_path):
    """tests/fixtures/run_before_mup_rule: a step-2 checkpoint from the code whose tied matrix took embedding_lr
    x sqrt(768 / n_embd) and whose Muon rate was muon_lr. Today's names restate it (head_lr such that muP's rule
    gives the same 1.39 at width 4), so steps 3 and 4 repeat its record."""
    fixture, run = ROOT / "tests" / "fixtures" / "run_before_mup_rule", tmp_path / "run"
    shutil.copytree(fixture, run)
    ns = run_script("train_gpt.py", f"--out_dir={run}", "--init_from=resume", "--device=cpu")
    assert ns["base_lrs"] == [pytest.approx([0.1 * (768 / 4) ** 0.5, 0.03]), [0.04]]
    assert "matrix_lr" in ns["config"] and "muon_lr" not in ns["config"] and ns["config"]["matrix_lr"] == 0.04
    assert "resume: these settings differ" not in (run / "log.txt").read_text()  # a restatement, not a change
    recorded = [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in metrics(fixture)
                if "loss" in r and r["step"] > 2]
    resumed = [r for r in train_records(run) if r[0] > 2]
    assert [r[0] for r in resumed] == [3, 4]
    # another CPU's float32 kernels move the grad norm by ~2e-5 (measured); a wrong rate moves it by far more
    for got, want in zip(resumed, recorded, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_settings_from_before_the_head_exponent_keep_mups_rule(arch):
    """A checkpoint of the muP-rule code (head x lr_ref_width / n_embd, no head_lr_exponent) resumes at its rates."""
    model = tiny_model(arch)  # 32 wide
    saved = {k: v for k, v in SETTINGS.items() if k != "head_lr_exponent"}
    restated = upgrade_settings(saved, {"n_embd": 32, "arch": arch})
    assert restated["head_lr_exponent"] == 1.0
    adamw, _ = model.configure_optimizers(restated)
    head = adamw.param_groups[0 if arch == "gpt2" else 2]
    assert head["lr"] == pytest.approx(SETTINGS["head_lr"] * SETTINGS["lr_ref_width"] / 32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("ref", [768, 0])
def test_old_settings_are_restated_at_the_rates_their_runs_used(arch, optimizer, ref):
    """The settings of the per-group code before muP's rule (embedding and head x sqrt(ref / width), the
    tied matrix at embedding_lr; adamw mode at learning_rate for all) give today's optimizers the same rates."""
    model = tiny_model(arch)  # 32 wide
    old = {**{k: v for k, v in SETTINGS.items() if k not in ("matrix_lr", "head_lr_exponent")}, "arch": arch,
           "optimizer": optimizer,
           "muon_lr": 0.05, "embedding_lr": 0.2, "head_lr": 0.006, "scalar_lr": 0.02, "lr_ref_width": ref,
           "learning_rate": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip_late": 0.5,
           "grad_clip_late_step": 0}
    width = (ref / 32) ** 0.5 if ref else 1.0
    if optimizer == "adamw":
        want = {"embedding+head" if arch == "gpt2" else "embedding": 1e-3, "rest": 1e-3, "head": 1e-3,
                "matrices": 1e-3, "positions": 1e-3}
    else:
        want = {"embedding+head": 0.2 * width, "embedding": 0.2 * width, "rest": 0.02, "head": 0.006 * width,
                "matrices": 0.05}
    new = upgrade_settings(old, {"arch": arch, "n_embd": 32})
    assert not {"muon_lr", "learning_rate", "beta1", "beta2", "weight_decay", "grad_clip_late"} & set(new)
    got = {g["name"]: g["lr"] for opt in model.configure_optimizers(new) for g in opt.param_groups}
    assert got == pytest.approx({k: want[k] for k in got})
    if optimizer == "adamw":
        assert (new["adam_beta1"], new["adam_beta2"], new["adam_eps"], new["adam_weight_decay"]) == (0.9, 0.99, 1e-8,
                                                                                                   0.1)


SCHEDULE = ("--lr_decay_iters=8", "--eval_interval=2")  # one LR schedule for the short runs and the full one


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 8-step run: the steps and val losses every resumed run must repeat."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(out, "--max_iters=8", *SCHEDULE)
    return out


def assert_repeats(run, full_run, skip_val_at=()):
    """run's training records are bitwise full_run's, each step and val loss logged once."""
    assert train_records(run) == train_records(full_run)
    val = [(r["step"], r["val_loss"]) for r in metrics(run) if "val_loss" in r]
    assert len({s for s, _ in val}) == len(val), "a step's val loss logged twice"
    expected_val = [(r["step"], r["val_loss"]) for r in metrics(full_run) if "val_loss" in r]
    assert [v for v in val if v[0] not in skip_val_at] == expected_val
    steps = [line.split(", lr")[0] for line in (run / "log.txt").read_text().splitlines()
             if line.startswith("step ")]  # the training lines up to their timings
    assert len(steps) == len(set(steps)), "log.txt repeats a step"


def test_resume_after_a_shorter_run_continues_bitwise(tmp_path, full_run):
    train(tmp_path / "short", "--max_iters=3", *SCHEDULE)
    # a bare resume: the run's saved settings, not the script's defaults, fill in what is not given
    run_script("train_gpt.py", f"--out_dir={tmp_path / 'short'}", "--init_from=resume", "--max_iters=8")
    assert_repeats(tmp_path / "short", full_run, skip_val_at=(3,))  # the short run also evaluated its last step


def test_resume_after_sigint_continues_bitwise(tmp_path, full_run):
    out = tmp_path / "interrupted"  # SIGINT, in a real process, at some step
    proc = subprocess.Popen(train_cmd(out, "--max_iters=10000", *SCHEDULE), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    stopped = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 2 <= stopped < 8
    train(out, "--max_iters=8", *SCHEDULE, "--init_from=resume")
    assert_repeats(out, full_run)


def test_two_rank_ddp_matches_one_rank_with_twice_the_accumulation(tmp_path):
    cmd = train_cmd(tmp_path / "two", "--max_iters=1")
    cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train(tmp_path / "one", "--max_iters=1")
    _, stderr = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, stderr
    (one,), (two,) = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert one[1] == pytest.approx(two[1], rel=1e-6) and one[2] == pytest.approx(two[2], rel=1e-5)  # loss, grad norm
    torch.manual_seed(1337)  # the script's seed: the weights both runs started from
    start = GPT(GPTConfig(arch="gpt2", block_size=64, n_layer=2, n_head=2, n_embd=64)).state_dict()
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        if name.startswith("transformer.h.") and a[name].dim() == 2:
            # Muon orthogonalises in bf16, so the two updates agree to bf16 precision, not fp32
            diff = (a[name] - b[name]).norm() / (a[name] - start[name]).norm()
            assert diff < 0.05, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)  # 1% of a step


def test_a_run_that_diverges_before_its_first_checkpoint_says_there_is_none(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", "--max_iters=5", "--head_lr=1e30", "--matrix_lr=1e30", "--embedding_lr=1e30")
    out = capsys.readouterr().out
    assert stopped.value.code == 1 and "stopping; no checkpoint was written before it" in out
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_nonfinite_loss_stops_without_touching_the_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, "--max_iters=2")
    before = hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest()
    with pytest.raises(SystemExit) as stopped:
        train(out, "--init_from=resume", "--max_iters=50", "--head_lr=1e30", "--matrix_lr=1e30",
              "--checkpoint_interval=1")
    assert stopped.value.code == 1 and "last good checkpoint" in capsys.readouterr().out
    assert hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest() == before


def test_a_step_that_blows_up_the_weights_stops_the_run_before_they_are_evaluated_or_sampled(tmp_path, capsys):
    """A huge weight decay leaves finite loss and gradients, but weights past fp32's square root of its
    range: the guard reads their norm too, so no eval, sample (NaN probabilities) or checkpoint sees them."""
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", "--max_iters=3", "--adam_weight_decay=1e20", "--sample_interval=1")
    out = capsys.readouterr().out
    assert stopped.value.code == 1 and "param norm inf: stopping; no checkpoint was written before it" in out
    assert "sample:" not in out and not (tmp_path / "run" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------- refusals, each one line

BAD_SETTINGS = [
    (["--n_layr=3"], "unknown setting 'n_layr' (did you mean n_layer?)"),
    (["--n_layer=two"], "n_layer must be int"),
    (["--total_batch_size=1000"], "must be a multiple of batch_size * block_size"),
    (["--data_dir=/nonexistent"], "python data/fineweb_edu.py --out_dir /nonexistent"),
    (["--init_from=resume"], "not found"),
    (["--init_from=nothing"], "init_from='nothing': use scratch, resume or a GPT-2 name"),
    (["--arch=gpt3"], "--arch='gpt3': use one of 'gpt2', 'llama'"),
    (["--loader_mode=zigzag"], "'zigzag'"),
    (["--optimizer=sgd"], "--optimizer='sgd': use one of 'muon', 'adamw'"),
    (["--batch_size=0"], "--batch_size=0: must be at least 1"),
    (["--block_size=-4"], "--block_size=-4: must be at least 1"),
    (["--eval_interval=0"], "--eval_interval=0: must be at least 1"),
    (["--log_interval=-1"], "--log_interval=-1: must be at least 1"),
    (["--checkpoint_interval=0"], "--checkpoint_interval=0: must be at least 1"),
    (["--total_batch_size=0"], "--total_batch_size=0: must be at least 1"),
    (["--max_iters=-5"], "--max_iters=-5: must be at least 1"),
    (["--n_embd=65"], "n_embd=65 is not divisible by n_head=2"),
    (["--matrix_lr=-1e-3"], "--matrix_lr=-0.001: must be 0 or more"),
    (["--matrix_lr=nan"], "--matrix_lr=nan: must be a finite number"),
    (["--adam_eps=0"], "--adam_eps=0.0: must be above 0"),
    (["--head_lr=inf"], "--head_lr=inf: must be a finite number"),
    (["--decay_frac=nan"], "--decay_frac=nan: must be a finite number"),
    (["--decay_frac=1.5"], "--decay_frac=1.5: must lie between 0 and 1"),
    (["--min_lr_frac=-0.1"], "--min_lr_frac=-0.1: must lie between 0 and 1"),
    (["--adam_beta1=2"], "--adam_beta1=2.0: must lie in [0, 1)"),
    (["--adam_beta2=1"], "--adam_beta2=1.0: must lie in [0, 1)"),
    (["--muon_momentum=-5"], "--muon_momentum=-5.0: must lie in [0, 1)"),
    (["--seed=-1"], "--seed=-1: must lie in [0, 2**32)"),
    (["--seed=1e30"], "--seed=1000000000000000019884624838656: must lie in [0, 2**32)"),
    (["--embedding_lr=-1"], "--embedding_lr=-1.0: must be 0 or more"),
    (["--muon_momentum_warmup=-3"], "--muon_momentum_warmup=-3: must be 0 or more"),
    (["--out_dir="], "--out_dir is empty; give it a value such as logs/NAME"),
    (["--data_dir= "], "--data_dir is empty"),
    (["--device=cuda"], "--device=cuda, but this torch"),
    (["--device=tpu"], "--device=tpu: use auto, cuda, cuda:N, mps or cpu"),
]


@pytest.mark.parametrize("args, message", BAD_SETTINGS, ids=[a[0] for a, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, args, message):
    if args == ["--device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as e:
        run_script("train_gpt.py", *SMOKE, f"--out_dir={tmp_path / 'run'}", *args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_bad_files_are_refused(tmp_path):
    def refused(*args):
        with pytest.raises(UserError) as e:
            train(*args)
        assert "\n" not in str(e.value)
        return str(e.value)

    (tmp_path / "latin1.toml").write_bytes("max_iters = 3 # d\xe9j\xe0 vu\n".encode("latin-1"))
    assert "latin1.toml: not valid UTF-8" in refused(tmp_path / "run", tmp_path / "latin1.toml")
    (tmp_path / "afile").write_text("not a dir")
    assert "cannot write to out_dir" in refused(tmp_path / "afile", "--max_iters=1")
    assert "cannot write to out_dir" in refused(tmp_path / "afile" / "run", "--max_iters=1")  # fails for root too

    # damaged checkpoints: each names the file and what is wrong, never a traceback
    run = tmp_path / "good"
    train(run, "--max_iters=1")
    good = torch.load(run / "ckpt.pt", weights_only=True)
    for name, damaged, message in [
        ("no_loader", {k: v for k, v in good.items() if k != "loader"}, "has no valid 'loader'"),
        ("no_optimizers", {k: v for k, v in good.items() if k != "optimizers"}, "has no valid 'optimizers'"),
        ("bad_config", {**good, "model_config": {"n_layer": [2]}}, "model_config is missing or damaged"),
        ("sft", {**good, "chat": True}, "was written by finetune_sft.py; resume it with python finetune_sft.py"),
    ]:
        (tmp_path / name).mkdir()
        torch.save(damaged, tmp_path / name / "ckpt.pt")
        assert message in refused(tmp_path / name, "--init_from=resume"), name
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "ckpt.pt").write_bytes(b"\x00" * 100)
    assert "cannot be read as a checkpoint" in refused(tmp_path / "garbage", "--init_from=resume")


def test_a_new_run_never_destroys_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_iters=1", "--keep_last=2")
    before = {p.name: p.read_bytes() for p in out.glob("ckpt*.pt")}
    with pytest.raises(UserError, match="already holds a run's checkpoint; continue it with --init_from=resume"):
        train(out, "--max_iters=1")
    assert {p.name: p.read_bytes() for p in out.glob("ckpt*.pt")} == before


def test_two_runs_never_share_a_dir(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_iters=1")
    lock = lock_run_dir(out)  # as a run in another process holds it
    try:
        with pytest.raises(UserError, match="another run is using out_dir"):
            train(out, "--init_from=resume", "--max_iters=2")
    finally:
        lock.close()
    train(out, "--init_from=resume", "--max_iters=2")  # the lock is gone with its holder


def test_resume_refuses_a_new_shape(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_iters=1")
    with pytest.raises(UserError, match=r"keeps its architecture \(n_layer 2 -> 4\)"):
        train(out, "--init_from=resume", "--n_layer=4", "--max_iters=2")


def test_resume_warns_of_a_new_schedule_and_survives_damaged_logs(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, "--max_iters=3", "--eval_interval=1")
    # a crash can tear the last metrics line; config.json is for people: resume reads the checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    (out / "config.json").write_text("{damaged")
    capsys.readouterr()
    run_script("train_gpt.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=6")
    printed = capsys.readouterr().out
    assert "resume: these settings differ from the checkpoint's and apply from here: max_iters 3 -> 6" in printed
    assert "warning: the schedule's factor at step 3 jumps 0.100 -> 0.868" in printed  # cosine to 6 steps
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [0, 1, 2, 3, 4, 5, 6]


def test_a_resume_applies_every_changed_setting_says_so_and_records_it(tmp_path, capsys):
    """One rule for every setting: a resume applies what it changes and says so (config.json and the checkpoint
    record it), or refuses it in one line. load_state_dict alone would bring back the saved betas and decay."""
    out = tmp_path / "run"
    train(out, "--max_iters=2")
    capsys.readouterr()
    changes = ["--adam_beta1=0.9", "--adam_beta2=0.99", "--adam_eps=1e-8", "--adam_weight_decay=0.05",
               "--muon_momentum=0.9", "--head_lr=0.004", "--head_lr_exponent=1", "--muon_weight_decay=0.01"]
    ns = run_script("train_gpt.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=3", *changes)
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("resume: these settings differ"))
    for change in ("adam_beta1 0.8 -> 0.9", "adam_beta2 0.95 -> 0.99", "adam_eps 1e-10 -> 1e-08",
                   "adam_weight_decay 0.0 -> 0.05", "muon_momentum 0.95 -> 0.9", "head_lr 0.032 -> 0.004",
                   "head_lr_exponent 0.5 -> 1.0", "max_iters 2 -> 3"):
        assert change in line
    adamw, muon = ns["optimizers"]
    assert {(g["betas"], g["eps"]) for g in adamw.param_groups} == {((0.9, 0.99), 1e-8)}
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert muon.param_groups[0]["momentum"] == 0.9 and muon.param_groups[0]["weight_decay"] == 0.01
    assert ns["base_lrs"][0][0] == pytest.approx(0.004 * 768 / 64)
    assert adamw.state[adamw.param_groups[0]["params"][0]]["step"] == 3  # the moments came with the checkpoint
    recorded = json.loads((out / "config.json").read_text())
    saved = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert recorded["adam_beta1"] == saved["adam_beta1"] == 0.9 and recorded["head_lr"] == saved["head_lr"] == 0.004
    with pytest.raises(UserError, match=r"keeps its optimizer \(optimizer muon -> adamw\)") as e:
        run_script("train_gpt.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--optimizer=adamw")
    assert "\n" not in str(e.value)


def fake_wandb(init):
    logged = []
    return SimpleNamespace(init=init, log=lambda record, step: logged.append((step, record)), logged=logged)


def test_wandb_without_the_package_or_a_login_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match="wandb_log=True needs wandb: pip install wandb"):
        train(tmp_path / "a", "--max_iters=1", "--wandb_log=True")

    def no_login(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(no_login))
    with pytest.raises(UserError, match=r"wandb.init failed \(No API key configured.*\); run wandb login") as e:
        train(tmp_path / "b", "--max_iters=1", "--wandb_log=True")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wandb_gets_every_metrics_record(tmp_path, monkeypatch):
    runs = []
    wandb = fake_wandb(lambda **kwargs: runs.append(kwargs))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train(tmp_path / "run", "--max_iters=2", "--wandb_log=True", "--wandb_run_name=first")
    assert runs == [dict(project="gpt", name="first", config=runs[0]["config"])] and runs[0]["config"]["max_iters"] == 2
    assert [step for step, _ in wandb.logged] == [r["step"] for r in metrics(tmp_path / "run")]


def test_cli_refusals_are_one_line_with_status_1(tmp_path):
    assert_one_line_error(run_cli(*train_cmd(tmp_path / "run", "--batch_size=0")[1:]), "--batch_size=0")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_a_long_val_pass_stops_promptly(tmp_path):
    # a val split of ~0.5M tokens: minutes of evaluation at eval_interval=1
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i}. " + "the quick brown fox jumps " * 400}) + "\n"
                            for i in range(500)))
    prep(["--source", str(docs), "--out_dir", str(tmp_path / "shards"), "--val_fraction=0.5", "--num_proc=1"])
    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        proc = subprocess.Popen(train_cmd(tmp_path / "run", f"--data_dir={tmp_path / 'shards'}",
                                          "--val_tokens=1000000", "--eval_interval=1", "--max_iters=1000"),
                                cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT)
    wait_for_text(out, "\ndata:", proc, timeout=300)  # the val pass of step 0 is about to start
    time.sleep(1)
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 0, out.read_text()[-2000:]
    assert time.perf_counter() - start < 120  # the whole pass takes many minutes: the signal cut it short
    stopped = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert stopped["step"] == 0 and stopped["evals_done"] is False  # a resumed run evaluates step 0 again


def test_a_second_stop_signal_exits_at_once(monkeypatch):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signals == [signal.SIGINT] and stop(ddp=False, device="cpu")  # the loop finishes its step
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_the_good_one(tmp_path, monkeypatch):
    from data.checkpoint import save_checkpoint

    save_checkpoint({"step": 1}, tmp_path, 1)
    good = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*free disk space") as e:
        save_checkpoint({"step": 2}, tmp_path, 2)
    assert "\n" not in str(e.value)
    assert (tmp_path / "ckpt.pt").read_bytes() == good and not (tmp_path / "ckpt.pt.tmp").exists()


def test_a_missing_hellaswag_file_is_said_once_with_the_command_that_fetches_it(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_iters=2", "--hellaswag_interval=1", f"--hellaswag_file={tmp_path / 'none.jsonl'}")
    log = (out / "log.txt").read_text()
    assert log.count("not found") == 1 and "python eval_hellaswag.py --download_only" in log
    assert not any("hellaswag" in r for r in metrics(out))


def test_a_checkpoint_from_before_per_group_rates_refuses_rates_it_cannot_apply(tmp_path):
    """Its AdamW runs every parameter at one rate: a new rate for one group cannot apply, so it is refused in
    one line rather than logged and ignored."""
    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_before_group_lrs", run)
    with pytest.raises(UserError, match="predates per-group rates and runs all its parameters at one rate") as e:
        run_script("train_gpt.py", f"--out_dir={run}", "--init_from=resume", "--device=cpu", "--head_lr=0.01")
    assert "\n" not in str(e.value)
    ns = run_script("train_gpt.py", f"--out_dir={run}", "--init_from=resume", "--device=cpu",
                    *(f"--{k}=0.001" for k in ("head_lr", "scalar_lr", "embedding_lr")))
    assert ns["base_lrs"][0] == [0.001, 0.001]  # all of them at once: applied


def test_a_full_disk_at_resume_is_one_line_and_keeps_the_log(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(out, "--max_iters=2")
    log, records = (out / "log.txt").read_text(), (out / "metrics.jsonl").read_text()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match=r"cannot write the run's files in .*No space left on device.*free disk") as e:
        run_script("train_gpt.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=3")
    monkeypatch.undo()
    assert "\n" not in str(e.value)
    assert (out / "log.txt").read_text() == log and (out / "metrics.jsonl").read_text() == records
