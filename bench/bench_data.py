"""
The data pipeline on this machine, on a .jsonl corpus prepared into shards by data/fineweb_edu.py itself:
  1. prep: data/fineweb_edu.py (os.cpu_count() tokenizer processes, then 1) next to plain single-process
     tiktoken encode_ordinary_batch(num_threads=1) on the same texts, tokens/s (best of --repeats runs each);
  2. loader: BatchLoader per batch (random and shuffle mode, torch's default threads and 1, each in a fresh
     process): the time to build it, windows() and next_batch(), and the process RSS before and after
     --batches batches (it must not grow with the tokens read); on the corpus's shards and on a 10B-token
     train split of sparse shards (FineWeb-Edu sample-10BT's size, 9.8M windows at T=1024; they read as
     zeros and take no disk);
  3. coverage: what shuffle mode buys over random (windows drawn with replacement): the train tokens that
     one epoch's worth of windows predicts (has as a target) at least once, and twice or more;
  4. learn: train_gpt.py for one epoch with random and with shuffle, the same small model and the same
     number of tokens per seed, scored on the same val set (ValData: windows spread evenly over the whole
     val split). A CPU is slow for this, so it trains on a prefix of the train split (--train_tokens).

    python bench/bench_data.py --corpus=CORPUS.jsonl                     # all four, on a few million tokens of text
    python bench/bench_data.py --corpus=CORPUS.jsonl --parts=coverage,loader
    nice python bench/bench_data.py --corpus=CORPUS.jsonl --parts=learn --train_tokens=0 --n_embd=128
    python bench/bench_data.py --corpus=data/samples/fineweb_edu_100.jsonl --shard_size=20000 --repeats=1 \\
        --batch_size=8 --block_size=64 --batches=50 --sparse_shards=2 --sparse_shard_tokens=10000 \\
        --coverage_block_sizes=64,32 --learn_batch_size=4 --learn_block_size=32 --learn_steps=2 \\
        --seeds=0 --val_tokens=512                                         # seconds: the test's smoke run

Settings: the block below, then --key=value (or --key value).
"""

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from stage_code import REPO_ROOT  # bench/: puts the repo root on sys.path

from data import UserError, one_line_errors
from data.fineweb_edu import Malformed, read_jsonl, text_encoding
from data.fineweb_edu import main as prep
from data.loaders import BatchLoader
from data.settings import check_settings, parse_settings
from data.shards import HEADER_BYTES, read_shard, write_manifest, write_shard
from data.tokenizer import get_tokenizer

one_line_errors()

# ----------------------------------------------------------------------------- settings
corpus = ""  # a .jsonl of {"text": ...} documents (required), e.g. data/samples/fineweb_edu_100.jsonl at toy sizes
parts = "prep,loader,coverage,learn"  # which parts to run, comma-separated
shard_size = 1_000_000  # tokens per shard of the prepared corpus: several shards, as a real dataset has
repeats = 3  # prep: timed runs of each, the fastest reported (other processes only ever add time)
batch_size = 64  # loader, coverage: B
block_size = 1024  # loader: T
batches = 10_000  # loader: batches timed per loader
sparse_shards = 100  # loader: sparse train shards (100 x 100M = 10B tokens); 0 = the corpus only
sparse_shard_tokens = 100_000_000  # loader: tokens per sparse shard
coverage_block_sizes = "1024,128"  # coverage: the T of each measurement (the loader's, and learn's)
train_tokens = 500_000  # learn: train on this prefix of the train split; 0 = all of it
learn_steps = 0  # learn: optimizer steps per run; 0 = the whole steps within one epoch
seeds = "0,1"  # learn: a random and a shuffle run per seed
n_layer = 2  # learn: the model
n_head = 2  # learn: the model
n_embd = 64  # learn: the model
learn_block_size = 128  # learn: T
learn_batch_size = 16  # learn: B
grad_accum = 2  # learn: micro-batches per step
val_tokens = 65_536  # learn: the fixed val set
learn_threads = 1  # learn: torch threads (OMP_NUM_THREADS) per training run

PARTS = ("prep", "loader", "coverage", "learn")
CORPUS_HINT = ("pass a .jsonl of {\"text\": ...} documents, e.g. --corpus=data/samples/fineweb_edu_100.jsonl "
               "(bundled, at the toy sizes of --help's last example) or a few million tokens of text of your own")
LOADER_CHILD = "--loader_child"  # part 2's fresh process for one loader (not a setting): this script again


