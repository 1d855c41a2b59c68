"""A guard for the whole class of bad settings: hypothesis feeds every setting of the five stage scripts and
both preps nan, +-inf, negative, zero, huge, empty and wrong-typed values. Each must be refused in one line
(a UserError, which the scripts print as `error: ...` with exit 1) or accepted by the settings check, which
runs before anything is written. In-process: the script's settings block, then its setup's check_settings
call, alone; then a few whole runs per script, which must work or refuse in one line (the listed end-to-end
refusals are in test_train.py, test_one_line_errors.py and the others)."""

import ast
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

BAD = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e30", "-1e30", "", " ", "abc", "1.5", "true", "2**19",
                       "1e-40", "99999999999999999999", "-0"])
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
    try:
        run()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)


@pytest.mark.parametrize("script", STAGES)
def test_stage_script_settings(script, tmp_path):
    code, keys = settings_check(script), keys_of(script)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(key=st.sampled_from(keys), value=BAD, other=st.sampled_from(keys), other_value=BAD)
    def check(key, value, other, other_value):
        argv, hook = sys.argv, sys.excepthook
        sys.argv = [script, f"--{key}={value}", f"--{other}={other_value}", f"--out_dir={tmp_path / 'run'}"]
        try:
            accepted_or_one_line(lambda: exec(code, {"__name__": "__main__", "__file__": str(REPO_ROOT / script)}))
        finally:
            sys.argv, sys.excepthook = argv, hook
        assert not (tmp_path / "run").exists()

    check()


PREP_KEYS = {fineweb_edu: ["shard_size", "max_tokens", "val_fraction", "val_tokens", "seed", "num_proc",
                           "chunk_docs", "out_dir", "source"],
             sft_mix: ["sources", "max_prompt_tokens", "max_response_tokens", "alpaca_max_chars", "weights",
                       "val_fraction", "seed", "out_dir", "raschka"]}


@pytest.mark.parametrize("prep", [fineweb_edu, sft_mix], ids=["fineweb_edu", "sft_mix"])
def test_prep_settings(prep):
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(key=st.sampled_from(PREP_KEYS[prep]), value=BAD)
    def check(key, value):
        accepted_or_one_line(lambda: prep.parse_args([f"--{key}={value}"]))

    check()


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

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
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
