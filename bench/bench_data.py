"""
Throughput of the data pipeline on this machine:
  1. data/fineweb_edu.py (default --num_proc, then 1) on the Python 3.11 docs corpus (~3.5M
     tokens), next to plain single-process tiktoken encode_ordinary_batch(num_threads=1) on the
     same texts (best of 3 runs each);
  2. BatchLoader random batches (B=64, T=1024) over shards made from that corpus, with torch's
     default threads and with 1, and the process RSS before and after 10,000 batches (it must
     not grow with the tokens read).

    python bench/bench_data.py CORPUS.jsonl    # e.g. ../shared/data/python_docs/python3.11_docs.jsonl
"""

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data import UserError, one_line_errors  # noqa: E402
from data.fineweb_edu import main as prep  # noqa: E402
from data.loaders import BatchLoader  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402

B, T, BATCHES = 64, 1024, 10_000
REPEATS = 3


def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource  # no /proc (macOS): peak RSS, in bytes there

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def best_time(fn, repeats=REPEATS):
    """(seconds, result) of the fastest of a few runs: other processes on a shared machine only ever add time."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - t0, result))
    return min(runs, key=lambda run: run[0])


def main():
    global CORPUS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a .jsonl file of {\"text\": ...} documents")
    CORPUS = Path(parser.parse_args().corpus)
    if not CORPUS.is_file():
        raise UserError(f"{CORPUS} not found; pass a .jsonl corpus such as the Python docs of ../shared/data")
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    print(f"corpus: {CORPUS.name}, {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters")

    enc = get_tokenizer()  # tiktoken's own Encoding, built from the bundled GPT-2 ranks
    base_s, ids = best_time(lambda: enc.encode_ordinary_batch(texts, num_threads=1))
    base_tokens = sum(map(len, ids)) + len(texts)  # + one EOT per document, as the prep writes
    print(f"tiktoken encode_ordinary_batch, 1 process 1 thread: {base_tokens:,} tokens in {base_s:.2f}s = "
          f"{base_tokens / base_s / 1e6:.2f}M tokens/s")

    get_tokenizer()  # the one-off tokenizer build (~0.4 s) is not throughput
    with tempfile.TemporaryDirectory() as out_dir:
        for num_proc in (os.cpu_count(), 1):
            args = ["--source", str(CORPUS), "--out_dir", out_dir, "--shard_size", "1e6", "--num_proc", str(num_proc)]
            with contextlib.redirect_stdout(io.StringIO()):  # the prep's summary, REPEATS times over
                elapsed, s = best_time(lambda args=args: prep(args))
            tokens = s["train_tokens"] + s["val_tokens"]
            assert tokens == base_tokens, "the prep must write exactly the tokenized corpus"
            rate = tokens / elapsed
            print(f"data/fineweb_edu.py --num_proc {num_proc} (read, tokenize, split, write shards): {tokens:,} tokens "
                  f"in {elapsed:.2f}s = {rate / 1e6:.2f}M tokens/s = {rate * base_s / base_tokens:.2f}x plain tiktoken")

        # torch's intra-op threads do _to_device's copies; on a busy machine their wake-ups dominate, so show both
        for threads in (torch.get_num_threads(), 1):
            torch.set_num_threads(threads)
            loader = BatchLoader(out_dir, "train", B, T, seed=0)
            loader.next_batch()  # open the shard files before measuring
            before = rss_mib()
            t0 = time.perf_counter()
            for _ in range(BATCHES):
                loader.next_batch()
            elapsed = time.perf_counter() - t0
            after = rss_mib()
            print(f"BatchLoader random B={B} T={T}, torch threads {threads}, {len(loader.reader.files)} train shards "
                  f"({int(loader.reader.starts[-1]):,} tokens): {BATCHES:,} batches in {elapsed:.2f}s = "
                  f"{BATCHES * B * T / elapsed / 1e6:.1f}M tokens/s ({elapsed / BATCHES * 1e3:.3f} ms/batch); "
                  f"RSS {before:.1f} MiB before, {after:.1f} MiB after ({after - before:+.1f} MiB)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

if __name__ == "__main__":
    one_line_errors()
    main()
