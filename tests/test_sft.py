"""data/sft_mix.py and finetune_sft.py: the chat template and its loss mask, the mix's filters and counts
(generated sources plus the bundled Raschka rows), the example loader, and whole fine-tunes as a user starts
them: a memorised reply, exact resume, cut-off replies, signals, NaN and bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from helpers import (
    RASCHKA,
    SAMPLE_SFT,
    load_model_namespace,
    make_checkpoint,
    metrics,
    run_script,
    train_records,
    wait_for_steps,
)
from helpers import REPO_ROOT as ROOT

from data import UserError
from data.checkpoint import load_checkpoint
from data.loaders import ExampleLoader
from data.sft_mix import REASONS
from data.sft_mix import main as mix
from data.shards import read_examples, write_examples, write_manifest
from data.tokenizer import ASSISTANT, EOT, USER, chat_context, chat_prompt, get_tokenizer, render_chat, reply_mask

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model runs faster on one thread than on two fighting for 2 cores
PAIRS = [  # (instruction, input, output): a handful a tiny model can learn by heart
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Name a primary color.", "", "Red is a primary color."),
    ("Translate to German.", "Thank you", "Danke."),
    ("What is 2 + 3?", "", "2 + 3 = 5."),
    ("Give an antonym of hot.", "", "Cold."),
    ("Who wrote Hamlet?", "", "William Shakespeare wrote Hamlet."),
]


def example(*turns):
    """The token ids the mix writes for these (prompt, response) turns."""
    return (EOT, *render_chat(turns)[0])


def split_examples(out_dir, split):
    tokens, offsets = read_examples(out_dir, split)
    return [tuple(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_pairs(path, pairs=PAIRS):
    path.write_text(json.dumps([dict(instruction=i, input=x, output=o) for i, x, o in pairs]))
    return path


def mix_args(out_dir, *args):
    return ["--out_dir", str(out_dir), *map(str, args)]


def chat(role, content):
    return {"role": role, "content": content}


def conversation(*pairs):
    return {"messages": [m for user, assistant in pairs for m in (chat("user", user), chat("assistant", assistant))]}


# ----------------------------------------------------------------------------- template and mask


def test_chat_context_is_the_multi_turn_template_and_drops_whole_old_turns():
    turns = [("Hi.", "Hello."), ("Name a color.", "Red."), ("And another?", "Blue.")]
    ids, dropped = chat_context(turns, "One more?", 1000)
    assert dropped == 0 and ids == [EOT, *render_chat(turns)[0], *chat_prompt("One more?")]
    assert ids == [*example(*turns), *chat_prompt("One more?")]  # what multi-turn SFT examples hold, then the prompt
    full = len(ids)
    ids, dropped = chat_context(turns, "One more?", full - 1)  # one token short: the oldest turn goes
    assert dropped == 1 and ids == [EOT, *render_chat(turns[1:])[0], *chat_prompt("One more?")]
    ids, dropped = chat_context(turns, "One more?", 3)  # too small for any turn: the new prompt alone
    assert dropped == 3 and ids == [EOT, *chat_prompt("One more?")]


def test_interactive_chat_remembers_and_resets(tmp_path):
    make_checkpoint(tmp_path / "sft" / "ckpt.pt", chat=True)  # block_size 64
    lines = "What is the capital of France?\nAnd of Germany, and of every country in Europe?\n/reset\nHi\n"
    result = subprocess.run([sys.executable, "sample.py", "--interactive", f"--ckpt={tmp_path / 'sft'}",
                             "--device=cpu", "--max_new_tokens=30", "--seed=1"], cwd=ROOT, input=lines,
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if not line.startswith("[" + str(tmp_path))]
    assert notes == ["[the context is full: the oldest 1 turn(s) dropped]", "[a new conversation]"], notes


def test_template_has_single_special_ids_and_marker_strings_stay_text():
    enc = get_tokenizer()
    prompt, response = "Is <|user|> a token? <|assistant|>", "No, <|endoftext|> is text here."
    ids, mask = render_chat([(prompt, response)])
    assert ids == [USER, *enc.encode_ordinary(prompt), ASSISTANT, *enc.encode_ordinary(response), EOT]
    assert ids.count(USER) == ids.count(ASSISTANT) == ids.count(EOT) == 1
    assert enc.decode(ids) == f"<|user|>{prompt}<|assistant|>{response}<|endoftext|>"
    assert chat_prompt(prompt) == ids[: ids.index(ASSISTANT) + 1]
    assert (USER, ASSISTANT, EOT) == (50257, 50258, 50256)


def test_mask_is_exactly_the_replies_and_their_closing_eot():
    enc = get_tokenizer()
    turns = [("Hi <|assistant|>", "Hello!"), ("And you?", "Fine <|endoftext|> thanks.")]
    ids, mask = render_chat(turns)
    assert reply_mask(ids).tolist() == mask
    replies = [t for t, m in zip(ids, mask, strict=True) if m]
    assert replies == [*enc.encode_ordinary("Hello!"), EOT, *enc.encode_ordinary("Fine <|endoftext|> thanks."), EOT]
    assert reply_mask([EOT, *ids]).tolist() == [0, *mask]  # the <|endoftext|> the mix puts first is context


@pytest.fixture(scope="module")
def pair_split(tmp_path_factory):
    """The PAIRS as one split, plus a long-prompt example whose reply lies beyond a short block."""
    out = tmp_path_factory.mktemp("split")
    rows = [example((i + ("\n\n" + x if x else ""), o)) for i, x, o in PAIRS]
    rows.append(example(("word " * 80, "A reply past the cut.")))
    write_examples(out, "train", rows)
    write_manifest(out)
    return out, rows


def test_loader_pads_right_masks_prompts_and_cuts_long_examples(pair_split):
    out, rows = pair_split
    loader = ExampleLoader(out, "train", batch_size=3, block_size=64)
    x, y = loader.batch([0, 4, 6])
    lengths = [len(rows[i]) for i in (0, 4, 6)]
    assert x.shape == y.shape == (3, 64)  # the longest example is cut to block_size + 1 tokens
    for row, (i, n) in enumerate(zip((0, 4, 6), lengths, strict=True)):
        ids, n = np.array(rows[i][:65]), min(n, 65)
        assert x[row, : n - 1].tolist() == ids[:-1].tolist()
        assert y[row, : n - 1].tolist() == np.where(reply_mask(ids)[1:] == 1, ids[1:], -1).tolist()
        assert (y[row, n - 1 :] == -1).all()
    reply = [t for t in y[0].tolist() if t != -1]
    assert get_tokenizer().decode(reply) == "The capital of France is Paris.<|endoftext|>"
    assert (y[2] == -1).all()  # the reply of the long example is cut off entirely
    x, y = ExampleLoader(out, "train", 2, block_size=64).batch([3, 4])
    assert x.shape[1] == max(len(rows[3]), len(rows[4])) - 1  # padded only to the longest in the batch


def test_loader_order_follows_seed_and_position(pair_split):
    out, rows = pair_split

    def draw(loader, k):
        return [loader.next_batch()[0] for _ in range(k)]

    def unpad(x_row):
        ids = x_row.tolist()
        while ids[-1] == EOT:  # x holds an example without its final <|endoftext|>, then the padding
            ids.pop()
        return tuple(ids)

    a, b = ExampleLoader(out, "train", 2, 64, seed=5), ExampleLoader(out, "train", 2, 64, seed=5)
    first = draw(a, 7)
    assert all(torch.equal(p, q) for p, q in zip(first, draw(b, 7), strict=True))
    seen = sorted(unpad(r) for batch in first for r in batch)  # 7 batches of 2: every example once per epoch
    assert seen == sorted(2 * [r[:65][:-1] for r in rows])
    resumed = ExampleLoader(out, "train", 2, 64, seed=5)
    resumed.load_state_dict({**a.state_dict(), "position": 4})
    assert all(torch.equal(p, q) for p, q in zip(draw(resumed, 3), first[4:], strict=True))
    ranks = [ExampleLoader(out, "train", 2, 64, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert all(torch.equal(ranks[i % 2].next_batch()[0], first[i]) for i in range(6))
    assert not all(torch.equal(p, q) for p, q in zip(draw(ExampleLoader(out, "train", 2, 64, seed=6), 7), first,
                                                     strict=True))
    with pytest.raises(UserError, match="seed=5 over 7 train examples, this run seed=6"):
        ExampleLoader(out, "train", 2, 64, seed=6).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------- the mix

SMOLTALK_ROWS = [
    conversation(("What is 2+2?", "4.")),                                                  # kept
    {"messages": [chat("system", "Be brief."), chat("user", "Name a color."), chat("assistant", "Blue.")]},  # kept
    conversation(("Hi", "Hello!"), ("How are you?", "Fine.")),                             # kept: first exchange
    {"messages": [chat("assistant", "Hello."), chat("user", "Hi.")]},                      # malformed: order
    {"messages": "What is 2+2?"},                                                          # malformed: not a list
    "{not json",                                                                           # malformed
    "[1, 2]",                                                                              # malformed: not an object
    {"messages": [chat("user", "Anyone there?")]},                                         # malformed: no reply
    conversation(("Say something.", "   ")),                                               # empty
    conversation(("What is 2+2?", "4.")),                                                  # duplicate
    conversation(("word " * 301, "Too long a prompt.")),                                  # too long: 301 tokens
    conversation(("Count to 300.", "a" + " a" * 299)),                                    # kept: exactly 300
    conversation(("Count to 301.", "a" + " a" * 300)),                                    # too long
]
ALPACA_ROWS = [
    dict(instruction="Translate to French.", input="Hello", output="Bonjour"),            # kept
    dict(instruction="Say <|user|> hi.", input="", output="Hi!"),                         # kept: marker is text
    dict(instruction="Write a lot.", input="", output="x" * 1001),                        # too long: characters
    dict(instruction="No output.", input=""),                                              # malformed
    dict(instruction="Numbers.", input="", output=5),                                      # malformed
    dict(instruction="  ", input="", output="Nothing asked."),                            # empty
    dict(instruction="What is 2+2?", input="", output="4."),                              # duplicate of smoltalk's
    dict(instruction="Summarize.", input="A long text. " * 70, output="Short."),          # kept: 921 characters
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    write_jsonl(d / "smoltalk.jsonl", SMOLTALK_ROWS)
    (d / "alpaca.json").write_text(json.dumps(ALPACA_ROWS))
    return d


def all_sources(d, out_dir, *args):
    return mix(mix_args(out_dir, "--smoltalk", d / "smoltalk.jsonl", "--raschka", RASCHKA, "--alpaca",
                        d / "alpaca.json", *args))


def test_filters_and_counts_on_generated_sources_and_the_raschka_file(sources, tmp_path):
    enc = get_tokenizer()
    assert len(enc.encode_ordinary(("word " * 301).strip())) == 301
    assert len(enc.encode_ordinary("a" + " a" * 299)) == 300
    summary = all_sources(sources, tmp_path)
    counts = {s: [c[k] for k in ("rows", *REASONS, "kept")] for s, c in summary["sources"].items()}
    # rows, malformed, empty, too_long_chars, duplicate, too_long_tokens, kept
    assert counts == {"smoltalk": [13, 5, 1, 0, 1, 2, 4], "raschka": [500, 0, 0, 0, 0, 0, 500],
                      "alpaca": [8, 2, 1, 1, 1, 0, 3]}
    assert summary["val_examples"] == round(0.02 * 507) and summary["train_examples"] == 507 - 10
    assert summary == json.loads((tmp_path / "summary.json").read_text())

    raschka = json.loads(RASCHKA.read_text())
    expected = {example(("\n\n".join(filter(None, (r["instruction"].strip(), r["input"].strip()))),
                         r["output"].strip())) for r in raschka}
    expected |= {example(("What is 2+2?", "4.")), example(("Be brief.\n\nName a color.", "Blue.")),
                 example(("Hi", "Hello!")), example(("Count to 300.", "a" + " a" * 299)),
                 example(("Translate to French.\n\nHello", "Bonjour")), example(("Say <|user|> hi.", "Hi!")),
                 example(("Summarize.\n\n" + ("A long text. " * 70).strip(), "Short."))}
    train, val = split_examples(tmp_path, "train"), split_examples(tmp_path, "val")
    assert len(train) + len(val) == len(set(train) | set(val)) == len(expected)
    assert set(train) | set(val) == expected

    # the token limits, counted against the tokenizer directly on the real file
    limited = mix(mix_args(tmp_path / "limited", "--sources=raschka", "--raschka", RASCHKA,
                           "--max_prompt_tokens=40", "--max_response_tokens=20"))
    too_long = sum(len(enc.encode_ordinary("\n\n".join(filter(None, (r["instruction"].strip(), r["input"].strip())))))
                   > 40 or len(enc.encode_ordinary(r["output"].strip())) > 20 for r in raschka)
    assert 0 < too_long < 500
    assert limited["sources"]["raschka"]["too_long_tokens"] == too_long
    assert limited["train_examples"] + limited["val_examples"] == 500 - too_long


def test_multi_turn_and_parquet(sources, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [SMOLTALK_ROWS[0], SMOLTALK_ROWS[1], SMOLTALK_ROWS[2]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "smol.parquet")
    summary = mix(mix_args(tmp_path / "out", "--sources=smoltalk", "--smoltalk", tmp_path / "smol.parquet",
                           "--multi_turn", "--val_fraction=0.3"))
    assert summary["sources"]["smoltalk"]["kept"] == 3
    got = set(split_examples(tmp_path / "out", "train")) | set(split_examples(tmp_path / "out", "val"))
    two_turns = example(("Hi", "Hello!"), ("How are you?", "Fine."))
    assert two_turns in got and example(("Hi", "Hello!")) not in got
    assert reply_mask(two_turns).tolist() == [0, *render_chat([("Hi", "Hello!"), ("How are you?", "Fine.")])[1]]


def test_weights_split_and_determinism(sources, tmp_path):
    summary = all_sources(sources, tmp_path / "a", "--weights=raschka=0.5,alpaca=2")
    s = summary["sources"]
    assert s["raschka"]["train"] + s["raschka"]["val"] == 250  # half the source
    assert s["smoltalk"]["train"] + s["smoltalk"]["val"] == 4
    assert s["alpaca"]["train"] == 2 * (3 - s["alpaca"]["val"])  # train examples twice, val ones once
    assert summary["val_examples"] == round(0.02 * (250 + 4 + 3))
    train, val = split_examples(tmp_path / "a", "train"), split_examples(tmp_path / "a", "val")
    assert not set(train) & set(val)
    all_sources(sources, tmp_path / "b", "--weights=raschka=0.5,alpaca=2")
    for name in ("train_000000.bin", "train_offsets.npy", "val_000000.bin", "val_offsets.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = all_sources(sources, tmp_path / "c", "--weights=raschka=0.5,alpaca=2", "--seed=1")
    assert split_examples(tmp_path / "c", "val") != val and other["val_examples"] == summary["val_examples"]


def one_line_error(match, argv):
    with pytest.raises(UserError, match=match) as e:
        mix(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_mix_errors_are_one_line(sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    missing = tmp_path / "missing.json"
    message = one_line_error("no such file", mix_args(out, "--sources=raschka", "--raschka", missing))
    assert str(missing) in message and "instruction, input, output" in message
    alpaca = sources / "alpaca.json"
    message = one_line_error("none with the smoltalk fields", mix_args(out, "--sources=smoltalk", "--smoltalk", alpaca))
    assert str(alpaca) in message and "messages" in message
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "text.parquet")
    one_line_error(r"text.parquet: no column messages .*columns: text", mix_args(
        out, "--sources=smoltalk", "--smoltalk", tmp_path / "text.parquet"))
    empty = write_pairs(tmp_path / "empty.json", [("Question?", "", " "), ("", "", "Answer.")])
    one_line_error(r"0 examples left .*raschka: 2 rows, 2 empty", mix_args(out, "--sources=raschka", "--raschka",
                                                                          empty))
    assert not out.exists()
    one_line_error("--weights 'alpaca=2'", mix_args(out, "--sources=raschka", "--weights=alpaca=2"))
    one_line_error("--val_fraction", mix_args(out, "--val_fraction=0"))

    # the downloads fail cleanly offline, pointing at the local-file flags
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    assert "pass --raschka PATH" in one_line_error("cannot download raschka", mix_args(out, "--sources=raschka"))
    assert "pass --smoltalk PATH" in one_line_error("HuggingFaceTB/smol-smoltalk", mix_args(out))


# ----------------------------------------------------------------------------- whole fine-tunes


def finetune_cmd(base, data_dir, out_dir, *args):
    return [sys.executable, "finetune_sft.py", "configs/sft_smoke.toml", f"--init_from={base}",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--compile=False", "--sample_interval=0",
            "--checkpoint_interval=1000", *args]


def start(*cmd_args):
    return subprocess.Popen(finetune_cmd(*cmd_args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def finish(*procs, check=True):
    """Wait for runs started together (on two cores, two one-thread runs take the time of one)."""
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    if check:
        for proc, stdout, stderr in results:
            assert proc.returncode == 0, stderr + stdout
    return results


def finetune(*cmd_args):
    finish(start(*cmd_args))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny model saved in train_gpt.py's checkpoint format (smoke shape)."""
    run_dir = tmp_path_factory.mktemp("base")
    make_checkpoint(run_dir / "ckpt.pt")
    return run_dir


