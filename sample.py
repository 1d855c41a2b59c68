"""
Sample from a trained GPT; the text streams to stdout as it is generated.

    python sample.py "Once upon a time"                            # the newest logs/*/ckpt.pt
    python sample.py "The meaning of life is" --ckpt=logs/gpt2_124m --num_samples=3 --temperature=0.8
    python sample.py "Name three primary colors." --ckpt=logs/sft  # an SFT checkpoint: chat, only the reply
    python sample.py "Once upon a time" --ckpt=logs/sft --chat=false  # an SFT checkpoint as plain text
    python sample.py --interactive --ckpt=logs/sft                 # a conversation: a prompt per line, /reset, EOF
    python sample.py --prompt_file=prompt.txt --temperature=0      # greedy
    python sample.py --serve --ckpt=logs/sft                       # a chat UI and an OpenAI API on port 8000

Every prompt starts after an <|endoftext|>, where each pretraining document starts; an empty
prompt is <|endoftext|> alone. Generation stops at <|endoftext|> (in chat mode at <|user|> and
<|assistant|> too) or after max_new_tokens.

Settings: the block below, then --key=value (or --key value); the bare words are the prompt.
"""

import codecs
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, one_line_errors
from data.checkpoint import load_checkpoint, resolve_checkpoint
from data.run import pick_autocast, pick_device
from data.settings import check_settings, parse_settings
from data.tokenizer import ASSISTANT, EOT, USER, VOCAB_SIZE, chat_context, get_tokenizer

one_line_errors()

# ----------------------------------------------------------------------------- settings
prompt = ""  # the text to continue (the bare words on the command line); "" = start from <|endoftext|>
ckpt = ""  # checkpoint file or run dir; "" = the newest logs/*/ckpt.pt
prompt_file = ""  # read the prompt from this file instead
num_samples = 1
max_new_tokens = 256
temperature = 0.8  # 0 = greedy
top_k = 200  # sample only from the k likeliest tokens; 0 = off
top_p = 1.0  # sample only from the smallest set of tokens whose probability reaches p; 1.0 = off
seed = 1337  # the same seed gives the same text
chat = "auto"  # "auto": true for SFT checkpoints; "true": the chat template, print only the reply; "false": plain text
interactive = False  # read prompts from stdin, one per line, until EOF or an empty line; a chat remembers (/reset)
use_cache = True  # KV cache: after the prompt, each forward takes one token
stream_chunk = 8  # tokens printed at a time: one wait for the GPU per chunk instead of one per token
device = "auto"  # "auto" (cuda > mps > cpu), "cuda", "mps", "cpu"
dtype = "auto"  # the weights' dtype: "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16" or "float32"
compile = False  # compile the one-token step into a CUDA graph: several times faster decoding after ~1 min
serve = False  # serve the model: a chat UI at http://host:port/ and an OpenAI-compatible API (pip install ".[serve]")
host = "127.0.0.1"  # --serve: the address to listen on; "0.0.0.0" lets other machines in
port = 8000  # --serve: 0 = any free port
max_queue = 64  # --serve: requests that may wait while one decodes (one at a time); one more is told 429

config = parse_settings(globals(), sys.argv[1:], positional="prompt")
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

# ----------------------------------------------------------------------------- setup
check_settings(config, positive=("max_new_tokens", "num_samples", "stream_chunk", "max_queue"),
               non_negative=("temperature", "top_k"), choices=dict(chat=("auto", "true", "false")))
if not 0 < top_p <= 1:
    raise UserError(f"--top_p={top_p}: must be in (0, 1]; 1 = off")
if prompt and prompt_file:
    raise UserError("a prompt and --prompt_file both give the prompt; pass one")
if interactive and (prompt or prompt_file):
    raise UserError("--interactive reads the prompts from stdin; drop the prompt argument and --prompt_file")
if serve and (prompt or prompt_file or interactive):
    raise UserError("--serve takes its prompts over HTTP; drop the prompt argument, --prompt_file and --interactive")
if not 0 <= port <= 65535:
    raise UserError(f"--port={port}: must be from 0 to 65535 (0 = any free port)")
try:
    prompt.encode("utf-8")
except UnicodeEncodeError as e:  # Python hands on the bytes of argv that are not UTF-8 as lone surrogates
    raise UserError(f"the prompt is not valid UTF-8 (character {e.start + 1}); pass UTF-8 text, or save it as UTF-8 "
                    "and pass --prompt_file") from None
if prompt_file:
    if Path(prompt_file).is_dir():
        raise UserError(f"--prompt_file={prompt_file} is a folder; pass the text file that holds the prompt")
    if not Path(prompt_file).is_file():
        raise UserError(f"--prompt_file={prompt_file}: file not found")
    try:
        prompt = Path(prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt_file={prompt_file}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"--prompt_file={prompt_file}: cannot be read ({e.strerror}); check its permissions") from None
if compile and not use_cache:
    raise UserError("--compile compiles the KV-cached one-token step; drop --use_cache=False or --compile")
device = pick_device(device)
compile = compile or (serve and device == "cuda")  # a server runs long enough to repay the compile's minute
if serve:
    from data.serve import listen, serve_http

    sock = listen(host, port)  # before the model loads: a taken port is an error at once
dtype, _ = pick_autocast(device, dtype)  # the weights themselves are cast: no autocast, no fp32 copies at inference

ckpt_path = resolve_checkpoint(ckpt)
checkpoint = load_checkpoint(ckpt_path, "cpu")  # on the CPU: the optimizer state stays off the GPU
model = GPT.from_checkpoint(checkpoint, ckpt_path).to(device, getattr(torch, dtype))
model.eval()
chat = checkpoint.get("chat", False) if chat == "auto" else chat == "true"
if chat and model.config.vocab_size <= ASSISTANT:
    raise UserError(f"{ckpt_path}: vocab_size {model.config.vocab_size} has no room for the chat tokens; "
                    "pass --chat=false")
