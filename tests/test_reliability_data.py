"""The data preps and loaders against a hostile or clumsy user and a hostile machine: links, outputs over
inputs, UTF-16 text, a full disk, tiny sources, ~ paths, a prep into the dir of a running training,
interrupted swaps. Each bad input is one line, and nothing is lost."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import RASCHKA, REPO_ROOT, SAMPLES, run_script

import data.fineweb_edu as fineweb_edu
import data.loaders as loaders
import data.sft_mix as sft_mix
import data.shards as shards
from data import UserError
from data.loaders import BatchLoader, ExampleLoader, ShardReader, ValData
from data.shards import MANIFEST, list_shards, read_examples, read_shard
from data.tokenizer import EOT, get_tokenizer

REAL = SAMPLES / "fineweb_edu_100.jsonl"


def prep(source, out_dir, *args):
    return fineweb_edu.main(["--source", str(source), "--out_dir", str(out_dir), "--num_proc", "1", *map(str, args)])


def mix(rows, out_dir, *args):
    return sft_mix.main(["--sources=raschka", f"--raschka={rows}", f"--out_dir={out_dir}", *map(str, args)])


def refused(call, *args, match=None):
    """The UserError that call(*args) raises: one line, matching `match`."""
    with pytest.raises(UserError, match=match) as e:
        call(*args)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def tree(d):
    """Every file under d by relative path, with its bytes (links as where they point)."""
    d = Path(d)
    return {str(p.relative_to(d)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file() or p.is_symlink()}


def names(d):
    return sorted(p.name for p in Path(d).iterdir())


def docs(out_dir, split="train"):
    """The documents of a split, as token tuples, cut before every EOT."""
    files = sorted(Path(out_dir).glob(f"{split}_*.bin"))
    if not files:
        return []
    stream = np.concatenate([read_shard(f) for f in files])
    return [tuple(d.tolist()) for d in np.split(stream, np.flatnonzero(stream == EOT)[1:])]


def tokenized(texts):
    enc = get_tokenizer()
    return [(EOT, *enc.encode_ordinary(t)) for t in texts]


@pytest.fixture
def rows(tmp_path):
    """40 distinct instruction rows, a .json list."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "" if i % 2 else f"start at {i % 5}",
                                 "output": " ".join(map(str, range(i % 9 + 1)))} for i in range(40)]))
    return path


# ----------------------------------------------------------------------------- 1. a link as --out_dir


@pytest.mark.parametrize("which", ["fineweb_edu", "sft_mix"])
def test_a_link_out_dir_swaps_its_target_and_stays_a_link(which, tmp_path, rows):
    target, link = tmp_path / "disk" / "target", tmp_path / "link"
    run = (lambda d, seed: prep(REAL, d, "--seed", seed, "--shard_size", 20_000)) if which == "fineweb_edu" else (
        lambda d, seed: mix(rows, d, "--seed", seed, "--val_fraction", 0.2))
    run(target, 1)
    (target / "notes.txt").write_text("mine")
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("also mine")
    link.symlink_to(target, target_is_directory=True)
    run(link, 2)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "notes.txt").read_text() == "mine" and (target / "runs" / "log.txt").read_text() == "also mine"
    assert json.loads((link / MANIFEST).read_text())["settings"]["seed"] == 2
    assert list_shards(link, "train") and list_shards(target, "val")
    assert names(tmp_path / "disk") == ["target"] and names(tmp_path) == ["disk", "link", "rows.json"]
    fresh = tmp_path / "fresh"
    run(fresh, 2)
    assert {k: v for k, v in tree(target).items() if k not in ("notes.txt", "runs/log.txt")} == tree(fresh)


def test_a_dangling_link_gets_its_target_and_a_link_to_a_file_is_refused(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "made" / "here")
    prep(REAL, link)
    assert link.is_symlink() and list_shards(tmp_path / "made" / "here", "train")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "to_file").symlink_to(tmp_path / "afile")
    refused(prep, REAL, tmp_path / "to_file", match="is a file")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    refused(prep, REAL, tmp_path / "a", match="loop of symbolic links")
    assert (tmp_path / "afile").read_text() == "x"


