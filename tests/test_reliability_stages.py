"""sample.py and eval_hellaswag.py against hostile or clumsy use: the chat setting, chat prompts longer than the
context, turn markers the model generates, stdin closed or not UTF-8, --out clobbering an input, repeated HellaSwag
rows, NaN weights in every stage, ~ in paths. In-process where the process does not matter; tiny random models, CPU
only, seconds."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import HELLASWAG, REPO_ROOT, SAMPLE_SFT, make_checkpoint, run_script

import data.hellaswag as hellaswag
from data import UserError
from data.tokenizer import ASSISTANT, EOT, USER, chat_prompt, get_tokenizer

ENC = get_tokenizer()
CHAT_STOPS = (EOT, USER, ASSISTANT)
LONG = " ".join(f"word{i}" for i in range(80))  # about 160 tokens: longer than the tiny models' block_size of 64


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (run dir, model): a base and an SFT (chat) checkpoint, tiny and random."""
    root = tmp_path_factory.mktemp("ckpts")
    return {name: (root / name, make_checkpoint(root / name / "ckpt.pt", chat=name == "sft", seed=3))
            for name in ("base", "sft")}


def greedy_reply(model, ids, n, stops=(EOT,)):
    """What sample.py should print after ids at temperature 0: up to n tokens, up to the first stop token."""
    tokens = [t.item() for t in model.generate(torch.tensor([ids]), n, temperature=0)]
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return ENC.decode([t for t in tokens[:end] if t < ENC.n_vocab])


def sample(capsys, *args):
    """Run sample.py in this process; its globals, stdout and stderr."""
    ns = run_script("sample.py", "--device=cpu", "--temperature=0", *args)
    printed = capsys.readouterr()
    return ns, printed.out, printed.err


def fed_ids(ns, text, history=None):
    """The token ids that the sample.py run in ns hands the model for a reply to text."""
    seen, real = [], ns["model"].generate

    def recording(idx, *args):
        seen.append(idx[0].tolist())
        return real(idx, *args)

    ns["model"].generate = recording
    try:
        ns["respond"](text, history)
    finally:
        del ns["model"].generate
    return seen[0]


def stdin(data):
    return io.TextIOWrapper(io.BytesIO(data))


# ----------------------------------------------------------------------------- sample.py: the chat setting


def test_chat_auto_follows_the_checkpoint_and_true_or_false_overrides_it(ckpts, capsys):
    base, sft = ckpts["base"], ckpts["sft"]
    args = ["--max_new_tokens=10"]
    plain = "Name a color." + greedy_reply(sft[1], [EOT, *ENC.encode_ordinary("Name a color.")], 10) + "\n"
    reply = greedy_reply(sft[1], [EOT, *chat_prompt("Name a color.")], 10, CHAT_STOPS) + "\n"
    assert plain != reply
    for flag, expected in [("--chat=auto", reply), ("--chat=false", plain), ("--chat=true", reply)]:
        _, out, err = sample(capsys, "Name a color.", f"--ckpt={sft[0]}", flag, *args)
        assert out == expected, flag
        assert (", chat]" in err) == (expected == reply), err
    _, out, _ = sample(capsys, "Name a color.", f"--ckpt={base[0]}", *args)  # auto: a base checkpoint is plain text
    assert out == "Name a color." + greedy_reply(base[1], [EOT, *ENC.encode_ordinary("Name a color.")], 10) + "\n"
    _, out, _ = sample(capsys, "Name a color.", f"--ckpt={base[0]}", "--chat=true", *args)
    assert out == greedy_reply(base[1], [EOT, *chat_prompt("Name a color.")], 10, CHAT_STOPS) + "\n"


@pytest.mark.parametrize("value", ["maybe", "", "True", "1"])
def test_a_chat_value_other_than_auto_true_false_is_one_line(ckpts, value):
    with pytest.raises(UserError, match="--chat=.*: use one of 'auto', 'true', 'false'") as e:
        run_script("sample.py", "hi", f"--ckpt={ckpts['sft'][0]}", f"--chat={value}", "--device=cpu")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sample.py: long chat prompts


