"""
GPT-2's BPE plus two chat tokens, the chat template and its loss mask.

ids 0..50255 are GPT-2's BPE ranks and 50256 is <|endoftext|>. The model's vocab is
padded to 50,304 (= 786 * 64, for fast matmuls), which leaves 47 unused slots; the chat
template takes the first two, so each control token is ONE id.

The BPE ranks are read from data/gpt2.tiktoken (tiktoken's r50k_base file, shipped in the
repo and checked against its sha256), so nothing is ever downloaded.
"""

import base64
import functools
import hashlib
from pathlib import Path

import numpy as np

from data import UserError

EOT = 50256  # <|endoftext|>: prepended to every pretraining document, ends every reply
USER = 50257  # <|user|>
ASSISTANT = 50258  # <|assistant|>
VOCAB_SIZE = 50304  # 50,257 padded up to a multiple of 64
TOKENIZER = "gpt2_chat"  # recorded in shard headers and manifests, so a shard from another tokenizer is caught

BPE_FILE = Path(__file__).resolve().parent / "gpt2.tiktoken"
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's pinned hash
# GPT-2's pre-tokenizer regex (tiktoken's r50k_base)
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.cache
def get_tokenizer():
    """tiktoken's gpt2 encoding extended with <|user|> and <|assistant|>.

    encode_ordinary() never produces special ids, so text that merely contains the
    string "<|user|>" stays ordinary text; only the template helpers below insert them.
    """
    import tiktoken

    data = BPE_FILE.read_bytes() if BPE_FILE.is_file() else b""
    if hashlib.sha256(data).hexdigest() != BPE_SHA256:
        raise UserError(f"{BPE_FILE} is missing or damaged (sha256 mismatch); restore it with "
                        f"git checkout -- {BPE_FILE.name} (run from data/)")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
    specials = {"<|endoftext|>": EOT, "<|user|>": USER, "<|assistant|>": ASSISTANT}
    return tiktoken.Encoding(name=TOKENIZER, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def chat_prompt(prompt):
    """Token ids of `<|user|>{prompt}<|assistant|>`: what the model continues with its reply."""
    return [USER, *get_tokenizer().encode_ordinary(prompt), ASSISTANT]


def render_chat(turns):
    """Token ids and loss mask for `<|user|>{p}<|assistant|>{r}<|endoftext|>` per (p, r) turn.

    The mask is 1 exactly on the reply tokens and their closing <|endoftext|>: the
    tokens the model must learn to produce. Prompts and the markers are context only.
    """
    enc = get_tokenizer()
    ids, mask = [], []
    for prompt, response in turns:
        context = chat_prompt(prompt)
        reply = [*enc.encode_ordinary(response), EOT]
        ids += context + reply
        mask += [0] * len(context) + [1] * len(reply)
    return ids, mask


def reply_mask(ids):
    """1 on the tokens render_chat masks with 1 (each reply and its closing <|endoftext|>), 0 elsewhere:
    a token is reply iff the last special token before it is <|assistant|>."""
    ids = np.asarray(ids)
    is_special = (ids == USER) | (ids == ASSISTANT) | (ids == EOT)
    latest = np.maximum.accumulate(np.where(is_special, np.arange(len(ids)), -1))  # at or before each position
    before = np.concatenate([[-1], latest[:-1]])  # strictly before it; -1: none
    return ((before >= 0) & (ids[before] == ASSISTANT)).astype(np.uint8)


def chat_context(turns, prompt, max_tokens):
    """Token ids of a conversation so far, (prompt, reply) turns, then the new prompt: <|endoftext|>, each turn
    in the template the multi-turn SFT data uses, then <|user|>{prompt}<|assistant|>. Whole turns are dropped,
    oldest first, until it fits in max_tokens (the new prompt is always kept). Returns (ids, turns dropped)."""
    new = chat_prompt(prompt)
    for dropped in range(len(turns) + 1):
        ids = [EOT, *render_chat(turns[dropped:])[0], *new]
        if len(ids) <= max_tokens:
            break
    return ids, dropped
