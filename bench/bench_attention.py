"""
The attention call of the training forward alone (the model's own: strided q, k, v views of the fused
c_attn output, causal SDPA, bf16), forward + backward, per SDPA backend, at the presets' head shapes;
and which kernel SDPA picks by itself. Head dims that are not a multiple of 8 (FGPT's 52) rule flash out.

    python bench/bench_attention.py                        # CUDA: the shapes of gpt2_124m, fgpt_600m_flash, fgpt_600m
    python bench/bench_attention.py --device=cpu --seq=128 # the default backend only, small: a check that it runs

Settings: the block below, then --key=value (or --key value).
"""

import contextlib
import sys

import torch
import torch.nn.functional as F
from stage_code import median_ms  # bench/: puts the repo root on sys.path
from torch.nn.attention import SDPBackend, sdpa_kernel

from data import UserError, one_line_errors
from data.run import pick_device
from data.settings import check_settings, parse_settings

one_line_errors()

# ----------------------------------------------------------------------------- settings
device = "auto"  # "auto" (cuda > mps > cpu), "cuda", "cpu"
shapes = "gpt2_124m:32x12x64,fgpt_600m_flash:16x13x96,fgpt_600m:16x24x52"  # name:BATCHxHEADSxHEAD_DIM,...
seq = 1024  # T
repeats = 20  # timed calls per backend; the median is reported

config = parse_settings(globals(), sys.argv[1:])
globals().update(config)
check_settings(config, positive=("seq", "repeats"))
device = pick_device(device)
cuda = device.startswith("cuda")
dtype = torch.bfloat16 if cuda else torch.float32
BACKENDS = {"default": None}
if cuda:
    BACKENDS.update(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                    efficient=SDPBackend.EFFICIENT_ATTENTION, math=SDPBackend.MATH)


def kernels_picked(fn):
    """The attention kernels the profiler sees in one call: what SDPA chose by itself."""
    with torch.profiler.profile() as prof:
        fn()
    words = ("flash", "cudnn", "fmha", "attention", "sdpa", "efficient")
    return sorted({e.key[:90] for e in prof.key_averages() if any(w in e.key.lower() for w in words)})


print(f"bench_attention: torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'no GPU'}, "
      f"cudnn {torch.backends.cudnn.version()}, {dtype}, T={seq} causal, forward + backward", flush=True)
def bench_shape(name, B, H, D):
    flop = 3.5 * 2 * B * H * seq * seq * D  # causal forward 2*T^2*D per head (half of 4), backward 2.5x forward
    qkv = torch.randn(B, seq, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (t.view(B, seq, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))  # the model's views, made once
    grad = torch.randn(B, H, seq, D, device=device, dtype=dtype)

    def fwd_bwd():  # the attention call and its backward alone: no reshapes, no gradient accumulation
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(y, (q, k, v), grad)

    for backend, choice in BACKENDS.items():
        try:
            with sdpa_kernel([choice]) if choice is not None else contextlib.nullcontext():
                fwd_bwd()  # warm-up
                ms = median_ms(fwd_bwd, repeats, cuda)
            print(f"{name} {B}x{H}x{seq}x{D}: {backend:9s} {ms:7.2f} ms per layer, {flop / ms / 1e9:5.0f} TFLOP/s",
                  flush=True)
        except RuntimeError as e:
            print(f"{name} {B}x{H}x{seq}x{D}: {backend:9s} unavailable ({str(e).splitlines()[0][:120]})", flush=True)
    if cuda:
        print(f"{name}: SDPA picks {kernels_picked(fwd_bwd)}", flush=True)


for spec in shapes.split(","):
    name, _, dims = spec.partition(":")
    try:
        B, H, D = (int(v) for v in dims.split("x"))
    except ValueError:
        raise UserError(f"--shapes: {spec!r} is not NAME:BATCHxHEADSxHEAD_DIM, like gpt2_124m:32x12x64") from None
    bench_shape(name, B, H, D)
