"""
HellaSwag, zero-shot and completion style: the context followed by each of the 4 endings, and the
model picks the ending it finds likeliest. eval_hellaswag.py scores a checkpoint with it; the
training scripts score the model while it trains.

acc picks the ending with the lowest total loss, acc_norm the lowest loss per token. This is
build-nanogpt's convention: GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on it (the Eleuther
harness scores it another way and reports 0.2892 / 0.3114).
"""

import functools
import json
import os
import shutil
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import REPO_ROOT, UserError
from data.tokenizer import EOT, get_tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = REPO_ROOT / "data/hellaswag/hellaswag_val.jsonl"  # where the download goes
HELLASWAG_SAMPLE = REPO_ROOT / "data/samples/hellaswag_val_200.jsonl"  # the first 200 rows, in the repo


def download_hellaswag(path):
    """Fetch the validation set to path through a temp file, so a failed or interrupted download leaves
    nothing behind, not even the folder it made."""
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    print(f"downloading {HELLASWAG_URL} to {path}")
    try:
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (OSError, KeyboardInterrupt) as e:
        tmp.unlink(missing_ok=True)
        for d in made:  # innermost first
            d.rmdir()
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserError(f"could not download HellaSwag from {HELLASWAG_URL} ({e}); fetch the file some other way "
                        "and pass --data=PATH") from None
    os.replace(tmp, path)


def hellaswag_path(data):
    """The file to read: `data` if given, else the default copy, downloaded on first use."""
    if data:
        return data
    if not HELLASWAG_FILE.is_file():
        download_hellaswag(HELLASWAG_FILE)
    return HELLASWAG_FILE


def check_example(example):
    """What is wrong with one parsed row, or None when it can be scored."""
    if not isinstance(example, dict):
        return "not a JSON object"
    if not isinstance(example.get("ctx"), str) or not example["ctx"].strip():
        return "'ctx' must be a non-empty string"
    endings = example.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) and e.strip() for e in endings):
        return "'endings' must be a list of 4 non-empty strings"
    if type(example.get("label")) is not int or not 0 <= example["label"] < 4:
        return "'label' must be the integer 0, 1, 2 or 3"
    return None


def load_hellaswag(path, limit=0):
    """The examples of a HellaSwag jsonl file, the first `limit` of them if limit > 0. A row that
    cannot be scored is an error naming the file and line, not a silently skipped example; so is a row
    that repeats an earlier one (the same ctx and endings), which would count twice. The val set's `ind`
    is no key for that: 433 of its values each name two different rows."""
    if os.path.isdir(path):
        raise UserError(f"HellaSwag file {path} is a folder; name the .jsonl file in it")
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} not found")
    examples, first_seen, repeats = [], {}, []  # repeats: (line, the line it repeats)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM, as some editors save
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            problem = check_example(example)
            if problem:
                raise UserError(f"{path} line {lineno}: {problem}")
            key = (example["ctx"], tuple(example["endings"]))
            if key in first_seen:
                repeats.append((lineno, first_seen[key]))
            first_seen.setdefault(key, lineno)
            examples.append(example)
    if repeats:
        (line, earlier), n = repeats[0], len(repeats)
        raise UserError(f"{path} line {line} repeats line {earlier} (the same ctx and endings); {n} row"
                        f"{'s repeat' if n > 1 else ' repeats'} an earlier one in all: remove them, or each counts "
                        "twice")
    if not examples:
        raise UserError(f"HellaSwag file {path} holds no examples; point --data at the val set (10,042 rows)")
    return examples


@functools.cache  # training scores the same examples every hellaswag_interval: tokenize each once per process
def encode_example(ctx, endings):
    """Token ids of a context and of its endings (a tuple), each ending with the space before it."""
    enc = get_tokenizer()
    return enc.encode_ordinary(ctx), [enc.encode_ordinary(" " + ending) for ending in endings]


def render_example(example, block_size):
    """The 4 candidates of an example as (tokens, mask): context + ending token ids, and 1 on the ending
    tokens. The last token is only ever a target, so a row may hold block_size + 1 tokens; a longer
    one loses context from the left, since the ending is what gets scored."""
    context, endings = encode_example(example["ctx"], tuple(example["endings"]))
    rows = []
    for ending in endings:  # GPT-2's BPE puts the space before a word into its token
        tokens, mask = context + ending, [0] * len(context) + [1] * len(ending)
        rows.append((tokens[-(block_size + 1) :], mask[-(block_size + 1) :]))
    return rows


