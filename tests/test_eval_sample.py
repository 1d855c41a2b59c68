"""eval_hellaswag.py, data/hellaswag.py and sample.py: on tiny random models, on the shared smoke run,
and on the bundled HellaSwag rows; CPU only, offline, seconds."""

import io
import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    HELLASWAG,
    REPO_ROOT,
    assert_one_line_error,
    load_model_namespace,
    make_checkpoint,
    run_cli,
    run_script,
    wait_for_text,
)

import data.hellaswag as hellaswag
from data import UserError
from data.tokenizer import EOT, VOCAB_SIZE, chat_prompt, get_tokenizer

sample_logits = load_model_namespace(REPO_ROOT / "sample.py")["sample_logits"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """arch -> a run dir holding a tiny random checkpoint, and the model in it."""
    root = tmp_path_factory.mktemp("runs")
    return {arch: (root / arch, make_checkpoint(root / arch / "ckpt.pt", arch=arch)) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def examples():
    return hellaswag.load_hellaswag(HELLASWAG, limit=16)


def greedy_text(model, ids, n):
    """What sample.py should print after ids: n greedy tokens up to <|endoftext|>, decoded."""
    tokens = [t.item() for t in model.generate(torch.tensor([ids]), n, temperature=0)]
    tokens = tokens[: tokens.index(EOT)] if EOT in tokens else tokens
    return get_tokenizer().decode([t for t in tokens if t < get_tokenizer().n_vocab])


# ----------------------------------------------------------------------------- HellaSwag


def test_render_real_row(examples):
    enc = get_tokenizer()
    example = examples[0]
    assert example["ctx"] == "A man is sitting on a roof. he" and example["label"] == 3
    rows = hellaswag.render_example(example, block_size=1024)
    context = enc.encode_ordinary(example["ctx"])
    n = len(context)
    for (tokens, mask), ending in zip(rows, example["endings"], strict=True):
        assert tokens[:n] == context and enc.decode(tokens[n:]) == " " + ending
        assert mask == [0] * n + [1] * (len(tokens) - n)
    # past block_size + 1 tokens the context loses its head; the ending is kept whole
    tokens, mask = hellaswag.render_example(example, block_size=12)[3]
    ending = enc.encode_ordinary(" " + example["endings"][3])
    kept = 13 - len(ending)
    assert len(tokens) == 13 and 0 < kept < len(context) and tokens == context[-kept:] + ending
    assert mask == [0] * kept + [1] * len(ending)


def test_batched_scoring_equals_one_at_a_time(run_dirs, examples):
    model = run_dirs["gpt2"][1]  # block_size 64 truncates some of these contexts
    rows = [row for ex in examples[:6] for row in hellaswag.render_example(ex, 64)]
    batched = hellaswag.ending_losses(model, rows, "cpu")
    alone = [hellaswag.ending_losses(model, [row], "cpu") for row in rows]
    for i in range(2):  # total and mean loss
        torch.testing.assert_close(batched[i], torch.cat([losses[i] for losses in alone]), atol=1e-5, rtol=1e-5)
    score = hellaswag.hellaswag_score(model, examples[:8], "cpu", batch_size=3)
    assert score == hellaswag.hellaswag_score(model, examples[:8], "cpu", batch_size=1)
    assert 0 <= score["acc"] <= 1 and 0 <= score["acc_norm"] <= 1 and score["n"] == 8


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bar_shows_on_a_terminal_only_and_leaves_the_line_clear(run_dirs, examples, monkeypatch,
                                                                          terminal):
    """In a log file (stderr not a terminal) the bar's \r updates would share a line with the next log line."""
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    hellaswag.hellaswag_score(run_dirs["gpt2"][1], examples[:8], "cpu", batch_size=2)
    if terminal:
        assert "hellaswag" in stderr.getvalue() and stderr.getvalue().endswith("\r")  # cleared: column 0
        assert stderr.getvalue().rsplit("\r", 2)[-2].strip() == ""
    else:
        assert stderr.getvalue() == ""


def test_ranks_split_the_examples(run_dirs, examples, monkeypatch):
    """With W ranks each scores every W-th example; the all-reduce (here: the sum done by hand) gives the full score."""
    model = run_dirs["llama"][1]
    monkeypatch.setattr(hellaswag.dist, "all_reduce", lambda counts: None)
    shards = [hellaswag.hellaswag_score(model, examples[:8], "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert [s["n"] for s in shards] == [4, 4]
    whole = hellaswag.hellaswag_score(model, examples[:8], "cpu")
    for key in ("acc", "acc_norm"):
        assert sum(s[key] * s["n"] for s in shards) == pytest.approx(whole[key] * 8)


def test_a_model_that_knows_the_answers_scores_one(examples):
    """An oracle that puts its logits on the next token of the correct row must pick every label."""

    class Oracle(torch.nn.Module):
        config = SimpleNamespace(block_size=64)

        def __init__(self):
            super().__init__()
            self.next = {}  # correct row prefix -> its next token
            for ex in examples:
                tokens, _ = hellaswag.render_example(ex, 64)[ex["label"]]
                self.next.update({tuple(tokens[:i]): tokens[i] for i in range(1, len(tokens))})

        def forward(self, idx, logits_at):
            logits = torch.zeros(*idx.shape, VOCAB_SIZE)
            for b, row in enumerate(idx.tolist()):
                for t in range(len(row)):
                    if tuple(row[: t + 1]) in self.next:
                        logits[b, t, self.next[tuple(row[: t + 1])]] = 30.0
            return logits[logits_at], None

    score = hellaswag.hellaswag_score(Oracle(), examples, "cpu", batch_size=4)
    assert score == {"acc": 1.0, "acc_norm": 1.0, "n": len(examples)}


def test_malformed_row_names_the_line(tmp_path):
    good = {"ctx": "A man is sitting on a roof. he", "endings": ["a", "b", "c", "d"], "label": 3}
    path = tmp_path / "h.jsonl"
    for bad, problem in [("{not json", "not valid JSON"), (json.dumps({**good, "endings": ["a"]}), "'endings'"),
                         (json.dumps({**good, "label": 4}), "'label'")]:
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(UserError, match=f"{path} line 2: {problem}"):
            hellaswag.load_hellaswag(path)
    assert len(hellaswag.load_hellaswag(path, limit=1)) == 1  # a limit stops before the bad row


def test_offline_download_asks_for_data_and_comes_after_the_checkpoint_check(smoke_run, tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "HELLASWAG_FILE", tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # refused at once
    with pytest.raises(UserError, match="checkpoint /nonexistent/run not found"):
        run_script("eval_hellaswag.py", "--ckpt=/nonexistent/run", "--device=cpu")
    assert not (tmp_path / "hellaswag").exists()  # no download for a checkpoint that is not there
    with pytest.raises(UserError, match="pass --data=PATH"):
        run_script("eval_hellaswag.py", f"--ckpt={smoke_run}", "--device=cpu")
    assert not list(tmp_path.rglob("*.jsonl*"))  # no half-written file left behind


def test_an_empty_hellaswag_file_is_refused(smoke_run, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    result = run_cli("eval_hellaswag.py", f"--ckpt={smoke_run}", f"--data={tmp_path / 'empty.jsonl'}", "--device=cpu")
    assert_one_line_error(result, "holds no examples")


def test_ctrl_c_during_eval_is_one_line(tmp_path):
    """The scoring is made to repeat until the signal comes (a wrapper tells when it starts), so the
    signal lands during the eval however busy the machine is."""
    make_checkpoint(tmp_path / "run" / "ckpt.pt")
    wrapper = ("import runpy, sys, time\nimport data.hellaswag as h\nreal = h.hellaswag_score\n"
               "def looping(*args, **kwargs):\n    print('SCORING', file=sys.stderr, flush=True)\n"
               "    deadline = time.time() + 300\n    while time.time() < deadline:\n        real(*args, **kwargs)\n"
               "h.hellaswag_score = looping\n"
               f"sys.argv = ['eval_hellaswag.py', '--ckpt={tmp_path / 'run'}', '--data={HELLASWAG}', '--limit=4', "
               "'--device=cpu']\nrunpy.run_path('eval_hellaswag.py', run_name='__main__')\n")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", wrapper], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    wait_for_text(err, "SCORING", proc, timeout=300)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) in (1, -signal.SIGINT, 128 + signal.SIGINT)
    text = err.read_text()
    assert text.rstrip().endswith("interrupted") and "Traceback" not in text, text


def test_eval_cli(run_dirs, tmp_path):
    run_dir, model = run_dirs["llama"]
    out = tmp_path / "score.json"
    result = run_cli("eval_hellaswag.py", f"--ckpt={run_dir}", f"--data={HELLASWAG}", "--limit", "6",
                     "--batch_size=4", "--device=cpu", f"--out={out}")
    assert result.returncode == 0, result.stderr
    score = json.loads(out.read_text())
    assert score["n"] == 6 and score["limit"] == 6 and str(run_dir) in score["ckpt"]
    expected = hellaswag.hellaswag_score(model, hellaswag.load_hellaswag(HELLASWAG, 6), "cpu")
    assert {k: score[k] for k in expected} == expected  # deterministic
    assert f"acc {score['acc']:.4f} acc_norm {score['acc_norm']:.4f} n 6" in result.stdout


def test_the_smoke_run_scores_the_bundled_rows_as_the_training_loop_did(smoke_run):
    """eval_hellaswag.py on the trained smoke checkpoint gives the acc_norm its training run logged at the end."""
    logged = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    at_end = [r["hellaswag"] for r in logged if "hellaswag" in r][-1]
    namespace = run_script("eval_hellaswag.py", f"--ckpt={smoke_run}", f"--data={HELLASWAG}", "--limit=8",
                           "--device=cpu")
    assert namespace["score"]["acc_norm"] == at_end and namespace["score"]["n"] == 8


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_with_cache_equals_without(run_dirs, arch):
    model = run_dirs[arch][1]
    prompt = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(1))
    with_cache = torch.cat(list(model.generate(prompt, 45, temperature=0, use_cache=True)), dim=1)
    without = torch.cat(list(model.generate(prompt, 45, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(with_cache, without)  # 75 tokens: past block_size 64 the window slides


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=g).unique().tolist()) == {1, 3}
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    for top_p, kept in [(0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        assert set(sample_logits(probs, top_p=top_p, generator=g).unique().tolist()) == kept, top_p
    assert sample_logits(probs, temperature=0).unique().tolist() == [0]


def sample_text(capsys, *args):
    run_script("sample.py", *args)
    return capsys.readouterr().out


def test_same_seed_same_text(run_dirs, capsys):
    def text(seed):
        return sample_text(capsys, "Once", f"--ckpt={run_dirs['gpt2'][0]}", "--max_new_tokens=8", "--temperature=1.0",
                           f"--seed={seed}", "--device=cpu", "--num_samples=2")

    first = text(7)
    assert first == text(7) and first != text(8)
    assert first.startswith("Once") and first.count("---------------") == 1


def test_sample_cli_greedy_joins_unquoted_words_and_names_the_checkpoint(run_dirs):
    run_dir, model = run_dirs["gpt2"]
    result = run_cli("sample.py", "Hello", "world", f"--ckpt={run_dir}", "--max_new_tokens=12", "--temperature=0",
                     "--device=cpu")
    assert result.returncode == 0, result.stderr
    enc = get_tokenizer()
    assert result.stdout == "Hello world" + greedy_text(model, [EOT, *enc.encode_ordinary("Hello world")], 12) + "\n"
    assert str(run_dir / "ckpt.pt") in result.stderr


def test_chat_checkpoint_prints_only_the_reply(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "sft" / "ckpt.pt", arch="llama", chat=True, seed=3)
    printed = sample_text(capsys, "Name a color.", f"--ckpt={tmp_path / 'sft'}", "--max_new_tokens=12",
                          "--temperature=0", "--device=cpu")
    assert printed == greedy_text(model, [EOT, *chat_prompt("Name a color.")], 12) + "\n"


def test_a_text_that_ends_at_once_says_so(tmp_path, capsys):
    make_checkpoint(tmp_path / "eot" / "ckpt.pt")
    state = torch.load(tmp_path / "eot" / "ckpt.pt", weights_only=True)
    weights = state["model"]
    weights["transformer.ln_f.weight"].zero_()  # the final norm's output is its bias: ones everywhere
    weights["transformer.ln_f.bias"].fill_(1.0)
    weights["lm_head.weight"][EOT] = 1.0  # so <|endoftext|> outscores every other token at every position
    torch.save(state, tmp_path / "eot" / "ckpt.pt")
    run_script("sample.py", "Hi", f"--ckpt={tmp_path / 'eot'}", "--device=cpu")
    printed = capsys.readouterr()
    assert printed.out == "Hi\n" and "ended the text at once" in printed.err


def test_interactive_and_prompt_file(run_dirs, tmp_path, capsys, monkeypatch):
    args = [f"--ckpt={run_dirs['gpt2'][0]}", "--max_new_tokens=5", "--temperature=0", "--device=cpu"]
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The sky")
    from_file = sample_text(capsys, f"--prompt_file={prompt_file}", *args)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"The sky\nThe sky\n\nnever read\n")))
    assert sample_text(capsys, "--interactive", *args) == from_file * 2


@pytest.mark.parametrize("flag, message", [
    ("--top_p=1.5", "--top_p=1.5: must be in (0, 1]"), ("--top_p=0", "--top_p=0.0: must be in (0, 1]"),
    ("--temperature=-1", "--temperature=-1.0: must be 0"), ("--top_k=-1", "--top_k=-1: must be 0"),
    ("--max_new_tokens=0", "--max_new_tokens=0: must be at least 1"), ("--top_p=x", "top_p must be float"),
    ("--ckpt=/nonexistent/run", "checkpoint /nonexistent/run not found"),
])
def test_bad_flags_are_one_line_errors(flag, message):
    with pytest.raises(UserError) as e:
        run_script("sample.py", "hi", flag, "--device=cpu")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_flag_exit_status():
    result = run_cli("sample.py", "hi", "--top_p", "2")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: --top_p=2.0: must be in (0, 1]; 1 = off\n"
