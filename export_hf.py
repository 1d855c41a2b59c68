"""
Export a checkpoint as a Hugging Face transformers folder, so the model goes where other models go:
the HF Hub, transformers, lm-evaluation-harness, vLLM.

    python export_hf.py --ckpt=logs/gpt2_124m --out_dir=hf/gpt2_124m
    python export_hf.py --ckpt=logs/sft --out_dir=hf/sft                 # an SFT checkpoint: with its chat template
    python export_hf.py --ckpt=logs/smoke --out_dir=/tmp/hf_smoke --save_dtype=bfloat16

and then, offline:

    AutoModelForCausalLM.from_pretrained("hf/gpt2_124m"), AutoTokenizer.from_pretrained("hf/gpt2_124m")
    lm_eval --model hf --model_args pretrained=hf/gpt2_124m --tasks hellaswag --batch_size 16

arch="gpt2" becomes a GPT2LMHeadModel (HF's Conv1D stores the four block matrices transposed; the
head stays tied), arch="llama" a LlamaForCausalLM (q, k, v split out of the fused c_attn, gate and up
out of the fused c_fc, and the RoPE convention converted, see hf_state_dict). What neither class can
express (qk_norm, logit_softcap: any model option beyond HF_FIELDS, away from its default) is refused.
The folder holds config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and a README.md model card. Before the folder appears, transformers loads it
back and must give our logits and our token ids (check=True). It is written beside out_dir and swapped in
whole: a failed, interrupted or disk-full export leaves the earlier one as it was. --overwrite replaces an
earlier export only (a folder holding any other file is refused), and never the checkpoint it reads; an
out_dir that is a link keeps pointing at the new export.

The tokenizer puts <|endoftext|> before every text, as each training document began (as Llama's tokenizers
add their BOS; add_special_tokens=False leaves it out), then exactly our ids: GPT-2's BPE from
data/gpt2.tiktoken (vocab and merges rebuilt from its ranks), <|endoftext|> = 50256, <|user|> = 50257,
<|assistant|> = 50258; len(tokenizer) is 50,259. The model keeps its 50,304 rows: ids 50259..50303 are
padding for fast matmuls, never a training target (so a trained model gives them vanishing probability),
and they decode to nothing.
Like every HF chat tokenizer, it turns the strings "<|user|>" etc. into their control ids wherever
they appear in the text (apply_chat_template needs that); our data/tokenizer.py encodes user text
with encode_ordinary, as plain characters. tokenizer(text, split_special_tokens=True) gives our ids
for such text too. Chat checkpoints get a chat_template that renders ours:
<|endoftext|> then <|user|>{prompt}<|assistant|>{reply}<|endoftext|> per turn.

Settings: the block below, then --key=value (or --key value).
The sections: settings, model (the same text in every stage script), export, main.
"""

import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, one_line_errors, refuse_clobber
from data.checkpoint import load_checkpoint, resolve_checkpoint
from data.settings import check_settings, parse_settings
from data.tokenizer import ASSISTANT, EOT, USER, VOCAB_SIZE, get_tokenizer

one_line_errors()

# ----------------------------------------------------------------------------- settings
ckpt = ""  # checkpoint file or run dir; "" = the newest logs/*/ckpt.pt
out_dir = ""  # the folder to write; "" = hf/<name of the checkpoint's run dir>
save_dtype = "float32"  # the stored weights: "float32" (exactly ours) or "bfloat16" (half the size)
check = True  # load the folder back with transformers and compare logits and token ids with ours first
overwrite = False  # replace an earlier export in out_dir (a link to one: its target, the link stays)

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

# ----------------------------------------------------------------------------- export
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
SPECIAL_TOKENS = {"<|endoftext|>": EOT, "<|user|>": USER, "<|assistant|>": ASSISTANT}
# data/tokenizer.py's template in Jinja: <|endoftext|> before the first turn (sample.py and the SFT data do
# the same: every pretraining document starts after one), then <|user|>{prompt}<|assistant|>{reply}<|endoftext|>
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != ['user', 'assistant'][loop.index0 % 2] %}"
    "{{ raise_exception('this model knows user and assistant turns only, alternating, starting with the user') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% else %}{{ '<|assistant|>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# what the check feeds both models: Unicode, emoji, whitespace runs, a marker string inside ordinary text