# ----------------------------------------------------------------------------- 2. an output over an input


def test_fineweb_out_dir_that_holds_a_source_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(REAL, corpus / "docs.jsonl")
    (tmp_path / "link").symlink_to(corpus)
    before = tree(tmp_path)
    for out in (corpus, tmp_path / "link", tmp_path):
        message = refused(prep, corpus / "docs.jsonl", out, match="would overwrite --source=")
        assert f"--out_dir={out}" in message and "pick another --out_dir" in message
    refused(prep, f"{corpus}/*.jsonl", corpus, match="would overwrite --source=")
    refused(prep, corpus / "docs.jsonl", corpus / "docs.jsonl", match="is a file")
    assert tree(tmp_path) == before


def test_sft_out_dir_that_holds_an_input_is_refused(tmp_path, rows):
    out = tmp_path / "sft"
    out.mkdir()
    shutil.copy(rows, out / "rows.json")
    before = tree(tmp_path)
    message = refused(mix, out / "rows.json", out, match="would overwrite --raschka=")
    assert f"--raschka={out / 'rows.json'}" in message
    refused(mix, rows, tmp_path, match="would overwrite --raschka=")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("out, message", [(".", "is the current dir:"), ("", "is the current dir:"),
                                          ("..", "is the current dir or holds it"), ("repo/data", "the project's code"),
                                          ("repo/bench", "the project's code"), ("repo", "the project's code")])
def test_out_dir_that_is_the_current_dir_or_the_code_is_refused(out, message, tmp_path, monkeypatch):
    """In a sandbox: before the fix, a prep into .. moved every file of the folder above into its stage and then
    deleted the stage. The project's code is a copy (data.REPO_ROOT), so a regression harms only tmp_path."""
    import data

    repo, cwd = tmp_path / "repo", tmp_path / "work" / "here"
    for name in ("train_gpt.py", "data/shards.py", "bench/bench_data.py", "configs/smoke.toml"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("code")
    cwd.mkdir(parents=True)
    (cwd / "mine.txt").write_text("mine")
    shutil.copy(REAL, tmp_path / "docs.jsonl")
    monkeypatch.setattr(data, "REPO_ROOT", repo)
    monkeypatch.chdir(cwd)
    before = tree(tmp_path)
    out = out.replace("repo", str(repo))
    assert message in refused(prep, tmp_path / "docs.jsonl", out)
    assert tree(tmp_path) == before and names(tmp_path) == ["docs.jsonl", "repo", "work"]


def test_out_dir_that_is_a_mount_point_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    refused(prep, REAL, out, match="is a mount point.*pick a folder inside it")
    assert names(tmp_path) == ["mnt"] and names(out) == []


# ----------------------------------------------------------------------------- 3. text encodings


TEXTS = ["First document, café.", "Second document: naïve ☃."]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_txt_with_a_byte_order_mark_is_decoded(encoding, tmp_path):
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-le": b"\xff\xfe\0\0",
           "utf-32-be": b"\0\0\xfe\xff"}.get(encoding, b"")
    (tmp_path / "doc.txt").write_bytes(bom + "\r\n".join(TEXTS).encode(encoding))
    prep(tmp_path / "doc.txt", tmp_path / "out", "--val_fraction", 0, "--separator", "\\n")
    assert docs(tmp_path / "out") == tokenized(TEXTS)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_jsonl_in_utf16_or_utf32_is_decoded_with_a_mark_and_refused_without(encoding, tmp_path):
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS) + "not json\n"
    (tmp_path / "doc.jsonl").write_bytes(lines.encode(encoding))
    if encoding == "utf-16-le":  # no mark
        refused(prep, tmp_path / "doc.jsonl", tmp_path / "out", match=r"NUL bytes and no byte-order mark.*as UTF-8")
        assert names(tmp_path) == ["doc.jsonl"]
        return
    s = prep(tmp_path / "doc.jsonl", tmp_path / "out", "--val_fraction", 0)
    assert docs(tmp_path / "out") == tokenized(TEXTS) and s["malformed_examples"] == [f"{tmp_path}/doc.jsonl:3: "
                                                                                       "not valid JSON"]


