"""A guard for the whole class of bad settings: every setting of the five stage scripts and both preps gets
nan, +-inf, negative, zero, huge, empty and wrong-typed values, one key at a time and every pair exhaustively
(no random draws: a failure replays). Each must be refused in one line (a UserError, which the scripts print
as `error: ...` with exit 1) or accepted by the settings check as a value of the setting's type, finite.
In-process: the script's settings block, then its setup's check_settings call, alone. Then whole runs, drawn by
hypothesis derandomized (the same examples every time): a fuzzed setting on a fresh run and on a resume, which
must work (a resume saying what it changed) or refuse in one line; and every output path pointed at every
input, which must be refused with the input unchanged."""

import ast
import hashlib
import json
import math
import shutil
import sys

import pytest
from helpers import REPO_ROOT, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data.fineweb_edu as fineweb_edu
import data.sft_mix as sft_mix
from data import UserError
from data.sync_model import MODEL_END

VALUES = ["nan", "inf", "-inf", "-1", "0", "1e30", "-1e30", "", " ", "abc", "1.5", "true", "2**19", "1e-40",
          "99999999999999999999", "-0"]
BAD = st.sampled_from(VALUES)
STAGES = ["train_gpt.py", "finetune_sft.py", "sample.py", "eval_hellaswag.py", "export_hf.py"]


def settings_check(script):
    """The code of a script up to its model section's end (settings, model) plus its setup's first
    check_settings(...) call."""
    text = (REPO_ROOT / script).read_text()
    head, setup = text[: text.index(MODEL_END)], text[text.index(MODEL_END):]
    call = next(node for node in ast.parse(setup).body if isinstance(node, ast.Expr)
                and getattr(node.value.func, "id", "") == "check_settings")
    return compile(head + "\n" * 3 + ast.get_source_segment(setup, call) + "\n", script, "exec")


def keys_of(script):
    from stage_code import script_settings
    return sorted(script_settings(script))


def accepted_or_one_line(run):
    """run()'s result, or None when it refused in one line."""
    try:
        return run()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None


@pytest.mark.parametrize("script", STAGES)
def test_stage_script_settings(script, tmp_path):
    from stage_code import script_settings

    code, defaults = settings_check(script), script_settings(script)

    def check(*pairs):
        argv, hook = sys.argv, sys.excepthook
        sys.argv = [script, *(f"--{k}={v}" for k, v in pairs), f"--out_dir={tmp_path / 'run'}"]
        namespace = {"__name__": "__main__", "__file__": str(REPO_ROOT / script)}
        try:
            return accepted_or_one_line(lambda: exec(code, namespace) or namespace["config"])
        finally:
            sys.argv, sys.excepthook = argv, hook

    for key in defaults:
        for value in VALUES:
            config = check((key, value))
            if config is not None:  # accepted: a value of the setting's own type, never nan or inf
                assert type(config[key]) is type(defaults[key]), (key, value)
                assert type(config[key]) is not float or math.isfinite(config[key]), (key, value)
    keys = list(defaults)
    for i, key in enumerate(keys):  # pairs: a value can be fine alone and not with another (n_embd, n_head)
        check((key, VALUES[i % len(VALUES)]), (keys[(i * 7 + 3) % len(keys)], VALUES[(i * 5) % len(VALUES)]))


PREP_KEYS = {fineweb_edu: ["shard_size", "max_tokens", "val_fraction", "val_tokens", "seed", "num_proc",
                           "chunk_docs", "out_dir", "source"],
             sft_mix: ["sources", "max_prompt_tokens", "max_response_tokens", "alpaca_max_chars", "weights",
                       "val_fraction", "seed", "out_dir", "raschka"]}


@pytest.mark.parametrize("prep", [fineweb_edu, sft_mix], ids=["fineweb_edu", "sft_mix"])
def test_prep_settings(prep):
    for key in PREP_KEYS[prep]:
        for value in VALUES:
            accepted_or_one_line(lambda: prep.parse_args([f"--{key}={value}"]))  # noqa: B023 (called at once)


# ----------------------------------------------------------------------------- end to end
# A few real runs per stage script: one fuzzed setting on top of settings that keep a run to seconds.
# Left out: the sizes (of the model, the batch, the run, the output: a huge one is a long run, not a bad
# input), the paths the test pins, the network (download_only), stdin (interactive) and compile (a minute
# on a CPU). Each run must work, or stop with a one-line refusal that leaves no out_dir, or (a learning
# rate that explodes) be stopped by the NaN guard.
SIZES = {"max_iters", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "total_batch_size", "val_tokens",
         "val_examples", "sample_tokens", "hellaswag_limit", "max_new_tokens",
         "num_samples", "limit"}
PINNED = {"out_dir", "init_from", "ckpt", "out", "download_only", "interactive", "compile"}


def end_to_end(smoke_run):
    """script: the args every fuzzed run starts from."""
    return {"train_gpt.py": ["configs/smoke.toml", "--device=cpu", "--max_iters=2", "--hellaswag_limit=4",
                             "--sample_tokens=4", "--sample_interval=1", "--log_interval=1"],
            "finetune_sft.py": ["configs/sft_smoke.toml", "--device=cpu", f"--init_from={smoke_run}", "--max_iters=2",
                                "--val_examples=8", "--hellaswag_limit=4", "--sample_tokens=4"],
            "sample.py": [f"--ckpt={smoke_run}", "--device=cpu", "--max_new_tokens=8", "Once upon a time"],
            "eval_hellaswag.py": [f"--ckpt={smoke_run}", "--device=cpu", "--data=data/samples/hellaswag_val_200.jsonl",
                                  "--limit=4"]}