def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource  # no /proc (macOS): peak RSS, in bytes there

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(cmd, what, **kwargs):
    """A subprocess's stdout; when it fails, its last line of output as a one-line error."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{what} failed (exit {done.returncode}): {last}")
    return done.stdout


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(out_dir, num_proc=1):
    """The corpus as shards in out_dir, made by data/fineweb_edu.py itself; returns its summary. Every
    part reads the same split (val_fraction 0.05, seed 0), whichever number of processes made it."""
    # quiet: the summary it prints and the tqdm bar on stderr, once per timed run
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return prep(["--source", str(corpus), "--out_dir", str(out_dir), "--val_fraction", "0.05", "--seed", "0",
                     "--shard_size", str(shard_size), "--num_proc", str(num_proc)])


# ----------------------------------------------------------------------------- 1. prep


def best_time(fn):
    """(seconds, result) of the fastest of `repeats` runs: other processes on a shared machine only ever add time."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - t0, result))
    return min(runs, key=lambda run: run[0])


def corpus_documents():
    """The corpus's documents as the prep reads them, without the blank ones it skips. A line it would skip as
    malformed is a one-line error: the prep must write exactly the corpus's tokens, which part 1 checks."""
    texts = []
    for doc in read_jsonl(corpus, text_encoding(corpus, "--corpus", whole=False)):
        if isinstance(doc, Malformed):
            raise UserError(f"--corpus: {doc.where}: {doc.why} (each line must be a JSON object with a string "
                            f"'text'); fix or drop the line")
        texts += [doc] if doc.strip() else []
    if not texts:
        raise UserError(f"--corpus: {corpus} holds no documents; {CORPUS_HINT}")
    return texts


def bench_prep(out_dir):
    print(f"1. prep: {corpus.name}, {len(documents)} documents, {sum(map(len, documents)) / 1e6:.1f}M characters")
    enc = get_tokenizer()  # tiktoken's own Encoding from the bundled GPT-2 ranks; its build (~0.4 s) is not timed
    base_s, ids = best_time(lambda: enc.encode_ordinary_batch(documents, num_threads=1))
    base_tokens = sum(map(len, ids)) + len(documents)  # + one EOT per document, as the prep writes
    print(f"  tiktoken encode_ordinary_batch, 1 process 1 thread: {base_tokens:,} tokens in {base_s:.2f}s = "
          f"{base_tokens / base_s / 1e6:.2f}M tokens/s")
    for num_proc in dict.fromkeys((os.cpu_count(), 1)):  # the prep's default, then one process
        elapsed, s = best_time(lambda num_proc=num_proc: prepare(out_dir, num_proc))
        tokens = s["train_tokens"] + s["val_tokens"]
        assert tokens == base_tokens, "the prep must write exactly the tokenized corpus"
        rate = tokens / elapsed
        print(f"  data/fineweb_edu.py --num_proc {num_proc} (read, tokenize, split, write shards): {tokens:,} tokens "
              f"in {elapsed:.2f}s = {rate / 1e6:.2f}M tokens/s = {rate * base_s / base_tokens:.2f}x plain tiktoken")


# ----------------------------------------------------------------------------- 2. loader speed and RSS


def write_sparse_shards(out_dir):
    """Train shards of sparse_shard_tokens zeros each that take no disk: a real shard's header (write_shard of
    no tokens, then its count set) and a hole where the tokens would be. The manifest records their sizes but
    no hashes, which would read 20 GB."""
    files = {}
    for i in range(sparse_shards):
        path = Path(out_dir) / f"train_{i:06d}.bin"
        write_shard(path, np.zeros(0, dtype=np.uint16))
        with open(path, "r+b") as f:
            f.seek(2 * 4)  # header word [2]: the number of tokens
            f.write(np.int32(sparse_shard_tokens).tobytes())
            f.truncate(HEADER_BYTES + 2 * sparse_shard_tokens)  # a hole: reads as token 0, no disk used
        files[path.name] = {"tokens": sparse_shard_tokens, "bytes": path.stat().st_size, "sha256": ""}
    write_manifest(out_dir, files)


def loader_child(data_dir, mode, threads, B, T, n_batches):
    """One loader in this fresh process, so its RSS is its own: JSON with the timings and RSS."""
    torch.set_num_threads(threads)
    rss0 = rss_mib()
    t0 = time.perf_counter()
    loader = BatchLoader(data_dir, "train", B, T, seed=0, mode=mode)
    build_s = time.perf_counter() - t0
    rss_built = rss_mib()  # shuffle stores no permutation, so this stays flat up to 10B tokens
    t0 = time.perf_counter()
    for g in range(n_batches):
        loader.windows(g)
    windows_s = time.perf_counter() - t0
    loader.next_batch()  # open the shard files before measuring
    before = rss_mib()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        loader.next_batch()
    batches_s = time.perf_counter() - t0
    print(json.dumps(dict(windows=loader.n_windows, build_ms=build_s * 1e3, rss0=rss0, rss_built=rss_built,
                          windows_us=windows_s / n_batches * 1e6, batch_ms=batches_s / n_batches * 1e3,
                          rss_before=before, rss_after=rss_mib())))