@pytest.mark.parametrize("where", [0, 200_000])
def test_a_txt_with_nul_bytes_and_no_mark_is_refused(where, tmp_path):
    text = ("a line of text\n" * 20_000).encode()
    data = "\n".join(TEXTS).encode("utf-16-le") if where == 0 else text[:where] + b"\0" + text[where:]
    (tmp_path / "doc.txt").write_bytes(data)
    message = refused(prep, tmp_path / "doc.txt", tmp_path / "out", match="holds NUL bytes")
    assert str(tmp_path / "doc.txt") in message and "save it as UTF-8" in message
    assert names(tmp_path) == ["doc.txt"]


@pytest.mark.parametrize("suffix, encoding", [(".json", "utf-16"), (".json", "utf-8-sig"), (".json", "utf-16-le"),
                                              (".jsonl", "utf-16"), (".jsonl", "utf-8-sig")])
def test_sft_sources_in_utf16_or_with_a_mark_decode_as_their_utf8_copy(suffix, encoding, tmp_path, rows):
    records = json.loads(rows.read_text())
    text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / f"rows8{suffix}").write_text(text, encoding="utf-8")
    (tmp_path / f"rows16{suffix}").write_bytes(text.encode(encoding))
    mix(tmp_path / f"rows8{suffix}", tmp_path / "utf8", "--val_fraction", 0.2)
    mix(tmp_path / f"rows16{suffix}", tmp_path / "utf16", "--val_fraction", 0.2)
    assert all(np.array_equal(a, b) for a, b in zip(read_examples(tmp_path / "utf8", "train"),
                                                    read_examples(tmp_path / "utf16", "train"), strict=True))


