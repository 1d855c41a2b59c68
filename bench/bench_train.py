"""
Training speed: train_gpt.py's step next to nanoGPT's step as nanoGPT runs it, on the same model, in one run.
Fixed random tokens (no data I/O, nothing written); the median step time, tokens/s and MFU of each.

    python bench/bench_train.py                                            # GPT-2 124M, T=1024, 524,288 tokens/step
    python bench/bench_train.py configs/llama_124m.toml
    python bench/bench_train.py configs/fgpt_600m_flash.toml --steps=3
    python bench/bench_train.py configs/smoke.toml --device=cpu --steps=2   # seconds on a CPU
    python bench/bench_train.py --sdpa_backend=cudnn --bf16_residual=True --memory_batch_sizes=16,64

  fast   train_gpt.py's step, the very function its loop calls (train_step, in its training step section, run
         alone by bench/stage_code.py) at the rates set_rates gives: Muon + AdamW, torch.compile and bf16
         autocast on CUDA, grad accumulation to total_batch_size, clipping, and the NaN guard's one host sync
  nanogpt  nanoGPT's recipe as nanoGPT runs it: AdamW alone (fused on CUDA), torch.compile and bf16 autocast
           on CUDA, the same model, micro-batch and accumulation, and its loop: no host sync but at log steps.
           The ratio is the optimizer's and the loop's.

The model is train_gpt.py's own model section. The settings are train_gpt.py's (its settings block:
configs/*.toml and its flags mean the same here), then the bench's.
"""

import statistics
import sys
import time
from types import SimpleNamespace

import torch
from stage_code import median_ms, script_settings, step_namespace  # bench/: puts the repo root on sys.path

from data import UserError, one_line_errors
from data.run import gpu_peak_flops, pick_autocast, pick_device
from data.settings import check_settings, parse_config
from data.tokenizer import VOCAB_SIZE
from data.train import set_rates

one_line_errors()

# ----------------------------------------------------------------------------- settings
# train_gpt.py's settings come first, as t.NAME (arch, n_layer, ..., batch_size, total_batch_size, the
# optimizer's, device, dtype, compile, peak_flops); these are the bench's own.
steps = 10  # timed optimizer steps per loop; the median is reported
warmup_steps = 2  # untimed steps first: compilation, the allocator's first growth
loops = "fast,nanogpt"  # which of the two steps to time, in this order
sdpa_backend = "auto"  # CUDA attention kernel: "auto" (SDPA's choice), "flash", "cudnn", "efficient" or "math"
bf16_residual = False  # embeddings in bf16, so the residual stream and its gradients are bf16 under autocast
coordinate_descent = False  # inductor's coordinate_descent_tuning: a longer compile for maybe faster kernels
memory_batch_sizes = ""  # CUDA: also the peak memory of a fast micro-step at these micro-batch sizes, e.g. "16,64"
phases = False  # CUDA: also time one fast step's parts (a micro-step's forward+backward, the clip, each optimizer)

BENCH = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (int, float, bool, str)}
config = parse_config({**script_settings("train_gpt.py"), **BENCH}, sys.argv[1:])
globals().update({k: config[k] for k in BENCH})
t = SimpleNamespace(**config)

ns = step_namespace("train_gpt.py")
ARCHS = ns["ARCHS"]
check_settings(config, positive=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "total_batch_size",
                                 "steps"), non_negative=("warmup_steps",),
               choices=dict(arch=ARCHS, sdpa_backend=("auto", "flash", "cudnn", "efficient", "math")))
if t.total_batch_size % (t.batch_size * t.block_size):
    raise UserError(f"total_batch_size={t.total_batch_size} must be a multiple of batch_size * block_size = "
                    f"{t.batch_size} * {t.block_size}")
if not set(loops.split(",")) <= {"fast", "nanogpt"}:
    raise UserError(f"--loops={loops}: use fast, nanogpt or fast,nanogpt")
if (bf16_residual or sdpa_backend != "auto" or coordinate_descent) and not t.device.startswith(("cuda", "auto")):
    raise UserError("--bf16_residual, --sdpa_backend and --coordinate_descent are CUDA settings; drop them on a CPU")
try:
    sizes = [int(b) for b in memory_batch_sizes.split(",") if b.strip()]
except ValueError:
    raise UserError(f"--memory_batch_sizes={memory_batch_sizes}: use whole numbers and commas, like 16,64") from None


device = pick_device(t.device)
cuda = device.startswith("cuda")
dtype, autocast = pick_autocast(device, t.dtype)
if bf16_residual and dtype != "bfloat16":
    raise UserError(f"--bf16_residual needs bf16 autocast, not {dtype}: it is the default on CUDA (--dtype=auto)")
torch.set_float32_matmul_precision("high")  # as train_gpt.py: TF32 matmuls on Ampere and later
grad_accum = t.total_batch_size // (t.batch_size * t.block_size)
peak_flops = t.peak_flops or gpu_peak_flops(device)
if cuda:
    backends = dict(flash=torch.backends.cuda.enable_flash_sdp, cudnn=torch.backends.cuda.enable_cudnn_sdp,
                    efficient=torch.backends.cuda.enable_mem_efficient_sdp, math=torch.backends.cuda.enable_math_sdp)
    if sdpa_backend != "auto":  # that kernel alone: an unsupported shape fails instead of falling back
        for name, enable in backends.items():
            enable(name == sdpa_backend)
    if coordinate_descent:
        import torch._inductor.config

        torch._inductor.config.coordinate_descent_tuning = True
