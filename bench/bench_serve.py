"""
Serving speed of `python sample.py --serve`: time to first token (TTFT) and tokens/s with 1, 4 and 16
clients streaming at once, p50 and p95 over the requests, and a count of replies that did not complete.

    python bench/bench_serve.py                                   # a random 6x384 chat model on the CPU
    python bench/bench_serve.py --ckpt=logs/sft --device=cuda     # your model on the GPU (compiled step)

Each client sends --requests streaming chat requests one after another, each with its own seed, and reads
them with the standard library (the numbers include HTTP and JSON, as a real client's do). The server decodes
one request at a time, so with more clients the TTFT grows by the others' replies while the tokens/s of the
whole server stays about the same; the speed does not depend on the weights.
Settings: the block below, then --key=value (or --key value).
"""

import json
import math
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import torch
from stage_code import REPO_ROOT, model_namespace, script_settings  # bench/: puts the repo root on sys.path

from data import UserError, one_line_errors
from data.checkpoint import load_checkpoint
from data.settings import check_settings, parse_settings
from data.tokenizer import EOT, chat_prompt

one_line_errors()

# ----------------------------------------------------------------------------- settings
ckpt = ""  # the checkpoint to serve; "" = a random chat model of the size below, saved in out_dir
model = "6x384"  # LAYERSxWIDTH of the random model (64-wide heads)
block_size = 1024  # its context
clients = "1,4,16"  # concurrent clients at each level
requests = 2  # requests each client sends at each level, one after another
max_tokens = 64  # per reply
device = "cpu"  # the server's --device
out_dir = "logs/bench_serve"  # the random model's checkpoint
timeout = 600  # seconds for the server to start, and for each request

config = parse_settings(globals(), sys.argv[1:])
globals().update(config)
check_settings(config, positive=("block_size", "requests", "max_tokens", "timeout"))
match = re.fullmatch(r"(\d+)x(\d+)", model)
if not match or int(match[2]) % 64:
    raise UserError(f"--model={model}: give LAYERSxWIDTH with a width that is a multiple of 64, like 6x384")
try:
    levels = [int(c) for c in clients.split(",")]
    assert levels and min(levels) > 0
except (ValueError, AssertionError):
    raise UserError(f"--clients={clients}: give positive whole numbers separated by commas, like 1,4,16") from None


def random_checkpoint():
    """A chat checkpoint of random weights in train_gpt.py's format, in out_dir."""
    ns = model_namespace("train_gpt.py")
    n_layer, width = int(match[1]), int(match[2])
    net = ns["GPT"](ns["GPTConfig"](n_layer=n_layer, n_embd=width, n_head=width // 64, block_size=block_size))
    path = Path(out_dir) / f"random_{model}" / "ckpt.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "model_config": asdict(net.config), "chat": True, "optimizers": [],
                "config": script_settings("train_gpt.py"), "step": 0, "best_val_loss": float("inf")}, path)
    return path


def start_server(path):
    """`python sample.py --serve` on a free port: (the process, its URL)."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--serve", f"--ckpt={path}", "--port=0",
                             f"--device={device}", f"--max_queue={max(levels)}"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if not line and proc.poll() is not None:
            raise UserError(f"the server ended (status {proc.returncode}): {''.join(lines).strip()}")
        found = re.search(r"at (http://\S+) ", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found[1]
    proc.kill()
    raise UserError(f"the server did not start within --timeout={timeout} s")


def one_request(url, seed):
    """One streaming chat request: (seconds to the first text, seconds in all, tokens), or None if it failed."""
    body = dict(messages=[dict(role="user", content=f"Tell me a story about the number {seed}.")], stream=True,
                max_tokens=max_tokens, seed=seed, stream_options=dict(include_usage=True))
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, tokens, done = time.perf_counter(), None, None, False
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - start
    except OSError as e:
        print(f"  a request failed: {e}", file=sys.stderr)
        return None
    if not done or tokens is None:
        return None
    return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens


def level(url, n):
    """n clients at once: each one's results, and the seconds the level took."""
    results, seeds = [], iter(range(10**6))
    lock = threading.Lock()

    def client():
        for _ in range(requests):
            with lock:
                seed = next(seeds)
            results.append(one_request(url, seed))

    threads = [threading.Thread(target=client) for _ in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * requests)
    return results, time.perf_counter() - start


def bare_decode(path):
    """Tokens/s of the model's own decode loop in this process, as sample.py runs it (KV cache, chunks of 8,
    the same prompt and length): the server's ceiling, without HTTP, JSON or the queue."""
    ns = model_namespace("sample.py")
    net = ns["GPT"].from_checkpoint(load_checkpoint(path), str(path)).to(device).eval()
    ids = torch.tensor([[EOT, *chat_prompt("Tell me a story about the number 1.")]], device=device)
    seconds = []
    for seed in range(1 + requests):  # the first one warms up
        generator = torch.Generator(device).manual_seed(seed)
        start = time.perf_counter()
        chunk = []
        with torch.no_grad():
            for token in net.generate(ids, max_tokens, 0.8, 200, 1.0, True, generator):
                chunk.append(token)
                if len(chunk) == 8:
                    torch.cat(chunk, dim=1).tolist()
                    chunk = []
        seconds.append(time.perf_counter() - start)
    return max_tokens / statistics.median(seconds[1:])


def pct(values, p):
    """The p-th percentile (nearest rank) of values."""
    return sorted(values)[max(0, math.ceil(p / 100 * len(values)) - 1)]


path = Path(ckpt) if ckpt else random_checkpoint()
proc, url = start_server(path)
try:
    one_request(url, 10**6)  # warm: the first request pays for the allocations
    print(f"bench_serve: {path} on {device}, {max_tokens} tokens a reply, {requests} requests per client; torch "
          f"{torch.__version__}")
    print("| clients | requests | dropped | TTFT p50 (s) | TTFT p95 (s) | reply p50 (s) | reply p95 (s) "
          "| server tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in levels:
        results, seconds = level(url, n)
        ok = [r for r in results if r is not None]
        dropped = n * requests - len(ok)
        if not ok:
            print(f"| {n} | {n * requests} | {dropped} | - | - | - | - | - |")
            continue
        ttft, total = [r[0] for r in ok], [r[1] for r in ok]
        print(f"| {n} | {n * requests} | {dropped} | {pct(ttft, 50):.3f} | {pct(ttft, 95):.3f} | {pct(total, 50):.3f} "
              f"| {pct(total, 95):.3f} | {sum(r[2] for r in ok) / seconds:,.0f} |", flush=True)
    print(f"server: {json.loads(urllib.request.urlopen(f'{url}/stats', timeout=60).read())}")
finally:
    proc.terminate()
    proc.wait(timeout=60)
print(f"the model's own decode loop in this process (no server): {bare_decode(path):,.0f} tok/s")
