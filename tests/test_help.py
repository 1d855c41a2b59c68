"""-h and --help on every stage and bench script: the usage lines of its docstring and every setting with
its default and comment, read from the script itself, exit 0, and nothing built, read or written. In this
process (a subprocess per script would import torch a dozen times: ~90 s of CPU)."""

import pytest
from helpers import REPO_ROOT, run_script

STAGES = ["train_gpt.py", "finetune_sft.py", "sample.py", "eval_hellaswag.py", "export_hf.py"]
BENCHES = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "bench").glob("bench_*.py"))


def help_of(script, *args, capsys):
    with pytest.raises(SystemExit) as done:
        run_script(script, *args)
    captured = capsys.readouterr()
    assert done.value.code in (0, None) and not captured.err, captured.err
    return captured.out


@pytest.mark.parametrize("script", STAGES)
def test_stage_script_help_lists_every_setting_with_its_default_and_comment(script, tmp_path, capsys):
    text = help_of(script, "--help", f"--out_dir={tmp_path / 'never'}", capsys=capsys)
    assert f"python {script}" in text  # the docstring's usage lines
    for line in (REPO_ROOT / script).read_text().split("\n# ---")[1].splitlines():  # the settings block
        name, _, rest = line.partition(" = ")
        if name.isidentifier() and name.islower() and not rest.startswith("parse_settings("):
            comment = rest.partition("  # ")[2]
            assert any(row.split()[:1] == [f"--{name}"] and comment in row for row in text.splitlines()), name
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("script", BENCHES)
def test_bench_script_help(script, capsys):
    text = help_of(script, "--help", capsys=capsys)
    assert text.strip() and ("usage" in text.lower() or "python bench/" in text)


def test_short_flag_on_a_stage_script(capsys):
    assert "--temperature" in help_of("sample.py", "-h", capsys=capsys)