GPT, GPTConfig, train_step = ns["GPT"], ns["GPTConfig"], ns["train_step"]
model_config = GPTConfig.from_settings(config)
generator = torch.Generator().manual_seed(t.seed)
x = torch.randint(0, VOCAB_SIZE, (t.batch_size, t.block_size), generator=generator).to(device)
y = torch.randint(0, VOCAB_SIZE, (t.batch_size, t.block_size), generator=generator).to(device)


def sync():
    if cuda:
        torch.cuda.synchronize()


def build(loop):
    """(model to train, the plain module, optimizers) for a loop, from one seed: the same initial weights."""
    torch.manual_seed(t.seed)
    with torch.device(device):  # initialized where it trains: seconds less for a 600M model
        raw = GPT(model_config)
    if bf16_residual:  # the residual stream is the sum of the embeddings and the blocks' bf16 outputs
        for emb in (raw.transformer.wte, getattr(raw.transformer, "wpe", None)):
            if emb is not None:
                emb.register_forward_hook(lambda module, args, out: out.to(torch.bfloat16))
    optimizers = raw.configure_optimizers({**config, "optimizer": t.optimizer if loop == "fast" else "adamw"})
    model = torch.compile(raw) if t.compile and cuda else raw  # nanoGPT compiles by default too
    return model, raw, optimizers


def micro_step(model, batch=x, targets=y):
    """One micro-batch's forward and backward, for the phase and memory figures."""
    with autocast:
        _, loss = model(batch, targets)
    (loss / grad_accum).backward()


def nanogpt_step(model, raw, optimizers, lrs):
    """nanoGPT's train.py loop body: forward and backward per micro-batch, clip, step; it reads the loss on
    the host at log steps only."""
    (opt,) = optimizers
    for group, lr in zip(opt.param_groups, lrs[0], strict=True):
        group["lr"] = lr
    for _ in range(grad_accum):
        micro_step(model)
    torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)


def fast_step(model, raw, optimizers, lrs):
    """train_gpt.py's step, as its loop calls it (the rates at their peaks: the cost is the same at every step)."""
    set_rates(optimizers, lrs, 1.0, t.muon_momentum)
    return train_step(model, raw, optimizers, lambda: (x, y), grad_accum, t.grad_clip, autocast)


def report_phases(model, raw, optimizers):
    fwd_bwd = median_ms(lambda: micro_step(model), 5, cuda=True)
    clip = median_ms(lambda: torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0), 5, cuda=True)
    opts = ", ".join(f"{type(opt).__name__} {median_ms(opt.step, 5, cuda=True):.2f} ms" for opt in optimizers)
    print(f"fast phases: micro-step forward+backward {fwd_bwd:.2f} ms (x{grad_accum} = {fwd_bwd * grad_accum:.0f} "
          f"ms), clip {clip:.2f} ms, {opts}", flush=True)


def report_memory(model, optimizers):
    for b in sizes:
        for opt in optimizers:
            opt.zero_grad(set_to_none=False)  # the gradients stay allocated, as within a step
        torch.cuda.reset_peak_memory_stats()
        try:
            micro_step(model, x[:1].expand(b, -1).contiguous(), y[:1].expand(b, -1).contiguous())
            sync()
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        except torch.cuda.OutOfMemoryError:
            peak = "out of memory"
        print(f"fast memory: micro-batch {b} x {t.block_size}: peak {peak}", flush=True)


def bench(loop):
    model, raw, optimizers = build(loop)
    lrs = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = fast_step if loop == "fast" else nanogpt_step
    t0 = time.perf_counter()
    for _ in range(warmup_steps):
        step(model, raw, optimizers, lrs)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        figures = step(model, raw, optimizers, lrs)
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tps = t.total_batch_size / dt
    mfu = f"MFU {raw.flops_per_token() * tps / peak_flops:.1%}" if peak_flops else "MFU n/a (no peak FLOP/s known)"
    memory = (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved") if cuda else ""
    what = ("Muon+AdamW" if loop == "fast" and t.optimizer == "muon" else "AdamW") + \
        (", compiled" if model is not raw else "")
    print(f"{loop:7s} ({what}): median step {dt * 1000:,.1f} ms (min {min(times) * 1000:,.1f}, max "
          f"{max(times) * 1000:,.1f}) over {steps} steps, {tps:,.0f} tokens/s, {mfu}{memory}; warm-up (the compile) "
          f"{warmup:.1f} s" + (f"; loss {figures['loss']:.3f}, grad norm {figures['grad_norm']:.2f}" if figures
                               else ""), flush=True)
    if loop == "fast" and phases and cuda:
        report_phases(model, raw, optimizers)
    if loop == "fast" and sizes and cuda:
        report_memory(model, optimizers)


with torch.device("meta"):  # shapes only, no memory
    n_params = sum(p.numel() for p in GPT(model_config).parameters())
flags = [f"--{k}={config[k]}" for k in ("sdpa_backend", "bf16_residual", "coordinate_descent") if config[k] != BENCH[k]]
gpu = torch.cuda.get_device_name(device) if cuda else "no GPU"
print(f"bench_train: {t.arch} {t.n_layer}x{t.n_embd} ({t.n_embd // t.n_head}-wide heads), {n_params / 1e6:.1f}M "
      f"parameters, T={t.block_size}, {grad_accum} x {t.batch_size} x {t.block_size} = {t.total_batch_size:,} "
      f"tokens/step | {device} ({gpu}) {dtype} | torch {torch.__version__} {' '.join(flags)}", flush=True)
for loop in loops.split(","):
    bench(loop)
    if cuda:
        torch.cuda.empty_cache()  # the last loop's model and optimizer state are gone: give their memory back
