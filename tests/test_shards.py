"""data/common.py: the .bin shard format, the batch loaders and the chat tokenizer."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"))
sys.path.insert(0, str(REPO))

from data.common import (  # noqa: E402
    ASSISTANT,
    EOT,
    HEADER_BYTES,
    USER,
    BatchLoader,
    UserError,
    ValData,
    get_tokenizer,
    list_shards,
    read_header,
    read_shard,
    render_chat,
    write_shard,
)

B, T = 4, 16
SIZES = (3000, 2000, 1500)  # train shards; tokens are their global positions, so every window is checkable


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    start = 0
    for i, n in enumerate(SIZES):
        write_shard(d / f"train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    write_shard(d / "val_000000.bin", np.arange(40_000, 41_000))
    return d


def loader(shards, **kwargs):
    return BatchLoader(shards, "train", B, T, **kwargs)


def draw(ld, k):
    return [ld.next_batch() for _ in range(k)]


def same(a, b):
    if len(a) != len(b):
        return False
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


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
    with pytest.raises(UserError, match="python data/fineweb_edu.py"):
        BatchLoader(tmp_path, "train", B, T)


# -----------------------------------------------------------------------------
# BatchLoader


def test_batches_are_windows_of_one_shard(shards):
    bounds = np.cumsum((0,) + SIZES)
    for x, y in draw(loader(shards), 20):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            start = row_x[0]
            assert np.array_equal(row_x, np.arange(start, start + T)) and row_y[-1] == start + T
            shard = np.searchsorted(bounds, start, side="right") - 1
            assert start + T < bounds[shard + 1], "a window must not run past its shard"


def test_seed_and_rank_determine_the_batches(shards):
    ref = draw(loader(shards, seed=3), 5)
    assert same(ref, draw(loader(shards, seed=3), 5))
    assert not same(ref, draw(loader(shards, seed=4), 5))
    r0 = draw(loader(shards, seed=3, rank=0, world_size=2), 3)
    r1 = draw(loader(shards, seed=3, rank=1, world_size=2), 3)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(r0, r1, strict=True))
    # 2 ranks x 1 micro-batch see what 1 rank x 2 micro-batches sees
    interleaved = [b for pair in zip(r0, r1, strict=True) for b in pair]
    assert same(interleaved, draw(loader(shards, seed=3), 6))


def test_state_dict_resumes_exactly(shards):
    for mode in ("random", "sequential"):
        ld = loader(shards, seed=5, mode=mode)
        draw(ld, 7)
        state = ld.state_dict()
        rest = draw(ld, 4)
        fresh = loader(shards, seed=5, mode=mode)
        fresh.load_state_dict(state)
        assert same(draw(fresh, 4), rest)
    with pytest.raises(UserError, match="seed"):
        loader(shards, seed=6).load_state_dict(state)


def test_sequential_reads_consecutive_tokens(shards):
    ld = loader(shards, mode="sequential")
    for i, (x, y) in enumerate(draw(ld, 110)):  # 110 * B*T tokens: crosses shard boundaries and wraps
        start = i * B * T % (sum(SIZES) - B * T)
        assert np.array_equal(x.flatten().numpy(), np.arange(start, start + B * T))
        assert np.array_equal(y.flatten().numpy(), np.arange(start + 1, start + B * T + 1))


def test_val_data_is_fixed(shards):
    val = ValData(shards, B, T, val_tokens=3 * B * T)
    first, second = list(val), list(val)
    assert len(first) == 3 and same(first, second)
    x, y = first[0]
    assert np.array_equal(x.flatten().numpy(), np.arange(40_000, 40_000 + B * T))
    assert torch.equal(x[:, 1:], y[:, :-1])


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
