"""export_hf.py: both archs load in transformers with our logits, our greedy tokens and our token ids;
what cannot be expressed is refused; nothing half-written. CPU only, offline, seconds."""

import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the exported folder is read from disk, never the Hub

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError
from data.tokenizer import ASSISTANT, EOT, USER, VOCAB_SIZE, chat_prompt, get_tokenizer, render_chat

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "export_hf.py"
MODEL_BEGIN = "# ----------------------------------------------------------------------------- model\n"
MODEL_END = "# ----------------------------------------------------------------------------- end of model\n"
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
TEXTS = [  # Unicode, emoji, whitespace runs, CRLF, contractions, numbers, a long run of one letter
    "Hello, world! The café's naïve façade.",
    "日本語のテキスト, Ελληνικά, русский, עברית, 한국어",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷 mixed with text",
    "   leading spaces\n\n\n\ttabs\t\there  \r\n\r\n trailing   ",
    "I'm sure you'll see they've DON'T 'S",
    "3.14159 + 2,718 = 1e10; x_1=0x1F",
    "a" * 500,
    " \u00a0\u2003\u3000 odd spaces ",
    "",
]


def export_namespace():
    """export_hf.py's names (functions, constants), without running its main section."""
    text = SCRIPT.read_text()
    head = text[: text.index("# ----------------------------------------------------------------------------- main")]
    old_argv, old_hook = sys.argv, sys.excepthook
    sys.argv = [str(SCRIPT)]
    try:
        namespace = {"__name__": "export_hf_functions", "__file__": str(SCRIPT)}
        exec(compile(head, str(SCRIPT), "exec"), namespace)
    finally:
        sys.argv, sys.excepthook = old_argv, old_hook
    return namespace


def export(*args):
    """Run export_hf.py in this process (torch and transformers are imported once) with these flags."""
    old_argv, old_hook, old_term = sys.argv, sys.excepthook, signal.getsignal(signal.SIGTERM)
    sys.argv = [str(SCRIPT), *args]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv, sys.excepthook = old_argv, old_hook
        signal.signal(signal.SIGTERM, old_term)