CHECK_TEXT = "The café's naïve 日本語 robot 🤖 said:\n\n   \"<|user|> is just text here\"\t\ttabs  and  spaces. 3.14159"


HF_FIELDS = ("arch", "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "rope_theta")  # what HF_CLASS holds


def refuse_unsupported(c, source):
    """Plain GPT-2 and Llama have no switch for our other model options (qk_norm, logit_softcap, any added
    later): exporting one away from its default would change the model."""
    default = GPTConfig()
    extras = [f"{f}={getattr(c, f)}" for f in GPTConfig.__dataclass_fields__
              if f not in HF_FIELDS and getattr(c, f) != getattr(default, f)]
    if extras:
        raise UserError(f"{source}: {' and '.join(extras)} cannot be expressed by transformers' {HF_CLASS[c.arch]}; "
                        "only models trained without them export")


def hf_config(c, state):
    """The transformers config of our model: GPT2Config or LlamaConfig, vocab kept at our padded size."""
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=c.vocab_size, bos_token_id=EOT, eos_token_id=EOT, architectures=[HF_CLASS[c.arch]])
    if c.arch == "gpt2":  # no dropout: we train without it, so fine-tuning in transformers should too
        return GPT2Config(n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                          activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, tie_word_embeddings=True, **common)
    return LlamaConfig(hidden_size=c.n_embd, intermediate_size=state["transformer.h.0.mlp.c_fc.weight"].size(0) // 2,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                       head_dim=c.n_embd // c.n_head, max_position_embeddings=c.block_size, rms_norm_eps=1e-6,
                       rope_theta=c.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False, **common)


def hf_state_dict(c, state):
    """Our weights under the names and layouts of GPT2LMHeadModel or LlamaForCausalLM."""
    if c.arch == "gpt2":  # the same names; HF's Conv1D keeps its weight as (in, out), nn.Linear as (out, in)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        return {k: v.t().contiguous() if k.endswith(conv1d) else v for k, v in state.items()}
    # RoPE: apply_rope turns channel pair (i, i + D/2) of a head by -angle, HF's rotate_half by +angle.
    # Negating the second half of each head's q and k channels (rows of q_proj and k_proj) maps one onto
    # the other: HF(flip q) = flip(ours(q)), and the dot product q.k of two flipped vectors is unchanged.
    C, H = c.n_embd, c.n_head
    flip = torch.ones(H, 2, C // H // 2)
    flip[:, 1] = -1
    flip = flip.view(C, 1)
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"], "lm_head.weight": state["lm_head.weight"]}
    for i in range(c.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.c_attn.weight"].split(C)
        gate, up = state[ours + "mlp.c_fc.weight"].chunk(2)  # SwiGLU: silu(gate) * up
        out |= {hf + "input_layernorm.weight": state[ours + "ln_1.weight"],
                hf + "self_attn.q_proj.weight": q * flip, hf + "self_attn.k_proj.weight": k * flip,
                hf + "self_attn.v_proj.weight": v, hf + "self_attn.o_proj.weight": state[ours + "attn.c_proj.weight"],
                hf + "post_attention_layernorm.weight": state[ours + "ln_2.weight"],
                hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up,
                hf + "mlp.down_proj.weight": state[ours + "mlp.c_proj.weight"]}
    return {k: v.contiguous() for k, v in out.items()}


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, the alphabet of its vocab and merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def bpe_merges(ranks):
    """The merge that makes each token of two or more bytes, in rank order: BPE replayed on the token's
    bytes with the merges ranked below it ends in the two parts it was made of. This rebuilds OpenAI's
    merges file (vocab.bpe) exactly, from the ranks alone."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            best, i = min(pairs)
            if best >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked merges")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def hf_tokenizer(vocab_size, block_size, chat):
    """(tokenizer.json text, tokenizer_config.json dict) of a byte-level BPE tokenizer giving our ids.
    The config is written by hand in the form transformers 4 and 5 both read."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    enc = get_tokenizer()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT)}
    alphabet = bytes_to_unicode()

    def text(token):
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): i for token, i in ranks.items()}
    merges = [(text(a), text(b)) for a, b in bpe_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # GPT-2's pre-tokenizer regex; tiktoken's r50k pattern splits every text the same way
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # <|endoftext|> first, as Llama's tokenizers add their BOS: every training document started after one, and
    # without it the model continues a text it never saw (generate from bare "Once upon a time" degrades)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B:1",
                                      special_tokens=[("<|endoftext|>", EOT)])])
    tokenizer.decoder = decoders.ByteLevel()
    specials = [name for name, i in SPECIAL_TOKENS.items() if i < vocab_size]  # a 50,257-row model has no chat ids
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    assert all(tokenizer.token_to_id(name) == SPECIAL_TOKENS[name] for name in specials)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "additional_special_tokens": specials[1:], "model_max_length": block_size,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
    }
    if chat:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    return tokenizer.to_str(pretty=True), tokenizer_config