@pytest.fixture(scope="module")
def raschka_mix(tmp_path_factory):
    out = tmp_path_factory.mktemp("raschka_mix")
    mix(mix_args(out, "--sources=raschka", "--raschka", RASCHKA))
    return out


def test_fine_tune_takes_the_base_runs_recipe_with_its_rates_times_lr_scale(raschka_mix, tmp_path):
    recipe = dict(optimizer="muon", matrix_lr=0.03, embedding_lr=0.2, head_lr=0.006, scalar_lr=0.02, lr_ref_width=256,
                  head_lr_exponent=1.0, adam_beta1=0.7, adam_eps=1e-9, muon_momentum=0.9)
    make_checkpoint(tmp_path / "base" / "ckpt.pt", settings=recipe)  # 64 wide: (256 / 64)**1 = x4 on the head
    out = tmp_path / "sft"
    ns = run_script("finetune_sft.py", "configs/sft_smoke.toml", f"--init_from={tmp_path / 'base'}",
                    f"--data_dir={raschka_mix}", f"--out_dir={out}", "--device=cpu", "--max_iters=1",
                    "--lr_scale=0.5", "--sample_interval=0", "--eval_interval=1000")
    adam_lrs, muon_lrs = ns["base_lrs"]
    assert adam_lrs == pytest.approx([0.012, 0.01]) and muon_lrs == [0.015]  # x 0.5; the tied head x 256 / 64
    adamw, muon = ns["optimizers"]
    assert adamw.defaults["betas"][0] == 0.7 and adamw.defaults["eps"] == 1e-9 and muon.defaults["momentum"] == 0.9
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in recipe} == recipe and saved["lr_scale"] == 0.5  # a resumed fine-tune finds them


