"""
HellaSwag, zero-shot and completion style: the context followed by each of the 4 endings, and the
model picks the ending it finds likeliest. eval_hellaswag.py scores a checkpoint with it; the
training scripts score the model while it trains.

acc picks the ending with the lowest total loss, acc_norm the lowest loss per token. This is
build-nanogpt's convention: GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on it (the Eleuther
harness scores it another way and reports 0.2892 / 0.3114).
"""

import json
import os
import shutil
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import UserError
from data.run import REPO_ROOT
from data.tokenizer import EOT, get_tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = REPO_ROOT / "data/hellaswag/hellaswag_val.jsonl"  # where the download goes
HELLASWAG_SAMPLE = REPO_ROOT / "data/samples/hellaswag_val_200.jsonl"  # the first 200 rows, in the repo


def download_hellaswag(path):
    """Fetch the validation set to path through a temp file, so an interrupted download leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    print(f"downloading {HELLASWAG_URL} to {path}")
    try:
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
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
    cannot be scored is an error naming the file and line, not a silently skipped example."""
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            problem = check_example(example)
            if problem:
                raise UserError(f"{path} line {lineno}: {problem}")
            examples.append(example)
    if not examples:
        raise UserError(f"HellaSwag file {path} holds no examples; point --data at the val set (10,042 rows)")
    return examples


def render_example(example, block_size):
    """The 4 candidates of an example as (tokens, mask): context + ending token ids, and 1 on the ending
    tokens. The last token is only ever a target, so a row may hold block_size + 1 tokens; a longer
    one loses context from the left, since the ending is what gets scored."""
    enc = get_tokenizer()
    context = enc.encode_ordinary(example["ctx"])
    rows = []
    for ending in example["endings"]:
        ending = enc.encode_ordinary(" " + ending)  # GPT-2's BPE puts the space before a word into its token
        tokens, mask = context + ending, [0] * len(context) + [1] * len(ending)
        rows.append((tokens[-(block_size + 1) :], mask[-(block_size + 1) :]))
    return rows


# -----------------------------------------------------------------------------
# scoring


def ending_losses(model, rows, device):
    """Total and mean loss over the ending tokens of each (tokens, mask) row, all rows in one forward.
    Rows are right-padded: with causal attention the padding after a row's last token cannot change
    the logits before it, so no attention mask is needed."""
    width = max(len(tokens) for tokens, _ in rows) - 1
    x = np.full((len(rows), width), EOT, dtype=np.int64)
    y = np.full((len(rows), width), -1, dtype=np.int64)  # -1: not an ending token, no loss
    for i, (tokens, mask) in enumerate(rows):
        x[i, : len(tokens) - 1] = tokens[:-1]
        y[i, : len(tokens) - 1] = np.where(mask[1:], tokens[1:], -1)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    scored = y != -1
    logits, _ = model(x, logits_at=scored)  # (number of ending tokens, vocab): no logits for the context
    losses = torch.zeros(y.shape, device=device)
    losses[scored] = F.cross_entropy(logits.float(), y[scored], reduction="none")
    total = losses.sum(dim=1)
    return total, total / scored.sum(dim=1)


@torch.inference_mode()
def hellaswag_score(model, examples, device, batch_size=32, rank=0, world_size=1):
    """{"acc", "acc_norm", "n"} of model on examples. Rank r of world_size scores examples r, r + W, ...
    and the counts are summed over the ranks, so every rank returns the score of all examples."""
    rendered = [render_example(ex, model.config.block_size) for ex in examples[rank::world_size]]
    labels = [ex["label"] for ex in examples[rank::world_size]]
    # examples of similar length share a forward: less padding to compute
    order = sorted(range(len(rendered)), key=lambda i: max(len(tokens) for tokens, _ in rendered[i]))
    counts = torch.zeros(3, device=device)  # right by total loss, right by mean loss, examples
    for start in tqdm(range(0, len(order), batch_size), desc="hellaswag", unit="batch", leave=False,
                      disable=rank != 0):
        batch = order[start : start + batch_size]
        total, mean = ending_losses(model, [row for i in batch for row in rendered[i]], device)
        label = torch.tensor([labels[i] for i in batch], device=device)
        counts[0] += (total.view(-1, 4).argmin(dim=1) == label).sum()
        counts[1] += (mean.view(-1, 4).argmin(dim=1) == label).sum()
        counts[2] += len(batch)
    if world_size > 1:
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return {"acc": right / max(n, 1), "acc_norm": right_norm / max(n, 1), "n": int(n)}