def make_checkpoint(run_dir, arch, chat=False, seed=0, **config):
    """A small random model in train_gpt.py's checkpoint format, in run_dir/ckpt.pt; returns the model.
    Every weight is drawn at random (norms and biases too), so a weight put in the wrong place shows."""
    text = SCRIPT.read_text()
    namespace = dict(math=math, dataclass=dataclass, torch=torch, nn=nn, F=F, UserError=UserError,
                     VOCAB_SIZE=VOCAB_SIZE)
    exec(compile(text[text.index(MODEL_BEGIN) : text.index(MODEL_END)], str(SCRIPT), "exec"), namespace)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = namespace["GPT"](namespace["GPTConfig"](arch=arch, **{**TINY, **config}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("ln_1.weight") else 0.0))
                else:
                    p.normal_(0.0, 0.1)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"arch": arch, "total_batch_size": 512, "hellaswag_limit": 50}
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "chat": chat, "config": cfg,
                "step": 20, "best_val_loss": 7.5}, run_dir / "ckpt.pt")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": 7.5}) + "\n" + json.dumps(
        {"step": 20, "val_loss": 7.75, "hellaswag": 0.26}) + "\n{torn")
    (run_dir / "log.txt").write_text(f"command: python train_gpt.py --arch={arch} --out_dir={run_dir}\n")
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (our model, the exported folder): gpt2 as a base model, llama as a chat model with its own RoPE base."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for arch, options in (("gpt2", {}), ("llama", dict(chat=True, rope_theta=5000.0))):
        model = make_checkpoint(root / f"run_{arch}", arch, **options)
        export(f"--ckpt={root / f'run_{arch}'}", f"--out_dir={root / f'hf_{arch}'}", "--check=False")
        result[arch] = model, root / f"hf_{arch}"
    return result


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported["llama"][1])


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_equal_ours(exported, arch):
    model, folder = exported[arch]
    hf = load_hf(folder)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
    assert hf.config.vocab_size == VOCAB_SIZE and hf.config.tie_word_embeddings == (arch == "gpt2")
    if arch == "llama":  # read by transformers 5 (rope_parameters) and 4.x (rope_theta) alike
        saved = json.loads((folder / "config.json").read_text())
        assert saved["rope_theta"] == saved.get("rope_parameters", saved)["rope_theta"] == 5000.0
    idx = torch.randint(0, VOCAB_SIZE, (2, TINY["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = model(idx)
        got = hf(idx).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generation_is_identical(exported, arch):
    model, folder = exported[arch]
    hf = load_hf(folder)
    prompt = torch.tensor([[EOT, *get_tokenizer().encode_ordinary("The capital of France is")]])
    n = 24
    ours = [t.item() for t in model.generate(prompt, n, temperature=0)]
    ours = ours[: ours.index(EOT) + 1] if EOT in ours else ours  # transformers stops after <|endoftext|>
    with torch.no_grad():
        theirs = hf.generate(prompt, do_sample=False, max_new_tokens=n)[0, prompt.size(1) :]
    assert theirs.tolist() == ours and len(ours) > 10


def test_rope_sign_flip_turns_ours_into_hf_convention():
    """apply_rope rotates the pair (i, i + D/2) the other way from HF's rotate_half; the flip of the second
    half of each head's q and k channels that hf_state_dict applies gives the same attention scores."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    ns = export_namespace()
    T, H, D = 16, 2, 32
    q, k = torch.randn(2, 1, T, H, D, generator=torch.Generator().manual_seed(0)).unbind(0)
    model = ns["GPT"](ns["GPTConfig"](arch="llama", n_layer=1, n_head=H, n_embd=H * D, block_size=T))
    rope = model.rope_cos, model.rope_sin
    ours = torch.einsum("bthd,bshd->bhts", ns["apply_rope"](q, *rope), ns["apply_rope"](k, *rope))

    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=H * D, num_attention_heads=H, rope_theta=10000.0))
    cos, sin = rotary(q, torch.arange(T)[None])
    flip = torch.cat([torch.ones(D // 2), -torch.ones(D // 2)])

    def hf_scores(q, k):
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q @ k.transpose(-1, -2)

    torch.testing.assert_close(hf_scores(q * flip, k * flip), ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hf_scores(q, k), ours, atol=1e-2)  # without the flip they differ


def test_tokenizer_gives_our_ids(hf_tokenizer):
    enc = get_tokenizer()
    assert len(hf_tokenizer) == ASSISTANT + 1  # ids 50259..50303 are model padding, no tokens
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id) == (EOT, EOT)
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        assert hf_tokenizer(text)["input_ids"] == [EOT, *ids], text  # <|endoftext|> first, as in training
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer("Once upon a time")["input_ids"] == [EOT, 7454, 2402, 257, 640]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_loss_of_a_text_through_the_exported_tokenizer_equals_ours(exported, arch):
    """What lm-eval and vLLM do with an export: tokenize a text with its tokenizer, score it. The ids and
    the loss must be what our training saw: <|endoftext|>, then the text."""
    model, folder = exported[arch]
    text = (REPO_ROOT / "data" / "samples" / "tinyshakespeare.txt").read_text()[:400]
    batch = transformers.AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")
    ids = torch.tensor([[EOT, *get_tokenizer().encode_ordinary(text)]])[:, : TINY["block_size"]]
    with torch.no_grad():
        theirs = load_hf(folder)(batch["input_ids"][:, : TINY["block_size"]],
                                 labels=batch["input_ids"][:, : TINY["block_size"]]).loss
        _, ours = model(ids[:, :-1], ids[:, 1:])
    assert torch.equal(batch["input_ids"][:, : TINY["block_size"]], ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_marker_strings_in_text(hf_tokenizer):
    """Ours encodes user text as plain characters; the HF tokenizer, like every HF chat tokenizer,
    turns the marker strings into control ids unless told split_special_tokens=True."""
    enc = get_tokenizer()
    text = "say <|user|> or <|assistant|> or <|endoftext|>, literally"
    assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == [EOT, *enc.encode_ordinary(text)]
    assert hf_tokenizer(text)["input_ids"] == [EOT, *enc.encode(text, allowed_special="all")]
    assert {USER, ASSISTANT, EOT} <= set(hf_tokenizer(text)["input_ids"])
    assert hf_tokenizer.decode([EOT, USER, 40, ASSISTANT, 50300], skip_special_tokens=True) == "I"


def test_chat_template_renders_ours(hf_tokenizer, exported):
    turns = [("Name three primary colors.", "Red, yellow and blue."), ("And 2 + 2? 🤔", "4.")]
    messages = [m for p, r in turns for m in ({"role": "user", "content": p}, {"role": "assistant", "content": r})]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == [EOT, *render_chat(turns)[0]]
    prompt = hf_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    assert prompt == [EOT, *chat_prompt(turns[0][0])]  # what sample.py feeds a chat model
    with pytest.raises(Exception, match="user and assistant turns only"):
        hf_tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    base = json.loads((exported["gpt2"][1] / "tokenizer_config.json").read_text())
    assert "chat_template" not in base  # a base model has no template


def test_model_card_and_files(exported):
    folder = exported["llama"][1]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= {p.name for p in folder.iterdir()}
    modes = {(folder / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json", "README.md")}
    assert len(modes) == 1  # the weights are as readable as the rest (transformers 5 makes them owner-only)
    card = (folder / "README.md").read_text()
    for fact in ("LlamaForCausalLM", "parameters", "10.2K (20 steps x 512 tokens)", "7.7500 at step 20 (best 7.5000)",
                 "0.2600 at step 20, first 50", "python train_gpt.py --arch=llama", "export_hf.py", "chat | yes"):
        assert fact in card, fact
    assert not list(folder.parent.glob("*.tmp*"))


def test_bfloat16_export_passes_its_check(tmp_path, capsys):
    make_checkpoint(tmp_path / "run", "gpt2")
    export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}", "--save_dtype=bfloat16")
    assert "check: transformers loads" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


@pytest.mark.parametrize("options, named", [(dict(qk_norm=True), "qk_norm=True"),
                                            (dict(logit_softcap=30.0), "logit_softcap=30.0")])
def test_inexpressible_options_are_refused(tmp_path, options, named):
    make_checkpoint(tmp_path / "run", "llama", **options)
    with pytest.raises(UserError, match=named) as e:
        export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}")
    assert "\n" not in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf*"))


def earlier_export(folder):
    """A folder of an export's files, each with its own content: what --overwrite may replace; returns the content."""
    folder.mkdir(parents=True)
    files = {name: f"earlier {name}".encode() for name in ("config.json", "model.safetensors", "README.md")}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def contents(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def test_existing_out_dir_is_kept_unless_overwrite(tmp_path):
    make_checkpoint(tmp_path / "run", "gpt2")
    earlier = earlier_export(tmp_path / "hf")
    with pytest.raises(UserError, match="--overwrite"):
        export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}")
    assert contents(tmp_path / "hf") == earlier
    export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}", "--overwrite", "--check=False")
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and contents(tmp_path / "hf") != earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temp or old folder left


@pytest.mark.parametrize("where, message", [
    ("the run dir", "would overwrite --ckpt="), ("above the run", "would overwrite --ckpt="),
    ("a link to the run dir", "would overwrite --ckpt="), ("the checkpoint file", "would overwrite --ckpt="),
    ("the repo", "would overwrite the project's code"), ("a folder holding a checkpoint", "holds ckpt_0000100.pt"),
    ("an export with a file of the user's", "holds notes.txt"), ("a folder of folders", "holds sub")])
def test_overwrite_never_removes_a_checkpoint_or_what_no_export_writes(tmp_path, where, message):
    make_checkpoint(tmp_path / "logs" / "run", "gpt2")
    (tmp_path / "other").mkdir()
    torch.save({}, tmp_path / "other" / "ckpt_0000100.pt")
    earlier_export(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "folders" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "logs" / "run")
    out = {"the run dir": tmp_path / "logs" / "run", "above the run": tmp_path / "logs",
           "a link to the run dir": tmp_path / "link", "the checkpoint file": tmp_path / "logs" / "run" / "ckpt.pt",
           "the repo": REPO_ROOT, "a folder holding a checkpoint": tmp_path / "other",
           "an export with a file of the user's": tmp_path / "mine", "a folder of folders": tmp_path / "folders"}[where]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(UserError, match=message) as e:
        export(f"--ckpt={tmp_path / 'logs' / 'run'}", f"--out_dir={out}", "--overwrite", "--check=False")
    assert "\n" not in str(e.value) and str(e.value).endswith("pick another --out_dir")
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("target", ["an earlier export", "nothing yet"])
def test_out_dir_that_is_a_link_replaces_its_target_and_keeps_the_link(tmp_path, target):
    make_checkpoint(tmp_path / "run", "gpt2")
    if target == "an earlier export":
        earlier_export(tmp_path / "exports" / "hf")
    else:
        (tmp_path / "exports").mkdir()
    (tmp_path / "hf").symlink_to(tmp_path / "exports" / "hf")
    export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}", "--overwrite", "--check=False")
    assert (tmp_path / "hf").is_symlink() and (tmp_path / "hf").resolve() == tmp_path / "exports" / "hf"
    assert (tmp_path / "exports" / "hf" / "tokenizer.json").is_file()
    assert b"earlier" not in (tmp_path / "exports" / "hf" / "config.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "hf", "run"]
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["hf"]  # no temp or old folder left


@pytest.mark.parametrize("out", ["a loop of links", "a file", "a file, with --overwrite"])
def test_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path, out):
    make_checkpoint(tmp_path / "run", "gpt2")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "afile").write_text("keep")
    path = tmp_path / ("loop" if out == "a loop of links" else "afile")
    with pytest.raises(UserError, match="cannot be followed" if out == "a loop of links" else "afile is a file") as e:
        export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={path}", *(["--overwrite"] if "--overwrite" in out else []))
    assert "\n" not in str(e.value) and (tmp_path / "afile").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "loop", "run"]


