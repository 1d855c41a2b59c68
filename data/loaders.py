"""
Batches for the training scripts, read from the shards of data/shards.py.

    BatchLoader    pretraining micro-batches, reproducible from (seed, micro-batch index)
    ValData        the fixed val set: the same tokens at every evaluation
    ExampleLoader  padded chat examples with the loss on the replies only (finetune_sft.py)

Each training loader's whole state is one counter (micro-batches handed out, all ranks
together), so a checkpoint resumes the exact batch order, and rank r of W takes
micro-batches r, r+W, r+2W, ...: 2 ranks x 1 micro-step see what 1 rank x 2 micro-steps see.
"""

import numpy as np
import torch

from data import UserError
from data.shards import HEADER_BYTES, list_shards, read_examples, read_header
from data.tokenizer import EOT, reply_mask


def _to_device(buf, device):
    """uint16 (N, T+1) windows -> int64 x, y on device (torch has no uint16 arithmetic)."""
    # numpy makes the contiguous int64 copies: torch's threaded copy kernels stall on a busy CPU
    x, y = torch.from_numpy(buf[:, :-1].astype(np.int64)), torch.from_numpy(buf[:, 1:].astype(np.int64))
    if torch.device(device).type == "cuda":  # pin_memory raises on a machine without CUDA
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class ShardReader:
    """Reads token spans from a split's shards with plain file reads.

    A long-lived np.memmap makes RSS grow with every page touched (nanoGPT #287);
    reads through open file handles leave the data in the OS page cache instead.
    """

    def __init__(self, data_dir, split, min_tokens=1):
        self.files = list_shards(data_dir, split)
        self.sizes = np.array([read_header(f) for f in self.files], dtype=np.int64)
        if self.sizes.sum() < min_tokens:
            raise UserError(
                f"the {split} shards in {data_dir} hold {self.sizes.sum():,} tokens, fewer than the {min_tokens:,} "
                f"one batch needs; lower batch_size/block_size or prepare more data"
            )
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # global offset of each shard
        self._handles = {}

    def read(self, shard, offset, out):
        """Fill the uint16 array `out` from `shard` starting at token `offset`."""
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(self.files[shard], "rb", buffering=0)
        f.seek(HEADER_BYTES + 2 * int(offset))
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise UserError(f"{self.files[shard]}: short read at token {offset}; the shard changed on disk")

    def read_span(self, start, out):
        """Fill `out` from the concatenated split stream starting at global token `start` (may cross shards)."""
        pos, filled = start, 0
        while filled < len(out):
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            n = min(len(out) - filled, int(self.starts[shard + 1] - pos))
            self.read(shard, pos - self.starts[shard], out[filled : filled + n])
            pos, filled = pos + n, filled + n


class BatchLoader:
    """Training micro-batches of B sequences of T tokens, reproducible from (seed, micro-batch index).

    random (default): each micro-batch is B windows of T+1 tokens at uniformly random
    offsets over all train tokens (a shard is picked in proportion to its length), so a
    run never drifts through one long document or domain at a time.
    sequential: consecutive B*T+1 token spans of the concatenated shards, wrapping round.

    Micro-batch g is drawn from its own generator seeded by (seed, g); rank r of W
    takes g = r, r+W, r+2W, ... So ranks see disjoint streams, 2 ranks x 1 micro-step
    see the same data as 1 rank x 2 micro-steps, and the whole state is one counter.
    """

    def __init__(self, data_dir, split, batch_size, block_size, seed=0, rank=0, world_size=1,
                 mode="random", device="cpu"):
        if mode not in ("random", "sequential"):
            raise UserError(f"loader mode {mode!r}: use 'random' or 'sequential'")
        self.B, self.T, self.seed, self.mode = batch_size, block_size, seed, mode
        self.rank, self.world_size, self.device = rank, world_size, device
        self.reader = ShardReader(data_dir, split, min_tokens=batch_size * block_size + 1)
        # a window of T+1 tokens can start at offsets 0..n-T-1 of a shard of n tokens
        self.window_starts = np.maximum(self.reader.sizes - block_size, 0)
        if self.window_starts.sum() == 0:
            raise UserError(f"every {split} shard in {data_dir} is shorter than block_size+1 = {block_size + 1} tokens")
        self.cum_starts = np.cumsum(self.window_starts)
        self.position = 0  # micro-batches handed out so far, all ranks together

    def next_batch(self):
        index = self.position + self.rank
        self.position += self.world_size
        buf = np.empty((self.B, self.T + 1), dtype=np.uint16)
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, index])
            picks = rng.integers(0, self.cum_starts[-1], size=self.B)
            shards = np.searchsorted(self.cum_starts, picks, side="right")
            offsets = picks - (self.cum_starts[shards] - self.window_starts[shards])
            for row, (shard, offset) in enumerate(zip(shards, offsets, strict=True)):
                self.reader.read(int(shard), offset, buf[row])
        else:
            span = np.empty(self.B * self.T + 1, dtype=np.uint16)
            total = int(self.reader.starts[-1])
            start = (index * self.B * self.T) % (total - self.B * self.T)
            self.reader.read_span(start, span)
            buf[:, :-1] = span[:-1].reshape(self.B, self.T)
            buf[:, -1] = span[self.T :: self.T]
        return _to_device(buf, self.device)

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state):
        if (state["seed"], state["mode"]) != (self.seed, self.mode):
            raise UserError(
                f"the checkpoint's loader used seed={state['seed']} mode={state['mode']}, this run "
                f"seed={self.seed} mode={self.mode}; resume with the same settings"
            )
        if state["position"] % self.world_size:
            raise UserError(f"cannot resume loader position {state['position']} with {self.world_size} ranks")
        self.position = state["position"]