@pytest.mark.parametrize("max_new_tokens, room", [(8, 64 - 8), (100, 64 // 2)])
def test_a_chat_prompt_too_long_for_the_context_keeps_its_markers(ckpts, capsys, max_new_tokens, room):
    """The window keeps the newest prompt tokens between <|endoftext|><|user|> and <|assistant|>, with room for the
    reply: max_new_tokens of it, or half the context when the reply would not fit anyway."""
    ns, _, err = sample(capsys, LONG, f"--ckpt={ckpts['sft'][0]}", f"--max_new_tokens={max_new_tokens}")
    prompt = ENC.encode_ordinary(LONG)
    cut = len(prompt) + 3 - room
    assert cut > 0 and f"its first {cut} tokens dropped" in err
    ids = fed_ids(ns, LONG)
    assert ids == [EOT, USER, *prompt[cut:], ASSISTANT] and len(ids) == room
    capsys.readouterr()
    history = [("Hi.", "Hello.")]  # an old turn goes first, whole, before any prompt token
    ids = fed_ids(ns, LONG, history)
    assert ids == [EOT, USER, *prompt[cut:], ASSISTANT] and history == [(LONG, history[0][1])]
    err = capsys.readouterr().err
    assert "the oldest 1 turn(s) dropped" in err and f"its first {cut} tokens dropped" in err


def test_a_chat_prompt_that_fits_is_whole_and_typed_markers_stay_text(ckpts, capsys):
    text = "Is <|user|> or <|assistant|> or <|endoftext|> a token?"
    ns, _, err = sample(capsys, text, f"--ckpt={ckpts['sft'][0]}", "--max_new_tokens=4")
    ids = fed_ids(ns, text)
    assert ids == [EOT, *chat_prompt(text)] and ids.count(USER) == ids.count(ASSISTANT) == 1 and "dropped" not in err


def test_a_plain_prompt_longer_than_the_context_says_so(ckpts, capsys):
    _, out, err = sample(capsys, LONG, f"--ckpt={ckpts['base'][0]}", "--max_new_tokens=4")
    assert out.startswith(LONG) and "the model sees its last 64]" in err


# ----------------------------------------------------------------------------- sample.py: turn markers end a reply


def rigged(path, token, after):
    """A tiny gpt2-arch SFT checkpoint at path whose greedy choice is `token` from position `after` on and never
    before it (a large position embedding along and against the token's tied row)."""
    model = make_checkpoint(path, chat=True, seed=5)
    state = torch.load(path, weights_only=True)
    direction = torch.ones(model.config.n_embd)
    direction[1::2] = -1  # zero mean: LayerNorm keeps it
    direction /= direction.norm()
    weights = state["model"]
    weights["transformer.wte.weight"][token] = 10 * direction
    weights["transformer.wpe.weight"][:after] = -100 * direction
    weights["transformer.wpe.weight"][after:] = 100 * direction
    torch.save(state, path)


@pytest.mark.parametrize("marker", [USER, ASSISTANT])
def test_a_generated_turn_marker_ends_the_reply_unprinted_and_unstored(tmp_path, capsys, monkeypatch, marker):
    ids = [EOT, *chat_prompt("Hi")]
    rigged(tmp_path / "sft" / "ckpt.pt", marker, after=len(ids) - 1 + 3)  # 3 tokens of text, then the marker
    monkeypatch.setattr(sys, "stdin", stdin(b"Hi\n"))
    ns, out, _ = sample(capsys, "--interactive", f"--ckpt={tmp_path / 'sft'}", "--max_new_tokens=10")
    tokens = [t.item() for t in ns["model"].generate(torch.tensor([ids]), 10, temperature=0)]
    assert tokens[3] == marker and not set(tokens[:3]) & set(CHAT_STOPS)  # the rig works: text, then the marker
    text = ENC.decode(tokens[:3])
    assert out == text + "\n" and "<|" not in out
    assert ns["history"] == [("Hi", text)]


def test_a_reply_that_is_only_a_marker_says_so(tmp_path, capsys):
    rigged(tmp_path / "sft" / "ckpt.pt", USER, after=0)
    _, out, err = sample(capsys, "Hi", f"--ckpt={tmp_path / 'sft'}")
    assert out == "\n" and "ended the reply at once (<|user|>)" in err


# ----------------------------------------------------------------------------- sample.py: stdin


@pytest.mark.parametrize("how", ["closed", "/dev/null"])
def test_interactive_with_stdin_closed_or_empty_ends_quietly(ckpts, how):
    kwargs = dict(stdin=subprocess.DEVNULL)
    if how == "closed":
        kwargs["preexec_fn"] = lambda: os.close(0)  # as `< &-` leaves it: Python starts with sys.stdin = None
    result = subprocess.run([sys.executable, "sample.py", "--interactive", f"--ckpt={ckpts['sft'][0]}",
                             "--device=cpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr  # the checkpoint line


def test_interactive_stdin_that_is_not_utf8_is_one_line_after_the_good_lines(ckpts, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", stdin(b"Hi\ncaf\xe9\nnever read\n"))
    with pytest.raises(UserError, match=r"stdin line 2 is not valid UTF-8 \(byte 3\); send UTF-8 text") as e:
        sample(capsys, "--interactive", f"--ckpt={ckpts['sft'][0]}", "--max_new_tokens=3")
    assert "\n" not in str(e.value)
    assert capsys.readouterr().out.count("\n") == 1  # the first line was answered


def test_interactive_stdin_that_fails_to_read_is_one_line(ckpts, capsys, monkeypatch):
    def hung_up():
        raise OSError(5, "Input/output error")  # a terminal that went away

    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: False, buffer=SimpleNamespace(readline=hung_up)))
    with pytest.raises(UserError, match=r"--interactive: cannot read stdin \(Input/output error\)"):
        sample(capsys, "--interactive", f"--ckpt={ckpts['sft'][0]}")


def test_interactive_reads_crlf_lines_and_keeps_the_first_of_several_samples(ckpts, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", stdin(b"Hi\r\n"))
    ns, out, _ = sample(capsys, "--interactive", f"--ckpt={ckpts['sft'][0]}", "--max_new_tokens=5", "--num_samples=2",
                        "--temperature=1", "--seed=4")
    first, second = out.split("---------------\n")
    assert ns["history"] == [("Hi", first.removesuffix("\n"))] and first != second


# ----------------------------------------------------------------------------- sample.py: odd prompts


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_empty_and_blank_prompts_sample(ckpts, capsys, text):
    for name in ("base", "sft"):
        ns, out, _ = sample(capsys, text, f"--ckpt={ckpts[name][0]}", "--max_new_tokens=4")
        model = ckpts[name][1]
        if name == "sft":
            assert out == greedy_reply(model, [EOT, *chat_prompt(text)], 4, CHAT_STOPS) + "\n"
        else:
            assert out == text + greedy_reply(model, [EOT, *ENC.encode_ordinary(text)], 4) + "\n"


def test_a_prompt_that_is_not_utf8_is_one_line(ckpts):
    with pytest.raises(UserError, match=r"the prompt is not valid UTF-8 \(character 4\)"):
        run_script("sample.py", "caf\udce9", f"--ckpt={ckpts['base'][0]}", "--device=cpu")  # argv's bytes 63 61 66 e9


def test_a_prompt_file_that_is_a_folder_or_unreadable_is_one_line(ckpts, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a folder; pass the text file"):
        run_script("sample.py", f"--prompt_file={tmp_path}", f"--ckpt={ckpts['base'][0]}", "--device=cpu")
    locked, read_text = tmp_path / "prompt.txt", Path.read_text
    locked.write_text("hi")

    def unreadable(path, *args, **kwargs):  # as a file without read permission is, to anyone but root
        if path == locked:
            raise PermissionError(13, "Permission denied")
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(UserError, match=r"prompt.txt: cannot be read \(Permission denied\); check its permissions"):
        run_script("sample.py", f"--prompt_file={locked}", f"--ckpt={ckpts['base'][0]}", "--device=cpu")


# ----------------------------------------------------------------------------- eval_hellaswag.py: --out


def never(*args, **kwargs):
    raise AssertionError("scored, though the command should have been refused first")


def evaluate(*args):
    return run_script("eval_hellaswag.py", *args, "--device=cpu")


def test_out_that_is_a_folder_is_refused_before_scoring(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "hellaswag_score", never)
    with pytest.raises(UserError, match=f"--out={tmp_path} is a folder; name a file in it"):
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={HELLASWAG}", f"--out={tmp_path}")
    with pytest.raises(UserError, match="is not a regular file"):
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={HELLASWAG}", "--out=/dev/null")


@pytest.mark.parametrize("target, message", [
    ("ckpt", "would overwrite --ckpt="), ("link to ckpt", "would overwrite --ckpt="),
    ("data", "would overwrite --data="), ("config", "would overwrite the config file"),
    ("default data", "would overwrite the HellaSwag file"), ("eval_hellaswag.py", "the project's code"),
    ("configs/smoke.toml", "would write inside the project's code"),
    ("data/gpt2.tiktoken", "would overwrite the project's bundled data"),
    ("data/samples/raschka_instruction_500.json", "would overwrite the project's bundled data"),
])
def test_out_onto_an_input_is_refused_before_anything_runs(ckpts, tmp_path, monkeypatch, target, message):
    monkeypatch.setattr(hellaswag, "hellaswag_score", never)  # also keeps the repo's files safe should it run
    monkeypatch.setattr(hellaswag, "HELLASWAG_FILE", tmp_path / "hellaswag_val.jsonl")  # never downloaded
    run = tmp_path / "run"
    make_checkpoint(run / "ckpt.pt")
    data = tmp_path / "h.jsonl"
    data.write_bytes(HELLASWAG.read_bytes())
    config = tmp_path / "eval.toml"
    config.write_text("limit = 4\n")
    (tmp_path / "link").symlink_to(run / "ckpt.pt")
    args = [f"--ckpt={run}", f"--data={data}"]
    out = {"ckpt": run / "ckpt.pt", "link to ckpt": tmp_path / "link", "data": data, "config": config,
           "default data": hellaswag.HELLASWAG_FILE}.get(target, REPO_ROOT / target)
    if target == "default data":
        args = [f"--ckpt={run}"]
    if target == "config":
        args.append(str(config))
    before = {p: p.read_bytes() for p in (run / "ckpt.pt", data, config, out) if p.is_file()}
    with pytest.raises(UserError, match=message) as e:
        evaluate(*args, f"--out={out}")
    assert "\n" not in str(e.value) and "pick another --out" in str(e.value)
    assert {p: p.read_bytes() for p in before} == before
    assert not hellaswag.HELLASWAG_FILE.exists()


def scores_in(folder):
    return sorted(p.name for p in folder.iterdir())


def test_out_is_written_whole_or_not_at_all(ckpts, tmp_path, monkeypatch):
    """Through a temp file and a rename: a failed or interrupted write leaves the old file, and no temp file."""
    out = tmp_path / "scores" / "s.json"
    out.parent.mkdir()
    out.write_text("old\n")
    args = [f"--ckpt={ckpts['base'][0]}", f"--data={HELLASWAG}", "--limit=4", f"--out={out}"]

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(json, "dump", full)
        with pytest.raises(UserError, match=r"--out=.*s.json: cannot write it \(No space left on device\)"):
            evaluate(*args)
    with monkeypatch.context() as m:
        m.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            evaluate(*args)
    assert out.read_text() == "old\n" and scores_in(out.parent) == ["s.json"]
    ns = evaluate(*args)
    assert json.loads(out.read_text())["acc_norm"] == ns["score"]["acc_norm"] and scores_in(out.parent) == ["s.json"]
    link = tmp_path / "link.json"
    link.symlink_to(out)
    evaluate(*args[:-1], f"--out={link}")
    assert link.is_symlink() and json.loads(out.read_text())["n"] == 4  # the file it names is replaced, not the link


def test_ctrl_c_while_scoring_writes_no_out(ckpts, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hellaswag, "hellaswag_score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={HELLASWAG}", f"--out={tmp_path / 's.json'}")
    assert scores_in(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_out_into_a_read_only_folder_is_refused_before_scoring(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "hellaswag_score", never)
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(UserError, match="its folder does not exist or cannot be written"):
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={HELLASWAG}", f"--out={folder / 's.json'}")


def test_out_and_ckpt_expand_a_leading_tilde(ckpts, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    (home / "run" / "ckpt.pt").write_bytes((ckpts["base"][0] / "ckpt.pt").read_bytes())
    monkeypatch.setenv("HOME", str(home))
    assert not (REPO_ROOT / "~").exists()
    ns = evaluate("--ckpt=~/run", f"--data={HELLASWAG}", "--limit=4", "--out=~/s.json")
    assert json.loads((home / "s.json").read_text())["ckpt"] == str(home / "run" / "ckpt.pt") == str(ns["source"])
    assert not (REPO_ROOT / "~").exists()


# ----------------------------------------------------------------------------- eval_hellaswag.py: the data


def rows_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [json.loads(line) for line in HELLASWAG.read_text().splitlines()[:5]]


def test_repeated_rows_are_refused_naming_the_first_and_the_count(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "hellaswag_score", never)
    path = rows_file(tmp_path / "h.jsonl", [*ROWS[:3], {**ROWS[1], "ind": 99999, "label": 0}, ROWS[0], ROWS[3]])
    with pytest.raises(UserError, match=r"line 4 repeats line 2 \(the same ctx and endings\); 2 rows repeat") as e:
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={path}")
    assert "\n" not in str(e.value)
    assert len(hellaswag.load_hellaswag(path, limit=3)) == 3  # the rows a limit leaves out are not read


def test_rows_that_share_an_ind_but_differ_are_scored(tmp_path):
    """As in the real val set, where 433 ind values each stand for two different examples."""
    path = rows_file(tmp_path / "h.jsonl", [ROWS[0], {**ROWS[1], "ind": ROWS[0]["ind"]}])
    assert len(hellaswag.load_hellaswag(path)) == 2


@pytest.mark.parametrize("change, problem", [
    (lambda row: {k: v for k, v in row.items() if k != "ctx"}, "'ctx' must be a non-empty string"),
    (lambda row: {**row, "endings": row["endings"][:3]}, "'endings' must be a list of 4"),
    (lambda row: {**row, "label": str(row["label"])}, "'label' must be the integer"),
    (lambda row: {**row, "label": True}, "'label' must be the integer"),
])
def test_a_malformed_row_is_one_line_through_the_script(ckpts, tmp_path, change, problem):
    path = rows_file(tmp_path / "h.jsonl", [ROWS[0], change(ROWS[1])])
    with pytest.raises(UserError, match=f"h.jsonl line 2: {problem}"):
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={path}")


def test_data_that_is_a_folder_a_bom_and_a_limit_past_the_end(ckpts, tmp_path, capsys):
    with pytest.raises(UserError, match="is a folder; name the .jsonl file in it"):
        evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={tmp_path}")
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + rows_file(tmp_path / "plain.jsonl", ROWS[:3]).read_bytes())  # Notepad's UTF-8
    ns = evaluate(f"--ckpt={ckpts['base'][0]}", f"--data={path}", "--limit=10")
    assert ns["score"]["n"] == 3
    assert f"[--limit=10: {path} holds 3 examples, all of them scored]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every stage: NaN weights


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "run" / "ckpt.pt"
    make_checkpoint(path)
    state = torch.load(path, weights_only=True)
    state["model"]["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    torch.save(state, path)
    return path.parent


@pytest.mark.parametrize("script", ["sample.py", "eval_hellaswag.py", "finetune_sft.py", "export_hf.py"])
def test_a_checkpoint_with_a_nan_weight_is_refused_in_one_line_by_every_stage(nan_run, tmp_path, script):
    out = tmp_path / "out"
    args = {"sample.py": ["hi", f"--ckpt={nan_run}", "--device=cpu"],
            "eval_hellaswag.py": [f"--ckpt={nan_run}", f"--data={HELLASWAG}", f"--out={tmp_path / 's.json'}",
                                  "--device=cpu"],
            "finetune_sft.py": [f"--init_from={nan_run}", f"--data_dir={SAMPLE_SFT}", f"--out_dir={out}",
                                "--device=cpu"],
            "export_hf.py": [f"--ckpt={nan_run}", f"--out_dir={out}"]}[script]
    with pytest.raises(UserError, match="weight transformer.h.1.mlp.c_fc.weight holds NaN or inf") as e:
        run_script(script, *args)
    assert "\n" not in str(e.value) and scores_in(tmp_path) == []
