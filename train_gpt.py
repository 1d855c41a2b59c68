"""
Pretrain a GPT on FineWeb-Edu token shards: one GPU, or several under torchrun.

    python train_gpt.py configs/smoke.toml --device=cpu                  # a minute on a laptop, bundled sample data
    python data/fineweb_edu.py                                           # once: tokenize into data/fineweb_edu/
    python train_gpt.py                                                  # GPT-2 124M with Muon + AdamW
    python train_gpt.py configs/llama_124m.toml --max_iters=5000
    python train_gpt.py --out_dir=logs/gpt2_124m --init_from=resume      # continue exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train_gpt.py                # DDP over 8 GPUs

Settings: the block below, then configs/*.toml files, then --key=value, in that order.
The sections: settings, model (the same text in every stage script), training step, setup, training loop.
"""

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, one_line_errors
from data.checkpoint import check_resumable, load_checkpoint, rng_states, save_checkpoint
from data.hellaswag import hellaswag_score, load_hellaswag
from data.loaders import BatchLoader, ValData
from data.run import (
    RunLog,
    StopRequest,
    duration,
    gpu_peak_flops,
    init_distributed,
    lock_run_dir,
    pick_autocast,
    refuse_architecture_change,
    refuse_run_dir_clobber,
    refuse_to_overwrite,
    start_wandb,
)
from data.settings import check_settings, parse_settings
from data.tokenizer import EOT, VOCAB_SIZE, get_tokenizer
from data.train import (
    evaluate,
    finish,
    group_rates,
    read_figures,
    restore,
    resume_notes,
    resume_optimizers,
    set_rates,
    stop_if_diverged,
)

one_line_errors()

# ----------------------------------------------------------------------------- settings
# model
arch = "gpt2"  # "gpt2" (learned positions, LayerNorm, GELU, tied head) or "llama" (RoPE, RMSNorm, SwiGLU)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024  # context length T
qk_norm = False
logit_softcap = 0.0  # 0 = off; e.g. 30 tames logit growth
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt) or "gpt2"/"gpt2-medium"/... via transformers
# data
data_dir = "data/fineweb_edu"  # train_*.bin and val_*.bin from data/fineweb_edu.py
loader_mode = "shuffle"  # every train window once per epoch in a seeded order; or "bos" / "random" / "sequential"
batch_size = 32  # micro-batch, in sequences; 32 x 1024 fits a 40 GB GPU at 124M, 64 fits 80 GB
total_batch_size = 524288  # tokens per optimizer step: 2**19 ~ 0.5M, GPT-3 small's batch
val_tokens = 10485760  # fixed val set: 20 * 2**19 tokens, the same ones at every eval
# optimizer: a peak rate per group, which the schedule below scales alike. Measured at widths 64-768 (bench/RECIPE.md):
# the best head rate falls as width^-0.5 and needs the long warmup (x4 the muP rule at 768, stable only with it);
# Muon at 0.02 is within x2 of the best at every width
optimizer = "muon"  # "muon": Muon for the block matrices, AdamW for the rest; "adamw": AdamW for all (nanoGPT)
matrix_lr = 0.02  # the block matrices: Muon's rate (torch.optim.Muon scales it by sqrt(max(1, rows/cols))), or AdamW's
embedding_lr = 0.3  # AdamW: an untied token embedding (llama), at every width
head_lr = 0.032  # AdamW: the head, and gpt2's tied embedding+head, at width lr_ref_width (the rule below)
scalar_lr = 0.03  # AdamW: the rest: gpt2's position embedding, norm gains, biases
lr_ref_width = 768  # the width head_lr is set for; 0 = the same head_lr at every width
head_lr_exponent = 0.5  # head_lr x (lr_ref_width / n_embd) ** this at other widths; muP's is 1 (stable, but slower)
muon_momentum = 0.95  # Muon's Nesterov momentum
muon_momentum_warmup = 0  # steps over which the momentum rises from 0.85 to muon_momentum (modded-nanogpt); 0 = off
muon_weight_decay = 0.0
adam_beta1 = 0.8  # AdamW's betas and eps (nanochat's and modded-nanogpt's)
adam_beta2 = 0.95
adam_eps = 1e-10
adam_weight_decay = 0.0  # on the embedding and head (optimizer="adamw": on every matrix); never on gains or biases
max_iters = 19073  # optimizer steps: 10B tokens / 2**19 = one pass over FineWeb-Edu sample-10BT
warmup_iters = 5600  # linear warmup steps, 29% of the run: the head's rate spikes without it (2,800: +0.70 nats at 768)
lr_schedule = "cosine"  # "cosine" to min_lr_frac, or "wsd" (warmup-stable-decay, a trapezoid)
lr_decay_iters = 0  # step where the schedule ends; 0 = max_iters (set it to resume into a longer run exactly)
min_lr_frac = 0.1  # final learning rate as a fraction of the peak
decay_frac = 0.2  # wsd: the last fraction of the run spent decaying
grad_clip = 1.0  # clip the global gradient norm; 0 = off
# evaluation, logging, checkpoints
out_dir = "logs/gpt2_124m"
log_interval = 10  # steps between metrics.jsonl records
eval_interval = 250  # steps between val loss measurements
hellaswag_interval = 1000  # steps between HellaSwag scores; 0 = off
hellaswag_file = "data/hellaswag/hellaswag_val.jsonl"  # python eval_hellaswag.py downloads it there
hellaswag_limit = 0  # score only the first N examples; 0 = all 10,042
sample_interval = 1000  # steps between samples from sample_prompt; 0 = off
sample_prompt = "Once upon a time"
sample_tokens = 32
checkpoint_interval = 1000  # steps between checkpoints (one is always written at the end)
keep_last = 2  # also keep ckpt_STEP.pt for the last K checkpoints; 0 = only ckpt.pt
wandb_log = False
wandb_project = "gpt"
wandb_run_name = ""
# system
device = "auto"  # "auto" (cuda > mps > cpu), "cuda", "cuda:1", "mps", "cpu"
dtype = "auto"  # "auto" (bfloat16 autocast on CUDA, float32 elsewhere), "bfloat16" or "float32"
compile = True  # torch.compile the model (CUDA only; pass --compile=False on Windows)
seed = 1337
peak_flops = 0.0  # the GPU's dense bf16 FLOP/s for MFU; 0 = look it up in data/run.py's PEAK_FLOPS


