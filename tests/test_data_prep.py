"""data/fineweb_edu.py: the prep CLI on the bundled FineWeb-Edu sample and on generated inputs; and what
data/sft_mix.py shares with it: the manifest, and duplicates as the tokenizer sees them."""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import data.sft_mix as sft_mix
from data import UserError
from data.fineweb_edu import as_tokenized, main, read_txt, split_hash
from data.shards import MANIFEST, list_shards, read_examples, read_header, read_shard, write_shard
from data.tokenizer import EOT, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "data" / "samples" / "fineweb_edu_100.jsonl"  # the first 100 documents of FineWeb-Edu sample-10BT
RASCHKA = REPO / "data" / "samples" / "raschka_instruction_500.json"  # the first 500 of Raschka's instruction data


def prep(source, out_dir, *args):
    return main(["--source", str(source), "--out_dir", str(out_dir), *map(str, args)])


def tokenized(texts):
    """What the prep should write for each text: EOT then its ordinary tokens."""
    enc = get_tokenizer()
    return [(EOT, *enc.encode_ordinary(t)) for t in texts]


def shard_docs(out_dir, split):
    """The documents of a split, in order, recovered by cutting its token stream before every EOT."""
    files = sorted(Path(out_dir).glob(f"{split}_*.bin"))
    if not files:
        return []
    stream = np.concatenate([read_shard(f) for f in files])
    starts = np.flatnonzero(stream == EOT)
    assert starts[0] == 0, "a split must start with a document's EOT"
    return [tuple(d.tolist()) for d in np.split(stream, starts[1:])]


def real_texts():
    return [json.loads(line)["text"] for line in REAL.read_text().splitlines()]


def file_bytes(out_dir):
    """Every file the prep wrote, the manifest included."""
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir())}


