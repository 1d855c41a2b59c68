"""The HellaSwag fast path of data/hellaswag.py (each example tokenized once per process, batches packed
once in numpy with integer indices, nothing read on the host until the final counts) scores exactly
what the straightforward path scores: one row per forward, the loss summed over its ending tokens."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
from stage_code import model_namespace  # noqa: E402

import data.hellaswag as hellaswag  # noqa: E402
from data.tokenizer import VOCAB_SIZE  # noqa: E402

ROWS = REPO_ROOT / "data/samples/hellaswag_val_200.jsonl"
BLOCK_SIZE = 64  # shorter than some rows: their contexts lose their heads


@pytest.fixture(scope="module")
def examples():
    return hellaswag.load_hellaswag(ROWS)


def tiny_model():
    ns = model_namespace("eval_hellaswag.py")
    torch.manual_seed(0)
    return ns["GPT"](ns["GPTConfig"](n_layer=2, n_head=2, n_embd=16, block_size=BLOCK_SIZE)).eval()


class Oracle(torch.nn.Module):
    """Puts its logits on the next token of each example's correct row (a context seen in no other row)."""

    config = tiny_model().config

    def __init__(self, examples):
        super().__init__()
        self.next = {}  # a prefix of a correct row -> the token after it
        for ex in examples:
            tokens, _ = hellaswag.render_example(ex, BLOCK_SIZE)[ex["label"]]
            self.next.update({tuple(tokens[: i + 1]): tokens[i + 1] for i in range(len(tokens) - 1)})

    def forward(self, idx, logits_at):
        """Logits (N, vocab) at the positions logits_at picks: (rows, cols) index tensors or a boolean mask."""
        rows, cols = logits_at if isinstance(logits_at, tuple) else logits_at.nonzero(as_tuple=True)
        logits, idx = torch.zeros(len(rows), VOCAB_SIZE), idx.tolist()
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            token = self.next.get(tuple(idx[r][: c + 1]))
            if token is not None:
                logits[i, token] = 30.0
        return logits, None


@torch.no_grad()
def row_loss(model, tokens, mask):
    """The losses of one row's ending tokens, the row alone in its forward (a boolean mask picks them)."""
    scored = torch.tensor([mask[1:]], dtype=torch.bool)
    logits, _ = model(torch.tensor([tokens[:-1]]), logits_at=scored)
    return F.cross_entropy(logits.float(), torch.tensor([tokens[1:]])[scored], reduction="none")


def straightforward_score(model, examples):
    """Each row alone, unpadded, and the ending with the lowest total (acc) or mean (acc_norm) loss."""
    right = right_norm = 0
    for ex in examples:
        losses = [row_loss(model, tokens, mask) for tokens, mask in hellaswag.render_example(ex, BLOCK_SIZE)]
        right += min(range(4), key=lambda i: losses[i].sum().item()) == ex["label"]
        right_norm += min(range(4), key=lambda i: losses[i].mean().item()) == ex["label"]
    return {"acc": right / len(examples), "acc_norm": right_norm / len(examples), "n": len(examples)}


def test_random_model_scores_what_the_straightforward_path_scores(examples):
    model = tiny_model()
    subset = examples[:16]  # a 50k vocab makes every ending token cost: 16 examples, 64 rows
    fast = hellaswag.hellaswag_score(model, subset, "cpu", batch_size=6)
    assert fast == straightforward_score(model, subset)
    rows = [row for ex in subset[:4] for row in hellaswag.render_example(ex, BLOCK_SIZE)]
    total, mean = hellaswag.ending_losses(model, rows, "cpu")  # 16 rows, padded, in one forward
    for i, (tokens, mask) in enumerate(rows):
        expected = row_loss(model, tokens, mask)
        torch.testing.assert_close(total[i], expected.sum(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mean[i], expected.mean(), atol=1e-5, rtol=1e-5)


def test_a_model_that_knows_the_answers_scores_one_on_every_row(examples):
    oracle = Oracle(examples)
    assert straightforward_score(oracle, examples[:8]) == {"acc": 1.0, "acc_norm": 1.0, "n": 8}
    assert hellaswag.hellaswag_score(oracle, examples, "cpu", batch_size=8) == {"acc": 1.0, "acc_norm": 1.0, "n": 200}


def test_a_second_score_reuses_the_tokens_and_batches_and_reads_the_host_once(examples, monkeypatch):
    model = tiny_model()
    subset = examples[:12]
    first = hellaswag.hellaswag_score(model, subset, "cpu", batch_size=4)
    tokenized, prepared = hellaswag.encode_example.cache_info(), hellaswag.prepared_batches.cache_info()

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    for name in ("item", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *args: pytest.fail("a tensor was read on the host"))
    again = hellaswag.hellaswag_score(model, subset, "cpu", batch_size=4)
    monkeypatch.undo()

    assert again == first
    assert reads == [torch.Size([3])]  # the final counts, nothing per batch
    assert hellaswag.encode_example.cache_info().misses == tokenized.misses  # nothing tokenized again
    assert hellaswag.prepared_batches.cache_info().hits == prepared.hits + 1  # nor packed again
