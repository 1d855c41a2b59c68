"""
What BatchLoader's shuffle mode buys over random (windows drawn with replacement), and what it costs:

  1. coverage: the train tokens that one epoch's worth of windows predicts (has as a target) at least
     once, and twice or more, on the Python 3.11 docs corpus (~3.4M train tokens), B=64, T=1024 and 128;
  2. loader time per batch and process RSS over 10,000 batches (B=64, T=1024), on that corpus and on
     a 10B-token train split of sparse shards (FineWeb-Edu sample-10BT's size, 9.8M windows; the
     shards read as zeros and take no disk), each mode in a fresh process;
  3. learning: train_gpt.py for one epoch with random and with shuffle, two seeds each, the same small
     model and the same number of tokens, scored on the same val set (ValData: windows spread evenly
     over the whole val split). A CPU is slow for this, so by default it trains on a prefix of the
     train split (--train_tokens; 0 = all of it).

    python bench/bench_loader.py                                 # all three
    python bench/bench_loader.py --parts coverage,speed
    nice python bench/bench_loader.py --parts learn --train_tokens 0 --n_embd 128
"""

import argparse
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.fineweb_edu import main as prep  # noqa: E402
from data.loaders import BatchLoader  # noqa: E402
from data.shards import HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, read_shard, write_shard  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "python_docs" / "python3.11_docs.jsonl"
B, T, BATCHES = 64, 1024, 10_000
SPARSE_SHARDS, SPARSE_SHARD_TOKENS = 100, 100_000_000  # 10B tokens


def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource  # no /proc (macOS): peak RSS, in bytes there

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepare(out_dir, shard_size):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prep(["--source", str(CORPUS), "--out_dir", str(out_dir), "--val_fraction", "0.05", "--seed", "0",
              "--shard_size", str(shard_size), "--num_proc", "1"])


# ----------------------------------------------------------------------------- 1. coverage