@pytest.fixture(scope="module")
def real_prep(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    summary = prep(REAL, out, "--val_fraction", 0.2, "--shard_size", 8000, "--num_proc", 2, "--chunk_docs", 16)
    return out, summary


def test_real_corpus_shards_and_accounting(real_prep):
    out, s = real_prep
    assert s["docs_read"] == 100 == s["train_docs"] + s["val_docs"] + s["empty_skipped"] + s["malformed"]
    assert s["empty_skipped"] == s["malformed"] == s["val_full_skipped"] == 0
    assert 5 < s["val_docs"] < 40  # ~20% of 100
    for split in ("train", "val"):
        files = list_shards(out, split)
        sizes = [read_header(f) for f in files]
        assert len(files) == s[f"{split}_shards"] and sum(sizes) == s[f"{split}_tokens"]
        assert all(n == 8000 for n in sizes[:-1]) and 0 < sizes[-1] <= 8000
    assert s["train_shards"] > 1

    train, val = shard_docs(out, "train"), shard_docs(out, "val")
    assert (len(train), len(val)) == (s["train_docs"], s["val_docs"])
    assert not set(train) & set(val)
    expected = tokenized(real_texts())
    assert sorted(train + val) == sorted(expected)
    # each split keeps the input order
    assert train == [d for d in expected if d in set(train)]
    assert val == [d for d in expected if d in set(val)]


def test_deterministic_across_num_proc_and_chunking(real_prep, tmp_path):
    out, _ = real_prep
    reference = file_bytes(out)
    for num_proc, chunk_docs in ((1, 7), (2, 512)):
        again = tmp_path / f"np{num_proc}"
        prep(REAL, again, "--val_fraction", 0.2, "--shard_size", 8000, "--num_proc", num_proc,
             "--chunk_docs", chunk_docs)
        assert file_bytes(again) == reference
    reseeded = prep(REAL, tmp_path / "seed", "--val_fraction", 0.2, "--shard_size", 8000, "--seed", 1,
                    "--num_proc", 1)
    assert shard_docs(tmp_path / "seed", "val") != shard_docs(out, "val") and reseeded["docs_read"] == 100


def test_generated_docs_empty_duplicate_malformed(tmp_path):
    distinct = [f"document {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(40)]
    lines = [json.dumps({"text": d}).encode() for _ in range(3) for d in distinct]
    lines += [
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": "  \n\t "}).encode(),
        b"",  # blank line: not a document
        b"not json {",
        b"[1, 2, 3]",
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": 5}).encode(),
        b'{"text": "bad utf-8 \xff\xfe"}',
        b'{"text": "a lone surrogate \\ud800 survives"}',
    ]
    src = tmp_path / "gen.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    bad_lines = [124, 125, 126, 127, 128]

    s = prep(src, tmp_path / "out", "--val_fraction", 0.5, "--shard_size", 50, "--num_proc", 2, "--chunk_docs", 5)
    assert (s["malformed"], s["empty_skipped"]) == (5, 2)
    assert s["train_docs"] + s["val_docs"] == 121
    assert s["docs_read"] == 128 == s["train_docs"] + s["val_docs"] + s["empty_skipped"] + s["malformed"]
    assert [int(m.split(":")[1]) for m in s["malformed_examples"]] == bad_lines

    train, val = shard_docs(tmp_path / "out", "train"), shard_docs(tmp_path / "out", "val")
    assert train and val
    for doc in tokenized(distinct):  # all three copies land in one split
        assert sorted((train.count(doc), val.count(doc))) == [0, 3]
    enc = get_tokenizer()
    assert any(enc.decode(list(d[1:])).startswith("a lone surrogate") for d in train + val)


def test_val_tokens_cap(tmp_path):
    free = prep(REAL, tmp_path / "free", "--val_fraction", 0.5, "--num_proc", 1)
    capped = prep(REAL, tmp_path / "capped", "--val_fraction", 0.5, "--val_tokens", 5000, "--num_proc", 1)
    val = shard_docs(tmp_path / "capped", "val")
    assert free["val_tokens"] > 5000
    assert capped["val_tokens"] >= 5000 > capped["val_tokens"] - len(val[-1])
    assert val == shard_docs(tmp_path / "free", "val")[: len(val)]  # the first val docs
    # the later val documents (none a copy of another) go to train: no document is lost
    later = shard_docs(tmp_path / "free", "val")[len(val):]
    assert sorted(shard_docs(tmp_path / "capped", "train")) == sorted(shard_docs(tmp_path / "free", "train") + later)
    assert capped["val_full_to_train"] == free["val_docs"] - capped["val_docs"] > 0 == capped["val_full_skipped"]
    assert capped["docs_read"] == 100 == capped["train_docs"] + capped["val_docs"]
    assert json.loads((tmp_path / "capped" / MANIFEST).read_text())["counts"]["val_full_to_train"] > 0


def test_val_tokens_cap_never_leaks_copies_of_val_documents_into_train(tmp_path):
    """Copies of a val document after val is full are skipped, never sent to train; other val documents
    after it train, all their copies with them."""
    distinct = [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(60)]
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for _ in range(3) for d in distinct))  # 3 passes
    free = prep(src, tmp_path / "free", "--val_fraction", 0.3, "--num_proc", 1)
    capped = prep(src, tmp_path / "capped", "--val_fraction", 0.3, "--val_tokens", 50, "--num_proc", 1)
    train, val = shard_docs(tmp_path / "capped", "train"), shard_docs(tmp_path / "capped", "val")
    assert not set(train) & set(val)
    for doc in tokenized(distinct):
        assert train.count(doc) in (0, 3)  # all copies of a document, or none
    assert 0 < capped["val_tokens"] < free["val_tokens"] and capped["val_full_skipped"] > 0
    assert set(shard_docs(tmp_path / "free", "train")) < set(train)  # and the val documents past the cap
    assert capped["val_docs"] + capped["val_full_skipped"] + capped["val_full_to_train"] == free["val_docs"]


def test_texts_that_tokenize_alike_share_a_split(tmp_path):
    """JSON can carry lone surrogates; the tokenizer sees U+FFFD there, and so does the split."""
    pairs = [(f"note {i}: caf\ud800 and more", f"note {i}: caf\ufffd and more") for i in range(40)]
    enc = get_tokenizer()
    for raw, clean in pairs[:3]:
        assert as_tokenized(raw) == clean and enc.encode_ordinary(raw) == enc.encode_ordinary(clean)
        assert all(split_hash(as_tokenized(raw), seed) == split_hash(clean, seed) for seed in range(5))
    assert as_tokenized("\ud83d\ude00") == "\U0001F600"  # a surrogate pair becomes the character, as in tiktoken
    src = tmp_path / "surrogates.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for pair in pairs for t in pair))
    s = prep(src, tmp_path / "out", "--val_fraction", 0.5, "--num_proc", 1)
    train, val = shard_docs(tmp_path / "out", "train"), shard_docs(tmp_path / "out", "val")
    assert s["train_docs"] and s["val_docs"]
    for doc in tokenized([clean for _, clean in pairs]):
        assert sorted((train.count(doc), val.count(doc))) == [0, 2]