# -----------------------------------------------------------------------------
# scoring


def pack_rows(rows, labels=()):
    """(tokens, mask) rows, each mask 0s then 1s, as ONE int64 array (pinned and copied in one go) and the
    sizes that split it on the device into: x (R, W) the inputs, right-padded; row, col, target for
    each ending token (where its logits are and what they should predict: integer indices, since
    indexing with a boolean mask makes the host wait for the GPU to count the mask); n (R,) each
    row's ending tokens; and the labels."""
    lengths = np.array([len(tokens) for tokens, _ in rows])
    n = np.minimum([sum(mask) for _, mask in rows], lengths - 1)  # the first token is never a target
    tokens = np.full((len(rows), lengths.max()), EOT, dtype=np.int64)
    for i, (t, _) in enumerate(rows):
        tokens[i, : len(t)] = t
    row = np.repeat(np.arange(len(rows)), n)
    col = np.repeat(lengths - 1 - n, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # each row's last n
    x = tokens[:, :-1]
    parts = [x.ravel(), row, col, tokens[row, col + 1], n, np.asarray(labels, dtype=np.int64)]
    return torch.from_numpy(np.concatenate(parts)), ([len(p) for p in parts], x.shape)


def row_losses(model, packed, sizes, device):
    """Total and mean loss over the ending tokens of each row of a pack_rows() batch, in one forward.
    Rows are right-padded: with causal attention the padding after a row's last token cannot change
    the logits before it, so no attention mask is needed. Returns the labels (on the device) too."""
    counts, shape = sizes
    x, row, col, target, n, labels = packed.to(device, non_blocking=True).split(counts)
    logits, _ = model(x.view(shape), logits_at=(row, col))  # (ending tokens, vocab): no logits for the context
    losses = torch.zeros(shape, device=device)
    losses[row, col] = F.cross_entropy(logits.float(), target, reduction="none")
    total = losses.sum(dim=1)  # a sum per row, not index_add_: the same order every run, so the same scores
    return total, total / n, labels


def ending_losses(model, rows, device):
    """Total and mean loss over the ending tokens of each (tokens, mask) row, all rows in one forward."""
    total, mean, _ = row_losses(model, *pack_rows(rows), device)
    return total, mean


@functools.lru_cache(maxsize=1)  # the batches of the last examples scored: training scores the same ones again
def prepared_batches(examples, block_size, batch_size, pin):
    """examples, a tuple of (ctx, endings, label), in pack_rows() batches of batch_size. Examples of similar
    length share a batch: less padding to compute."""
    rendered = [render_example(dict(ctx=ctx, endings=endings), block_size) for ctx, endings, _ in examples]
    order = sorted(range(len(rendered)), key=lambda i: max(len(tokens) for tokens, _ in rendered[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        packed, sizes = pack_rows([row for i in batch for row in rendered[i]], [examples[i][2] for i in batch])
        batches.append((packed.pin_memory() if pin else packed, sizes))  # pinned: the copy need not wait
    return batches


@torch.inference_mode()
def hellaswag_score(model, examples, device, batch_size=64, rank=0, world_size=1):
    """{"acc", "acc_norm", "n"} of model on examples. Rank r of world_size scores examples r, r + W, ...
    and the counts are summed over the ranks, so every rank returns the score of all examples.
    Nothing waits for the GPU until the final counts."""
    mine = tuple((ex["ctx"], tuple(ex["endings"]), ex["label"]) for ex in examples[rank::world_size])
    pin = torch.device(device).type == "cuda"
    counts = torch.zeros(3, device=device)  # right by total loss, right by mean loss, examples
    # The bar shows on a terminal only (disable=None), where it clears its line for the next log line; in a
    # log file (python train_gpt.py > run.log 2>&1) its \r updates would share a line with the next one.
    for packed, sizes in tqdm(prepared_batches(mine, model.config.block_size, batch_size, pin), desc="hellaswag",
                              unit="batch", leave=False, disable=None if rank == 0 else True):
        total, mean, labels = row_losses(model, packed, sizes, device)
        counts[0] += (total.view(-1, 4).argmin(dim=1) == labels).sum()
        counts[1] += (mean.view(-1, 4).argmin(dim=1) == labels).sum()
        counts[2] += len(labels)
    if world_size > 1:
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return {"acc": right / max(n, 1), "acc_norm": right_norm / max(n, 1), "n": int(n)}
