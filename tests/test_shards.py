"""data/shards.py: the .bin shard format, the manifest that vouches for a prepared dir, the chat-example
files; and (until they move) the batch loaders and the chat tokenizer."""

import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import UserError
from data.fineweb_edu import main as prep
from data.loaders import BatchLoader, ValData
from data.shards import (
    HEADER_BYTES,
    MANIFEST,
    list_shards,
    read_examples,
    read_header,
    read_shard,
    write_examples,
    write_manifest,
    write_shard,
)
from data.tokenizer import ASSISTANT, EOT, TOKENIZER, USER, VOCAB_SIZE, get_tokenizer, render_chat

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "fineweb_edu_100.jsonl"  # 100 real FineWeb-Edu documents, ~62k tokens
B, T = 4, 16


def refused(call, *args, match=""):
    """The UserError that call(*args) raises: one line, matching `match`."""
    with pytest.raises(UserError, match=match) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# -----------------------------------------------------------------------------
# shard format


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, EOT, USER, VOCAB_SIZE - 1, 7], dtype=np.int64)
    entry = write_shard(tmp_path / "s.bin", tokens)
    assert read_header(tmp_path / "s.bin") == len(tokens)
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    data = (tmp_path / "s.bin").read_bytes()
    assert len(data) == HEADER_BYTES + 2 * len(tokens) == entry["bytes"] and entry["tokens"] == len(tokens)
    header = np.frombuffer(data[:HEADER_BYTES], dtype=np.int32)
    # llm.c's words, then the vocab, a tokenizer hash, the prep id (0: by hand) and the tokenizer's name
    assert header[:4].tolist() == [20240520, 1, len(tokens), VOCAB_SIZE] and header[4] != 0 and header[5] == 0
    assert header[6:10].tobytes().rstrip(b"\0").decode() == TOKENIZER and not header[10:].any()
    assert not list(tmp_path.glob("*.tmp"))
    write_shard(tmp_path / "empty.bin", [])
    assert read_header(tmp_path / "empty.bin") == 0
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "big.bin", [1, 2**16])
    assert not (tmp_path / "big.bin").exists()


def set_words(path, start, *values):
    data = bytearray(path.read_bytes())
    data[4 * start : 4 * (start + len(values))] = np.array(values, dtype=np.int32).tobytes()
    path.write_bytes(bytes(data))


def corrupt(path, what):
    if what == "magic":
        set_words(path, 0, 12345)
    elif what == "version":
        set_words(path, 1, 2)
    elif what == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    elif what == "short":
        path.write_bytes(path.read_bytes()[:100])
    elif what == "no tokenizer":  # what llm.c's prep (and ours before the tokenizer was recorded) writes
        set_words(path, 3, *[0] * 7)
    elif what == "other tokenizer":
        set_words(path, 3, 100277, 99, 0, *np.frombuffer(b"cl100k_base".ljust(16, b"\0"), dtype=np.int32))


@pytest.mark.parametrize("what, message", [
    ("magic", "magic number 12345"),
    ("version", "shard version 2"),
    ("truncated", "truncated"),
    ("short", "shorter than the 1024-byte header"),
    ("no tokenizer", "records no tokenizer"),
    ("other tokenizer", f"made with tokenizer 'cl100k_base' \\(vocab 100277.*this code uses '{TOKENIZER}' "
                        f"\\(vocab {VOCAB_SIZE}"),
])
def test_header_errors_name_the_file_and_the_fix(tmp_path, what, message):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100))
    corrupt(path, what)
    for read in (read_header, read_shard):
        error = refused(read, path, match=message)
        assert str(path) in error and f"re-run the data prep: python data/fineweb_edu.py --out_dir {tmp_path}" in error


def test_token_ids_outside_the_vocab_are_refused(tmp_path):
    """A flipped high bit makes an id past the vocab: reading the shard names it, not the embedding lookup.
    (write_shard lets such ids through, so tests can make bad shards; the prep never produces them.)"""
    write_shard(tmp_path / "val_000000.bin", [EOT, VOCAB_SIZE])
    refused(read_shard, tmp_path / "val_000000.bin", match=f"token 1 is id {VOCAB_SIZE}, outside")
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(20_000, 21_000))
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 2 * 700 + 1] ^= 0x80  # the top bit of token 700 (20700): now 53468
    path.write_bytes(bytes(data))
    error = refused(read_shard, path, match=f"token 700 is id 53468, outside the {TOKENIZER} vocabulary")
    assert str(path) in error and "re-run the data prep" in error
    assert read_header(path) == 1000  # the header alone is fine: the batch check catches it in a pretraining run