def test_max_tokens_stops_after_whole_document(tmp_path):
    s = prep(REAL, tmp_path, "--max_tokens", 20_000, "--val_fraction", 0.2, "--num_proc", 2, "--chunk_docs", 4)
    expected = tokenized(real_texts())[: s["docs_read"]]
    written = s["train_tokens"] + s["val_tokens"]
    assert s["stopped_at_max_tokens"] and s["docs_read"] < 100
    assert written == sum(map(len, expected)) and written >= 20_000 > written - len(expected[-1])
    assert sorted(shard_docs(tmp_path, "train") + shard_docs(tmp_path, "val")) == sorted(expected)


def test_txt_and_md_sources_are_one_doc_per_file_in_sorted_order(tmp_path, capsys):
    (tmp_path / "b.md").write_text("# bee\n\nbee two\n")
    (tmp_path / "a.txt").write_text("def main():\n    return 1\n")
    (tmp_path / "c.txt").write_text("   \n")  # only whitespace: no document
    sources = ["--source", f"{tmp_path / 'c.txt'},{tmp_path / 'b.md'}", "--source", str(tmp_path / "a.txt")]
    s = main([*sources, "--out_dir", str(tmp_path / "out"), "--val_fraction", 0])
    assert (s["docs_read"], s["empty_skipped"], s["val_shards"]) == (3, 1, 0)
    assert shard_docs(tmp_path / "out", "train") == tokenized(["def main():\n    return 1\n", "# bee\n\nbee two\n"])
    assert "3 .txt/.md source file(s): a document per file (--separator=S splits them at S)" in capsys.readouterr().out


@pytest.mark.parametrize("separator, expected", [
    ("\\n", ["ay one", "ay two", "bee one", "bee two", "see one", "see two"]),  # as the shell hands on '\n'
    ("\\n\\n", ["ay one\nay two", "bee one", "bee two\n   \nsee one", "see two\n"]),
    ("<doc>", ["ay one\nay two\n\nbee one\n\n", "bee two\n   \nsee one\n\nsee two\n"]),
])
def test_separator_splits_text_files_into_documents(tmp_path, capsys, separator, expected):
    cut = "<doc>" if separator == "<doc>" else ""
    text = f"ay one\nay two\n\nbee one\n\n{cut}bee two\n   \nsee one\n\nsee two\n"
    (tmp_path / "a.txt").write_text(text)
    s = main(["--source", str(tmp_path / "a.txt"), "--out_dir", str(tmp_path / "out"), "--val_fraction", 0,
              "--separator", separator])
    assert shard_docs(tmp_path / "out", "train") == tokenized(expected) and s["docs_read"] == len(expected)
    assert "split into documents at --separator=" in capsys.readouterr().out


def test_separator_is_read_across_chunks(tmp_path):
    """read_txt reads 1M characters at a time: a separator cut by a chunk's end still splits there."""
    docs = ["x" * ((1 << 20) - 2), "y" * 10]
    (tmp_path / "a.txt").write_text("<doc>".join(docs))
    assert list(read_txt(tmp_path / "a.txt", separator="<doc>")) == docs


def test_bad_separator_is_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(UserError, match=re.escape(r"--separator=\q: use \n, \t, \r or \\ for escapes")):
        main(["--source", str(tmp_path / "a.jsonl"), "--separator", "\\q"])
    with pytest.raises(UserError, match="splits .txt/.md files, and --source names none; drop it"):
        main(["--source", str(tmp_path / "a.jsonl"), "--out_dir", str(tmp_path / "out"), "--separator", "\\n"])


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["alpha beta", None, "", "gamma delta"]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": texts}), tmp_path / "docs.parquet")
    s = prep(tmp_path / "docs.parquet", tmp_path / "out", "--val_fraction", 0, "--num_proc", 1)
    assert (s["docs_read"], s["train_docs"], s["malformed"], s["empty_skipped"]) == (4, 2, 1, 1)
    assert "row 1" in s["malformed_examples"][0]
    assert shard_docs(tmp_path / "out", "train") == tokenized(["alpha beta", "gamma delta"])

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "notext.parquet")
    with pytest.raises(UserError, match="notext.parquet: no 'text' column"):
        prep(tmp_path / "notext.parquet", tmp_path / "out2", "--num_proc", 2)


