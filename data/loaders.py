"""
Batches for the training scripts, read from the shards of data/shards.py.

    BatchLoader    pretraining micro-batches, reproducible from (seed, micro-batch index)
    ValData        the fixed val set: the same tokens at every evaluation
    ExampleLoader  padded chat examples with the loss on the replies only (finetune_sft.py)

Each training loader's whole state is one counter (micro-batches handed out, all ranks
together), so a checkpoint resumes the exact batch order, and rank r of W takes
micro-batches r, r+W, r+2W, ...: 2 ranks x 1 micro-step see what 1 rank x 2 micro-steps see.
"""

import os

import numpy as np
import torch

from data import UserError
from data.shards import (
    HEADER_BYTES,
    check_prep_stamp,
    list_shards,
    prep_stamp,
    read_examples,
    read_header,
    reprepared,
)
from data.tokenizer import EOT, VOCAB_SIZE, reply_mask

OPENED = "run the command again"  # the fix when a prep swapped data_dir while a loader was being built
RESUME = "resume: python {script} --out_dir=<this run's out_dir> --init_from=resume"  # ... and mid-run


def _file_id(st):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


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

    A prep into data_dir meanwhile swaps in other shards under the same names. An open handle keeps
    reading the file it opened, and each shard is opened on first use only if it is still the file
    validated at the start (os.fstat of the new handle against the identity recorded then), so no
    batch mixes two preps; check_prep() notices the new prep even when every shard is open already.
    fix: what the error says to do once the prep is done.
    """

    def __init__(self, data_dir, split, min_tokens=1, fix=OPENED):
        self.data_dir, self.fix = data_dir, fix
        self.stamp = prep_stamp(data_dir)
        try:
            self.files = list_shards(data_dir, split)
            self.sizes = np.array([read_header(f) for f in self.files], dtype=np.int64)
            self._ids = [_file_id(os.stat(f)) for f in self.files]
        except (UserError, OSError):  # a prep that swapped in midway explains a mismatch better
            check_prep_stamp(data_dir, self.stamp, OPENED, when="while this run opened it")
            raise
        # bracketed by two stamps, so the files checked, sized and identified above are one prep's
        check_prep_stamp(data_dir, self.stamp, OPENED, when="while this run opened it")
        if self.sizes.sum() < min_tokens:
            raise UserError(
                f"the {split} shards in {data_dir} hold {self.sizes.sum():,} tokens, fewer than the {min_tokens:,} "
                f"one batch needs; lower batch_size/block_size or prepare more data"
            )
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # global offset of each shard
        self._handles = {}

    def check_prep(self):
        """Refuse to read on once data_dir holds another prep than the one this reader opened (one stat)."""
        check_prep_stamp(self.data_dir, self.stamp, self.fix)

    def read(self, shard, offset, out):
        """Fill the uint16 array `out` from `shard` starting at token `offset`."""
        f = self._handles.get(shard)
        if f is None:
            f = self._open(shard)
        f.seek(HEADER_BYTES + 2 * int(offset))
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise UserError(f"{self.files[shard]}: short read at token {offset}; the shard changed on disk")

    def _open(self, shard):
        path = self.files[shard]
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            self.check_prep()
            raise UserError(f"cannot open {path} ({e.strerror}), though it was there when this run started; "
                            f"{self.fix}") from None
        if _file_id(os.fstat(f.fileno())) != self._ids[shard]:
            f.close()
            raise reprepared(self.data_dir, self.fix, changed=path.name)
        self._handles[shard] = f
        return f

    def read_span(self, start, out):
        """Fill `out` from the concatenated split stream starting at global token `start` (may cross shards)."""
        pos, filled = start, 0
        while filled < len(out):
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            n = min(len(out) - filled, int(self.starts[shard + 1] - pos))
            self.read(shard, pos - self.starts[shard], out[filled : filled + n])
            pos, filled = pos + n, filled + n

    def document_starts(self, shard, chunk=2**24):
        """The offsets in a shard of every <|endoftext|>, each document's first token, read chunk tokens at a
        time (16M tokens = 32 MB at once; a 100M-token shard of ~1K-token documents: 0.8 MB of offsets)."""
        found, size = [], int(self.sizes[shard])
        for begin in range(0, size, chunk):
            buf = np.empty(min(chunk, size - begin), dtype=np.uint16)
            self.read(shard, begin, buf)
            found.append(begin + np.flatnonzero(buf == EOT))
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def check_ids(self, buf, starts):
        """Refuse ids >= VOCAB_SIZE, which the model cannot embed: a flipped byte or a shard from another
        tokenizer. `buf` holds rows of tokens; row i starts at global token starts[i] of the split."""
        if buf.max() < VOCAB_SIZE:
            return
        row, col = np.argwhere(buf >= VOCAB_SIZE)[0]
        pos = int(starts[row]) + int(col)
        shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
        raise UserError(
            f"{self.files[shard]}: token id {buf[row, col]} at token offset {pos - self.starts[shard]} is not below "
            f"the vocab size {VOCAB_SIZE:,}, so the shard is corrupt or from another tokenizer; delete it and re-run "
            f"the data prep (python data/fineweb_edu.py)"
        )


def _mix64(x):
    """splitmix64's finaliser on a uint64 array: every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SeededPermutation:
    """A seeded bijection of [0, n) that maps any position on its own, in O(1) memory.

    A Feistel network permutes [0, 2**bits), the smallest power of two that holds n: the
    high and low bits of a number take turns being XORed with a keyed hash of the other
    part, and XORing the same hash again undoes a round, so the whole is a bijection.
    Cycle-walking (apply it again while the result is >= n) folds it into a bijection of
    [0, n) in under 2 applications on average. The alternative, a stored permutation, is
    80 MB of int64 per 10M windows (10B tokens at T=1024)."""

    ROUNDS = 6

    def __init__(self, n, key):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.lo_bits = np.uint64(bits // 2)
        self.lo_mask, self.hi_mask = np.uint64((1 << bits // 2) - 1), np.uint64((1 << bits - bits // 2) - 1)
        self.keys = np.random.default_rng(key).integers(0, 2**64, size=self.ROUNDS, dtype=np.uint64)

    def _feistel(self, x):
        hi, lo = x >> self.lo_bits, x & self.lo_mask
        for i, key in enumerate(self.keys):
            if i % 2:
                lo ^= _mix64(hi ^ key) & self.lo_mask
            else:
                hi ^= _mix64(lo ^ key) & self.hi_mask
        return (hi << self.lo_bits) | lo

    def __call__(self, positions):
        out = self._feistel(np.atleast_1d(np.asarray(positions, dtype=np.uint64)))
        while (outside := out >= self.n).any():
            out[outside] = self._feistel(out[outside])
        return out.astype(np.int64)


class BatchLoader:
    """Training micro-batches of B sequences of T tokens, reproducible from (seed, micro-batch index).

    shuffle (default): the train split cut into windows of T+1 tokens at stride T (every
    start k*T of every shard; a shard's incomplete last window is dropped), handed out in a
    seeded order: every window exactly once per epoch, a new order each epoch. Window
    position p (micro-batch g holds p = g*B .. g*B+B-1) is window perm_epoch(p mod N), with
    perm_epoch a SeededPermutation keyed by (seed, epoch), so no list of windows is stored.
    random: B windows at uniformly random offsets over all train tokens, with replacement;
    one epoch's worth of them leaves ~37% of the tokens unseen and shows ~26% twice or more.
    bos: windows of T+1 tokens that start at a document's first token (the <|endoftext|> each document
    starts with), one per document, in shuffle's seeded order: no window starts mid-document, as
    nanochat and modded-nanogpt batch. A document shorter than T+1 runs on into the next one, and a
    document's tokens past its first T+1 are not trained on (the run's log says what share that is).
    sequential: consecutive B*T+1 token spans of the concatenated shards, wrapping round.

    Rank r of W takes micro-batches g = r, r+W, r+2W, ... So ranks see disjoint windows,
    2 ranks x 1 micro-step see the same data as 1 rank x 2 micro-steps, and the whole state
    is one counter. Every batch is checked for ids >= VOCAB_SIZE, which the model cannot embed.
    """

    MODES = ("shuffle", "bos", "random", "sequential")
    CHUNK = 64  # shuffle: micro-batches whose windows are worked out together

    def __init__(self, data_dir, split, batch_size, block_size, seed=0, rank=0, world_size=1,
                 mode="shuffle", device="cpu"):
        if mode not in self.MODES:
            raise UserError(f"loader_mode={mode!r}: use {', '.join(map(repr, self.MODES[:-1]))} or {self.MODES[-1]!r}")
        self.B, self.T, self.seed, self.mode = batch_size, block_size, seed, mode
        self.rank, self.world_size, self.device = rank, world_size, device
        self.reader = ShardReader(data_dir, split, min_tokens=batch_size * block_size + 1,
                                  fix=RESUME.format(script="train_gpt.py"))
        # shuffle: windows at stride T; bos: at each document start; their number defines an epoch in every mode
        if mode == "bos":  # the starts with a whole window of T+1 tokens left in their shard
            self.doc_starts = [self.reader.document_starts(shard) for shard in range(len(self.reader.files))]
            self.shard_windows = np.array([np.searchsorted(starts, size - block_size) for starts, size in
                                           zip(self.doc_starts, self.reader.sizes, strict=True)], dtype=np.int64)
        else:
            self.shard_windows = np.maximum(self.reader.sizes - 1, 0) // block_size
        self.cum_windows = np.cumsum(self.shard_windows)
        self.n_windows = int(self.cum_windows[-1])
        if self.n_windows == 0:
            raise UserError(f"every {split} shard in {data_dir} is shorter than block_size+1 = {block_size + 1} tokens"
                            + (" after its first document start" if mode == "bos" else ""))
        # random: a window of T+1 tokens can start at offsets 0..n-T-1 of a shard of n tokens
        self.window_starts = np.maximum(self.reader.sizes - block_size, 0)
        self.cum_starts = np.cumsum(self.window_starts)
        self.position = 0  # micro-batches handed out so far, all ranks together
        self._chunk = 0, np.empty((0, batch_size), dtype=np.int64)

    @property
    def epoch(self):
        """Windows handed out so far (all ranks) over the train windows at stride T."""
        return self.position * self.B / self.n_windows

    def shuffled(self, positions):
        """shuffle: the window at each window position p, perm_epoch(p mod N) with epoch = p // N."""
        epochs = positions // self.n_windows
        picks = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            inside = epochs == epoch
            perm = SeededPermutation(self.n_windows, [self.seed, int(epoch)])
            picks[inside] = perm(positions[inside] % self.n_windows)
        return picks

    def windows(self, index):
        """(shard, token offset) of each of micro-batch `index`'s B windows (shuffle and random modes)."""
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, index])
            picks = rng.integers(0, self.cum_starts[-1], size=self.B)
            shards = np.searchsorted(self.cum_starts, picks, side="right")
            return shards, picks - (self.cum_starts[shards] - self.window_starts[shards])
        # numpy's per-call overhead dwarfs the arithmetic on B numbers, so work out this rank's next
        # CHUNK micro-batches at once; the cache is a pure function of `index`, not state
        first, picks = self._chunk
        k, r = divmod(index - first, self.world_size)
        if r or not 0 <= k < len(picks):
            indices = index + self.world_size * np.arange(self.CHUNK)
            picks = self.shuffled((indices[:, None] * self.B + np.arange(self.B)).ravel()).reshape(self.CHUNK, self.B)
            self._chunk, k = (index, picks), 0
        shards = np.searchsorted(self.cum_windows, picks[k], side="right")
        local = picks[k] - (self.cum_windows[shards] - self.shard_windows[shards])
        if self.mode == "bos":
            return shards, np.array([self.doc_starts[s][i] for s, i in zip(shards, local, strict=True)])
        return shards, local * self.T

    def trained_share(self):
        """bos: the share of the train tokens that some window holds (what a document past its first T+1
        tokens loses); 1.0 in the other modes, whose windows tile the split."""
        if self.mode != "bos":
            return 1.0
        covered = 0
        for size, starts, n in zip(self.reader.sizes, self.doc_starts, self.shard_windows, strict=True):
            ends = np.append(starts[1:], size)[:n]  # each window's document ends at the next start
            covered += int((np.minimum(ends, starts[:n] + self.T + 1) - starts[:n]).sum())
        return covered / int(self.reader.sizes.sum())

    def next_batch(self):
        # one stat a batch, as dear as one window's read: a prep into data_dir stops the run at the next batch,
        # not whenever a shard is first opened (never, once all are)
        self.reader.check_prep()
        index = self.position + self.rank
        self.position += self.world_size
        buf = np.empty((self.B, self.T + 1), dtype=np.uint16)
        if self.mode == "sequential":
            span = np.empty(self.B * self.T + 1, dtype=np.uint16)
            total = int(self.reader.starts[-1])
            start = (index * self.B * self.T) % (total - self.B * self.T)
            self.reader.read_span(start, span)
            self.reader.check_ids(span[None], [start])
            buf[:, :-1] = span[:-1].reshape(self.B, self.T)
            buf[:, -1] = span[self.T :: self.T]
        else:
            shards, offsets = self.windows(index)
            for row, (shard, offset) in enumerate(zip(shards, offsets, strict=True)):
                self.reader.read(int(shard), offset, buf[row])
            self.reader.check_ids(buf, self.reader.starts[shards] + offsets)
        return _to_device(buf, self.device)

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "mode": self.mode, "batch_size": self.B,
                "windows": self.n_windows}

    def load_state_dict(self, state):
        if (state["seed"], state["mode"]) != (self.seed, self.mode):
            raise UserError(
                f"the checkpoint's loader used seed={state['seed']} loader_mode={state['mode']}, this run "
                f"seed={self.seed} loader_mode={self.mode}; resume with the same seed and loader_mode"
            )
        windows = state.get("windows", self.n_windows)  # checkpoints from before shuffle lack the last two
        if windows != self.n_windows:
            raise UserError(
                f"the checkpoint's loader ran over {windows:,} train windows of T+1 tokens, this run over "
                f"{self.n_windows:,}: data_dir or block_size changed; resume with the same data and block_size"
            )
        # the position counts micro-batches; a resume with another batch_size continues at the same window
        done = state["position"] * state.get("batch_size", self.B)
        if done % (self.B * self.world_size):
            raise UserError(
                f"the checkpoint's loader handed out {done:,} windows, not a whole number of micro-batches of "
                f"batch_size={self.B} on {self.world_size} rank(s); resume with the checkpoint's batch_size"
            )
        self.position = done // self.B