def save_file_on_a_full_disk(tensors, filename, metadata=None):
    """safetensors as it fails on a full disk: part of the file written, then its own error naming the OS error."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 1000)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where", ["the weights", "the tokenizer", "too little free before any work"])
def test_full_disk_is_one_line_and_keeps_the_earlier_export(tmp_path, monkeypatch, where):
    import errno
    import shutil

    make_checkpoint(tmp_path / "run", "gpt2")
    earlier = earlier_export(tmp_path / "hf")
    if where == "the weights":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file_on_a_full_disk)
    elif where == "the tokenizer":
        write_text = Path.write_text

        def full(path, text, *args, **kwargs):
            if path.name == "tokenizer.json":
                write_text(path, text[:1000], *args, **kwargs)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return write_text(path, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", full)
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    with pytest.raises(UserError) as e:
        export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}", "--overwrite", "--check=False")
    match = re.fullmatch(rf"disk full: free (\d+) MB in {re.escape(str(tmp_path))} \(the export takes about (\d+) MB, "
                         rf"(\d+) MB are free\) and export again; {re.escape(str(tmp_path / 'hf'))} is as it was",
                         str(e.value))
    assert match, str(e.value)
    short, need, free = map(int, match.groups())
    assert 13 < need < 30  # 3.3M float32 weights and the tokenizer
    if where == "too little free before any work":
        assert (short, free) == (need - 1, 1)
    assert contents(tmp_path / "hf") == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no staging folder left


@pytest.mark.parametrize("when", ["before the new export moves in", "after it moved in"])
def test_interrupt_within_the_swap_puts_the_earlier_export_back(tmp_path, monkeypatch, when):
    make_checkpoint(tmp_path / "run", "gpt2")
    earlier = earlier_export(tmp_path / "hf")
    replace, interrupts = os.replace, [KeyboardInterrupt]

    def interrupted(a, b):
        if Path(b) != tmp_path / "hf" or not interrupts:
            return replace(a, b)
        if when == "after it moved in":
            replace(a, b)
        raise interrupts.pop()

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}", "--overwrite", "--check=False")
    assert contents(tmp_path / "hf") == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


@pytest.mark.parametrize("weights", ["nan", "finite but overflowing"])
def test_a_model_that_cannot_run_is_refused_in_one_line(tmp_path, weights):
    make_checkpoint(tmp_path / "run", "gpt2")
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt")
    if weights == "nan":
        checkpoint["model"]["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    else:  # each weight is finite; the logits are not
        checkpoint["model"]["transformer.wte.weight"].fill_(3e38)
    torch.save(checkpoint, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(UserError) as e:
        export(f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}")
    message = str(e.value)
    assert "\n" not in message and "report" not in message and "earlier checkpoint" in message
    assert ("transformer.h.1.mlp.c_fc.weight holds NaN" if weights == "nan" else "logits are not finite") in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_out_dir_expands_the_home_tilde(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "run", "gpt2")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    export(f"--ckpt={tmp_path / 'run'}", "--out_dir=~/exports/hf", "--check=False")
    assert (tmp_path / "home" / "exports" / "hf" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]  # no folder named ~


def test_sigterm_during_an_export_leaves_nothing(tmp_path):
    """The signal arrives as the finished folder is moved into place (os.replace, wrapped to send it first)."""
    make_checkpoint(tmp_path / "run", "gpt2")
    wrapper = ("import os, runpy, signal, sys\nreal = os.replace\n"
               "def replace(a, b):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(a, b)\n"
               f"os.replace = replace\nsys.argv = [{str(SCRIPT)!r}, {'--ckpt=' + str(tmp_path / 'run')!r}, "
               f"{'--out_dir=' + str(tmp_path / 'hf')!r}, '--check=False']\n"
               f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", wrapper], cwd=SCRIPT.parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == "interrupted", result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no hf/, no hf.tmpPID/
