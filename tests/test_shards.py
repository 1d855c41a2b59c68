"""data/common.py: the .bin shard format, the batch loaders and the chat tokenizer."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"))
sys.path.insert(0, str(REPO))

from data.common import (  # noqa: E402
    ASSISTANT,
    EOT,
    HEADER_BYTES,
    USER,
    UserError,
    get_tokenizer,
    list_shards,
    read_header,
    read_shard,
    render_chat,
    write_shard,
)

# -----------------------------------------------------------------------------
# shard format


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, EOT, USER, 65535, 7], dtype=np.int64)
    write_shard(tmp_path / "s.bin", tokens)
    assert read_header(tmp_path / "s.bin") == len(tokens)
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 2 * len(tokens)
    assert not list(tmp_path.glob("*.tmp"))
    write_shard(tmp_path / "empty.bin", [])
    assert read_header(tmp_path / "empty.bin") == 0


def corrupt(path, what):
    data = bytearray(path.read_bytes())
    if what == "magic":
        data[0:4] = np.int32(12345).tobytes()
    elif what == "version":
        data[4:8] = np.int32(2).tobytes()
    elif what == "truncated":
        data = data[:-3]
    elif what == "short":
        data = data[:100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what, message", [
    ("magic", "magic number 12345"),
    ("version", "shard version 2"),
    ("truncated", "truncated"),
    ("short", "shorter than the 1024-byte header"),
])
def test_header_errors_name_the_file(tmp_path, what, message):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100))
    corrupt(path, what)
    for read in (read_header, read_shard):
        with pytest.raises(UserError, match=message) as e:
            read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_data_gives_the_prep_command(tmp_path):
    with pytest.raises(UserError, match="does not exist.*python data/fineweb_edu.py"):
        list_shards(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match="no val_\\*.bin shards.*python data/fineweb_edu.py"):
        list_shards(tmp_path, "val")


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