def bench_loader(data_dir, label):
    # _to_device's int64 copies are numpy's: torch's threaded copies stalled on a busy CPU, where their
    # wake-ups dominated. Both thread counts show that it stays so.
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        for mode in ("random", "shuffle"):
            args = json.dumps([str(data_dir), mode, threads, batch_size, block_size, batches])
            r = json.loads(run([sys.executable, __file__, LOADER_CHILD, args], f"the {mode} loader").splitlines()[-1])
            print(f"  {label}, {mode:8s} torch threads {threads} ({r['windows']:,} windows): loader built in "
                  f"{r['build_ms']:.1f} ms, RSS {r['rss0']:.1f} -> {r['rss_built']:.1f} MiB; windows() "
                  f"{r['windows_us']:.0f} us/batch; next_batch() {r['batch_ms']:.3f} ms/batch = "
                  f"{batch_size * block_size / r['batch_ms'] / 1e3:.1f}M tokens/s; RSS over {batches:,} batches "
                  f"{r['rss_before']:.1f} -> {r['rss_after']:.1f} MiB ({r['rss_after'] - r['rss_before']:+.1f})")


# ----------------------------------------------------------------------------- 3. coverage


def coverage(data_dir, T):
    for mode in ("random", "shuffle"):
        loader = BatchLoader(data_dir, "train", batch_size, T, seed=0, mode=mode)
        starts = loader.reader.starts
        seen = np.zeros(int(starts[-1]), dtype=np.int32)  # how often each token is a target (predicted)
        n = loader.n_windows  # one epoch's worth, in every mode
        for g in range(-(-n // batch_size)):
            shards, offsets = loader.windows(g)
            for shard, offset in list(zip(shards, offsets, strict=True))[: n - g * batch_size]:
                begin = int(starts[shard] + offset)
                seen[begin + 1 : begin + T + 1] += 1
        print(f"  {mode:8s} T={T:<5d} {n:,} windows (one epoch) over {len(seen):,} train tokens: "
              f"{np.mean(seen > 0):.2%} predicted at least once, {np.mean(seen > 1):.2%} twice or more, "
              f"most {seen.max()} times")


# ----------------------------------------------------------------------------- 4. learning


def learn(full_dir, work_dir):
    data_dir = Path(work_dir) / "learn_data"  # the train prefix and the whole val split, as a prep leaves them
    data_dir.mkdir()
    whole = np.concatenate([read_shard(f) for f in sorted(Path(full_dir).glob("train_*.bin"))])
    train = whole[:train_tokens] if train_tokens else whole
    write_shard(data_dir / "train_000000.bin", train)
    for f in sorted(Path(full_dir).glob("val_*.bin")):
        write_shard(data_dir / f.name, read_shard(f))
    write_manifest(data_dir)
    micro = learn_batch_size * learn_block_size
    windows = (len(train) - 1) // learn_block_size
    steps = learn_steps or windows * learn_block_size // (micro * grad_accum)  # whole steps within one epoch
    if steps == 0:
        raise UserError(f"--train_tokens={train_tokens}: {len(train):,} train tokens hold no whole step of "
                        f"{grad_accum} x {micro:,} tokens; raise it (0 = all) or lower --learn_batch_size")
    print(f"  {len(train):,} train tokens ({'all' if len(train) == len(whole) else 'a prefix'} of the train split), "
          f"{windows:,} windows of {learn_block_size + 1}; model n_layer={n_layer} n_head={n_head} n_embd={n_embd}; "
          f"{steps} steps of {grad_accum} x {learn_batch_size} x {learn_block_size} tokens "
          f"= {steps * micro * grad_accum / (windows * learn_block_size):.3f} epoch; val_tokens {val_tokens:,}")
    results = {}
    for seed in seed_list:
        for mode in ("random", "shuffle"):
            out_dir = Path(work_dir) / f"{mode}_{seed}"
            cmd = [sys.executable, "train_gpt.py", "configs/smoke.toml", f"--data_dir={data_dir}", "--device=cpu",
                   f"--out_dir={out_dir}", f"--loader_mode={mode}", f"--seed={seed}", f"--max_iters={steps}",
                   f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
                   f"--block_size={learn_block_size}", f"--batch_size={learn_batch_size}",
                   f"--total_batch_size={micro * grad_accum}", f"--val_tokens={val_tokens}",
                   f"--warmup_iters={max(1, steps // 10)}", f"--eval_interval={steps}",
                   f"--checkpoint_interval={steps}", f"--log_interval={max(1, steps // 10)}",
                   "--sample_interval=0", "--hellaswag_interval=0"]
            t0 = time.perf_counter()
            run(cmd, "train_gpt.py", cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": str(learn_threads)})
            records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            val = [r["val_loss"] for r in records if "val_loss" in r]
            last = [r for r in records if "loss" in r][-1]
            results[mode, seed] = val[-1]
            print(f"  {mode:8s} seed {seed}: val loss {val[0]:.4f} -> {val[-1]:.4f}, last train loss "
                  f"{last['loss']:.4f}, epoch {last['epoch']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    for mode in ("random", "shuffle"):
        losses = [results[mode, seed] for seed in seed_list]
        print(f"  {mode:8s} mean val loss over seeds {seeds}: {np.mean(losses):.4f} "
              f"(spread {max(losses) - min(losses):.4f})")
    gaps = [results["random", s] - results["shuffle", s] for s in seed_list]
    print(f"  random - shuffle, per seed: {', '.join(f'{g:+.4f}' for g in gaps)}")


# ----------------------------------------------------------------------------- main

if sys.argv[1:2] == [LOADER_CHILD]:
    loader_child(*json.loads(sys.argv[2]))
    sys.exit()

config = parse_settings(globals(), sys.argv[1:])
globals().update(config)
check_settings(config, positive=("shard_size", "repeats", "batch_size", "block_size", "batches", "n_layer",
                                 "n_head", "n_embd", "learn_block_size", "learn_batch_size", "grad_accum",
                                 "val_tokens", "learn_threads"),
               non_negative=("sparse_shards", "sparse_shard_tokens", "train_tokens", "learn_steps"))
if not corpus:
    raise UserError(f"--corpus is not set; {CORPUS_HINT}")
corpus = Path(corpus).expanduser()  # the shell leaves the ~ of --corpus=~/x alone
if not corpus.is_file():
    raise UserError(f"--corpus: {corpus} {'is a folder' if corpus.is_dir() else 'not found'}; {CORPUS_HINT}")
if corpus.suffix != ".jsonl":
    raise UserError(f"--corpus: {corpus} is not a .jsonl file; {CORPUS_HINT}")
documents = corpus_documents()
part_list = parts.split(",")
if not part_list or not set(part_list) <= set(PARTS):
    raise UserError(f"--parts={parts}: use some of {','.join(PARTS)}")
try:
    coverage_T = [int(t) for t in coverage_block_sizes.split(",")]
    seed_list = [int(s) for s in seeds.split(",")]
except ValueError:
    raise UserError(f"--coverage_block_sizes={coverage_block_sizes}, --seeds={seeds}: use whole numbers and commas, "
                    "like 1024,128 and 0,1") from None
if sparse_shards and sparse_shard_tokens < batch_size * block_size + 1:
    raise UserError(f"--sparse_shard_tokens={sparse_shard_tokens}: fewer than one batch of --batch_size x "
                    f"--block_size; raise it, or --sparse_shards=0")

print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}, "
      f"python {platform.python_version()}, torch {torch.__version__}, load average {load_average()}")
with tempfile.TemporaryDirectory() as tmp:
    shards = Path(tmp) / "corpus"
    if "prep" in part_list:
        bench_prep(shards)  # leaves the shards the other parts read
    else:
        prepare(shards)
    if "loader" in part_list:
        n_shards = len(list(shards.glob("train_*.bin")))
        print(f"2. loader speed and RSS, B={batch_size} T={block_size}")
        bench_loader(shards, f"{corpus.stem} ({n_shards} shards)")
        if sparse_shards:
            sparse = Path(tmp) / "sparse"
            sparse.mkdir()
            write_sparse_shards(sparse)
            bench_loader(sparse, f"{sparse_shards * sparse_shard_tokens:,} tokens ({sparse_shards} sparse shards)")
    if "coverage" in part_list:
        print(f"3. coverage after one epoch's worth of windows, B={batch_size}")
        for T in coverage_T:
            coverage(shards, T)
    if "learn" in part_list:
        print("4. learning, random vs shuffle")
        learn(shards, tmp)
print(f"load average at the end: {load_average()}")