def test_sft_jsonl_with_nul_bytes_and_no_mark_is_refused(tmp_path, rows):
    records = json.loads(rows.read_text())
    (tmp_path / "rows.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in records).encode("utf-16-le"))
    refused(mix, tmp_path / "rows.jsonl", tmp_path / "out", match="--raschka .*rows.jsonl: holds NUL bytes")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 4. a full disk


def full_disk(monkeypatch, fail_name, error=errno.ENOSPC):
    """Make data/shards.py's writes of fail_name (its temp file) write part of a chunk, then fail with error,
    as a real full disk does."""
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            self.f.write(bytes(memoryview(chunk).cast("B")[:100]))
            raise OSError(error, os.strerror(error))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Failing(f) if "w" in mode and Path(path).name == fail_name + ".tmp" else f

    monkeypatch.setattr(shards, "open", fake_open, raising=False)


@pytest.mark.parametrize("which, fail_name", [("fineweb_edu", "train_000000.bin"), ("fineweb_edu", "train_000002.bin"),
                                              ("fineweb_edu", "val_000000.bin"), ("fineweb_edu", MANIFEST),
                                              ("sft_mix", "train_000000.bin"), ("sft_mix", "val_offsets.npy"),
                                              ("sft_mix", MANIFEST)])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_prep(which, fail_name, tmp_path, rows, monkeypatch):
    out = tmp_path / "out"
    run = (lambda seed: prep(REAL, out, "--seed", seed, "--shard_size", 8000, "--val_fraction", 0.2)) if (
        which == "fineweb_edu") else (lambda seed: mix(rows, out, "--seed", seed, "--val_fraction", 0.2))
    run(1)
    (out / "notes.txt").write_text("mine")
    before, beside = tree(out), names(tmp_path)
    full_disk(monkeypatch, fail_name)
    message = refused(run, 2, match=rf"^disk full: free more than [\d,]+ MB in {re.escape(str(tmp_path))} ")
    assert fail_name in message and f"{out} is as it was" in message
    assert tree(out) == before and names(tmp_path) == beside  # no staging folder, no lock, no temp file
    monkeypatch.undo()
    run(2)
    assert json.loads((out / MANIFEST).read_text())["settings"]["seed"] == 2 and (out / "notes.txt").exists()


@pytest.mark.parametrize("error", [errno.EIO, errno.EDQUOT, errno.EROFS])
def test_other_write_errors_are_one_line(error, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prep(REAL, out)
    before = tree(out)
    full_disk(monkeypatch, "train_000000.bin", error)
    message = refused(prep, REAL, out, "--seed", 5)
    expected = "disk full" if error == errno.EDQUOT else f"cannot write .*train_000000.bin \\({os.strerror(error)}\\)"
    assert re.search(expected, message) and f"{out} is as it was" in message
    assert tree(out) == before and names(tmp_path) == ["out"]


def test_a_failing_shard_writer_without_a_file_name_is_one_line(tmp_path, monkeypatch):
    """The staged prep turns any OSError of the prep's writes into one line, whichever function raised it."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fineweb_edu, "write_shard", no_space)
    message = refused(prep, REAL, tmp_path / "out", match="^disk full: free more than 1 MB in ")
    assert f" in {tmp_path} (" in message and f"nothing was written to {tmp_path / 'out'}" in message
    assert names(tmp_path) == []


# ----------------------------------------------------------------------------- 5. a split left empty


@pytest.mark.parametrize("n, fraction", [(3, 0.9), (2, 0.75), (5, 0.95)])
def test_sft_val_fraction_that_leaves_no_train_is_one_line(n, fraction, tmp_path, rows):
    (tmp_path / "few.json").write_text(json.dumps(json.loads(rows.read_text())[:n]))
    message = refused(mix, tmp_path / "few.json", tmp_path / "out", f"--val_fraction={fraction}",
                      match=f"--val_fraction={fraction:g} holds out all {n} examples")
    assert "lower it below" in message and not (tmp_path / "out").exists()
    below = float(message.split("lower it below ")[1].split(",")[0])
    s = mix(tmp_path / "few.json", tmp_path / "out", f"--val_fraction={below - 0.01}")
    assert s["train_examples"] >= 1 and s["val_examples"] >= 1


# ----------------------------------------------------------------------------- 6. ~ in path arguments


def test_a_leading_tilde_is_the_home_dir(tmp_path, monkeypatch, rows):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    shutil.copy(REAL, home / "docs.jsonl")
    shutil.copy(rows, home / "rows.json")
    fineweb_edu.main(["--source=~/docs.jsonl", "--out_dir=~/shards", "--num_proc=1"])
    sft_mix.main(["--sources=raschka", "--raschka=~/rows.json", "--out_dir=~/sft"])
    assert list_shards(home / "shards", "train") and read_examples(home / "sft", "val")
    assert names(work) == []  # no folder named ~
    assert json.loads((home / "shards" / MANIFEST).read_text())["settings"]["source"] == [str(home / "docs.jsonl")]
    assert json.loads((home / "sft" / MANIFEST).read_text())["settings"]["raschka"] == str(home / "rows.json")


# ----------------------------------------------------------------------------- 7. a prep during a training


def reprep(d, seed):
    """d prepared from the bundled corpus, in train shards of 8,000 tokens; seed changes which go to train."""
    prep(REAL, d, "--shard_size", 8000, "--val_fraction", 0.2, "--seed", seed)


def test_a_prep_during_training_stops_the_next_batch(tmp_path):
    d = tmp_path / "data"
    reprep(d, 1)
    loader = BatchLoader(d, "train", 4, 32, seed=0)
    first = loader.next_batch()
    assert first[0].shape == (4, 32)
    reprep(d, 2)
    message = refused(loader.next_batch, match=f"^{re.escape(str(d))} was re-prepared during the run")
    assert "python train_gpt.py --out_dir=" in message and "--init_from=resume" in message
    assert "once the prep is done" in message
    assert loader.state_dict()["position"] == 1  # the refused batch was not handed out
    again = BatchLoader(d, "train", 4, 32, seed=0)  # a new run (or a resume) reads the new prep
    assert again.next_batch()[0].shape == (4, 32)


def test_a_shard_opened_after_a_prep_is_refused_and_an_open_one_reads_on(tmp_path):
    d = tmp_path / "data"
    reprep(d, 1)
    old = [read_shard(f) for f in list_shards(d, "train")]
    reader = ShardReader(d, "train")
    out = np.empty(100, dtype=np.uint16)
    reader.read(0, 0, out)
    reprep(d, 2)
    assert len(list_shards(d, "train")) >= 2
    reader.read(0, 50, out)  # its handle holds the file it opened: the old prep's tokens, never a mix
    assert np.array_equal(out, old[0][50:150])
    refused(reader.read, 1, 0, out, match=r"re-prepared during the run \(its train_000001.bin is another file")
    refused(reader.check_prep, match="re-prepared during the run")


def test_a_prep_while_the_loaders_open_the_dir_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "data"
    reprep(d, 1)
    real = loaders.list_shards

    def swapped_midway(data_dir, split):
        files = real(data_dir, split)
        reprep(d, 2)
        return files

    monkeypatch.setattr(loaders, "list_shards", swapped_midway)
    refused(ValData, d, 4, 32, 1024, match="re-prepared while this run opened it.*run the command again")
    reprep(d, 1)
    refused(BatchLoader, d, "train", 4, 32, match="re-prepared while this run opened it")


def test_an_sft_prep_during_finetuning_stops_the_next_batch(tmp_path, rows, monkeypatch):
    d = tmp_path / "sft"
    mix(rows, d, "--val_fraction", 0.2, "--seed", 1)
    loader = ExampleLoader(d, "train", 2, 64)
    loader.next_batch()
    mix(rows, d, "--val_fraction", 0.2, "--seed", 2)
    message = refused(loader.next_batch, match=f"^{re.escape(str(d))} was re-prepared during the run")
    assert "python finetune_sft.py --out_dir=" in message and "--init_from=resume" in message
    real = shards.list_shards

    def swapped_midway(data_dir, split):
        mix(rows, d, "--val_fraction", 0.2, "--seed", 3)
        return real(data_dir, split)

    monkeypatch.setattr(shards, "list_shards", swapped_midway)
    refused(read_examples, d, "train", match="re-prepared while it was read")


# ----------------------------------------------------------------------------- 8. bench/bench_data.py


@pytest.mark.parametrize("corpus, message", [
    (b'{"text": "fine"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    (b'{"text": "fine"}\n[1, 2]\n', "bad.jsonl:2: not a JSON object"),
    (b'{"text": "fine"}\n{"txt": "typo"}\n', "bad.jsonl:2: no string 'text' field"),
    (b'{"text": " "}\n\n', "holds no documents"),
    ('{"text": "fine"}\n'.encode("utf-16-le"), "holds NUL bytes"),
])
def test_bench_data_malformed_corpus_is_one_line(corpus, message, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(corpus)
    error = refused(run_script, "bench/bench_data.py", f"--corpus={tmp_path / 'bad.jsonl'}", "--parts=coverage")
    assert error.startswith("--corpus") and message in error
    (tmp_path / "corpus.txt").write_text("a document\n")
    refused(run_script, "bench/bench_data.py", f"--corpus={tmp_path / 'corpus.txt'}", match="is not a .jsonl file")


# ----------------------------------------------------------------------------- attacks


def test_a_source_named_twice_or_through_a_link_is_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REAL, tmp_path / "docs.jsonl")
    (tmp_path / "alias.jsonl").symlink_to(tmp_path / "docs.jsonl")
    s = fineweb_edu.main(["--source", f"docs.jsonl,{tmp_path / 'docs.jsonl'}", "--source", "./docs.jsonl",
                          "--source", "alias.jsonl", "--out_dir", "out", "--num_proc", "1"])
    assert s["docs_read"] == 100


def test_sft_source_named_twice_in_sources_is_mixed_once(tmp_path, rows):
    once = mix(rows, tmp_path / "once", "--val_fraction", 0.2)
    twice = sft_mix.main(["--sources=raschka,raschka", f"--raschka={rows}", f"--out_dir={tmp_path / 'twice'}",
                          "--val_fraction=0.2"])
    assert (twice["train_examples"], twice["val_examples"]) == (once["train_examples"], once["val_examples"])
    assert tree(tmp_path / "twice") == tree(tmp_path / "once")


def test_a_folder_named_like_a_file_is_named_a_folder(tmp_path):
    (tmp_path / "docs.jsonl").mkdir()
    (tmp_path / "rows.json").mkdir()
    refused(prep, tmp_path / "docs.jsonl", tmp_path / "out", match="matches the folder")
    refused(mix, tmp_path / "rows.json", tmp_path / "out", match="rows.json: a folder")
    assert names(tmp_path) == ["docs.jsonl", "rows.json"]


@pytest.mark.parametrize("content, message", [(b"", "no rows"), (b"\n\n", "no rows"), (b"[]", "no rows")])
def test_sft_empty_sources_are_one_line(content, message, tmp_path):
    suffix = ".json" if content == b"[]" else ".jsonl"
    (tmp_path / f"empty{suffix}").write_bytes(content)
    refused(mix, tmp_path / f"empty{suffix}", tmp_path / "out", match=message)
    (tmp_path / "empty.txt").write_bytes(b"")
    refused(prep, tmp_path / "empty.txt", tmp_path / "out", match="no text to tokenize")
    assert not (tmp_path / "out").exists()


def test_folders_beside_out_dir_named_like_a_prep_s_are_left_alone(tmp_path):
    """Only the prep's own staging folders (.NAME.new<pid>, .NAME.old<pid>) are cleared; an out_dir named like a
    glob pattern matches nobody else's."""
    out = tmp_path / "run[1]"
    for mine in (".run[1].new_ideas", ".run[1].old_notes", ".run1.new4242"):  # the last: run1's running prep
        (tmp_path / mine).mkdir()
        (tmp_path / mine / "train_000000.bin").write_bytes(b"keep me")
    killed = tmp_path / ".run[1].new4243"  # left by a prep into run[1] that was killed
    killed.mkdir()
    (killed / "train_000000.bin").write_bytes(b"half")
    prep(REAL, out)
    assert list_shards(out, "train") and not killed.exists()
    for mine in (".run[1].new_ideas", ".run[1].old_notes", ".run1.new4242"):
        assert (tmp_path / mine / "train_000000.bin").read_bytes() == b"keep me"


@pytest.mark.parametrize("stop_at", ["moving the user's files", "between the two renames"])
def test_a_prep_stopped_during_its_swap_loses_nothing(stop_at, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prep(REAL, out, "--seed", 1)
    (out / "a_notes.txt").write_text("mine")
    (out / "b_notes.txt").write_text("mine too")
    before = tree(out)
    real, stopped = os.replace, []

    def interrupted(src, dst):
        if not stopped and (Path(src).name == "b_notes.txt" if stop_at == "moving the user's files" else
                            Path(dst) == out):
            stopped.append(src)
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep(REAL, out, "--seed", 2)
    monkeypatch.undo()
    assert tree(out) == before and names(tmp_path) == ["out"]


@pytest.mark.parametrize("state", ["moving the user's files", "between the two renames", "before the old removal"])
def test_what_a_prep_killed_during_its_swap_left_is_put_back(state, tmp_path):
    """A prep killed outright (no clean-up ran) mid-swap: the next prep puts the user's files back (and the
    earlier prep, if it was moved aside) before it runs, even one that is then refused."""
    out, new, old = tmp_path / "out", tmp_path / ".out.new777", tmp_path / ".out.old777"
    prep(REAL, out, "--seed", 1)
    earlier = tree(out)
    prep(REAL, new, "--seed", 2)  # what the killed prep had finished
    (out / "notes.txt").write_text("mine")
    if state == "moving the user's files":
        os.replace(out / "notes.txt", new / "notes.txt")
    elif state == "between the two renames":
        os.replace(out / "notes.txt", new / "notes.txt")
        os.replace(out, old)
    else:
        shutil.copytree(out, old)
        (old / "notes.txt").unlink()
        os.replace(new, tmp_path / "moved")
        shutil.rmtree(out)
        os.replace(tmp_path / "moved", out)
        (out / "notes.txt").write_text("mine")
    (tmp_path / "empty.jsonl").write_text("\n")
    refused(prep, tmp_path / "empty.jsonl", out, match="no text to tokenize")
    assert (out / "notes.txt").read_text() == "mine" and names(tmp_path) == ["empty.jsonl", "out"]
    if state != "before the old removal":
        assert {k: v for k, v in tree(out).items() if k != "notes.txt"} == earlier
    assert list_shards(out, "train")


def test_unicode_paths(tmp_path):
    src = tmp_path / "données" / "é 文档.jsonl"
    src.parent.mkdir()
    shutil.copy(REAL, src)
    out = tmp_path / "sorties" / "日本語 run"
    s = prep(src, out, "--val_fraction", 0.2)
    assert list_shards(out, "train") and s["docs_read"] == 100
    assert sorted(docs(out) + docs(out, "val")) == sorted(tokenized(json.loads(x)["text"]
                                                                    for x in REAL.read_text().splitlines()))
    assert names(tmp_path) == ["données", "sorties"] and names(out.parent) == ["日本語 run"]


def test_the_largest_shard_size_needs_no_memory_up_front(tmp_path):
    """--shard_size=2**31-1 used to allocate a 4 GB buffer per split before reading a document: under a 3 GB
    address-space limit, a MemoryError traceback for a 62k-token corpus."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = subprocess.run([sys.executable, "data/fineweb_edu.py", f"--source={REAL}", f"--out_dir={tmp_path / 'out'}",
                           "--num_proc=1", f"--shard_size={2**31 - 1}"], cwd=REPO_ROOT, preexec_fn=limit,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert [f.name for f in list_shards(tmp_path / "out", "train")] == ["train_000000.bin"]


def test_a_growing_shard_buffer_writes_the_same_shards(tmp_path, monkeypatch):
    prep(REAL, tmp_path / "whole", "--shard_size", 8000, "--val_fraction", 0.2)
    monkeypatch.setattr(fineweb_edu.ShardWriter, "GROW_FROM", 100)  # 100 -> 200 -> ... -> 6400 -> 8000
    prep(REAL, tmp_path / "grown", "--shard_size", 8000, "--val_fraction", 0.2)
    assert tree(tmp_path / "grown") == tree(tmp_path / "whole") and len(list_shards(tmp_path / "grown", "train")) > 5


def test_an_unreadable_source_is_one_line(tmp_path, monkeypatch):
    shutil.copy(REAL, tmp_path / "docs.jsonl")
    real_open = open

    def denied(path, *args, **kwargs):
        if Path(path) == tmp_path / "docs.jsonl":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fineweb_edu, "open", denied, raising=False)
    refused(prep, tmp_path / "docs.jsonl", tmp_path / "out", match=r"--source .*docs.jsonl: cannot read it \(Perm")
    shutil.copy(RASCHKA, tmp_path / "rows.json")
    real_read = Path.read_bytes

    def read_denied(path):
        if path == tmp_path / "rows.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_denied)
    refused(mix, tmp_path / "rows.json", tmp_path / "out", match=r"--raschka .*rows.json: cannot read it")
    assert names(tmp_path) == ["docs.jsonl", "rows.json"]


def test_an_out_dir_under_a_file_is_one_line(tmp_path, rows):
    (tmp_path / "afile").write_text("x")
    refused(prep, REAL, tmp_path / "afile" / "out" / "x", match=r"lies under .*afile, which is a file; pick a folder")
    refused(mix, rows, tmp_path / "afile" / "out", match=r"lies under .*afile, which is a file; pick a folder")
    assert names(tmp_path) == ["afile", "rows.json"] and (tmp_path / "afile").read_text() == "x"