config = parse_settings(globals(), sys.argv[1:])
globals().update(config)


# ----------------------------------------------------------------------------- model
# The same text stands in train_gpt.py, finetune_sft.py, sample.py, eval_hellaswag.py and export_hf.py
# (tests/test_model_sync.py checks), so each stage script reads on its own.


@dataclass
class GPTConfig:
    arch: str = "gpt2"  # "gpt2": learned positions, LayerNorm, GELU, tied head | "llama": RoPE, RMSNorm, SwiGLU
    vocab_size: int = VOCAB_SIZE
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    rope_theta: float = 10000.0  # llama only

    @classmethod
    def from_settings(cls, settings):
        """The config that a script's settings name (arch, n_layer, ...: a setting of a field's name sets it)."""
        return cls(**{k: v for k, v in settings.items() if k in cls.__dataclass_fields__})


ARCHS = ("gpt2", "llama")  # what GPTConfig.arch may be


class KVCache:
    """Keys and values of every position of the context, per layer, for one-token-per-forward decoding.

    The buffers are allocated once, on first use (in the dtype k and v come in: bf16 under autocast),
    and kept. pos, the number of tokens cached, lives on the device, so a step reads and advances it
    without a host sync. static=True lets a CUDA graph (torch.compile's mode="reduce-overhead") write
    the buffers in place, as recorded; it loads torch._dynamo, so pass it only when compiling."""

    def __init__(self, config, device, static=False):
        self.config, self.static = config, static
        self.k, self.v = [None] * config.n_layer, [None] * config.n_layer
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        if static:
            torch._dynamo.mark_static_address(self.pos, guard=False)

    def update(self, layer, k, v, pos):
        """Write k and v (B, H, T, D) at positions pos (T,); return this layer's whole cache."""
        if self.k[layer] is None or self.k[layer].shape[0] != k.size(0) or self.k[layer].dtype != k.dtype:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.config.block_size, D)
            self.v[layer] = v.new_zeros(B, H, self.config.block_size, D)
            if self.static:
                torch._dynamo.mark_static_address(self.k[layer], guard=False)
                torch._dynamo.mark_static_address(self.v[layer], guard=False)
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by position-dependent angles, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        bias = config.arch == "gpt2"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)  # q, k, v fused (HF GPT-2 layout)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.config, self.layer = config, layer

    def forward(self, x, rope=None, cache=None, pos=None, mask=None):
        B, T, C = x.shape
        H = self.config.n_head
        q, k, v = (t.view(B, T, H, C // H) for t in self.c_attn(x).split(C, dim=2))
        if self.config.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is None:  # no explicit mask: one would knock SDPA off the flash kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the whole cache, every shape fixed; the mask hides the positions after each query
            k, v = cache.update(self.layer, k, v, pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.arch == "gpt2":
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
            self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        else:  # SwiGLU: 8/3 x wide keeps the parameters of a 4x GELU MLP; rounded up to a multiple of 64
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
            self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=False)  # gate and up, fused
            self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.swiglu = config.arch == "llama"

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


def make_norm(config):
    return nn.LayerNorm(config.n_embd) if config.arch == "gpt2" else nn.RMSNorm(config.n_embd, eps=1e-6)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1, self.attn = make_norm(config), CausalSelfAttention(config, layer)
        self.ln_2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, rope=None, cache=None, pos=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Parameter names follow HF GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...)."""

    def __init__(self, config):
        super().__init__()
        if config.arch not in ARCHS:
            raise UserError(f"arch={config.arch!r}: use one of {', '.join(ARCHS)}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.arch == "gpt2":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        else:
            head_dim = config.n_embd // config.n_head
            freqs = config.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), freqs)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: GPT-2's 1/sqrt(2 * n_layer) scaling
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None, logits_at=None):
        """idx (B, T) token ids -> logits (B, T, vocab) and, given targets, the mean cross-entropy
        over the targets that are not -1 (0 when none are, so an all-masked batch adds no NaN).

        logits_at indexes the (B, T) positions whose logits are wanted (a boolean mask, or
        `(slice(None), [-1])` for the last): the vocab projection is most of a small model's
        inference cost, and sampling or scoring needs it at a few positions only."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos, mask = torch.arange(T, device=idx.device), None
        if cache is not None:  # the tokens follow the cached ones (the caller keeps pos + T <= block_size)
            pos = pos + cache.pos
            mask = torch.arange(self.config.block_size, device=idx.device) <= pos[:, None]  # (T, block_size)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.rope_cos[pos], self.rope_sin[pos]
        for block in self.transformer.h:
            x = block(x, rope, cache, pos, mask)
        if cache is not None:
            cache.pos += T  # in place: a CUDA graph keeps reading the same tensor
        if logits_at is not None:
            x = x[logits_at]
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.logit_softcap > 0:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1, reduction="sum")
        return logits, loss / (targets != -1).sum().clamp(min=1)

    def flops_per_token(self):
        """Training FLOPs per token, nanoGPT/PaLM style: 6N for the matmul weights plus 12*L*H*Q*T for attention."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        n -= self.transformer.wpe.weight.numel() if c.arch == "gpt2" else self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    def configure_optimizers(self, s):
        """The optimizers of settings s (train_gpt.py's names), one peak rate per group. The block matrices
        take matrix_lr: torch.optim.Muon (muon_momentum, muon_weight_decay) when optimizer="muon", whose
        orthogonalised update is the same size at every width, or AdamW when optimizer="adamw". AdamW
        (adam_beta1, adam_beta2, adam_eps) takes the rest: an untied token embedding at embedding_lr, the
        head at head_lr (gpt2's tied matrix is the head too), both with adam_weight_decay, and the gains,
        biases and gpt2's positions at scalar_lr. head_lr is set at n_embd = lr_ref_width and carried to
        other widths x (lr_ref_width / n_embd) ** head_lr_exponent: muP's rule for Adam is exponent 1 (the
        logits move by about rate x width per step), the best rate measured at widths 64-768 fell as
        width^-0.5 (bench/RECIPE.md). An embedding's input rate stays the same at every width."""
        fused = next(self.parameters()).device.type == "cuda"
        params = dict(self.named_parameters())  # a tied head appears once, as transformer.wte.weight
        matrices = [p for n, p in params.items() if n.startswith("transformer.h.") and p.dim() == 2]
        rest = [p for n, p in params.items() if n not in ("transformer.wte.weight", "lm_head.weight")
                and not (n.startswith("transformer.h.") and p.dim() == 2)]
        ref = s["lr_ref_width"]
        head_lr = s["head_lr"] * ((ref / self.config.n_embd) ** s["head_lr_exponent"] if ref else 1.0)
        tied = "lm_head.weight" not in params
        groups = [dict(name="embedding+head" if tied else "embedding", params=[params["transformer.wte.weight"]],
                       lr=head_lr if tied else s["embedding_lr"], weight_decay=s["adam_weight_decay"]),
                  dict(name="rest", params=rest, lr=s["scalar_lr"], weight_decay=0.0)]
        if not tied:
            groups.append(dict(name="head", params=[params["lm_head.weight"]], lr=head_lr,
                               weight_decay=s["adam_weight_decay"]))
        adam = dict(betas=(s["adam_beta1"], s["adam_beta2"]), eps=s["adam_eps"], fused=fused)
        if s["optimizer"] == "adamw":  # nanoGPT's recipe decays every matrix, gpt2's positions too
            groups[1:2] = [dict(name="positions", params=[p for p in rest if p.dim() >= 2], lr=s["scalar_lr"],
                                weight_decay=s["adam_weight_decay"]),
                           dict(name="rest", params=[p for p in rest if p.dim() < 2], lr=s["scalar_lr"],
                                weight_decay=0.0)]
            groups.append(dict(name="matrices", params=matrices, lr=s["matrix_lr"],
                               weight_decay=s["adam_weight_decay"]))
            return [torch.optim.AdamW([g for g in groups if g["params"]], **adam)]
        if s["optimizer"] != "muon":
            raise UserError(f"optimizer={s['optimizer']!r}: use 'muon' or 'adamw'")
        return [torch.optim.AdamW(groups, **adam),
                torch.optim.Muon([dict(name="matrices", params=matrices)], lr=s["matrix_lr"],
                                 momentum=s["muon_momentum"], weight_decay=s["muon_weight_decay"])]

    def decode_step(self, token, cache):
        """The logits (B, vocab) after one more token (B, 1) through the cached model. Its shapes never
        change, so sample.py can compile it into a CUDA graph: one launch per token instead of hundreds."""
        logits, _ = self(token, cache=cache)
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, generator=None,
                 cache=None):
        """Yield the next token (B, 1) max_new_tokens times after the prompt idx (B, T). The tokens stay
        on the device and nothing here waits for it: read them in chunks to keep the GPU busy.

        With the cache the prompt is prefilled once, then decode_step takes one token at a time. Past
        block_size the model sees the last block_size tokens (as without the cache), so each further
        token refills the cache from that window: both paths give the same tokens. Pass a KVCache to
        reuse its buffers across calls (a compiled decode_step's CUDA graph is recorded with them)."""
        block_size, last = self.config.block_size, (slice(None), [-1])
        if use_cache and cache is None:
            cache = KVCache(self.config, idx.device)
        cached = 0  # tokens in the cache, counted on the host
        token = None  # the one sampled last: decode_step's input (a slice of idx would change strides each step)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -block_size:], logits_at=last)[0][:, -1]
            elif cached in (0, block_size):  # the prompt, or a window that slid: prefill from empty
                cache.pos.zero_()
                window = idx[:, -block_size:]
                logits = self(window, cache=cache, logits_at=last)[0][:, -1]
                cached = window.size(1)
            else:
                logits = self.decode_step(token, cache)
                cached += 1
            token = sample_logits(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, token], dim=1)
            yield token

    @classmethod
    def from_checkpoint(cls, ckpt, source="checkpoint"):
        """Rebuild a model from a checkpoint dict; a mismatch names what differs, not every key."""
        fields = set(GPTConfig.__dataclass_fields__)
        unknown = sorted(set(ckpt["model_config"]) - fields)
        if unknown:
            raise UserError(f"{source}: model_config has fields this script does not know: {unknown}")
        model = cls(GPTConfig(**ckpt["model_config"]))
        model.load_weights(ckpt["model"], source)
        return model

    def load_weights(self, state, source="checkpoint"):
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            def brief(items):
                return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
            parts = [f"missing {brief(missing)}" if missing else "", f"unexpected {brief(unexpected)}" if unexpected
                     else "", f"shape {brief(shapes)}" if shapes else ""]
            c = self.config
            raise UserError(f"{source}: weights do not fit arch={c.arch} n_layer={c.n_layer} n_embd={c.n_embd} "
                            f"vocab_size={c.vocab_size}: " + "; ".join(p for p in parts if p))
        self.load_state_dict(state)

    @classmethod
    def from_hf(cls, hf_model):
        """Our arch="gpt2" model holding the weights of a transformers GPT2LMHeadModel (same logits)."""
        hf = hf_model.config
        config = GPTConfig(arch="gpt2", vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd)
        model = cls(config)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state = {k: v.t() if k.endswith(conv1d) else v for k, v in hf_model.state_dict().items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # HF's Conv1D stores weights transposed
        model.load_weights(state, "transformers GPT2LMHeadModel")
        return model

    @classmethod
    def from_pretrained(cls, name):
        """OpenAI's GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl) through transformers; vocab stays 50,257."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise UserError(f"init_from={name} needs transformers: pip install transformers") from None
        try:
            return cls.from_hf(GPT2LMHeadModel.from_pretrained(name))
        except OSError as e:
            raise UserError(f"could not load {name} weights ({str(e).splitlines()[0]}); they come from the HF Hub "
                            "or its local cache") from None


def muon_momentum_at(step, c):
    """Muon's momentum at `step`: from 0.85 up to muon_momentum over muon_momentum_warmup steps."""
    frac = min(1.0, step / c["muon_momentum_warmup"]) if c["muon_momentum_warmup"] else 1.0
    return (1 - frac) * 0.85 + frac * c["muon_momentum"]


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row of logits (B, V): greedy at temperature 0, else sample from the
    softmax restricted to the top_k tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # <= 0: a tiny temperature gives -inf
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ----------------------------------------------------------------------------- end of model

# ----------------------------------------------------------------------------- training step
# What one step computes; bench/bench_train.py times these very lines (bench/stage_code.py runs this section).


def lr_factor(step, c):
    """The learning rate at `step` as a fraction of its peak, under the schedule of settings c (this run's,
    or a checkpoint's): linear warmup over warmup_iters, then a cosine down to min_lr_frac at the end
    (lr_decay_iters or max_iters), or warmup-stable-decay ("wsd": flat, then linear down to min_lr_frac
    over the last decay_frac of the run)."""
    end = c["lr_decay_iters"] or c["max_iters"]
    if step < c["warmup_iters"]:
        return (step + 1) / c["warmup_iters"]
    if c["lr_schedule"] == "wsd":
        decay_start = end * (1 - c["decay_frac"])
        return 1 - (1 - c["min_lr_frac"]) * min(1.0, max(0.0, step - decay_start) / max(1, end - decay_start))
    progress = min(1.0, (step - c["warmup_iters"]) / max(1, end - c["warmup_iters"]))
    return c["min_lr_frac"] + (1 - c["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model, raw_model, optimizers, next_batch, grad_accum, grad_clip, autocast, ddp=False):
    """One optimizer step at the rates set_rates gave the groups: forward and backward over grad_accum
    micro-batches from next_batch(), clip, step. Each micro-batch's loss is divided by grad_accum, so the
    summed gradients are those of the mean over one big batch. Returns the step's figures (data/train.py
    read_figures), read in the step's one host sync."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(grad_accum):
        x, y = next_batch()
        # DDP all-reduces gradients on the last micro-step only; the others accumulate locally
        sync = not ddp or micro == grad_accum - 1
        with model.no_sync() if not sync else contextlib.nullcontext(), autocast:
            logits, loss = model(x, y)
        last_logits = logits[:, -1].detach().float().clone()  # (B, vocab): the logits' spread is read from these
        del logits  # not held through the backward: (B, T, vocab) is the largest activation
        (loss / grad_accum).backward()
        loss_sum += loss.detach()
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for opt in optimizers:
        opt.step()
    return read_figures(loss_sum / grad_accum, norm, raw_model, last_logits)


# ----------------------------------------------------------------------------- setup
# Every setting is checked before anything is written, so a refused run leaves no out_dir behind.
check_settings(config, positive=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "total_batch_size",
                                 "max_iters", "log_interval", "eval_interval", "checkpoint_interval", "val_tokens",
                                 "adam_eps"),
               non_negative=("matrix_lr", "muon_weight_decay", "warmup_iters", "embedding_lr", "head_lr", "scalar_lr",
                             "lr_ref_width", "head_lr_exponent", "adam_weight_decay", "muon_momentum_warmup",
                             "lr_decay_iters", "grad_clip", "hellaswag_interval", "hellaswag_limit", "sample_interval",
                             "sample_tokens", "keep_last"),
               choices=dict(arch=ARCHS, optimizer=("muon", "adamw"), lr_schedule=("cosine", "wsd"),
                            loader_mode=BatchLoader.MODES),
               fractions=("min_lr_frac", "decay_frac"),
               non_empty=("out_dir", "data_dir"),
               below_one=("adam_beta1", "adam_beta2", "muon_momentum"))
if n_embd % n_head:
    raise UserError(f"n_embd={n_embd} is not divisible by n_head={n_head}; pick n_head among the divisors of n_embd")
refuse_run_dir_clobber(out_dir, [(data_dir, "--data_dir"), (hellaswag_file, "--hellaswag_file")])
ddp, rank, world_size, device = init_distributed(device)
master = rank == 0  # rank 0 alone writes logs and checkpoints
device_type = torch.device(device).type
dtype, autocast = pick_autocast(device, dtype)
torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
torch.manual_seed(seed)  # every rank builds the same initial weights

# total_batch_size tokens per step = world_size ranks x grad_accum micro-steps x batch_size x block_size
tokens_per_micro = batch_size * block_size * world_size
if total_batch_size % tokens_per_micro:
    raise UserError(f"total_batch_size={total_batch_size} must be a multiple of batch_size * block_size * "
                    f"world_size = {batch_size} * {block_size} * {world_size} = {tokens_per_micro}")
grad_accum = total_batch_size // tokens_per_micro

# Data problems surface here, before anything is written to out_dir.
loader = BatchLoader(data_dir, "train", batch_size, block_size, seed=seed, rank=rank, world_size=world_size,
                     mode=loader_mode, device=device)
val_data = ValData(data_dir, batch_size, block_size, val_tokens, rank=rank, world_size=world_size, device=device)
hellaswag_examples, hellaswag_note = None, ""
if hellaswag_interval > 0:
    if Path(hellaswag_file).is_file():
        hellaswag_examples = load_hellaswag(hellaswag_file, limit=hellaswag_limit)
    else:
        hellaswag_note = (f"hellaswag: {hellaswag_file} not found, so no HellaSwag scores this run; fetch it with "
                          f"python eval_hellaswag.py --download_only, or set --hellaswag_interval=0")

checkpoint = None  # the dict to resume from
if init_from == "resume":
    checkpoint = load_checkpoint(out_dir, device)
    if checkpoint.get("chat"):
        raise UserError(f"{out_dir}/ckpt.pt was written by finetune_sft.py; resume it with "
                        f"python finetune_sft.py --out_dir={out_dir} --init_from=resume")
    check_resumable(checkpoint, f"{out_dir}/ckpt.pt")
    model = GPT.from_checkpoint(checkpoint, f"{out_dir}/ckpt.pt")
    refuse_architecture_change(checkpoint["config"], config, f"{out_dir}/ckpt.pt",
                               [f for f in GPTConfig.__dataclass_fields__ if f != "block_size"])
elif init_from == "scratch":
    refuse_to_overwrite(out_dir)
    model = GPT(GPTConfig.from_settings(config))
elif init_from.startswith("gpt2"):
    refuse_to_overwrite(out_dir)
    model = GPT.from_pretrained(init_from)
else:
    raise UserError(f"init_from={init_from!r}: use scratch, resume or a GPT-2 name such as gpt2")
if model.config.block_size < block_size:
    raise UserError(f"block_size={block_size} is longer than the model's {model.config.block_size}")
model.to(device)
# Three views of one set of weights:
#   raw_model  the plain module: optimizers, checkpoints (plain parameter names), sampling, HellaSwag
#   compiled   torch.compile's wrapper (CUDA): the fast forward for training and val loss
#   model      compiled, wrapped in DDP under torchrun: the training forward, which all-reduces gradients
raw_model = model
if checkpoint is None:
    optimizers = raw_model.configure_optimizers(config)  # the optimizer settings above
else:  # a resume takes this run's settings, the checkpoint's moments
    optimizers = resume_optimizers(checkpoint, raw_model, config, f"{out_dir}/ckpt.pt")
base_lrs = [[group["lr"] for group in opt.param_groups] for opt in optimizers]  # this run's peaks, scaled each step
if compile and device_type == "cuda":
    model = torch.compile(model)
compiled = model
if ddp:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device_type == "cuda" else None)

step, best_val_loss, evaluated = 0, float("inf"), False  # evaluated: this step's evals are logged
if checkpoint is not None:  # the loader's position and every RNG continue: bitwise the steps of an unbroken run
    step, best_val_loss, evaluated = restore(checkpoint, loader)
    saved = checkpoint["config"]
    del checkpoint  # the weights now live in the model: free the copy

wandb_run = start_wandb(wandb_project, wandb_run_name, config) if wandb_log and master else None  # before any write
lock = lock_run_dir(out_dir) if master else None  # one run per out_dir: a second one is refused
log = RunLog(out_dir, __file__, config, resume_step=step if init_from == "resume" else None, enabled=master,
             wandb=wandb_run)
flops_per_token = raw_model.flops_per_token()
peak_flops = peak_flops or gpu_peak_flops(device)
n_params = sum(p.numel() for p in raw_model.parameters())
log.print(f"model: {n_params / 1e6:.1f}M parameters, {flops_per_token / 1e6:.0f} MFLOPs/token | device {device} "
          f"{dtype} | {world_size} rank(s) x {grad_accum} micro-steps x {batch_size} x {block_size} tokens "
          f"= {total_batch_size:,} tokens/step")
log.print(f"data: {data_dir}, {int(loader.reader.starts[-1]):,} train tokens in {len(loader.reader.files)} "
          f"shards, {val_data.tokens:,} val tokens" + (f"; resumed at step {step}" if step else ""))
epochs = max_iters * total_batch_size / (loader.n_windows * block_size)  # the loader's epoch: all its windows once
log.print(f"this run: {max_iters:,} steps x {total_batch_size:,} tokens = {max_iters * total_batch_size:,} tokens, "
          f"{epochs:.3g} epochs of the train split")
if loader_mode == "bos":
    log.print(f"loader_mode=bos: {loader.n_windows:,} windows, one at each document start, hold "
              f"{loader.trained_share():.0%} of the train tokens (the rest lie past a document's first "
              f"{block_size + 1})")
if val_data.short_by_split:
    log.print(f"warning: the val split holds {val_data.tokens:,} tokens in whole batches, fewer than "
              f"val_tokens={val_tokens:,}, so the val loss is noisier; prepare a larger val split (the prep's "
              "--val_fraction) or lower --val_tokens")
if epochs > 1:
    log.print(f"warning: the run repeats the train split {epochs:.3g} times; prepare more tokens "
              "(python data/fineweb_edu.py --max_tokens=...) or lower max_iters")
if hellaswag_note:
    log.print(hellaswag_note)
if step >= max_iters:
    log.print(f"the run is already at max_iters={max_iters}: nothing to train; to go on, pass a larger --max_iters "
              "(set --lr_decay_iters to the final length from the start, so the schedule stays smooth)")
log.print(f"peak rates: {group_rates(optimizers, base_lrs)}; each step x the schedule's factor (lr_factor)")
if init_from == "resume":
    for note in resume_notes(saved, config, step, lr_factor):
        log.print(note)


def mfu(tokens_per_sec):
    """Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak (0 where the peak is unknown)."""
    return flops_per_token * tokens_per_sec / (peak_flops * world_size) if peak_flops else 0.0


def write_checkpoint():
    """Everything a run needs to continue exactly. The weights are finite: the NaN guard has read their
    norm after every step."""
    if master:
        save_checkpoint({
            "model": raw_model.state_dict(), "model_config": asdict(raw_model.config), "chat": False,
            "config": config, "step": step, "best_val_loss": best_val_loss, "evals_done": evaluated,
            "optimizers": [opt.state_dict() for opt in optimizers], "loader": loader.state_dict(),
            "rng": rng_states(),
        }, out_dir, step, keep_last)
        log.print(f"step {step}: checkpoint written to {out_dir}/ckpt.pt")


# ----------------------------------------------------------------------------- training loop
stop_requested = StopRequest()  # Ctrl-C / SIGTERM: finish the step, checkpoint, exit; a second Ctrl-C exits at once
start_step = step  # a resumed run does not rewrite the checkpoint it started from
tokens_since, time_since, logged_step = 0, time.perf_counter(), step
run_start = time_since
while True:
    last_step = step >= max_iters

    # Evaluate first, so step 0 measures the untrained model and the last step the final one.
    # A resumed run starts with evaluated=True when its start step's evaluations are logged already.
    record = {}
    if not evaluated and (step % eval_interval == 0 or last_step):
        val_loss = evaluate(compiled, val_data, autocast, stop_requested, ddp, device)  # compiled: no DDP, no grads
        if val_loss is None:  # Ctrl-C cut the val pass short: checkpoint now; a resumed run evaluates this step
            log.print(f"step {step}: interrupted by signal during evaluation")
            break
        record["val_loss"] = val_loss
        best_val_loss = min(best_val_loss, val_loss)
    if not evaluated and hellaswag_examples and step > 0 and (step % hellaswag_interval == 0 or last_step):
        with autocast:  # raw_model: the batches of endings vary in length, which would recompile the compiled one
            record["hellaswag"] = hellaswag_score(raw_model, hellaswag_examples, device, rank=rank,
                                                  world_size=world_size)["acc_norm"]
            record["hellaswag_rows"] = len(hellaswag_examples)
    if not evaluated and master and sample_interval > 0 and step > 0 and (step % sample_interval == 0 or last_step):
        enc = get_tokenizer()
        prompt = torch.tensor([[EOT, *enc.encode_ordinary(sample_prompt)]], device=device)
        with autocast:
            out = [t.item() for t in raw_model.generate(prompt, sample_tokens, temperature=0.8, top_k=200)]
        log.print(f"step {step} sample: {sample_prompt}{enc.decode(out)!r}")
    if record:
        log.evals(step, record)
    evaluated = True
    if last_step:
        break
    if step > start_step and step % checkpoint_interval == 0:
        write_checkpoint()

    set_rates(optimizers, base_lrs, lr_now := lr_factor(step, config), muon_momentum_at(step, config))
    figures = train_step(model, raw_model, optimizers, loader.next_batch, grad_accum, grad_clip, autocast, ddp)
    step += 1
    evaluated = False
    tokens_since += total_batch_size
    stop_if_diverged(figures, step, out_dir, log)  # before anything evaluates, samples or saves these weights
    if step % log_interval == 0 or step == max_iters:
        now = time.perf_counter()
        tps = tokens_since / (now - time_since)
        rec = {"step": step, **figures, "lr_factor": lr_now, "tokens_per_sec": tps, "mfu": mfu(tps),
               "epoch": loader.epoch}
        eta = (now - run_start) / (step - start_step) * (max_iters - step)  # evals and checkpoints included
        log.print(f"step {step}/{max_iters}: loss {rec['loss']:.4f}, lr x{lr_now:.3f}, grad norm "
                  f"{rec['grad_norm']:.3f}, param norm {rec['param_norm']:.1f}, head norm {rec['head_norm']:.1f}, "
                  f"logit std {rec['logit_std']:.2f}, epoch {rec['epoch']:.3f}, {tps:,.0f} tok/s, "
                  f"{1000 * (now - time_since) / (step - logged_step):.0f} ms/step"
                  + (f", MFU {rec['mfu']:.1%}" if peak_flops else "")  # no peak known (CPU, MPS): no MFU
                  + f" | {duration(now - run_start)} elapsed, ETA {duration(eta)}")
        log.metrics(rec)
        tokens_since, time_since, logged_step = 0, time.perf_counter(), step
    if stop_requested(ddp, device):
        log.print(f"step {step}: interrupted by signal")
        break

write_checkpoint()
log.close()  # the final curves.png
finish(ddp)
