"""The bundled samples (data/samples/PROVENANCE.md): the raw files are the ones it describes, and its
three prep commands reproduce the committed shards, offsets, summary and manifests byte for byte."""

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest

from data.fineweb_edu import main as fineweb_edu
from data.sft_mix import main as sft_mix
from data.shards import list_shards, read_examples

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
PROVENANCE = (SAMPLES / "PROVENANCE.md").read_text()
COMMANDS = [shlex.split(line)[1:] for line in PROVENANCE.splitlines() if line.startswith("python data/")]
MAINS = {"data/fineweb_edu.py": fineweb_edu, "data/sft_mix.py": sft_mix}


def test_raw_files_match_their_provenance():
    hashes = dict(re.findall(r"^- `([^`]+)`:.*?sha256 `([0-9a-f]{64})`", PROVENANCE, re.MULTILINE))
    assert sorted(hashes) == ["data/gpt2.tiktoken", "data/samples/fineweb_edu_100.jsonl",
                              "data/samples/hellaswag_val_200.jsonl", "data/samples/raschka_instruction_500.json",
                              "data/samples/tinyshakespeare.txt"]
    for name, sha256 in hashes.items():
        assert hashlib.sha256((REPO / name).read_bytes()).hexdigest() == sha256, name
    rows = json.loads((SAMPLES / "raschka_instruction_500.json").read_text())
    assert len(rows) == 500 and (SAMPLES / "raschka_instruction_500.json").read_text() == json.dumps(rows, indent=4)
    assert len((SAMPLES / "fineweb_edu_100.jsonl").read_text().splitlines()) == 100
    assert len((SAMPLES / "hellaswag_val_200.jsonl").read_text().splitlines()) == 200


def files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def with_out_dir(argv, out_dir):
    """argv with its --out_dir (either form) replaced; and the committed dir it named."""
    for i, arg in enumerate(argv):
        if arg.startswith("--out_dir="):
            return [*argv[:i], f"--out_dir={out_dir}", *argv[i + 1 :]], REPO / arg.removeprefix("--out_dir=")
        if arg == "--out_dir":
            return [*argv[: i + 1], str(out_dir), *argv[i + 2 :]], REPO / argv[i + 1]
    raise AssertionError(f"no --out_dir in {argv}")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_prep_reproduces_the_committed_samples(tmp_path, monkeypatch, command):
    assert len(COMMANDS) == 3
    argv, committed = with_out_dir(command[1:], tmp_path / "out")
    monkeypatch.chdir(REPO)  # the manifest records the sources as the command names them, relative to the repo
    MAINS[command[0]](argv)
    fresh, kept = files(tmp_path / "out"), files(committed)
    assert fresh.keys() == kept.keys()
    for name, data in kept.items():
        assert fresh[name] == data, f"{committed / name} is stale: re-run the commands in data/samples/PROVENANCE.md"


def test_the_committed_samples_pass_the_loaders_checks():
    assert [f.name for f in list_shards(SAMPLES / "fineweb_edu", "train")] == ["train_000000.bin"]
    assert [f.name for f in list_shards(SAMPLES / "fineweb_edu", "val")] == ["val_000000.bin"]
    for split, n in (("train", 490), ("val", 10)):
        tokens, offsets = read_examples(SAMPLES / "sft", split)
        assert len(offsets) == n + 1 and offsets[-1] == len(tokens)
