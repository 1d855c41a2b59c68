"""data/loaders.py: BatchLoader's four modes (shuffle, bos, random, sequential), exact resume and DDP, the
vocab check on every batch, and the fixed val set spread over the val split."""

import numpy as np
import pytest
import torch

from data import UserError
from data.loaders import BatchLoader, SeededPermutation, ValData
from data.shards import HEADER_BYTES, write_manifest, write_shard
from data.tokenizer import EOT, VOCAB_SIZE

B, T = 4, 16
SIZES = (3000, 2000, 1500)  # train shards; tokens are their global positions, so every window is checkable
BOUNDS = np.cumsum((0,) + SIZES)
# shuffle's windows: starts k*T of each shard with k*T + T + 1 <= shard size
STARTS = np.concatenate([BOUNDS[i] + T * np.arange((n - 1) // T) for i, n in enumerate(SIZES)])
N = len(STARTS)  # 187 + 124 + 93 = 404
VAL = (40_000, 41_000, 41_500)  # two val shards: [40000, 41000) and [41000, 41500)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for i, n in enumerate(SIZES):
        write_shard(d / f"train_{i:06d}.bin", np.arange(BOUNDS[i], BOUNDS[i] + n))
    write_shard(d / "val_000000.bin", np.arange(VAL[0], VAL[1]))
    write_shard(d / "val_000001.bin", np.arange(VAL[1], VAL[2]))
    write_manifest(d)
    return d


def loader(shards, **kwargs):
    return BatchLoader(shards, "train", kwargs.pop("B", B), kwargs.pop("T", T), **kwargs)


def draw(ld, k):
    return [ld.next_batch() for _ in range(k)]


def starts(batches):
    """The first token of every window, in order: with position tokens, the window's global start."""
    return np.concatenate([x[:, 0].numpy() for x, _ in batches])


def same(a, b):
    if len(a) != len(b):
        return False
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_stride_windows_match_the_shards():
    assert N == sum((n - 1) // T for n in SIZES) == 404
    assert all(s + T + 1 <= BOUNDS[np.searchsorted(BOUNDS, s, side="right")] for s in STARTS)


# -----------------------------------------------------------------------------
# every mode


@pytest.mark.parametrize("mode", ["shuffle", "random"])
def test_batches_are_windows_of_one_shard(shards, mode):
    for x, y in draw(loader(shards, mode=mode), 30):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            start = row_x[0]
            assert np.array_equal(row_x, np.arange(start, start + T))
            assert np.array_equal(row_y, np.arange(start + 1, start + T + 1))
            shard = np.searchsorted(BOUNDS, start, side="right") - 1
            assert start + T < BOUNDS[shard + 1], "a window must not run past its shard"
            if mode == "shuffle":
                assert (start - BOUNDS[shard]) % T == 0


@pytest.mark.parametrize("mode", ["shuffle", "random", "sequential"])
def test_seed_and_rank_determine_the_batches(shards, mode):
    ref = draw(loader(shards, seed=3, mode=mode), 6)
    assert same(ref, draw(loader(shards, seed=3, mode=mode), 6))
    if mode != "sequential":
        assert not same(ref, draw(loader(shards, seed=4, mode=mode), 6))
    r0 = draw(loader(shards, seed=3, mode=mode, rank=0, world_size=2), 3)
    r1 = draw(loader(shards, seed=3, mode=mode, rank=1, world_size=2), 3)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(r0, r1, strict=True))
    # 2 ranks x 1 micro-batch see what 1 rank x 2 micro-batches sees
    interleaved = [b for pair in zip(r0, r1, strict=True) for b in pair]
    assert same(interleaved, ref)


@pytest.mark.parametrize("mode", ["shuffle", "random", "sequential"])
def test_state_dict_resumes_exactly(shards, mode):
    ld = loader(shards, seed=5, mode=mode)
    draw(ld, 107)  # shuffle: past the end of the first epoch (101 micro-batches)
    state = ld.state_dict()
    rest = draw(ld, 4)
    fresh = loader(shards, seed=5, mode=mode)
    fresh.load_state_dict(state)
    assert same(draw(fresh, 4), rest)
    assert fresh.epoch == ld.epoch == 111 * B / N


def test_resume_refuses_other_seed_mode_or_data(shards, tmp_path):
    state = loader(shards, seed=5).state_dict()
    with pytest.raises(UserError, match="seed=5 loader_mode=shuffle, this run seed=6"):
        loader(shards, seed=6).load_state_dict(state)
    with pytest.raises(UserError, match="loader_mode=shuffle, this run seed=5 loader_mode=random"):
        loader(shards, seed=5, mode="random").load_state_dict(state)
    with pytest.raises(UserError, match="404 train windows.*over 201: data_dir or block_size changed"):
        loader(shards, seed=5, T=32).load_state_dict(state)
    write_shard(tmp_path / "train_000000.bin", np.arange(3000))
    write_manifest(tmp_path)
    with pytest.raises(UserError, match="over 187: data_dir or block_size changed"):
        BatchLoader(tmp_path, "train", B, T, seed=5).load_state_dict(state)


def test_resume_with_another_batch_size_continues_at_the_same_window(shards):
    ld = loader(shards, seed=2)
    draw(ld, 6)  # 24 windows handed out
    state = ld.state_dict()
    rest = starts(draw(ld, 4))
    halved = loader(shards, seed=2, B=2)
    halved.load_state_dict(state)
    assert halved.position == 12 and np.array_equal(starts(draw(halved, 8)), rest)
    with pytest.raises(UserError, match="handed out 24 windows.*batch_size=5 on 1 rank"):
        loader(shards, seed=2, B=5).load_state_dict(state)
    with pytest.raises(UserError, match="batch_size=4 on 4 rank"):  # 6 micro-batches cannot split over 4 ranks
        loader(shards, seed=2, rank=0, world_size=4).load_state_dict(state)


def test_sequential_reads_consecutive_tokens(shards):
    ld = loader(shards, mode="sequential")
    for i, (x, y) in enumerate(draw(ld, 110)):  # 110 * B*T tokens: crosses shard boundaries and wraps
        start = i * B * T % (sum(SIZES) - B * T)
        assert np.array_equal(x.flatten().numpy(), np.arange(start, start + B * T))
        assert np.array_equal(y.flatten().numpy(), np.arange(start + 1, start + B * T + 1))


def test_bad_settings_are_refused(shards, tmp_path):
    with pytest.raises(UserError, match="loader_mode='shuffled': use 'shuffle', 'bos', 'random' or 'sequential'"):
        loader(shards, mode="shuffled")
    with pytest.raises(UserError, match="python data/fineweb_edu.py"):
        BatchLoader(tmp_path / "nowhere", "train", B, T)
    for i in range(3):
        write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(T))  # 3*T tokens, but no shard holds T+1
    write_manifest(tmp_path)
    with pytest.raises(UserError, match="every train shard .* is shorter than block_size\\+1 = 17 tokens"):
        BatchLoader(tmp_path, "train", 2, T)


# -----------------------------------------------------------------------------
# shuffle


def test_seeded_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 65, 404, 4097):
        out = SeededPermutation(n, [0, 0])(np.arange(n))
        assert out.dtype == np.int64 and np.array_equal(np.sort(out), np.arange(n)), n
    a, b = SeededPermutation(4097, [0, 0]), SeededPermutation(4097, [0, 1])
    assert not np.array_equal(a(np.arange(4097)), b(np.arange(4097)))
    assert np.array_equal(a(np.arange(100, 200)), a(np.arange(4097))[100:200])  # any positions, alone


def test_shuffle_windows_are_a_pure_function_of_the_index(shards):
    """windows() works out CHUNK micro-batches at a time; any order of calls must give the same windows."""
    ld = loader(shards, seed=4, rank=1, world_size=3)
    indices = [1, 4, 7, 300, 301, 0, 199, 4, 1 + 3 * 64, 1 + 3 * 63]
    got = [ld.windows(i) for i in indices]
    for i, (shards_, offsets) in zip(indices, got, strict=True):
        want = loader(shards, seed=4).shuffled(np.arange(i * B, (i + 1) * B))
        assert np.array_equal(STARTS[want], BOUNDS[shards_] + offsets)


def test_shuffle_hands_out_every_window_once_per_epoch(shards):
    ld = loader(shards, seed=1)
    batches = draw(ld, N // B)
    assert ld.epoch == 1.0
    seen = starts(batches)
    assert np.array_equal(np.sort(seen), STARTS)  # each window exactly once
    covered = np.zeros(sum(SIZES), dtype=bool)
    for x, y in batches:
        covered[x.numpy().ravel()] = covered[y.numpy().ravel()] = True
    tails = sum((n - 1) % T for n in SIZES)  # the tokens after each shard's last whole window
    assert covered.sum() == sum(SIZES) - tails == 6467
    # a shuffle, not the stride order: position in the epoch and window start are unrelated
    assert abs(np.corrcoef(np.arange(N), seen)[0, 1]) < 0.2
    assert len(np.unique(np.searchsorted(BOUNDS, seen[:12], side="right"))) > 1  # mixes the shards


def test_shuffle_reshuffles_each_epoch_and_straddles_epoch_ends(shards):
    ld = loader(shards, seed=1, B=3)  # 404 windows = 134 micro-batches and one window of the next epoch
    seen = starts(draw(ld, 2 * N // 3 + 1))
    first, second = seen[:N], seen[N : 2 * N]
    assert np.array_equal(np.sort(first), STARTS) and np.array_equal(np.sort(second), STARTS)
    assert np.mean(first == second) < 0.05, "each epoch must have its own order"
    other_seed = starts(draw(loader(shards, seed=2, B=3), N // 3))
    assert np.mean(other_seed == first[: len(other_seed)]) < 0.05


def test_shuffle_ranks_split_each_epoch(shards):
    r0, r1 = loader(shards, seed=7, rank=0, world_size=2), loader(shards, seed=7, rank=1, world_size=2)
    a, b = starts(draw(r0, N // B // 2)), starts(draw(r1, N // B // 2))  # 50 micro-batches each of 101
    assert not set(a) & set(b)
    rest = starts(draw(loader(shards, seed=7), N // B))[-B:]  # the last micro-batch, which neither rank took
    assert np.array_equal(np.sort(np.concatenate([a, b, rest])), STARTS)
    assert r0.epoch == r1.epoch == 100 * B / N


def test_random_mode_leaves_about_a_third_unseen(shards):
    """The issue behind shuffle: one epoch of windows drawn with replacement covers ~1 - 1/e of the tokens."""
    covered = np.zeros(sum(SIZES), dtype=bool)
    for x, y in draw(loader(shards, seed=0, mode="random"), N // B):
        covered[x.numpy().ravel()] = covered[y.numpy().ravel()] = True
    assert 0.55 < covered.mean() < 0.72


# -----------------------------------------------------------------------------
# bos: windows at document starts

DOCS = [np.random.default_rng(i).integers(1, 3 * T, size=40) for i in range(2)]  # document lengths, 2 shards


@pytest.fixture(scope="module")
def doc_shards(tmp_path_factory):
    """Two train shards of documents: each <|endoftext|>, then 200 * (document number) + its position in it.
    Returns the folder and the (shard, offset) of every document start with a whole window in its shard."""
    d, windows, n_doc = tmp_path_factory.mktemp("docs"), [], 0
    for i, lengths in enumerate(DOCS):
        tokens = []
        for length in lengths:
            windows.append((i, len(tokens)))
            tokens += [EOT, *(200 * n_doc + np.arange(1, length))]
            n_doc += 1
        write_shard(d / f"train_{i:06d}.bin", np.array(tokens))
        windows = [(s, o) for s, o in windows if s != i or o + T + 1 <= len(tokens)]
    write_manifest(d)
    return d, windows


def shard_tokens(d, shard):
    return np.fromfile(d / f"train_{shard:06d}.bin", dtype=np.uint16, offset=HEADER_BYTES).astype(np.int64)


def test_bos_windows_start_at_every_document_once_per_epoch(doc_shards):
    d, windows = doc_shards
    ld = BatchLoader(d, "train", 1, T, seed=3, mode="bos")
    assert ld.n_windows == len(windows) < sum(map(len, DOCS))  # the last documents of a shard have no window
    seen = [ld.next_batch() for _ in windows]
    assert ld.epoch == 1.0
    tokens = {s: shard_tokens(d, s) for s in (0, 1)}
    want = sorted(tuple(tokens[s][o : o + T]) for s, o in windows)
    assert sorted(tuple(x[0].tolist()) for x, _ in seen) == want  # each document's window exactly once
    for x, y in seen:
        assert x[0, 0] == EOT and torch.equal(x[:, 1:], y[:, :-1])
    again = [tuple(x[0].tolist()) for x, _ in (ld.next_batch() for _ in windows)]
    assert sorted(again) == want and again != [tuple(x[0].tolist()) for x, _ in seen]  # a new order each epoch


def test_bos_resumes_exactly_and_splits_over_ranks(doc_shards):
    d, windows = doc_shards
    make = lambda **kw: BatchLoader(d, "train", 2, T, seed=5, mode="bos", **kw)
    ld = make()
    draw(ld, len(windows))  # two epochs' worth
    state, rest = ld.state_dict(), draw(ld, 5)
    fresh = make()
    fresh.load_state_dict(state)
    assert same(draw(fresh, 5), rest)
    with pytest.raises(UserError, match="loader_mode=bos, this run seed=5 loader_mode=shuffle"):
        BatchLoader(d, "train", 2, T, seed=5).load_state_dict(state)
    ref = draw(make(), 6)
    r0, r1 = draw(make(rank=0, world_size=2), 3), draw(make(rank=1, world_size=2), 3)
    assert same([b for pair in zip(r0, r1, strict=True) for b in pair], ref)


def test_bos_trained_share_counts_each_documents_tokens_in_its_window(doc_shards):
    d, windows = doc_shards
    ends = {}
    for i, lengths in enumerate(DOCS):
        ends.update({(i, int(e) - int(n)): int(e) for n, e in zip(lengths, np.cumsum(lengths), strict=True)})
    covered = sum(min(ends[w], w[1] + T + 1) - w[1] for w in windows)
    ld = BatchLoader(d, "train", 2, T, mode="bos")
    assert ld.trained_share() == pytest.approx(covered / sum(int(n.sum()) for n in DOCS))
    assert 0.5 < ld.trained_share() < 1 and BatchLoader(d, "train", 2, T).trained_share() == 1.0


def test_bos_without_a_window_is_refused(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(1, 500))  # no <|endoftext|> at all
    write_manifest(tmp_path)
    with pytest.raises(UserError, match="shorter than block_size\\+1 = 17 tokens after its first document start"):
        BatchLoader(tmp_path, "train", 2, T, mode="bos")


# -----------------------------------------------------------------------------
# token ids the model cannot embed


@pytest.mark.parametrize("mode", ["shuffle", "random", "sequential"])
def test_out_of_vocab_id_names_the_shard_and_offset(tmp_path, mode):
    tokens = np.arange(2000) % 1000
    tokens[1234] = VOCAB_SIZE  # what a flipped high bit or another tokenizer's shard looks like
    write_shard(tmp_path / "train_000000.bin", np.arange(500))
    write_shard(tmp_path / "train_000001.bin", tokens)
    write_manifest(tmp_path)
    ld = BatchLoader(tmp_path, "train", B, T, mode=mode)
    with pytest.raises(UserError) as e:
        draw(ld, 500)  # more than an epoch in every mode, so some window holds offset 1234
    message = str(e.value)
    assert message.startswith(str(tmp_path / "train_000001.bin")) and "\n" not in message
    assert f"token id {VOCAB_SIZE} at token offset 1234" in message and "re-run the data prep" in message


def test_out_of_vocab_id_in_val_is_refused(tmp_path):
    tokens = np.arange(3000) % 1000
    tokens[2900] = 65535
    write_shard(tmp_path / "val_000000.bin", tokens)
    write_manifest(tmp_path)
    with pytest.raises(UserError, match="val_000000.bin: token id 65535 at token offset 2900 .*re-run the data prep"):
        ValData(tmp_path, B, T, val_tokens=10**6)


# -----------------------------------------------------------------------------
# ValData


def test_val_data_is_fixed_and_spread_over_the_split(shards):
    n_val = (VAL[1] - VAL[0] - 1) // T + (VAL[2] - VAL[1] - 1) // T  # 62 + 31 windows
    val = ValData(shards, B, T, val_tokens=3 * B * T)
    first, second = list(val), list(val)
    assert len(first) == 3 and same(first, second) and val.tokens == 3 * B * T
    for x, y in first:
        assert torch.equal(x[:, 1:], y[:, :-1])
    got = starts(first)
    split_starts = np.concatenate([VAL[0] + T * np.arange(62), VAL[1] + T * np.arange(31)])
    assert np.array_equal(got, split_starts[np.arange(12) * n_val // 12])
    assert got[0] == VAL[0] and got[-1] > VAL[1]  # from the start of the split to its last shard
    assert np.all(np.diff(got) >= 7 * T)  # evenly spaced: every 93/12 ~ 7.75th window


def test_val_data_takes_the_whole_split_when_val_tokens_exceeds_it(shards):
    val = ValData(shards, B, T, val_tokens=10**6)
    assert len(list(val)) == 93 // B and val.tokens == 23 * B * T
    ranks = [starts(ValData(shards, B, T, val_tokens=10**6, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == 12 * B and len(ranks[1]) == 11 * B
    assert np.array_equal(np.sort(np.concatenate(ranks)), np.sort(starts(val)))


def test_val_data_needs_one_batch_of_windows(tmp_path):
    for i in range(5):
        write_shard(tmp_path / f"val_{i:06d}.bin", np.arange(T))  # 5*T tokens, no whole window
    write_manifest(tmp_path)
    with pytest.raises(UserError, match="hold 0 windows of block_size\\+1 = 17 tokens, fewer than one batch of 4"):
        ValData(tmp_path, B, T, val_tokens=1000)