def test_cli_fine_tune_learns_replies_that_greedy_sampling_reproduces(base, tmp_path):
    data, out, pairs = tmp_path / "data", tmp_path / "sft", write_pairs(tmp_path / "pairs.json")
    mix(mix_args(data, "--sources=raschka", "--raschka", pairs, "--val_fraction=0.1"))
    cli = subprocess.Popen([sys.executable, "data/sft_mix.py", "--sources=raschka", f"--raschka={pairs}",
                            f"--out_dir={tmp_path / 'cli'}", "--val_fraction=0.1"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV)
    (_, printed, _), _ = finish(cli, start(base, data, out, "--max_iters=30", "--batch_size=5",
                                           "--total_batch_size=5", "--lr_scale=1",
                                           "--sample_interval=30"))
    assert "6 rows -> 6 kept (none dropped); weight 1 -> 5 train, 1 val" in printed
    for name in ("train_000000.bin", "train_offsets.npy", "val_000000.bin", "val_offsets.npy"):
        assert (tmp_path / "cli" / name).read_bytes() == (data / name).read_bytes()
    records = metrics(out)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.5 < 5 < losses[0]

    ckpt = load_checkpoint(out, "cpu")  # weights_only=True
    assert ckpt["chat"] is True and ckpt["step"] == 30 and ckpt["loader"]["position"] == 30
    model = load_model_namespace(ROOT / "finetune_sft.py")["GPT"].from_checkpoint(ckpt).eval()
    enc = get_tokenizer()
    trained = split_examples(data, "train")
    assert len(trained) == 5
    for ids in trained:
        cut = ids.index(ASSISTANT) + 1
        reply = [t.item() for t in model.generate(torch.tensor([ids[:cut]]), len(ids) - cut, temperature=0)]
        assert reply == list(ids[cut:]), enc.decode(ids)
    france = "The capital of France is Paris."
    assert example(("What is the capital of France?", france)) in trained
    assert f"step 30 sample: 'What is the capital of France?' -> {france!r}" in (out / "log.txt").read_text()
    result = subprocess.run([sys.executable, "sample.py", "What is the capital of France?", f"--ckpt={out}",
                             "--device=cpu", "--temperature=0"], cwd=ROOT, capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == france


RESUME_ARGS = ("--batch_size=4", "--log_interval=1", "--eval_interval=2", "--val_examples=8")


@pytest.fixture(scope="module")
def full_and_short(base, raschka_mix, tmp_path_factory):
    """A 4-step run, and the first 2 steps of the same run (the full run's schedule) to resume."""
    full, short = tmp_path_factory.mktemp("full") / "run", tmp_path_factory.mktemp("short") / "run"
    finish(start(base, raschka_mix, full, "--max_iters=4", *RESUME_ARGS),
           start(base, raschka_mix, short, "--max_iters=2", "--lr_decay_iters=4", *RESUME_ARGS))
    return full, short


def test_resume_is_bitwise_exact(raschka_mix, full_and_short, tmp_path):
    full, short = full_and_short
    resumed = tmp_path / "resumed"
    shutil.copytree(short, resumed)
    finish(start("resume", raschka_mix, resumed, "--max_iters=4", *RESUME_ARGS))
    expected = train_records(full)
    assert [r[0] for r in expected] == [1, 2, 3, 4]
    assert train_records(resumed) == expected
    val = [(r["step"], r["val_loss"]) for r in metrics(resumed) if "val_loss" in r]
    assert sorted(set(val)) == [(r["step"], r["val_loss"]) for r in metrics(full) if "val_loss" in r]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_after_resume_keeps_the_good_checkpoint(raschka_mix, full_and_short, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(full_and_short[1], broken)
    before = hashlib.sha256((broken / "ckpt.pt").read_bytes()).hexdigest()
    (proc, stdout, _), = finish(start("resume", raschka_mix, broken, "--max_iters=4", "--lr_scale=1e30",
                                      "--checkpoint_interval=1", *RESUME_ARGS), check=False)
    # the new lr_scale applies, and the log says so; the step after the resume breaks the weights: the run
    # stops before it checkpoints them
    assert "apply from here: lr_scale 1.0 -> 1e+30" in stdout
    assert proc.returncode == 1 and "last good checkpoint" in stdout
    assert hashlib.sha256((broken / "ckpt.pt").read_bytes()).hexdigest() == before


def test_two_rank_ddp_matches_one_rank_with_the_same_micro_batches(base, raschka_mix, tmp_path):
    args = ("--max_iters=1", "--batch_size=4", "--total_batch_size=8", "--val_examples=8")
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *finetune_cmd(base, raschka_mix, tmp_path / "two", *args)[1:]], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    finish(ddp, start(base, raschka_mix, tmp_path / "one", *args))
    (one,), (two,) = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert one[1] == pytest.approx(two[1], rel=1e-6) and one[2] == pytest.approx(two[2], rel=1e-5)  # loss, grad norm
    val = [[r["val_loss"] for r in metrics(tmp_path / d) if "val_loss" in r] for d in ("one", "two")]
    assert val[0] == pytest.approx(val[1], rel=1e-6)


def test_replies_cut_off_by_block_size_are_counted_or_refused_and_sigterm_checkpoints(base, tmp_path):
    data, out = tmp_path / "data", tmp_path / "sft"
    mix(mix_args(data, "--sources=raschka", "--raschka", write_pairs(tmp_path / "pairs.json")))
    # block_size=4: <|endoftext|><|user|> and 3 prompt tokens; every reply is cut off, so nothing would be learned
    with pytest.raises(UserError, match=r"block_size=4: none of the 5 train examples keeps a reply token") as e:
        run_script(*finetune_cmd(base, data, out, "--block_size=4")[1:])
    assert "\n" not in str(e.value) and not out.exists()
    # block_size=10: two train replies start past the cut; the run says so, and trains on the other three
    proc = subprocess.Popen(finetune_cmd(base, data, out, "--block_size=10", "--max_iters=10000", "--log_interval=1"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for_steps(out, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    log = (out / "log.txt").read_text()
    assert "warning: 2 of 5 train and 0 of 1 val examples carry no loss: their replies start past block_size + 1 = " \
        "11 tokens" in log and "interrupted by signal" in log
    records = train_records(out)
    ckpt = load_checkpoint(out, "cpu")
    assert len(records) >= 2 and ckpt["step"] == records[-1][0] and ckpt["chat"] is True


def test_the_examples_that_carry_no_loss_are_those_whose_batch_has_no_target():
    for block_size in (8, 16, 64):
        loader = ExampleLoader(SAMPLE_SFT, "train", 4, block_size)
        for i in range(0, loader.n, 7):
            _, y = loader.batch([i])
            assert bool((y != -1).any()) == bool(loader.has_loss[i]), (block_size, i)


def test_bad_inputs_are_one_line_errors(base, raschka_mix, tmp_path, monkeypatch):
    (proc, stdout, stderr), = finish(start(tmp_path / "missing", raschka_mix, tmp_path / "a"), check=False)
    assert proc.returncode == 1 and stderr.strip() == f"error: checkpoint {tmp_path / 'missing'} not found (looked " \
        f"for the file and for {tmp_path / 'missing'}/ckpt.pt)"
    assert not (tmp_path / "a").exists()

    # the other cases in this process: the same script, without a second torch import
    make_checkpoint(tmp_path / "small_vocab" / "ckpt.pt", vocab_size=50257)
    make_checkpoint(tmp_path / "mismatched" / "ckpt.pt")
    ckpt = torch.load(tmp_path / "mismatched" / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "n_embd": 128}}, tmp_path / "mismatched" / "ckpt.pt")
    for args, message in [
        ((tmp_path / "mismatched", raschka_mix, tmp_path / "b"), "weights do not fit arch=gpt2 n_layer=2 n_embd=128"),
        ((tmp_path / "small_vocab", raschka_mix, tmp_path / "c"), "vocab_size 50257 has no room for the chat tokens"),
        (("resume", raschka_mix, base), "was not written by finetune_sft.py"),
        (("", raschka_mix, tmp_path / "d"), "no base model: pass --init_from=PATH"),
        ((base, raschka_mix, base), "whose checkpoints this run overwrites"),
        ((base, tmp_path / "no_data", tmp_path / "e"), f"python data/sft_mix.py --out_dir {tmp_path / 'no_data'}"),
        ((base, raschka_mix, tmp_path / "f", "--total_batch_size=x"), "must be int"),
    ]:
        with pytest.raises(UserError) as e:
            run_script(*finetune_cmd(*args)[1:])
        assert message in str(e.value) and "\n" not in str(e.value)