print(f"[{ckpt_path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, step "
      f"{checkpoint.get('step', '?')}{', chat' if chat else ''}]", file=sys.stderr, flush=True)
del checkpoint
cache = KVCache(model.config, device, static=compile)  # one for every sample: a CUDA graph keeps its addresses
if compile:  # fullgraph: a graph break would split the step, and the CUDA graph with it
    model.decode_step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
generator = torch.Generator(device).manual_seed(seed)
enc = get_tokenizer()


# ----------------------------------------------------------------------------- sampling
block_size = model.config.block_size
room = block_size - min(max_new_tokens, block_size // 2)  # for the prompt: the reply gets up to half the context
stops = (EOT, USER, ASSISTANT) if chat else (EOT,)  # in a chat a turn marker ends the reply, as <|endoftext|> does


def in_chunks(tokens, size):
    """The (1, 1) token tensors that generate() yields, as lists of ints, size at a time: reading a token
    waits for the GPU to finish it, so reading one at a time would leave it idle after every token."""
    chunk = []
    for token in tokens:
        chunk.append(token)
        if len(chunk) == size:
            yield torch.cat(chunk, dim=1)[0].tolist()
            chunk = []
    if chunk:
        yield torch.cat(chunk, dim=1)[0].tolist()


def replies(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator):
    """Generate after the token ids, up to a stop token or max_new_tokens, and yield the reply in chunks
    (token ids, text, stop): stop is the stop token in the last chunk, else None. The text holds each
    character once all its bytes have come (a character may be split over several tokens)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx = torch.tensor([ids], device=device)
    tokens = model.generate(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator, cache)
    for chunk in in_chunks(tokens, stream_chunk):
        end = next((i for i, t in enumerate(chunk) if t in stops), None)
        stop = None if end is None else chunk[end]
        chunk = chunk[:end]  # what the model generated after the stop token is dropped
        text = b"".join(enc.decode_single_token_bytes(t) for t in chunk if t < enc.n_vocab)  # padding ids: no text
        yield chunk, decoder.decode(text, final=stop is not None), stop
        if stop is not None:
            return
    yield [], decoder.decode(b"", final=True), None


def stream(ids):
    """Print the reply after the token ids as it comes; return its text."""
    n, reply, ended = 0, [], None
    for chunk, text, stop in replies(ids):
        n, ended = n + len(chunk), stop
        reply.append(text)
        print(text, end="", flush=True)
    print(flush=True)
    if n == 0:  # a reply of no tokens ends at a stop token
        print(f"[the model ended the {'reply' if chat else 'text'} at once ({enc.decode([ended])}); try another --seed "
              "or prompt]", file=sys.stderr)
    return "".join(reply)


def context(text, history):
    """The token ids before the reply to text, and how many of the history's (prompt, reply) turns no longer fit.
    After <|endoftext|>: the text, or in a chat the turns that fit, whole, then <|user|>{text}<|assistant|>. A chat
    prompt too long for the context loses its oldest tokens, not its markers: without them it is no chat."""
    if not chat:
        ids = [EOT, *enc.encode_ordinary(text)]
        if len(ids) > block_size:
            print(f"[the prompt is {len(ids)} tokens, longer than the context: the model sees its last {block_size}]",
                  file=sys.stderr)
        return ids, 0
    ids, dropped = chat_context(history or [], text, room)
    cut = len(ids) - max(room, 3)  # the three markers stay, even in a context too short for them and a token
    if cut > 0:  # the prompt alone is too long, so chat_context has dropped every old turn
        ids = [EOT, USER, *ids[2 + cut :]]
        print(f"[the prompt is too long for the context of {block_size} tokens with room for the reply: its first "
              f"{cut} tokens dropped]", file=sys.stderr)
    return ids, dropped


def respond(text, history=None):
    """Samples after text; in a chat with a history (a list of (prompt, reply)), the conversation so far comes
    first and the first sample's reply joins it."""
    ids, dropped = context(text, history)
    if dropped:
        print(f"[the context is full: the oldest {dropped} turn(s) dropped]", file=sys.stderr)
        del history[:dropped]
    replies = []
    for i in range(num_samples):
        if i > 0:
            print("---------------")
        if not chat:
            print(text, end="", flush=True)
        replies.append(stream(ids))
    if history is not None:
        history.append((text, replies[0]))


def stdin_prompts():
    """The lines of stdin, up to EOF or an empty line. No stdin at all (`<&-`) ends the conversation as EOF does."""
    if sys.stdin is None:
        return
    for lineno in itertools.count(1):
        if sys.stdin.isatty():
            print("> ", end="", flush=True)
        try:
            raw = sys.stdin.buffer.readline()
        except OSError as e:
            raise UserError(f"--interactive: cannot read stdin ({e.strerror}); give it a terminal, a pipe or a text "
                            "file") from None
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise UserError(f"--interactive: stdin line {lineno} is not valid UTF-8 (byte {e.start}); send UTF-8 "
                            "text") from None
        if not line.strip():
            return
        yield line


if serve:
    serve_http(sock, replies, lambda seed: torch.Generator(device).manual_seed(seed), ckpt_path.parent.name, chat,
               block_size, dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p), max_queue)
elif not interactive:
    respond(prompt)
else:  # a chat checkpoint remembers the conversation; /reset starts afresh
    history = [] if chat else None
    for line in stdin_prompts():
        if chat and line.strip() == "/reset":
            history.clear()
            print("[a new conversation]", file=sys.stderr)
            continue
        respond(line, history)