class ValData:
    """The fixed val set: val_tokens worth of windows of T+1 tokens spread evenly over the whole
    val split (its windows at stride T, then every k-th of them), as (B, T) batches: the same tokens
    at every evaluation, whatever the seed. Spread, not the first val_tokens tokens: with local
    sources read in order, the split's start is one source only. Rank r of W evaluates batches r, r+W, ..."""

    def __init__(self, data_dir, batch_size, block_size, val_tokens, rank=0, world_size=1, device="cpu"):
        reader = ShardReader(data_dir, "val", min_tokens=batch_size * block_size + 1)
        shard_windows = np.maximum(reader.sizes - 1, 0) // block_size
        cum_windows = np.cumsum(shard_windows)
        total = int(cum_windows[-1])
        if total < batch_size:
            raise UserError(
                f"the val shards in {data_dir} hold {total} windows of block_size+1 = {block_size + 1} tokens, fewer "
                f"than one batch of {batch_size}; lower batch_size/block_size or prepare more val data"
            )
        n_batches = max(1, min(val_tokens // (batch_size * block_size), total // batch_size))
        self.short_by_split = total // batch_size < val_tokens // (batch_size * block_size)  # the split is the limit
        n = n_batches * batch_size
        picks = np.arange(n) * total // n  # evenly spaced, the first at the split's start
        shards = np.searchsorted(cum_windows, picks, side="right")
        offsets = (picks - (cum_windows[shards] - shard_windows[shards])) * block_size
        buf = np.empty((n, block_size + 1), dtype=np.uint16)
        for row, (shard, offset) in enumerate(zip(shards, offsets, strict=True)):
            reader.read(int(shard), offset, buf[row])
        reader.check_ids(buf, reader.starts[shards] + offsets)
        self.batches = list(buf.reshape(n_batches, batch_size, block_size + 1))[rank::world_size]
        self.device = device
        self.tokens = n * block_size

    def __iter__(self):
        for buf in self.batches:
            yield _to_device(buf, self.device)


class ExampleLoader:
    """Micro-batches of B chat examples of one split as (x, y), y = -1 wherever there is no loss: on the
    prompts, the markers and the padding. Examples are cut to T + 1 tokens.

    Training order: the examples in a permutation seeded by (seed, epoch), endlessly. Micro-batch g
    takes positions g*B .. g*B+B-1 of that stream; rank r of W takes g = r, r+W, r+2W, ... (as
    BatchLoader does), so the order follows from (seed, step) and the state is one counter."""

    def __init__(self, data_dir, split, batch_size, block_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.data_dir, self.stamp = data_dir, prep_stamp(data_dir)
        self.tokens, self.offsets = read_examples(data_dir, split)
        check_prep_stamp(data_dir, self.stamp, OPENED, when="while this run opened it")
        self.n = len(self.offsets) - 1
        # which examples keep a reply token within their first T + 1 (each starts with <|endoftext|>, a special
        # token, so reply_mask over the whole split is each example's own)
        scored = np.concatenate([[0], np.cumsum(reply_mask(self.tokens), dtype=np.int64)])
        ends = np.minimum(self.offsets[1:], self.offsets[:-1] + block_size + 1)
        self.has_loss = scored[ends] - scored[self.offsets[:-1] + 1] > 0
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
        # the examples are in memory, but the run's checkpoint names data_dir: stop before the run and its
        # resume train on two preps (one stat a batch)
        check_prep_stamp(self.data_dir, self.stamp, RESUME.format(script="finetune_sft.py"))
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
