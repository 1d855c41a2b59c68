"""The model section is copied into every stage script: the copies must stay identical, read each
other's checkpoints, fail clearly on a checkpoint of another shape, and match HF GPT-2. A new model
option is one edit to train_gpt.py, one command, and a setting."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, assert_one_line_error, load_model_namespace, make_checkpoint

from data import UserError
from data.checkpoint import load_checkpoint
from data.sync_model import COPIES, SOURCE, model_section, sync

STAGE_SCRIPTS = [SOURCE, *COPIES]
KEEP_IN_DATA = {"samples", "gpt2.tiktoken"} | {p.name for p in (REPO_ROOT / "data").glob("*.py")}


def gpt_class(script):
    """The GPT class of a stage script, built from its model section alone."""
    return load_model_namespace(REPO_ROOT / script)["GPT"]


def test_model_sections_are_identical():
    stale = sync(check=True)  # a missing stage script is a UserError naming it
    assert not stale, f"{stale}: model section differs from train_gpt.py's; run python data/sync_model.py"


def test_sync_copies_the_model_section_and_nothing_else(tmp_path):
    for name in STAGE_SCRIPTS:
        (tmp_path / name).write_text((REPO_ROOT / name).read_text())
    source = tmp_path / SOURCE
    source.write_text(source.read_text().replace("def make_norm(config):", "def make_norm(config):  # edited"))
    before = {name: (tmp_path / name).read_text() for name in COPIES}
    assert sync(check=True, root=tmp_path) == list(COPIES)
    assert sync(root=tmp_path) == list(COPIES) and sync(check=True, root=tmp_path) == []
    for name in COPIES:
        text = (tmp_path / name).read_text()
        assert "def make_norm(config):  # edited" in text
        assert text.replace("  # edited", "") == before[name]  # the rest of the script untouched
    (tmp_path / "sample.py").unlink()
    with pytest.raises(UserError, match="sample.py is missing"):
        sync(check=True, root=tmp_path)


def copy_of_the_repo(root):
    """The stage scripts, data/'s code and tokenizer, configs/ and the bundled sample shards."""
    for script in STAGE_SCRIPTS:
        shutil.copy(REPO_ROOT / script, root / script)
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    shutil.copytree(REPO_ROOT / "data", root / "data", ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or (Path(folder).name == "data" and n not in KEEP_IN_DATA)])
    return {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_a_new_model_option_is_one_edit_one_command_and_a_setting(tmp_path):
    """ReLU² in gpt2's MLP (modded-nanogpt's choice): a field of GPTConfig and its use in the model section,
    a line in the settings block, then data/sync_model.py. No other file changes, and every stage takes it:
    the run trains with it and saves it, a resume may not drop it, sample.py builds it, export_hf.py refuses it
    in one line (transformers' GPT-2 has no ReLU²)."""
    before = copy_of_the_repo(tmp_path)
    script = tmp_path / SOURCE
    text = script.read_text()
    for old, new in [
        ("    rope_theta: float = 10000.0  # llama only\n",
         "    rope_theta: float = 10000.0  # llama only\n"
         "    relu2: bool = False  # gpt2's MLP: ReLU² instead of GELU\n"),
        ('        self.swiglu = config.arch == "llama"\n',
         '        self.swiglu = config.arch == "llama"\n        self.relu2 = config.relu2\n'),
        ("        return self.c_proj(F.gelu(self.c_fc(x), approximate=\"tanh\"))",
         "        if self.relu2:\n            return self.c_proj(F.relu(self.c_fc(x)).square())\n"
         "        return self.c_proj(F.gelu(self.c_fc(x), approximate=\"tanh\"))"),
        ("logit_softcap = 0.0  #", "relu2 = False  # ReLU² in gpt2's MLP\nlogit_softcap = 0.0  #"),
    ]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    script.write_text(text)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert run("data/sync_model.py").returncode == 0
    after = {path.relative_to(tmp_path): path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert {path for path in after if after[path] != before.get(path)} == {Path(s) for s in STAGE_SCRIPTS}
    assert len({model_section(tmp_path / s) for s in STAGE_SCRIPTS}) == 1

    ns = load_model_namespace(tmp_path / "sample.py")
    torch.manual_seed(0)
    model = ns["GPT"](ns["GPTConfig"](n_layer=1, n_head=2, n_embd=32, block_size=16, relu2=True))
    idx = torch.randint(0, 1000, (1, 16))
    relu2_logits = model(idx)[0]
    model.transformer.h[0].mlp.relu2 = False
    assert not torch.allclose(relu2_logits, model(idx)[0])  # the option changes the model

    train = run("train_gpt.py", "configs/smoke.toml", "--device=cpu", "--out_dir=logs/relu2", "--relu2=True",
                "--max_iters=2", "--hellaswag_interval=0", "--sample_interval=0")
    assert train.returncode == 0, train.stderr
    assert torch.load(tmp_path / "logs/relu2/ckpt.pt", weights_only=True)["model_config"]["relu2"] is True
    assert_one_line_error(run("train_gpt.py", "--out_dir=logs/relu2", "--init_from=resume", "--relu2=False"),
                          "(relu2 True -> False)")
    sample = run("sample.py", "--ckpt=logs/relu2", "--device=cpu", "--max_new_tokens=4", "Hello")
    assert sample.returncode == 0 and sample.stdout.startswith("Hello"), sample.stderr
    assert_one_line_error(run("export_hf.py", "--ckpt=logs/relu2", "--out_dir=hf"), "relu2=True cannot be expressed")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpoint_gives_the_same_logits_in_every_script(tmp_path, arch):
    trained = make_checkpoint(tmp_path / "ckpt.pt", arch=arch, qk_norm=arch == "llama", logit_softcap=15.0)
    ckpt = load_checkpoint(tmp_path, "cpu")  # weights_only=True: the format holds no pickled code
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    expected, _ = trained(idx)
    for name in STAGE_SCRIPTS:
        model = gpt_class(name).from_checkpoint(ckpt, name)
        logits, _ = model(idx)
        assert torch.equal(logits, expected), name


def test_mismatched_checkpoint_is_a_short_error_naming_the_difference(tmp_path):
    make_checkpoint(tmp_path / "ckpt.pt", arch="gpt2")
    ckpt = load_checkpoint(tmp_path, "cpu")
    GPT = gpt_class("sample.py")

    def error(model_config):
        with pytest.raises(UserError) as e:
            GPT.from_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], **model_config}}, "run/ckpt.pt")
        message = str(e.value)
        assert message.startswith("run/ckpt.pt") and "\n" not in message and len(message) < 500, message
        return message

    as_llama = error({"arch": "llama"})
    assert "arch=llama" in as_llama and "unexpected transformer.h.0.ln_1.bias" in as_llama
    assert "shape transformer.wte.weight (50304, 64) != (50304, 128)" in error({"n_embd": 128})
    assert "missing transformer.h.2." in error({"n_layer": 3})
    assert "'n_kv_head'" in error({"n_kv_head": 2})


def test_gpt2_arch_matches_transformers_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=1000)).eval()
    with torch.no_grad():  # beyond HF's init (zero biases, unit norms), so every weight is checked
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    model = gpt_class("sample.py").from_hf(hf)
    idx = torch.randint(0, 1000, (3, 64))
    with torch.no_grad():
        expected = hf(idx).logits
    logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
