"""
Inference speed of the stage scripts' code paths, on random weights (speed does not depend on them):
  1. decoding at batch 1, greedy, after a 16-token prompt, in sample.py's way (bf16 weights on CUDA):
       plain     no KV cache: each token runs the whole window again
       cached    the KV cache, tokens read in chunks (sample.py's default)
       item      the KV cache, each token read on the host as it comes (sample.py before the fast path)
       compiled  the KV cache with the one-token step compiled into a CUDA graph (sample.py --compile)
  2. HellaSwag scoring in eval_hellaswag.py's way (fp32 weights, bf16 autocast on CUDA):
       cold      data/hellaswag.py's fast path on a fresh process: tokenizing and packing included
       warm      the same again, as a training run's later scores: tokens and batches cached
       old       the straightforward path it replaced: each batch rendered again, boolean-mask indexing
     plus the host syncs of each path where CUDA can count them.

    python bench/bench_inference.py --device=cpu                   # small models, the bundled 200 rows
    python bench/bench_inference.py --data=data/hellaswag/hellaswag_val.jsonl   # from eval_hellaswag.py --download_only
    python bench/bench_inference.py --device=cuda                  # GPT-2 124M: all 10,042 rows, 512 tokens

The models are the stage scripts' own (their model section, run alone: bench/stage_code.py).
Settings: the block below, then --key=value (or --key value).
"""

import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from stage_code import REPO_ROOT, model_namespace  # bench/: puts the repo root on sys.path

import data.hellaswag as hellaswag
from data import UserError, one_line_errors
from data.run import pick_autocast, pick_device
from data.settings import check_settings, parse_settings
from data.tokenizer import EOT

one_line_errors()

# ----------------------------------------------------------------------------- settings
parts = "decode,hellaswag"  # what to time
device = "auto"  # "auto" (cuda > mps > cpu), "cuda", "cpu"
arch = "gpt2"  # one of the model section's ARCHS
decode_models = ""  # comma-separated LAYERSxWIDTH (64-wide heads); "" = 12x768 (GPT-2 124M) on CUDA, 6x384 elsewhere
decode_tokens = 0  # tokens decoded after the prompt; 0 = 512 on CUDA, 128 elsewhere
decode_modes = ""  # of plain,cached,item,compiled; "" = all on CUDA, plain,cached,item elsewhere (inductor: ~1 min)
data = ""  # HellaSwag jsonl; "" = data/hellaswag/hellaswag_val.jsonl if downloaded, else the 200 rows in data/samples/
examples = 0  # HellaSwag examples scored; 0 = all in the file on CUDA, 64 elsewhere
hellaswag_model = ""  # LAYERSxWIDTH; "" = 12x768 on CUDA, 6x384 elsewhere
batch_size = 64  # examples per forward (data/hellaswag.py's default)
more_batch_sizes = ""  # also time the warm fast path at these, e.g. "32,128"; "" = 32,128 on CUDA, none elsewhere
old = True  # also time the straightforward path

config = parse_settings(globals(), sys.argv[1:])
globals().update(config)
check_settings(config, non_negative=("decode_tokens", "examples"), positive=("batch_size",),
               choices=dict(arch=model_namespace("train_gpt.py")["ARCHS"]))

device = pick_device(device)
cuda = device.startswith("cuda")
torch.set_float32_matmul_precision("high")
decode_models = decode_models or ("12x768" if cuda else "6x384")
decode_tokens = decode_tokens or (512 if cuda else 128)
modes = (decode_modes or ("plain,cached,item,compiled" if cuda else "plain,cached,item")).split(",")
if not set(modes) <= {"plain", "cached", "item", "compiled"}:
    raise UserError(f"--decode_modes={decode_modes}: use some of plain,cached,item,compiled")
hellaswag_model = hellaswag_model or ("12x768" if cuda else "6x384")
more_batch_sizes = [int(b) for b in (more_batch_sizes or ("32,128" if cuda else "")).split(",") if b]
NS = model_namespace("sample.py")
GPT, GPTConfig, KVCache = NS["GPT"], NS["GPTConfig"], NS["KVCache"]