def test_missing_data_gives_the_prep_command(tmp_path):
    with pytest.raises(UserError, match="does not exist.*python data/fineweb_edu.py"):
        list_shards(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match="no val_\\*.bin shards.*python data/fineweb_edu.py"):
        list_shards(tmp_path, "val")



# -----------------------------------------------------------------------------
# the manifest: a prepared dir is exactly what its prep wrote, or it is refused


def prep_args(out_dir, *args):
    return ["--source", str(SAMPLE), "--out_dir", str(out_dir), "--shard_size", "5000", "--val_fraction", "0.2",
            "--num_proc", "1", *map(str, args)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The sample prepared twice, with two seeds: 11 full train shards of 5000 tokens each time."""
    root = tmp_path_factory.mktemp("prepared")
    prep(prep_args(root / "seed0"))
    prep(prep_args(root / "seed1", "--seed", 1))
    return root / "seed0", root / "seed1"


def contents(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def fix_command(error):
    """The prep command an error names as its fix, as an argv for data/fineweb_edu.py's main."""
    command = shlex.split(error.split("re-run the data prep: ")[1])
    assert command[:2] == ["python", "data/fineweb_edu.py"]
    return command[2:]


def test_a_prepared_dir_passes_and_its_manifest_lists_every_file(prepared):
    good, _ = prepared
    manifest = json.loads((good / MANIFEST).read_text())
    files = list_shards(good, "train") + list_shards(good, "val")
    assert sorted(manifest["files"]) == sorted(f.name for f in files) == sorted(contents(good).keys() - {MANIFEST})
    for f in files:
        assert manifest["files"][f.name]["bytes"] == f.stat().st_size
        assert manifest["files"][f.name]["tokens"] == read_header(f, manifest["prep_id"])
    assert sum(manifest["files"][f.name]["tokens"] for f in files) == 61_842  # all 100 documents' tokens
    assert manifest["tokenizer"] == {"name": TOKENIZER, "vocab_size": VOCAB_SIZE, "hash": manifest["tokenizer"]["hash"]}


def tamper(d, other, what):
    if what == "missing shard":
        (d / "train_000003.bin").unlink()
    elif what == "extra shard":
        shutil.copy(d / "train_000001.bin", d / "train_000099.bin")
    elif what == "changed size":
        (d / "val_000000.bin").write_bytes((d / "val_000000.bin").read_bytes()[:-200])
    elif what == "shard of another run":  # the same name and size: a 5000-token shard of the seed-1 prep
        assert (other / "train_000002.bin").stat().st_size == (d / "train_000002.bin").stat().st_size
        shutil.copy(other / "train_000002.bin", d / "train_000002.bin")
    elif what == "no manifest":
        (d / MANIFEST).unlink()
    elif what == "damaged manifest":
        (d / MANIFEST).write_text("{")


@pytest.mark.parametrize("what, split, message", [
    ("missing shard", "train", "train_000003.bin is missing, though manifest.json lists it"),
    ("extra shard", "train", "train_000099.bin is not in manifest.json: a stale file of another prep run"),
    ("changed size", "val", "val_000000.bin: [0-9,]+ bytes, but manifest.json records"),
    ("shard of another run", "train", "train_000002.bin: written by another data prep run"),
    ("no manifest", "val", "no manifest.json in .*: its data prep did not finish"),
    ("damaged manifest", "val", "manifest.json is damaged"),
])
def test_a_dir_that_differs_from_its_manifest_is_refused(prepared, tmp_path, what, split, message):
    good, other = prepared
    d = tmp_path / "data"
    shutil.copytree(good, d)
    tamper(d, other, what)
    error = refused(list_shards, d, split, match=message)
    assert str(d) in error and "python data/fineweb_edu.py" in error and f"--out_dir {d}" in error
    if split == "train":
        refused(BatchLoader, d, "train", B, T, match=message)
    else:
        refused(ValData, d, B, T, 64, match=message)
    if what in ("no manifest", "damaged manifest"):
        return  # the manifest is gone, so the fix is the generic prep command
    # the fix the message names remakes the dir exactly (its settings are in the manifest)
    prep(fix_command(error))
    assert contents(d) == contents(good)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_in, calls_before", [("write_shard", 3), ("write_manifest", 0)])
def test_an_interrupted_prep_leaves_the_earlier_one_usable(prepared, tmp_path, monkeypatch, crash_in, calls_before):
    """A prep with new settings over a good dir, stopped halfway: the dir still holds the good prep, whole."""
    import data.fineweb_edu as fineweb_edu

    good, other = prepared
    d = tmp_path / "data"
    shutil.copytree(good, d)
    real, calls = getattr(fineweb_edu, crash_in), []

    def crash(*args, **kwargs):
        if len(calls) == calls_before:
            raise Crash
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fineweb_edu, crash_in, crash)
    with pytest.raises(Crash):
        prep(prep_args(d, "--seed", 1))
    monkeypatch.undo()
    assert contents(d) == contents(good) and list_shards(d, "train") and list_shards(d, "val")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing left beside it
    prep(prep_args(d, "--seed", 1))
    assert contents(d) == contents(other)


