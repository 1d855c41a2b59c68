"""
The on-disk formats the data-prep scripts write and the loaders read (no torch here).

Token shards: the llm.c / modded-nanogpt .bin layout. A header of 256 int32, [0] magic,
[1] version, [2] number of tokens, then the tokens as uint16 (GPT-2's ids fit).

Chat examples (data/sft_mix.py): a split is the examples' tokens back to back in
{split}_000000.bin plus {split}_offsets.npy, int64 boundaries: example i is
tokens[offsets[i]:offsets[i+1]]. The loss mask is not stored: data/tokenizer.py reply_mask()
re-derives it from the special ids, which ordinary text never produces.
"""

import os
from pathlib import Path

import numpy as np

from data import UserError

PREPARE_HINT = "python data/fineweb_edu.py --out_dir {dir}"

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path, tokens):
    """Write a shard atomically: a temp file renamed into place, so no half-written shard survives a crash."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if len(tokens) >= 2**31:
        raise ValueError("a shard holds at most 2**31 - 1 tokens (its count is an int32)")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_header(path):
    """Validate a shard's header and size; return its number of tokens."""
    path = Path(path)
    fix = "delete it and re-run the data prep (python data/fineweb_edu.py)"
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; {fix}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise UserError(f"{path}: magic number {header[0]} is not {MAGIC}, so this is not a .bin token shard; {fix}")
    if header[1] != VERSION:
        raise UserError(f"{path}: shard version {header[1]}, this code reads version {VERSION}; {fix}")
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        raise UserError(
            f"{path}: header promises {ntok:,} tokens ({HEADER_BYTES + 2 * ntok:,} bytes) but the file has "
            f"{size:,} bytes (truncated or partly written); {fix}"
        )
    return ntok


def read_shard(path):
    """All tokens of a shard as a uint16 array (read into memory, not memory-mapped)."""
    ntok = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        return np.fromfile(f, dtype=np.uint16, count=ntok)


def list_shards(data_dir, split):
    """The sorted `{split}_NNNNNN.bin` files in data_dir, or a clear error with the command that makes them."""
    data_dir = Path(data_dir)
    hint = PREPARE_HINT.format(dir=data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist; prepare the shards with: {hint}")
    files = sorted(data_dir.glob(f"{split}_*.bin"))
    if not files:
        raise UserError(f"no {split}_*.bin shards in {data_dir}; prepare them with: {hint}")
    return files


SFT_PREPARE_HINT = "python data/sft_mix.py --out_dir {dir}"


def write_examples(out_dir, split, examples):
    """Write token-id lists as one split: the shard, then its offsets (both atomically)."""
    out_dir = Path(out_dir)
    lengths = np.array([len(ids) for ids in examples], dtype=np.int64)
    write_shard(out_dir / f"{split}_000000.bin", np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in examples]))
    tmp = out_dir / f"{split}_offsets.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate([[0], np.cumsum(lengths)]))
    os.replace(tmp, out_dir / f"{split}_offsets.npy")


def read_examples(data_dir, split):
    """(tokens, offsets) of a split written by write_examples, checked against each other."""
    path = Path(data_dir) / f"{split}_offsets.npy"
    if not path.is_file():
        raise UserError(f"no {path.name} in {data_dir}; prepare the examples with: "
                        f"{SFT_PREPARE_HINT.format(dir=data_dir)}")
    tokens = np.concatenate([read_shard(f) for f in list_shards(data_dir, split)])
    offsets = np.load(path)
    if (offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(tokens)
            or np.any(np.diff(offsets) <= 0)):
        raise UserError(f"{path} does not match the {len(tokens):,} tokens of the {split} shards; re-run "
                        f"{SFT_PREPARE_HINT.format(dir=data_dir)}")
    return tokens, offsets