def build(size, dtype=torch.float32):
    """A random model of LAYERSxWIDTH with 64-wide heads and GPT-2's 1024-token context."""
    try:
        n_layer, n_embd = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"model size {size!r}: use LAYERSxWIDTH, like 12x768") from None
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, block_size=1024))
    return model.to(device, dtype).eval()


def describe(model, size, dtype):
    return f"{arch} {size} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) on {device} {dtype}"


def timed(fn):
    """fn's result and its wall time, the GPU's queued work included."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def host_syncs(fn):
    """How many times fn makes the host wait for the GPU (CUDA's sync debug mode warns at each one)."""
    if not cuda:
        return "n/a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- decoding


def bench_decode(size):
    dtype, _ = pick_autocast(device)  # sample.py's weights: bf16 on CUDA, fp32 elsewhere
    model = build(size, getattr(torch, dtype))
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    cache = KVCache(model.config, device, static="compiled" in modes)  # one for all runs, as in sample.py

    def decode(n, mode):
        tokens = model.generate(prompt, n, temperature=0, use_cache=mode != "plain", cache=cache)
        if mode == "item":
            return [token.item() for token in tokens]
        return torch.cat(list(tokens), dim=1)[0].tolist()  # one host read at the end: chunks in sample.py

    results, speed, notes = {}, {}, []
    for mode in modes:
        if mode == "compiled":
            model.decode_step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
            _, seconds = timed(lambda: decode(16, "compiled"))  # compiles, then records the CUDA graph
            notes.append(f"compile + graph capture {seconds:.1f} s")
        else:
            decode(8, mode)  # warm-up: kernels, allocator
        results[mode], seconds = timed(lambda mode=mode: decode(decode_tokens, mode))
        speed[mode] = decode_tokens / seconds
        if mode in ("cached", "compiled") and cuda:
            notes.append(f"{mode}: {host_syncs(lambda mode=mode: decode(32, mode))} host syncs for 32 tokens")
        if mode == "compiled":
            del model.decode_step  # the plain method again, for the modes after it
    same = all(tokens == results[modes[0]] for tokens in results.values())
    print(f"decode, {describe(model, size, dtype)}, batch 1, 16-token prompt + {decode_tokens} tokens: "
          + ", ".join(f"{mode} {speed[mode]:,.0f} tokens/s" if speed[mode] >= 100 else
                      f"{mode} {speed[mode]:.3g} tokens/s" for mode in modes)
          + "".join(f"; {mode}/{modes[0]} {speed[mode] / speed[modes[0]]:.2f}x" for mode in modes[1:])
          + f"; greedy tokens {'identical' if same else 'DIFFER (bf16 ties?)'}; " + "; ".join(notes), flush=True)


# ----------------------------------------------------------------------------- HellaSwag


def old_ending_losses(model, rows, device):
    """The plain way to score endings, the baseline of data/hellaswag.py's ending_losses: boolean-mask indexing."""
    width = max(len(tokens) for tokens, _ in rows) - 1
    x = np.full((len(rows), width), EOT, dtype=np.int64)
    y = np.full((len(rows), width), -1, dtype=np.int64)
    for i, (tokens, mask) in enumerate(rows):
        x[i, : len(tokens) - 1] = tokens[:-1]
        y[i, : len(tokens) - 1] = np.where(mask[1:], tokens[1:], -1)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    scored = y != -1
    logits, _ = model(x, logits_at=scored)
    losses = torch.zeros(y.shape, device=device)
    losses[scored] = F.cross_entropy(logits.float(), y[scored], reduction="none")
    total = losses.sum(dim=1)
    return total, total / scored.sum(dim=1)


@torch.inference_mode()
def old_hellaswag_score(model, examples, device, batch_size):
    """data/hellaswag.py's hellaswag_score before the fast path: every call renders (tokenizes) every example."""
    rendered = [hellaswag.render_example(ex, model.config.block_size) for ex in examples]
    labels = [ex["label"] for ex in examples]
    order = sorted(range(len(rendered)), key=lambda i: max(len(tokens) for tokens, _ in rendered[i]))
    counts = torch.zeros(3, device=device)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        total, mean = old_ending_losses(model, [row for i in batch for row in rendered[i]], device)
        label = torch.tensor([labels[i] for i in batch], device=device)
        counts[0] += (total.view(-1, 4).argmin(dim=1) == label).sum()
        counts[1] += (mean.view(-1, 4).argmin(dim=1) == label).sum()
        counts[2] += len(batch)
    right, right_norm, n = counts.tolist()
    return {"acc": right / max(n, 1), "acc_norm": right_norm / max(n, 1), "n": int(n)}


def forget_tokens():
    """A fresh process's caches: nothing tokenized or packed yet (the old path had no caches)."""
    hellaswag.encode_example.cache_clear()
    hellaswag.prepared_batches.cache_clear()


def bench_hellaswag(size):
    candidates = [REPO_ROOT / "data/hellaswag/hellaswag_val.jsonl", REPO_ROOT / "data/samples/hellaswag_val_200.jsonl"]
    path = data or next(p for p in candidates if p.is_file())
    rows = hellaswag.load_hellaswag(path, limit=examples or (0 if cuda else 64))
    dtype, autocast = pick_autocast(device)  # eval_hellaswag.py's: fp32 weights, bf16 autocast on CUDA
    model = build(size)
    print(f"hellaswag, {describe(model, size, dtype)}, {len(rows):,} examples of {path}, {batch_size} per forward:",
          flush=True)
    everything = hellaswag.load_hellaswag(path)
    forget_tokens()
    _, seconds = timed(lambda: [hellaswag.render_example(ex, 1024) for ex in everything])
    print(f"  tokenizing all {len(everything):,} rows of the file: {seconds:.2f} s (the fast path does it once per "
          "process)", flush=True)
    with autocast:
        hellaswag.hellaswag_score(model, rows[:batch_size], device, batch_size)  # warm-up: kernels, allocator
        forget_tokens()
        score, cold = timed(lambda: hellaswag.hellaswag_score(model, rows, device, batch_size))
        _, warm = timed(lambda: hellaswag.hellaswag_score(model, rows, device, batch_size))
        syncs = host_syncs(lambda: hellaswag.hellaswag_score(model, rows[:4 * batch_size], device, batch_size))
        print(f"  fast: cold {cold:.2f} s, warm {warm:.2f} s; host syncs for 4 batches: {syncs}; acc_norm "
              f"{score['acc_norm']:.4f}", flush=True)
        for b in more_batch_sizes:
            hellaswag.hellaswag_score(model, rows, device, b)  # packs this batch size
            _, seconds = timed(lambda b=b: hellaswag.hellaswag_score(model, rows, device, b))
            print(f"  fast, warm, {b} per forward: {seconds:.2f} s", flush=True)
        if old:
            forget_tokens()  # the old path tokenized on every call
            before, seconds = timed(lambda: old_hellaswag_score(model, rows, device, batch_size))
            syncs = host_syncs(lambda: old_hellaswag_score(model, rows[: 4 * batch_size], device, batch_size))
            print(f"  old: {seconds:.2f} s, host syncs for 4 batches: {syncs}; acc_norm {before['acc_norm']:.4f} "
                  f"({'same' if before == score else 'DIFFERENT'} score); old/cold {seconds / cold:.2f}x, old/warm "
                  f"{seconds / warm:.2f}x", flush=True)


print(f"bench_inference: torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'no GPU'}, "
      f"{torch.get_num_threads()} CPU threads", flush=True)
if not set(parts.split(",")) <= {"decode", "hellaswag"}:
    raise UserError(f"--parts={parts}: use decode, hellaswag or both")
if "decode" in parts:
    for size in decode_models.split(","):
        bench_decode(size)
if "hellaswag" in parts:
    bench_hellaswag(hellaswag_model)