def test_cli_stops_on_a_stale_shard_with_one_line(prepared, tmp_path):
    """Where a user meets it: train_gpt.py on a dir with a shard the prep did not write."""
    good, _ = prepared
    d = tmp_path / "data"
    shutil.copytree(good, d)
    shutil.copy(d / "train_000000.bin", d / "train_000099.bin")
    cmd = [sys.executable, "train_gpt.py", "configs/smoke.toml", f"--data_dir={d}", f"--out_dir={tmp_path / 'run'}",
           "--device=cpu", "--compile=False"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {d / 'train_000099.bin'} is not in manifest.json") and f"--out_dir {d}" in line
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# chat examples


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture
def examples(tmp_path):
    rows = [[EOT, USER, 10 + i, ASSISTANT, 20 + i, EOT] for i in range(5)]
    write_examples(tmp_path, "train", rows)
    write_manifest(tmp_path)
    return tmp_path, rows


def test_examples_round_trip(examples):
    d, rows = examples
    tokens, offsets = read_examples(d, "train")
    assert [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == rows
    assert offsets.dtype == np.int64


@pytest.mark.parametrize("garbage, message", [
    (lambda data: b"\x93NUMPY" + bytes(len(data) - 6), "not a readable .npy array"),       # same size, no header
    (lambda data: data[:20] + b"((((" + data[24:], "not a readable .npy array"),          # a mangled header
    (lambda data: npy(np.arange(6, dtype=np.float64)), "does not match the 30 tokens"),  # same size
    (lambda data: npy(np.array([0, 6, 3, 18, 24, 30])), "does not match the 30 tokens"),  # not sorted
])
def test_garbage_offsets_are_one_line_errors(examples, garbage, message):
    d, _ = examples
    path = d / "train_offsets.npy"
    path.write_bytes(garbage(path.read_bytes()))
    assert path.stat().st_size == json.loads((d / MANIFEST).read_text())["files"][path.name]["bytes"]
    error = refused(read_examples, d, "train", match=message)
    assert str(path) in error and "re-run the data prep" in error


def test_a_damaged_example_shard_or_offsets_file_of_another_size_is_refused(examples):
    d, _ = examples
    (d / "train_offsets.npy").write_bytes(b"garbage")
    refused(read_examples, d, "train", match="train_offsets.npy: 7 bytes, but manifest.json records")
    write_manifest(d)  # vouch for the garbage: then the parse itself refuses it
    refused(read_examples, d, "train", match="train_offsets.npy is not a readable .npy array")


# -----------------------------------------------------------------------------
# tokenizer


def test_chat_tokens_are_single_ids():
    enc = get_tokenizer()
    assert enc.encode("<|user|><|assistant|>", allowed_special="all") == [USER, ASSISTANT] == [50257, 50258]
    assert enc.decode([USER, ASSISTANT, EOT]) == "<|user|><|assistant|><|endoftext|>"
    plain = enc.encode_ordinary("<|user|>")
    assert USER not in plain and len(plain) > 1 and enc.decode(plain) == "<|user|>"


def test_render_chat_masks_reply_and_eot():
    enc = get_tokenizer()
    turns = [("Hi there", "Hello!"), ("Bye", "See you.")]
    ids, mask = render_chat(turns)
    want_ids, want_mask = [], []
    for prompt, reply in turns:
        context, answer = [USER, *enc.encode_ordinary(prompt), ASSISTANT], [*enc.encode_ordinary(reply), EOT]
        want_ids += context + answer
        want_mask += [0] * len(context) + [1] * len(answer)
    assert (ids, mask) == (want_ids, want_mask)
    text = "<|user|>Hi there<|assistant|>Hello!<|endoftext|><|user|>Bye<|assistant|>See you.<|endoftext|>"
    assert enc.decode(ids) == text
