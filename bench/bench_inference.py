"""
Inference speed of the stage scripts' code paths, on random weights (speed does not depend on them):
  1. HellaSwag scoring (eval_hellaswag.hellaswag_score): many examples per forward vs one at a time;
  2. decoding at batch 1 (GPT.generate, greedy): with vs without the KV cache.

    python bench/bench_inference.py --device=cpu --data=../shared/data/hellaswag/hellaswag_val.jsonl
    python bench/bench_inference.py --device=cuda   # GPT-2 124M in bf16: all 10,042 examples, 512 tokens

Settings: the block below, then --key=value (or --key value).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stage scripts import as modules

import torch  # noqa: E402
from data.common import UserError, parse_config, pick_autocast, pick_device, script_defaults  # noqa: E402

from eval_hellaswag import GPT, GPTConfig, hellaswag_path, hellaswag_score, load_hellaswag  # noqa: E402

# ----------------------------------------------------------------------------- settings
device = "auto"  # "auto" (cuda > mps > cpu), "cuda", "cpu"
dtype = "auto"  # "auto" (bfloat16 autocast on CUDA, float32 elsewhere), "bfloat16" or "float32"
data = ""  # HellaSwag jsonl; "" = eval_hellaswag.py's default copy
examples = 0  # HellaSwag examples timed each way; 0 = all 10,042 on CUDA, 64 elsewhere
batch_size = 32  # examples per forward when batched
hellaswag_model = ""  # LAYERSxWIDTH (64-wide heads); "" = 12x768 (GPT-2 124M) on CUDA, 6x384 elsewhere
decode_models = ""  # comma-separated LAYERSxWIDTH; "" = 12x768 on CUDA, 6x384,12x768 elsewhere
decode_tokens = 0  # tokens decoded after a 16-token prompt; 0 = 512 on CUDA, 128 elsewhere
arch = "gpt2"  # "gpt2" or "llama"

cfg = parse_config(script_defaults(globals()), sys.argv[1:])
globals().update(cfg)

device = pick_device(device)
cuda = device.startswith("cuda")
dtype, autocast = pick_autocast(device, dtype)
torch.set_float32_matmul_precision("high")
hellaswag_model = hellaswag_model or ("12x768" if cuda else "6x384")
decode_models = decode_models or ("12x768" if cuda else "6x384,12x768")
decode_tokens = decode_tokens or (512 if cuda else 128)


def build(size):
    """A random model of LAYERSxWIDTH with 64-wide heads and GPT-2's 1024-token context."""
    try:
        n_layer, n_embd = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"model size {size!r}: use LAYERSxWIDTH, like 12x768") from None
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, block_size=1024))
    return model.to(device).eval()


def timed(fn):
    """fn's result and its wall time, with the GPU's queued work included."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with autocast:
        result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def decode_time(model, prompt, n, use_cache):
    """Seconds to decode n greedy tokens after prompt."""
    return timed(lambda: list(model.generate(prompt, n, temperature=0, use_cache=use_cache)))[1]


def describe(model, size):
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{arch} {size} ({params:.0f}M params) on {device} {dtype}"


# ----------------------------------------------------------------------------- benchmarks


def bench_hellaswag(size):
    rows = load_hellaswag(hellaswag_path(data), limit=examples or (0 if cuda else 64))
    model = build(size)
    timed(lambda: hellaswag_score(model, rows[:batch_size], device, batch_size))  # warm-up: kernels, allocator
    batched, t_batched = timed(lambda: hellaswag_score(model, rows, device, batch_size))
    alone, t_alone = timed(lambda: hellaswag_score(model, rows, device, batch_size=1))
    print(f"hellaswag, {describe(model, size)}, {len(rows)} examples: "
          f"{batch_size} per forward {len(rows) / t_batched:.1f} examples/s ({t_batched:.1f} s), "
          f"one per forward {len(rows) / t_alone:.1f} examples/s ({t_alone:.1f} s): {t_alone / t_batched:.2f}x "
          f"(acc_norm {batched['acc_norm']:.4f} / {alone['acc_norm']:.4f})", flush=True)


def bench_decode(size):
    model = build(size)
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    speed = {}
    for use_cache in (True, False):
        decode_time(model, prompt, 8, use_cache)  # warm-up
        speed[use_cache] = decode_tokens / decode_time(model, prompt, decode_tokens, use_cache)
    print(f"decode, {describe(model, size)}, batch 1, 16-token prompt + {decode_tokens} tokens: "
          f"KV cache {speed[True]:.1f} tokens/s, no cache {speed[False]:.1f} tokens/s: "
          f"{speed[True] / speed[False]:.2f}x", flush=True)


bench_hellaswag(hellaswag_model)
for size in decode_models.split(","):
    bench_decode(size)
