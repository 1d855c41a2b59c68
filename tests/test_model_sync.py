"""The model section is copied into every stage script: the copies must stay identical, read each
other's checkpoints, fail clearly on a checkpoint of another shape, and match HF GPT-2."""

import pytest
import torch
from helpers import REPO_ROOT, load_model_namespace, make_checkpoint

from data import UserError
from data.checkpoint import load_checkpoint
from data.sync_model import COPIES, SOURCE, sync

STAGE_SCRIPTS = [SOURCE, *COPIES]


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