def count(n):
    """1234 -> 1.2K, 10485760000 -> 10.5B: a count at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def run_facts(checkpoint, ckpt_path):
    """What the model card says about the run: how much it trained, its val loss and HellaSwag, how it was made."""
    cfg, step, run_dir = checkpoint.get("config") or {}, checkpoint.get("step"), Path(ckpt_path).parent
    facts = {}
    if isinstance(step, int) and "total_batch_size" in cfg:  # train_gpt.py
        facts["tokens trained"] = f"{count(cfg['total_batch_size'] * step)} ({step:,} steps x " \
                                  f"{cfg['total_batch_size']:,} tokens)"
    elif isinstance(step, int) and "gradient_accumulation_steps" in cfg:  # finetune_sft.py
        examples = step * cfg.get("batch_size", 0) * cfg["gradient_accumulation_steps"]
        facts["fine-tuning"] = f"{step:,} steps, {examples:,} examples, from {cfg.get('init_from', '?')}"
    records = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash
    vals = [r for r in records if isinstance(r, dict) and isinstance(r.get("val_loss"), (int, float))]
    best = checkpoint.get("best_val_loss")
    if vals:
        facts["val loss"] = f"{vals[-1]['val_loss']:.4f} at step {vals[-1].get('step', '?')}"
        if isinstance(best, float) and math.isfinite(best) and best < vals[-1]["val_loss"]:
            facts["val loss"] += f" (best {best:.4f})"
    elif isinstance(best, float) and math.isfinite(best):
        facts["val loss"] = f"{best:.4f} (best)"
    scores = [r for r in records if isinstance(r, dict) and isinstance(r.get("hellaswag"), (int, float))]
    if scores:
        limit = cfg.get("hellaswag_limit", 0)
        facts["HellaSwag acc_norm"] = (f"{scores[-1]['hellaswag']:.4f} at step {scores[-1].get('step', '?')}, "
                                       + (f"first {limit} val examples" if limit else "all 10,042 val examples")
                                       + " (eval_hellaswag.py's convention)")
    log_path = run_dir / "log.txt"
    commands = [line.removeprefix("command: ") for line in log_path.read_text(errors="replace").splitlines()
                if line.startswith("command: ")] if log_path.is_file() else []
    return facts, commands


def model_card(name, c, n_params, chat, facts, commands, save_dtype):
    shape = f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.block_size}"
    rows = {"architecture": f"{HF_CLASS[c.arch]} (arch={c.arch}): {shape}", "parameters": f"{n_params / 1e6:.1f}M",
            **facts, "weights": f"{save_dtype}, safetensors",
            "vocab": f"{c.vocab_size:,} rows; the tokenizer has {min(c.vocab_size, ASSISTANT + 1):,} tokens "
                     "(GPT-2's BPE, <|user|>, <|assistant|>), the rest are padding",
            "chat": "yes: tokenizer.apply_chat_template renders <|user|>{prompt}<|assistant|>{reply}<|endoftext|>"
                    if chat else "no: a base model, it continues text"}
    made = "\n".join(f"    {command}" for command in commands) or "    (no log.txt next to the checkpoint)"
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"tags:\n- {c.arch}\n- {'chat' if chat else 'base'}\n---\n\n"
        f"# {Path(name).name}\n\n"
        "| | |\n|---|---|\n" + "".join(f"| {k} | {v.replace('|', chr(92) + '|')} |\n" for k, v in rows.items())
        + "\n"
        f"Trained with:\n\n{made}\n\n"
        f"Exported with:\n\n    python {' '.join(['export_hf.py', *sys.argv[1:]])}\n\n"
        "Use:\n\n"
        "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"    model = AutoModelForCausalLM.from_pretrained(\"{name}\")\n"
        f"    tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n\n"
        "A text starts after <|endoftext|>, as every training document did: the tokenizer puts it first "
        "(add_special_tokens=False leaves it out). It also turns the literal "
        "strings <|endoftext|>, <|user|> and <|assistant|> into their control ids; pass "
        "split_special_tokens=True to keep them as plain text.\n"
    )


def write_folder(folder, name, model, checkpoint, ckpt_path, save_dtype):
    """The whole export, into folder: weights and configs, tokenizer files, model card."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    c, chat = model.config, bool(checkpoint.get("chat"))
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    hf_cfg = hf_config(c, state)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    hf.load_state_dict(hf_state_dict(c, state))  # strict: every name and shape must match
    hf.generation_config = GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)
    hf.to(getattr(torch, save_dtype)).save_pretrained(folder, safe_serialization=True)
    if c.arch == "llama":  # transformers 5 writes rope_parameters only; 4.x (and what pins it) reads rope_theta
        hf_json = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**hf_json, "rope_theta": c.rope_theta}, indent=2) + "\n")
    tokenizer_json, tokenizer_config = hf_tokenizer(c.vocab_size, c.block_size, chat)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    facts, commands = run_facts(checkpoint, ckpt_path)
    n_params = sum(p.numel() for p in model.parameters())
    card = model_card(name, c, n_params, chat, facts, commands, save_dtype)
    (folder / "README.md").write_text(card, encoding="utf-8")
    umask = os.umask(0o022)  # transformers 5 writes model.safetensors readable by its owner only:
    os.umask(umask)  # give it the mode of the other files, so that a server running as another user can read it
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@torch.no_grad()
def check_folder(folder, model, chat, save_dtype, source):
    """transformers, loading the folder, must give our token ids and (for our weights rounded to save_dtype
    and run in fp32) our logits. Returns the largest logit difference."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.tokenizer import render_chat

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ours = get_tokenizer().encode_ordinary(CHECK_TEXT)
    theirs = tokenizer(CHECK_TEXT, split_special_tokens=True)["input_ids"]
    if theirs != [EOT, *ours]:
        raise UserError(f"export check: the exported tokenizer gives other ids than ours on {CHECK_TEXT!r}")
    if chat:
        turns = [("What is 2 + 2?", "4."), ("And 3 + 3?", "6.")]
        messages = [m for prompt, reply in turns for m in ({"role": "user", "content": prompt},
                                                           {"role": "assistant", "content": reply})]
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        if rendered != [EOT, *render_chat(turns)[0]]:
            raise UserError("export check: the chat template does not render data/tokenizer.py's template")
    reference = copy.deepcopy(model).float()
    for p in reference.parameters():
        p.data = p.data.to(getattr(torch, save_dtype)).float()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    idx = torch.tensor([[EOT, *ours][: model.config.block_size]])
    expected, _ = reference(idx)
    if not torch.isfinite(expected).all():  # finite weights whose products overflow: the model itself cannot run
        raise UserError(f"{source}: the model's own logits are not finite (its weights overflow float32"
                        f"{' once rounded to bfloat16' if save_dtype == 'bfloat16' else ''}), so no export of it "
                        "can run; use an earlier checkpoint")
    got = hf(idx).logits
    diff = (got - expected).abs().max().item()
    if not diff <= 1e-4 * max(1.0, expected.abs().max().item()):
        raise UserError(f"export check: transformers' logits differ from ours by up to {diff:.3g}; the export is wrong "
                        "(please report it)")
    return diff


EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "README.md")
EXTRA_BYTES = 8 * 2**20  # an export's files beside its weights (tokenizer.json is 3.6 MB), with room to spare


def export_file(path):
    """Whether path is a file an export writes (a large model's weights come in numbered shards)."""
    return path.is_file() and (path.name in EXPORT_FILES or bool(re.fullmatch(r"model-\d+-of-\d+\.safetensors",
                                                                               path.name)))


def full_disk(e):
    """Whether an error is a full disk or quota: an OSError, or safetensors' error naming the OS error."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(e, "errno", None) in codes or any(f"(os error {code})" in str(e) for code in codes)


def disk_full(folder, need, out):
    free = shutil.disk_usage(folder).free
    short = need - free if need > free else need  # the disk filled from elsewhere meanwhile: the whole export
    return UserError(f"disk full: free {math.ceil(short / 2**20)} MB in {folder} (the export takes about "
                     f"{math.ceil(need / 2**20)} MB, {free // 2**20} MB are free) and export again; "
                     f"{out} is as it was")


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too runs the export's clean-up, so no half-written folder stays


# ----------------------------------------------------------------------------- main
check_settings(config, choices=dict(save_dtype=("float32", "bfloat16")))
ckpt_path = resolve_checkpoint(ckpt)
out = Path(out_dir or Path("hf") / Path(ckpt_path).resolve().parent.name)
try:
    real = out.resolve()  # a link is followed: its target is replaced, and the link stays
except (OSError, RuntimeError) as e:  # a loop of links
    raise UserError(f"--out_dir={out} cannot be followed ({e}); pick another --out_dir") from None
refuse_clobber([(out, "--out_dir", True)], [(ckpt_path, "--ckpt")])
parent = next(p for p in real.parents if p.exists())  # where the export is staged, checked before any work
if (real.exists() and not real.is_dir()) or not parent.is_dir():
    raise UserError(f"--out_dir={out}: {real if real.exists() else parent} is a file; pick another --out_dir")
if not os.access(parent, os.W_OK):
    raise UserError(f"--out_dir={out}: {parent} is not writable; pick another --out_dir")
if real.exists() and any(real.iterdir()):
    if not overwrite:
        raise UserError(f"--out_dir={out} already exists; pass --overwrite to replace it, or pick another --out_dir")
    stray = next((p for p in sorted(real.iterdir()) if not export_file(p)), None)
    if stray is not None:
        raise UserError(f"--out_dir={out} holds {stray.name}, which no export writes and --overwrite would delete "
                        "(it replaces an earlier export only); move it out or pick another --out_dir")
checkpoint = load_checkpoint(ckpt_path, "cpu")
model = GPT.from_checkpoint(checkpoint, ckpt_path).eval()
refuse_unsupported(model.config, ckpt_path)
need = sum(p.numel() for p in model.parameters()) * getattr(torch, save_dtype).itemsize + EXTRA_BYTES
if shutil.disk_usage(parent).free < need:
    raise disk_full(parent, need, out)
try:
    import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
    import tokenizers  # noqa: F401
    import transformers
except ImportError as e:
    raise UserError(f"export_hf.py needs transformers, tokenizers and safetensors ({e}); "
                    "pip install transformers safetensors") from None
transformers.logging.set_verbosity_error()  # its notes on generation defaults are not the user's business
transformers.logging.disable_progress_bar()  # nor its bars over one file

# Written next to out_dir and swapped into place at the end: an export that fails leaves the earlier one as it was.
started = time.time()
signal.signal(signal.SIGTERM, interrupt)
real.parent.mkdir(parents=True, exist_ok=True)
tmp, old = (real.with_name(f"{real.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
try:
    tmp.mkdir()
    write_folder(tmp, str(out), model, checkpoint, ckpt_path, save_dtype)
    diff = check_folder(tmp, model, bool(checkpoint.get("chat")), save_dtype, ckpt_path) if check else None
    if real.exists():
        os.replace(real, old)
    os.replace(tmp, real)
except BaseException as e:
    if old.exists() and not (real.exists() and tmp.exists()):  # stopped within the swap: the earlier export returns
        if not tmp.exists():
            os.replace(real, tmp)
        os.replace(old, real)
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, Exception) and full_disk(e):
        raise disk_full(real.parent, need, out) from None
    raise
shutil.rmtree(old, ignore_errors=True)
c = model.config
print(f"exported {ckpt_path} (arch={c.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
      f"step {checkpoint.get('step', '?')}{', chat' if checkpoint.get('chat') else ''}) to {out}/ as "
      f"{HF_CLASS[c.arch]}, {save_dtype} weights, in {time.time() - started:.1f} s")
if check:
    print(f"check: transformers loads {out}/ and gives our token ids and our logits (max |difference| {diff:.2g})")
