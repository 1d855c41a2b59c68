"""bench/bench_data.py on a CPU at toy size: every part (prep, loader, coverage, learn) runs on the bundled
100-document corpus and prints figures that make sense; a missing --corpus is one line, not a traceback."""

import math
import re

import pytest
from helpers import SAMPLES, assert_one_line_error, run_cli

TINY = ["--shard_size=20000", "--repeats=1", "--batch_size=8", "--block_size=64", "--batches=50",
        "--sparse_shards=2", "--sparse_shard_tokens=10000", "--coverage_block_sizes=64,32", "--learn_batch_size=4",
        "--learn_block_size=32", "--learn_steps=2", "--seeds=0", "--val_tokens=512"]
NUMBER = r"([\d,]+(?:\.\d+)?)"


def number(text):
    return float(text.replace(",", ""))


def test_every_part_prints_sensible_figures():
    result = run_cli("bench/bench_data.py", f"--corpus={SAMPLES / 'fineweb_edu_100.jsonl'}", *TINY, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for header in ("machine:", "1. prep", "2. loader", "3. coverage", "4. learning", "load average at the end"):
        assert header in out, header

    # prep: the prep writes exactly the tokens tiktoken makes (+1 EOT a document), at some positive rate
    base = re.search(rf"tiktoken encode_ordinary_batch.*: {NUMBER} tokens in .* = {NUMBER}M tokens/s", out)
    assert base and number(base[1]) > 50_000 and number(base[2]) > 0, out
    preps = re.findall(rf"fineweb_edu.py --num_proc \d+ .*: {NUMBER} tokens in .* = {NUMBER}M tokens/s", out)
    assert preps and all(tokens == base[1] and number(rate) > 0 for tokens, rate in preps), out

    # loader: both modes on both datasets; positive speeds and RSS that does not grow over the batches
    loaders = re.findall(r"  (.+?), (random|shuffle) +torch threads \d+ \(([\d,]+) windows\): .* RSS "
                         rf"{NUMBER} -> {NUMBER} MiB; .* = {NUMBER}M tokens/s; RSS over 50 batches {NUMBER} -> "
                         rf"{NUMBER} MiB", out)
    seen = {(label.split(" (")[0], mode) for label, mode, *_ in loaders}
    assert seen == {(name, mode) for name in ("fineweb_edu_100", "20,000 tokens") for mode in ("random", "shuffle")}
    for label, _, windows, rss0, rss_built, rate, before, after in loaders:
        assert all(number(x) > 0 for x in (rss0, rss_built, rate, before, after)), label
        assert number(after) - number(before) < 32, label
        if "sparse" in label:
            assert number(windows) == 2 * ((10_000 - 1) // 64)  # the holes read as whole shards of zeros

    # coverage: fractions; shuffle predicts each token once (windows at stride T), random misses some
    rows = re.findall(r"(random|shuffle) +T=(\d+) .*: ([\d.]+)% predicted at least once, ([\d.]+)% twice", out)
    coverage = {(mode, int(T)): (float(once) / 100, float(twice) / 100) for mode, T, once, twice in rows}
    assert set(coverage) == {(mode, T) for mode in ("random", "shuffle") for T in (64, 32)}, out
    for T in (64, 32):
        assert all(0 <= f <= 1 for f in coverage["random", T] + coverage["shuffle", T])
        assert coverage["shuffle", T][0] >= coverage["random", T][0] and coverage["shuffle", T][1] == 0

    # learn: a finished run per mode with finite losses, and their difference
    for mode in ("random", "shuffle"):
        run = re.search(rf"{mode} +seed 0: val loss ([\d.]+) -> ([\d.]+), last train loss ([\d.]+), epoch", out)
        assert run and all(math.isfinite(float(x)) for x in run.groups()), out
    assert re.search(r"random - shuffle, per seed: [+-][\d.]+", out), out


@pytest.mark.parametrize("corpus", [[], ["--corpus=nowhere/corpus.jsonl"]])
def test_missing_corpus_is_one_line(corpus):
    result = run_cli("bench/bench_data.py", *corpus, "--parts=coverage", timeout=120)
    assert_one_line_error(result, "--corpus")
    assert "e.g. --corpus=" in result.stderr