def test_source_errors(tmp_path):
    pattern = str(tmp_path / "nothing_*.jsonl")
    with pytest.raises(UserError, match="matches no files") as e:
        prep(pattern, tmp_path / "out")
    assert pattern in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        prep(tmp_path / "missing.jsonl", tmp_path / "out")
    (tmp_path / "nothing.jsonl").write_text('{"text": " "}\nnot json\n')
    with pytest.raises(UserError, match="no text to tokenize.*1 empty, 1 malformed"):
        prep(tmp_path / "nothing.jsonl", tmp_path / "out")
    for bad in ("0", str(2**31)):
        with pytest.raises(UserError, match="--shard_size"):
            prep(REAL, tmp_path / "out", "--shard_size", bad)
    for bad in ("1.5", "x"):
        with pytest.raises(UserError, match="argument --shard_size: .* see --help"):  # argparse's, in one line
            prep(REAL, tmp_path / "out", "--shard_size", bad)


def test_hub_source(tmp_path, monkeypatch):
    """The default source, with `datasets` stubbed: this machine is offline."""
    rows = [{"text": "first hub doc"}, {"text": None}, {"text": "second hub doc", "score": 3.1}]

    def load_dataset(path, name, split, streaming):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the stub stands for the local cache: no reachability check
    s = main(["--out_dir", str(tmp_path / "out"), "--val_fraction", "0", "--num_proc", "2"])
    assert (s["docs_read"], s["malformed"]) == (3, 1)
    assert shard_docs(tmp_path / "out", "train") == tokenized(["first hub doc", "second hub doc"])

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match="--source") as e:
        main(["--out_dir", str(tmp_path / "out")])
    assert "\n" not in str(e.value)


def test_rerun_removes_stale_shards(tmp_path):
    first = prep(REAL, tmp_path, "--shard_size", 5000, "--val_fraction", 0.2, "--num_proc", 1)
    (tmp_path / "train_000020.bin.tmp").write_bytes(b"half a shard")
    second = prep(REAL, tmp_path, "--shard_size", 50_000, "--val_fraction", 0.2, "--num_proc", 1)
    assert first["train_shards"] > second["train_shards"] and first["val_shards"] > second["val_shards"]
    stale = [f"train_{i:06d}.bin" for i in range(second["train_shards"], first["train_shards"])]
    stale += ["train_000020.bin.tmp"]
    stale += [f"val_{i:06d}.bin" for i in range(second["val_shards"], first["val_shards"])]
    assert second["stale_removed"] == stale
    assert len(list_shards(tmp_path, "train")) == second["train_shards"]
    assert sorted(shard_docs(tmp_path, "train") + shard_docs(tmp_path, "val")) == sorted(tokenized(real_texts()))


def test_cli_subprocess(tmp_path):
    out = tmp_path / "shards"
    cmd = [sys.executable, "data/fineweb_edu.py", "--source", str(REAL), "--out_dir", str(out),
           "--val_fraction", "0.2", "--seed", "7"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "read 100 documents" in r.stdout
    assert list_shards(out, "train") and list_shards(out, "val")
    assert json.loads((out / MANIFEST).read_text())["settings"]["seed"] == 7


def test_prep_scripts_do_not_import_torch():
    code = "import sys, data.fineweb_edu, data.sft_mix; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_killed_prep_leaves_the_earlier_prep_usable(tmp_path):
    """SIGKILL halfway through (no clean-up runs), over the complete output of an earlier run: the new
    prep writes beside out_dir, so out_dir still holds the earlier prep, whole; the next prep clears what
    the killed one left."""
    import signal
    import time

    src = tmp_path / "two_copies.jsonl"
    src.write_text(REAL.read_text() * 2)
    out = tmp_path / "out"
    prep(src, out, "--shard_size", 1000, "--val_fraction", 0.2, "--seed", 1, "--num_proc", 1)  # the earlier run
    before = dir_bytes(out)
    cmd = [sys.executable, "data/fineweb_edu.py", "--source", str(src), "--out_dir", str(out), "--shard_size", "1000",
           "--val_fraction", "0.2", "--num_proc", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.new*/train_000005.bin")) and time.time() < deadline:  # 5 shards written
        time.sleep(0.002)
    assert proc.poll() is None, "the prep finished before the kill: give it more shards to write"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert dir_bytes(out) == before and list_shards(out, "train")
    assert list(tmp_path.glob(".out.new*"))  # what the killed prep wrote, beside out_dir
    prep(src, out, "--shard_size", 1000, "--val_fraction", 0.2, "--seed", 1, "--num_proc", 1)
    assert dir_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "two_copies.jsonl"]


def test_a_refused_prep_leaves_the_dir_as_it_was(tmp_path):
    out = tmp_path / "out"
    prep(REAL, out, "--val_fraction", 0.2, "--num_proc", 1)
    (out / "notes.txt").write_text("mine")
    before = dir_bytes(out)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no text to tokenize"):
        prep(tmp_path / "empty.jsonl", out, "--num_proc", 1)
    assert dir_bytes(out) == before and list_shards(out, "val")
    prep(REAL, out, "--val_fraction", 0.3, "--num_proc", 1)  # a new prep keeps the files that are not its own
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "out"]