def coverage(data_dir, block_size):
    for mode in ("random", "shuffle"):
        loader = BatchLoader(data_dir, "train", B, block_size, seed=0, mode=mode)
        starts = loader.reader.starts
        seen = np.zeros(int(starts[-1]), dtype=np.int32)  # how often each token is a target (predicted)
        n = loader.n_windows
        for g in range(-(-n // B)):
            shards, offsets = loader.windows(g)
            for shard, offset in list(zip(shards, offsets, strict=True))[: n - g * B]:
                begin = int(starts[shard] + offset)
                seen[begin + 1 : begin + block_size + 1] += 1
        print(f"  {mode:8s} T={block_size:<5d} {n:,} windows (one epoch) over {len(seen):,} train tokens: "
              f"{np.mean(seen > 0):.2%} predicted at least once, {np.mean(seen > 1):.2%} twice or more, "
              f"most {seen.max()} times")


# ----------------------------------------------------------------------------- 2. speed and RSS


def write_sparse_shards(out_dir):
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, SPARSE_SHARD_TOKENS
    for i in range(SPARSE_SHARDS):
        with open(Path(out_dir) / f"train_{i:06d}.bin", "wb") as f:
            f.write(header.tobytes())
            f.truncate(HEADER_BYTES + 2 * SPARSE_SHARD_TOKENS)  # a hole: reads as token 0, no disk used


def speed_child(mode, data_dir):
    """One mode in this fresh process: JSON with the timings and RSS."""
    torch.set_num_threads(1)  # the int64 copies; torch's thread wake-ups dominate on a busy CPU
    rss0 = rss_mib()
    t0 = time.perf_counter()
    loader = BatchLoader(data_dir, "train", B, T, seed=0, mode=mode)
    build_s = time.perf_counter() - t0
    rss_built = rss_mib()
    t0 = time.perf_counter()
    for g in range(BATCHES):
        loader.windows(g)
    windows_s = time.perf_counter() - t0
    loader.next_batch()  # open the shard files before measuring
    before = rss_mib()
    t0 = time.perf_counter()
    for _ in range(BATCHES):
        loader.next_batch()
    batches_s = time.perf_counter() - t0
    print(json.dumps(dict(windows=loader.n_windows, build_ms=build_s * 1e3, rss0=rss0, rss_built=rss_built,
                          windows_us=windows_s / BATCHES * 1e6, batch_ms=batches_s / BATCHES * 1e3,
                          rss_before=before, rss_after=rss_mib())))


def speed(data_dir, label):
    for mode in ("random", "shuffle"):
        out = subprocess.run([sys.executable, __file__, "--speed_child", mode, str(data_dir)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.splitlines()[-1])
        print(f"  {label}, {mode:8s} ({r['windows']:,} windows): loader built in {r['build_ms']:.1f} ms, "
              f"RSS {r['rss0']:.1f} -> {r['rss_built']:.1f} MiB; windows() {r['windows_us']:.0f} us/batch; "
              f"next_batch() {r['batch_ms']:.3f} ms/batch = {B * T / r['batch_ms'] / 1e3:.1f}M tokens/s; "
              f"RSS over {BATCHES:,} batches {r['rss_before']:.1f} -> {r['rss_after']:.1f} MiB "
              f"({r['rss_after'] - r['rss_before']:+.1f})")


# ----------------------------------------------------------------------------- 3. learning


def learn(full_dir, work_dir, args):
    data_dir = Path(work_dir) / "data"
    data_dir.mkdir()
    train = np.concatenate([read_shard(f) for f in sorted(Path(full_dir).glob("train_*.bin"))])
    if args.train_tokens:
        train = train[: args.train_tokens]
    write_shard(data_dir / "train_000000.bin", train)
    for f in sorted(Path(full_dir).glob("val_*.bin")):
        write_shard(data_dir / f.name, read_shard(f))
    micro = args.batch_size * args.block_size
    windows = (len(train) - 1) // args.block_size
    steps = windows * args.block_size // (micro * args.grad_accum)  # whole steps within one epoch
    print(f"  {len(train):,} train tokens ({'all' if not args.train_tokens else 'a prefix'} of the train split), "
          f"{windows:,} windows of {args.block_size + 1}; model n_layer={args.n_layer} n_head={args.n_head} "
          f"n_embd={args.n_embd}; {steps} steps of {args.grad_accum} x {args.batch_size} x {args.block_size} tokens "
          f"= {steps * micro * args.grad_accum / (windows * args.block_size):.3f} epoch; "
          f"val_tokens {args.val_tokens:,}")
    results = {}
    for seed in args.seeds:
        for mode in ("random", "shuffle"):
            out_dir = Path(work_dir) / f"{mode}_{seed}"
            cmd = [sys.executable, "train_gpt.py", "configs/smoke.toml", f"--data_dir={data_dir}", "--device=cpu",
                   f"--out_dir={out_dir}", f"--loader_mode={mode}", f"--seed={seed}", f"--max_iters={steps}",
                   f"--n_layer={args.n_layer}", f"--n_head={args.n_head}", f"--n_embd={args.n_embd}",
                   f"--block_size={args.block_size}", f"--batch_size={args.batch_size}",
                   f"--total_batch_size={micro * args.grad_accum}", f"--val_tokens={args.val_tokens}",
                   f"--warmup_iters={max(1, steps // 10)}",
                   f"--eval_interval={steps}", f"--checkpoint_interval={steps}",
                   f"--log_interval={max(1, steps // 10)}",
                   "--sample_interval=0", "--hellaswag_interval=0"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if done.returncode:
                sys.exit(f"train_gpt.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            val = [r["val_loss"] for r in records if "val_loss" in r]
            last = [r for r in records if "loss" in r][-1]
            results[mode, seed] = val[-1]
            print(f"  {mode:8s} seed {seed}: val loss {val[0]:.4f} -> {val[-1]:.4f}, last train loss "
                  f"{last['loss']:.4f}, epoch {last['epoch']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    for mode in ("random", "shuffle"):
        losses = [results[mode, seed] for seed in args.seeds]
        print(f"  {mode:8s} mean val loss over seeds {args.seeds}: {np.mean(losses):.4f} "
              f"(spread {max(losses) - min(losses):.4f})")
    gaps = [results["random", s] - results["shuffle", s] for s in args.seeds]
    print(f"  random - shuffle, per seed: {', '.join(f'{g:+.4f}' for g in gaps)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="coverage,speed,learn")
    parser.add_argument("--train_tokens", type=int, default=500_000, help="learn: train on this prefix; 0 = all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_head", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--val_tokens", type=int, default=65_536)
    parser.add_argument("--threads", type=int, default=1, help="learn: torch threads per training run")
    parser.add_argument("--speed_child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_child:
        return speed_child(*args.speed_child)
    parts = args.parts.split(",")
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydocs"
        prepare(corpus, shard_size=1_000_000)  # several shards, as a real dataset has
        if "coverage" in parts:
            print("1. coverage after one epoch's worth of windows")
            for block_size in (T, 128):
                coverage(corpus, block_size)
        if "speed" in parts:
            print(f"2. loader speed and RSS, B={B} T={T}, torch threads 1")
            speed(corpus, f"python docs ({len(list(corpus.glob('train_*.bin')))} shards)")
            sparse = Path(tmp) / "sparse"
            sparse.mkdir()
            write_sparse_shards(sparse)
            speed(sparse, f"10B tokens ({SPARSE_SHARDS} sparse shards)")
        if "learn" in parts:
            print("3. one epoch of training, random vs shuffle")
            learn(corpus, tmp, args)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