@pytest.mark.parametrize("script, examples", [("train_gpt.py", 12), ("finetune_sft.py", 6), ("sample.py", 40),
                                              ("eval_hellaswag.py", 40)])
def test_stage_script_runs_work_or_refuse_in_one_line(script, examples, smoke_run, tmp_path, capsys):
    args = end_to_end(smoke_run)[script]
    out_dir = [f"--out_dir={tmp_path / 'run'}"] if script in ("train_gpt.py", "finetune_sft.py") else []
    keys = [k for k in keys_of(script) if k not in SIZES | PINNED]

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(key=st.sampled_from(keys), value=BAD)
    def check(key, value):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        try:
            run_script(script, *args, *out_dir, f"--{key}={value}")
        except UserError as e:
            assert "\n" not in str(e) and str(e), repr(e)
            assert not (tmp_path / "run").exists()
        except SystemExit as e:  # the NaN guard: said, and no checkpoint of the blown-up weights
            assert e.code == 1 and ": stopping; " in capsys.readouterr().out
        else:
            assert not out_dir or (tmp_path / "run" / "ckpt.pt").is_file()

    check()


def another_value(default):
    """A valid setting other than the default, of its type."""
    if type(default) is bool:
        return not default
    if type(default) is int:
        return default + 1
    return default * 0.5 if default else 0.5


RESUME_KEYS = ["adam_beta1", "adam_beta2", "adam_eps", "adam_weight_decay", "matrix_lr", "head_lr", "scalar_lr",
               "muon_momentum", "muon_weight_decay", "grad_clip", "warmup_iters", "min_lr_frac", "log_interval",
               "eval_interval", "batch_size", "seed", "n_layer", "arch", "optimizer", "loader_mode", "block_size",
               "lr_ref_width", "keep_last", "checkpoint_interval"]


def test_a_changed_setting_on_resume_is_applied_and_said_or_refused_in_one_line(tmp_path, capsys):
    """One rule for every setting: a resume applies a change and its log and config.json say so, or refuses it."""
    base = tmp_path / "base"
    run_script("train_gpt.py", "configs/smoke.toml", "--device=cpu", "--max_iters=2", "--hellaswag_interval=0",
               "--sample_interval=0", f"--out_dir={base}")
    defaults = json.loads((base / "config.json").read_text())
    choices = {"arch": "llama", "optimizer": "adamw", "loader_mode": "random"}

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(key=st.sampled_from(RESUME_KEYS))
    def check(key):
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        value = choices[key] if key in choices else another_value(defaults[key])
        capsys.readouterr()
        ns = accepted_or_one_line(lambda: run_script("train_gpt.py", f"--out_dir={run}", "--init_from=resume",
                                                     "--max_iters=3", f"--{key}={value}"))
        if ns is None:  # refused: the run dir is as it was
            assert torch_step(run) == 2
            return
        printed = capsys.readouterr().out
        assert f"{key} {defaults[key]} -> {value}" in printed, (key, printed[-2000:])
        assert json.loads((run / "config.json").read_text())[key] == value == ns["config"][key]

    check()


def torch_step(run):
    import torch

    return torch.load(run / "ckpt.pt", weights_only=True)["step"]


def test_every_output_path_pointed_at_an_input_is_refused_and_the_input_is_unchanged(smoke_run, tmp_path):
    """Each stage's output (a run dir, --out, an export folder, a prep's --out_dir, a picture) at each of its
    inputs (the checkpoint, the data, a config file, the project's code): refused before anything is written."""
    ckpt, data, config, code = smoke_run / "ckpt.pt", REPO_ROOT / "data/samples/hellaswag_val_200.jsonl", \
        REPO_ROOT / "configs/smoke.toml", REPO_ROOT / "sample.py"
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "one two three"}\n')
    cases = [
        ("eval_hellaswag.py", [f"--ckpt={smoke_run}", f"--data={data}", "--device=cpu"], "--out",
         [ckpt, data, code, config]),
        ("export_hf.py", [f"--ckpt={ckpt}", "--overwrite=True"], "--out_dir", [smoke_run, ckpt.parent]),
        ("train_gpt.py", ["configs/smoke.toml", "--device=cpu", "--max_iters=1"], "--out_dir",
         [REPO_ROOT / "data/samples/fineweb_edu", REPO_ROOT / "configs"]),
        ("finetune_sft.py", ["configs/sft_smoke.toml", "--device=cpu", f"--init_from={ckpt}"], "--out_dir",
         [REPO_ROOT / "data/samples/sft", smoke_run]),
    ]
    for script, args, flag, inputs in cases:
        for target in inputs:
            before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in
                      ([target] if target.is_file() else target.rglob("*")) if p.is_file()}
            with pytest.raises(UserError) as e:
                run_script(script, *args, f"{flag}={target}")
            assert "\n" not in str(e.value), (script, target)
            assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}, (script, target)
    for prep, args in ((fineweb_edu, ["--source", str(source)]), (sft_mix, ["--sources=raschka",
                                                                         f"--raschka={source}"])):
        for target in (tmp_path, source.parent, REPO_ROOT / "data"):
            with pytest.raises(UserError):
                prep.main([*args, "--out_dir", str(target)])
    assert source.read_text() == '{"text": "one two three"}\n'
    with pytest.raises(UserError):
        from data.curves import main as curves

        curves([str(smoke_run), f"--out={smoke_run / 'metrics.jsonl'}"])