def test_a_second_prep_into_the_same_dir_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "out"
    prep(REAL, out, "--val_fraction", 0.2, "--num_proc", 1)
    before = dir_bytes(out)
    with open(tmp_path / ".out.lock", "a") as held:  # as a running prep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=r"another prep is writing .*out now") as e:
            prep(REAL, out, "--val_fraction", 0.3, "--num_proc", 1)
    assert "\n" not in str(e.value) and dir_bytes(out) == before
    with pytest.raises(UserError, match="is a file"):
        prep(REAL, tmp_path / ".out.lock", "--num_proc", 1)


def mix_args(out_dir, *args):
    return ["--sources=raschka", f"--raschka={RASCHKA}", f"--out_dir={out_dir}", *map(str, args)]


def dir_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def test_sft_mix_manifest_stale_files_and_interruption(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    sft_mix.main(mix_args(reference, "--seed", 2))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train_000000.bin", "train_000001.bin", "val_000000.bin"):  # a pretraining prep's shards
        write_shard(out / name, [EOT, 1, 2])
    sft_mix.main(mix_args(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())  # train_000001 gone
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == [
        "train_000000.bin", "train_offsets.npy", "val_000000.bin", "val_offsets.npy"]
    before = dir_bytes(out)

    real, calls = sft_mix.write_examples, []

    def crash(*args, **kwargs):  # interrupted after the train split, before val
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft_mix, "write_examples", crash)
    with pytest.raises(KeyboardInterrupt):
        sft_mix.main(mix_args(out, "--seed", 2))
    monkeypatch.undo()
    assert dir_bytes(out) == before and read_examples(out, "val")  # the earlier mix, whole and usable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]
    sft_mix.main(mix_args(out, "--seed", 2))
    assert dir_bytes(out) == dir_bytes(reference)


def test_sft_mix_duplicates_are_judged_as_the_tokenizer_sees_them(tmp_path):
    rows = [{"instruction": f"Spell caf{mark} number {i}.", "input": "", "output": "Done."}
            for i in range(4) for mark in ("\ud800", "\ufffd")]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    s = sft_mix.main(["--sources=raschka", f"--raschka={tmp_path / 'rows.json'}", f"--out_dir={tmp_path / 'out'}",
                      "--val_fraction=0.25"])
    assert s["sources"]["raschka"]["duplicate"] == 4 and s["train_examples"] + s["val_examples"] == 4


# ----------------------------------------------------------------------------- offline: one line, at once


@pytest.mark.parametrize("prep", ["fineweb_edu", "sft_mix"])
def test_an_unreachable_hub_is_one_line_before_any_retry(prep, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        if prep == "fineweb_edu":
            main(["--out_dir", str(out)])
        else:
            sft_mix.main(["--sources=smoltalk", "--out_dir", str(out)])
    message = str(e.value)
    assert message.startswith("cannot reach the Hugging Face Hub at hub.invalid for ") and "\n" not in message
    assert ("--source PATH_OR_GLOB" if prep == "fineweb_edu" else "--smoltalk PATH") in message
    assert not out.exists()


def test_a_failed_hellaswag_download_leaves_no_folder(tmp_path, monkeypatch):
    import data.hellaswag as hellaswag

    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", "https://hellaswag.invalid/hellaswag_val.jsonl")
    with pytest.raises(UserError, match="could not download HellaSwag"):
        hellaswag.download_hellaswag(tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffFirst document.\nSecond document.\n".encode("utf-8"))
    prep(tmp_path / "bom.txt", tmp_path / "out", "--val_fraction", 0, "--num_proc", 1, "--separator", "\\n")
    assert shard_docs(tmp_path / "out", "train") == tokenized(["First document.", "Second document."])