class ValData:
    """The first `val_tokens` tokens of the val split as fixed (B, T) batches: the same
    tokens at every evaluation. Rank r of W evaluates batches r, r+W, ..."""

    def __init__(self, data_dir, batch_size, block_size, val_tokens, rank=0, world_size=1, device="cpu"):
        reader = ShardReader(data_dir, "val", min_tokens=batch_size * block_size + 1)
        per_batch = batch_size * block_size
        available = int(reader.starts[-1]) - 1
        n_batches = max(1, min(val_tokens, available) // per_batch)
        span = np.empty(n_batches * per_batch + 1, dtype=np.uint16)
        reader.read_span(0, span)
        self.batches = [span[i * per_batch : (i + 1) * per_batch + 1] for i in range(n_batches)][rank::world_size]
        self.B, self.T, self.device = batch_size, block_size, device
        self.tokens = n_batches * per_batch

    def __iter__(self):
        for span in self.batches:
            buf = np.empty((self.B, self.T + 1), dtype=np.uint16)
            buf[:, :-1] = span[:-1].reshape(self.B, self.T)
            buf[:, -1] = span[self.T :: self.T]
            yield _to_device(buf, self.device)


class ExampleLoader:
    """Micro-batches of B chat examples of one split as (x, y), y = -1 wherever there is no loss: on the
    prompts, the markers and the padding. Examples are cut to T + 1 tokens.

    Training order: the examples in a permutation seeded by (seed, epoch), endlessly. Micro-batch g
    takes positions g*B .. g*B+B-1 of that stream; rank r of W takes g = r, r+W, r+2W, ... (as
    BatchLoader does), so the order follows from (seed, step) and the state is one counter."""

    def __init__(self, data_dir, split, batch_size, block_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.tokens, self.offsets = read_examples(data_dir, split)
        self.n = len(self.offsets) - 1
        self.B, self.T, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.position = 0  # micro-batches handed out so far, all ranks together
        self.epoch, self.order = -1, None

    def batch(self, indices):
        """Examples -> x, y of shape (len(indices), longest example - 1), right-padded."""
        rows = [self.tokens[self.offsets[i] : self.offsets[i + 1]][: self.T + 1].astype(np.int64) for i in indices]
        T = max(len(ids) for ids in rows) - 1
        # padding sits after each example, so causal attention never lets a real position see it
        x = np.full((len(rows), T), EOT, dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        for row, ids in enumerate(rows):
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = np.where(reply_mask(ids)[1:] == 1, ids[1:], -1)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def next_batch(self):
        index = self.position + self.rank
        self.position += self.world_size
        picks = []
        for p in range(index * self.B, (index + 1) * self.B):
            if p // self.n != self.epoch:
                self.epoch = p // self.n
                self.order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            picks.append(self.order[p % self.n])
        return self.batch(picks)

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "examples": self.n}

    def load_state_dict(self, state):
        if (state["seed"], state["examples"]) != (self.seed, self.n):
            raise UserError(
                f"the checkpoint's loader used seed={state['seed']} over {state['examples']} train examples, this run "
                f"seed={self.seed} over {self.n}; resume with the same seed and data_dir"
            )
        if state["position"] % self.world_size:
            raise UserError(f"cannot resume loader position {state['position']} with {self.world_size} ranks")
        self.position = state["position"]
