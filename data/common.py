"""
The one module every stage script shares: the GPT-2 tokenizer with chat tokens, the
llm.c-style .bin token shards, the batch loaders, and the small run plumbing
(config parsing, checkpoints, logs, LR schedule) that the stage scripts would
otherwise each write again. The model itself lives in each stage script.
"""

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARE_HINT = "python data/fineweb_edu.py --out_dir {dir}"


class UserError(SystemExit):
    """A bad input: the message is printed as one line and the process exits with status 1."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# -----------------------------------------------------------------------------
# tokenizer: GPT-2 BPE plus two chat tokens in the padded vocabulary slots
#
# ids 0..50255 are GPT-2's BPE ranks and 50256 is <|endoftext|>. The model's
# vocab is padded to 50,304 (= 786 * 64, for fast matmuls), which leaves 47 unused
# slots; the chat template takes the first two, so each control token is ONE id.

EOT = 50256  # <|endoftext|>: prepended to every pretraining document, ends every reply
USER = 50257  # <|user|>
ASSISTANT = 50258  # <|assistant|>
VOCAB_SIZE = 50304  # 50,257 padded up to a multiple of 64


@functools.cache
def get_tokenizer():
    """tiktoken's gpt2 encoding extended with <|user|> and <|assistant|>.

    encode_ordinary() never produces special ids, so text that merely contains the
    string "<|user|>" stays ordinary text; only the template helpers below insert them.
    """
    import tiktoken

    base = tiktoken.get_encoding("gpt2")
    specials = {**base._special_tokens, "<|user|>": USER, "<|assistant|>": ASSISTANT}
    return tiktoken.Encoding(
        name="gpt2_chat", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks, special_tokens=specials
    )


def chat_prompt(prompt):
    """Token ids of `<|user|>{prompt}<|assistant|>`: what the model continues with its reply."""
    return [USER, *get_tokenizer().encode_ordinary(prompt), ASSISTANT]


def render_chat(turns):
    """Token ids and loss mask for `<|user|>{p}<|assistant|>{r}<|endoftext|>` per (p, r) turn.

    The mask is 1 exactly on the reply tokens and their closing <|endoftext|>: the
    tokens the model must learn to produce. Prompts and the markers are context only.
    """
    enc = get_tokenizer()
    ids, mask = [], []
    for prompt, response in turns:
        context = chat_prompt(prompt)
        reply = [*enc.encode_ordinary(response), EOT]
        ids += context + reply
        mask += [0] * len(context) + [1] * len(reply)
    return ids, mask


# -----------------------------------------------------------------------------
# token shards: the llm.c / modded-nanogpt .bin layout
# header of 256 int32: [0] magic, [1] version, [2] number of tokens; then the tokens as uint16

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path, tokens):
    """Write a shard atomically: a temp file renamed into place, so no half-written shard survives a crash."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if len(tokens) >= 2**31:
        raise ValueError("a shard holds at most 2**31 - 1 tokens (its count is an int32)")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_header(path):
    """Validate a shard's header and size; return its number of tokens."""
    path = Path(path)
    fix = "delete it and re-run the data prep (python data/fineweb_edu.py)"
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; {fix}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise UserError(f"{path}: magic number {header[0]} is not {MAGIC}, so this is not a .bin token shard; {fix}")
    if header[1] != VERSION:
        raise UserError(f"{path}: shard version {header[1]}, this code reads version {VERSION}; {fix}")
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        raise UserError(
            f"{path}: header promises {ntok:,} tokens ({HEADER_BYTES + 2 * ntok:,} bytes) but the file has "
            f"{size:,} bytes (truncated or partly written); {fix}"
        )
    return ntok


def read_shard(path):
    """All tokens of a shard as a uint16 array (read into memory, not memory-mapped)."""
    ntok = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        return np.fromfile(f, dtype=np.uint16, count=ntok)


def list_shards(data_dir, split):
    """The sorted `{split}_NNNNNN.bin` files in data_dir, or a clear error with the command that makes them."""
    data_dir = Path(data_dir)
    hint = PREPARE_HINT.format(dir=data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist; prepare the shards with: {hint}")
    files = sorted(data_dir.glob(f"{split}_*.bin"))
    if not files:
        raise UserError(f"no {split}_*.bin shards in {data_dir}; prepare them with: {hint}")
    return files


# -----------------------------------------------------------------------------
# batch loaders


def _to_device(buf, device):
    """uint16 (N, T+1) windows -> int64 x, y on device (torch has no uint16 arithmetic)."""
    # numpy makes the contiguous int64 copies: torch's threaded copy kernels stall on a busy CPU
    x, y = torch.from_numpy(buf[:, :-1].astype(np.int64)), torch.from_numpy(buf[:, 1:].astype(np.int64))
    if torch.device(device).type == "cuda":  # pin_memory raises on a machine without CUDA
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class ShardReader:
    """Reads token spans from a split's shards with plain file reads.

    A long-lived np.memmap makes RSS grow with every page touched (nanoGPT #287);
    reads through open file handles leave the data in the OS page cache instead.
    """

    def __init__(self, data_dir, split, min_tokens=1):
        self.files = list_shards(data_dir, split)
        self.sizes = np.array([read_header(f) for f in self.files], dtype=np.int64)
        if self.sizes.sum() < min_tokens:
            raise UserError(
                f"the {split} shards in {data_dir} hold {self.sizes.sum():,} tokens, fewer than the {min_tokens:,} "
                f"one batch needs; lower batch_size/block_size or prepare more data"
            )
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # global offset of each shard
        self._handles = {}

    def read(self, shard, offset, out):
        """Fill the uint16 array `out` from `shard` starting at token `offset`."""
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(self.files[shard], "rb", buffering=0)
        f.seek(HEADER_BYTES + 2 * int(offset))
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise UserError(f"{self.files[shard]}: short read at token {offset}; the shard changed on disk")

    def read_span(self, start, out):
        """Fill `out` from the concatenated split stream starting at global token `start` (may cross shards)."""
        pos, filled = start, 0
        while filled < len(out):
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            n = min(len(out) - filled, int(self.starts[shard + 1] - pos))
            self.read(shard, pos - self.starts[shard], out[filled : filled + n])
            pos, filled = pos + n, filled + n


class BatchLoader:
    """Training micro-batches of B sequences of T tokens, reproducible from (seed, micro-batch index).

    random (default): each micro-batch is B windows of T+1 tokens at uniformly random
    offsets over all train tokens (a shard is picked in proportion to its length), so a
    run never drifts through one long document or domain at a time.
    sequential: consecutive B*T+1 token spans of the concatenated shards, wrapping round.

    Micro-batch g is drawn from its own generator seeded by (seed, g); rank r of W
    takes g = r, r+W, r+2W, ... So ranks see disjoint streams, 2 ranks x 1 micro-step
    see the same data as 1 rank x 2 micro-steps, and the whole state is one counter.
    """

    def __init__(self, data_dir, split, batch_size, block_size, seed=0, rank=0, world_size=1,
                 mode="random", device="cpu"):
        if mode not in ("random", "sequential"):
            raise UserError(f"loader mode {mode!r}: use 'random' or 'sequential'")
        self.B, self.T, self.seed, self.mode = batch_size, block_size, seed, mode
        self.rank, self.world_size, self.device = rank, world_size, device
        self.reader = ShardReader(data_dir, split, min_tokens=batch_size * block_size + 1)
        # a window of T+1 tokens can start at offsets 0..n-T-1 of a shard of n tokens
        self.window_starts = np.maximum(self.reader.sizes - block_size, 0)
        if self.window_starts.sum() == 0:
            raise UserError(f"every {split} shard in {data_dir} is shorter than block_size+1 = {block_size + 1} tokens")
        self.cum_starts = np.cumsum(self.window_starts)
        self.position = 0  # micro-batches handed out so far, all ranks together

    def next_batch(self):
        index = self.position + self.rank
        self.position += self.world_size
        buf = np.empty((self.B, self.T + 1), dtype=np.uint16)
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, index])
            picks = rng.integers(0, self.cum_starts[-1], size=self.B)
            shards = np.searchsorted(self.cum_starts, picks, side="right")
            offsets = picks - (self.cum_starts[shards] - self.window_starts[shards])
            for row, (shard, offset) in enumerate(zip(shards, offsets, strict=True)):
                self.reader.read(int(shard), offset, buf[row])
        else:
            span = np.empty(self.B * self.T + 1, dtype=np.uint16)
            total = int(self.reader.starts[-1])
            start = (index * self.B * self.T) % (total - self.B * self.T)
            self.reader.read_span(start, span)
            buf[:, :-1] = span[:-1].reshape(self.B, self.T)
            buf[:, -1] = span[self.T :: self.T]
        return _to_device(buf, self.device)

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state):
        if (state["seed"], state["mode"]) != (self.seed, self.mode):
            raise UserError(
                f"the checkpoint's loader used seed={state['seed']} mode={state['mode']}, this run "
                f"seed={self.seed} mode={self.mode}; resume with the same settings"
            )
        if state["position"] % self.world_size:
            raise UserError(f"cannot resume loader position {state['position']} with {self.world_size} ranks")
        self.position = state["position"]


class ValData:
    """The first `val_tokens` tokens of the val split as fixed (B, T) batches: the same
    tokens at every evaluation. Rank r of W evaluates batches r, r+W, ..."""

    def __init__(self, data_dir, batch_size, block_size, val_tokens, rank=0, world_size=1, device="cpu"):
        reader = ShardReader(data_dir, "val", min_tokens=batch_size * block_size + 1)
        per_batch = batch_size * block_size
        available = int(reader.starts[-1]) - 1
        n_batches = max(1, min(val_tokens, available) // per_batch)
        span = np.empty(n_batches * per_batch + 1, dtype=np.uint16)
        reader.read_span(0, span)
        self.batches = [span[i * per_batch : (i + 1) * per_batch + 1] for i in range(n_batches)][rank::world_size]
        self.B, self.T, self.device = batch_size, block_size, device
        self.tokens = n_batches * per_batch

    def __iter__(self):
        for span in self.batches:
            buf = np.empty((self.B, self.T + 1), dtype=np.uint16)
            buf[:, :-1] = span[:-1].reshape(self.B, self.T)
            buf[:, -1] = span[self.T :: self.T]
            yield _to_device(buf, self.device)


# -----------------------------------------------------------------------------
# configuration: defaults at the top of a script < configs/*.toml < --key=value


def _coerce(key, value, default, source):
    """Convert `value` (a TOML value or a command-line string) to the type of `default`."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UserError(f"{source}: {key} must be true or false, got {value!r}")
            return text.lower() in ("true", "1", "yes")
        try:
            number = float(text)
        except ValueError:
            raise UserError(f"{source}: {key} must be {kind.__name__}, got {value!r}") from None
        if kind is int:  # "524288", "5e5" and "2**19"-free spellings of whole numbers
            if not number.is_integer():
                raise UserError(f"{source}: {key} must be a whole number, got {value!r}")
            value = int(text) if text.lstrip("+-").isdigit() else int(number)
        else:
            value = number
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise UserError(f"{source}: {key} must be {kind.__name__} like {default!r}, got {value!r}")
    return value


def parse_config(defaults, argv, positional=None):
    """Resolve a script's settings: `defaults` (name -> int/float/bool/str) overridden by any
    `configs/*.toml` files in argv, then by `--key=value` / `--key value` / bare `--flag`
    (for booleans). A bare word goes to the `positional` key, if the script has one.
    Unknown keys and ill-typed values are one-line errors."""
    config = dict(defaults)

    def check_key(key, source):
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{source}: unknown setting {key!r}{hint}; the settings are at the top of {sys.argv[0]}")

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.endswith(".toml") and not arg.startswith("--"):
            path = Path(arg)
            if not path.is_file():
                raise UserError(f"config file {arg} not found; the presets are in configs/")
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            try:
                table = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise UserError(f"{arg}: not valid TOML ({e})") from None
            for key, value in table.items():
                check_key(key, arg)
                config[key] = _coerce(key, value, defaults[key], arg)
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            check_key(key, f"--{key}")
            if not eq:
                if type(defaults[key]) is bool and (i == len(argv) or argv[i].startswith("--")):
                    value = "true"
                elif i < len(argv):
                    value, i = argv[i], i + 1
                else:
                    raise UserError(f"--{key} needs a value, like --{key}={defaults[key]!r}")
            config[key] = _coerce(key, value, defaults[key], f"--{key}")
        elif positional is not None:
            config[positional] = arg
        else:
            raise UserError(f"unexpected argument {arg!r}; use configs/NAME.toml or --key=value")
    return config


def parse_run_config(defaults, argv):
    """parse_config for the training scripts. With --init_from=resume the run's own settings
    (out_dir/config.json) stand in for the script's defaults, so a bare
    `--out_dir=DIR --init_from=resume` continues the same run; config files and flags on the
    command line still override them."""
    config = parse_config(defaults, argv)
    saved = Path(config["out_dir"]) / "config.json"
    if config["init_from"] == "resume" and saved.is_file():
        stored = json.loads(saved.read_text())
        kept = {k: v for k, v in stored.items() if k in defaults and type(v) is type(defaults[k])}
        config = parse_config({**defaults, **kept}, argv)
    return config


def script_defaults(namespace):
    """The settings block of a script: its lower-case module-level int/float/bool/str names, in
    order (upper-case names such as VOCAB_SIZE are constants, not settings)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k == k.lower() and type(v) in (int, float, bool, str)}


# -----------------------------------------------------------------------------
# devices, schedules, checkpoints, run logs


def pick_device(device="auto"):
    """The device to run on: `device` itself, or for "auto" the best one here (cuda > mps > cpu)."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_autocast(device, dtype="auto"):
    """(dtype, context) for the forward passes: "auto" is bfloat16 autocast on CUDA, float32 elsewhere."""
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"--dtype={dtype}: use bfloat16 or float32")
    if dtype == "float32":
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def lr_factor(step, max_iters, warmup_iters, schedule="cosine", min_lr_frac=0.1, decay_frac=0.2):
    """Multiplier on the base learning rates at `step`: linear warmup, then either a cosine
    down to min_lr_frac at max_iters, or warmup-stable-decay ('wsd': flat, then linear
    down to min_lr_frac over the last decay_frac of the run)."""
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = max_iters * (1 - decay_frac)
        if step < decay_start:
            return 1.0
        return 1 - (1 - min_lr_frac) * min(1.0, (step - decay_start) / max(1, max_iters - decay_start))
    raise UserError(f"lr_schedule={schedule!r}: use 'cosine' or 'wsd'")


def rng_states():
    """Every RNG a run draws from, as plain types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states):
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    name, key, *rest = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(obj, out_dir, step, keep_last=0):
    """Write out_dir/ckpt.pt atomically (temp file + rename). With keep_last > 0 also keep
    ckpt_STEP.pt for the last `keep_last` saves (hard links: no extra disk)."""
    out_dir = Path(out_dir)
    tmp = out_dir / "ckpt.pt.tmp"
    torch.save(obj, tmp)
    if keep_last > 0:
        numbered = out_dir / f"ckpt_{step:07d}.pt"
        numbered.unlink(missing_ok=True)
        try:
            os.link(tmp, numbered)
        except OSError:
            import shutil

            shutil.copyfile(tmp, numbered)
        for old in sorted(out_dir.glob("ckpt_*.pt"))[:-keep_last]:
            old.unlink()
    os.replace(tmp, out_dir / "ckpt.pt")


def resolve_checkpoint(path):
    """A checkpoint file, or a run dir holding ckpt.pt; '' means the newest logs/*/ckpt.pt."""
    if not path:
        found = sorted((REPO_ROOT / "logs").glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no checkpoint found under {REPO_ROOT / 'logs'}/*/ckpt.pt; train one with "
                            "python train_gpt.py or pass --ckpt=PATH")
        return found[-1]
    p = Path(path)
    if p.is_dir():
        if (p / "ckpt.pt").is_file():
            return p / "ckpt.pt"
        raise UserError(f"run dir {p} has no ckpt.pt; pass a checkpoint file or a run dir that has one")
    if p.is_file():
        return p
    raise UserError(f"checkpoint {p} not found (looked for the file and for {p}/ckpt.pt)")


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint with weights_only=True: plain tensors and types, no pickled code."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not a checkpoint written by train_gpt.py or finetune_sft.py (no model/model_config)")
    return ckpt


def versions():
    """One line naming what produced a run, so a log can be rerun."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or "none"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"python {platform.python_version()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
            f"gpu {gpu} | numpy {np.__version__} | git {commit}")


class RunLog:
    """out_dir/log.txt (readable) and out_dir/metrics.jsonl (one JSON object per logged step).

    A run begins its log with the command, versions, resolved config and a copy of the
    script's source. On resume from `resume_step`, metrics logged after that step by the
    interrupted run are dropped, since the resumed run logs those steps again."""

    def __init__(self, out_dir, script, config, resume_step=None, enabled=True, wandb_project=""):
        self.out_dir, self.enabled, self.wandb = Path(out_dir), enabled, None
        self.metrics_path, self.log_path = self.out_dir / "metrics.jsonl", self.out_dir / "log.txt"
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.metrics_path.write_text("")
            self.log_path.write_text("")
        elif self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        source = Path(script).read_text()
        (self.out_dir / Path(script).name).write_text(source)
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        self.print(f"=== {when} {'resumed at step ' + str(resume_step) if resume_step is not None else 'new run'}")
        self.print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        self.print(versions())
        self.print("config: " + json.dumps(config))
        if wandb_project:  # offline too: WANDB_MODE=offline
            import wandb

            self.wandb = wandb
            wandb.init(project=wandb_project, name=config.get("wandb_run_name") or None, config=config)

    def print(self, text):
        if not self.enabled:
            return
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def metrics(self, record):
        """Append one record ({"step": ..., ...}) to metrics.jsonl, and to wandb when it is on."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# -----------------------------------------------------------------------------
# the training loop's plumbing, shared by train_gpt.py and finetune_sft.py


def init_distributed(device):
    """Join the process group when launched by torchrun; returns (ddp, rank, world_size, device)."""
    device = pick_device(device)
    if "RANK" not in os.environ:
        return False, 0, 1, device
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def set_learning_rates(optimizers, base_lrs, factor):
    """Every param group at its base learning rate (from this run's settings) times the schedule's factor."""
    for opt, lrs in zip(optimizers, base_lrs, strict=True):
        for group, lr in zip(opt.param_groups, lrs, strict=True):
            group["lr"] = lr * factor


def param_norm(model):
    return torch.sqrt(sum(p.detach().float().square().sum() for p in model.parameters())).item()


def restore_training_state(ckpt, optimizers, optimizer, path):
    """Load a checkpoint's optimizer states and RNGs into this run; returns (step, best_val_loss)."""
    if ckpt["config"]["optimizer"] != optimizer:
        raise UserError(f"{path} was trained with optimizer={ckpt['config']['optimizer']}; "
                        f"resume with --optimizer={ckpt['config']['optimizer']}")
    for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(state)
    set_rng_states(ckpt["rng"])
    return ckpt["step"], ckpt["best_val_loss"]


def write_training_checkpoint(log, out_dir, keep_last, master, model, **state):
    """Checkpoint everything a run needs to continue exactly (state: optimizers, loader, step, ...).
    Blown-up weights are never saved over a good checkpoint: the fp32 norm overflows once any
    weight passes ~1e19, so this catches those as well as inf and NaN."""
    step = state["step"]
    if not math.isfinite(param_norm(model)):
        log.print(f"step {step}: non-finite weight norm, not saved; the last good checkpoint is {out_dir}/ckpt.pt")
        sys.exit(1)
    if master:
        state["optimizers"] = [opt.state_dict() for opt in state["optimizers"]]
        state["loader"] = state["loader"].state_dict()
        save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                         "rng": rng_states(), **state}, out_dir, step, keep_last)
        log.print(f"step {step}: checkpoint written to {out_dir}/ckpt.pt")


def stop_if_not_finite(log, out_dir, step, loss, grad_norm):
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        log.print(f"step {step}: loss {loss}, grad norm {grad_norm}: stopping; the last good checkpoint "
                  f"is {out_dir}/ckpt.pt (try a lower learning rate or grad_clip)")
        sys.exit(1)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, checkpoint and exit cleanly, instead of dying mid-write."""

    def __init__(self):
        self.signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))

    def __call__(self, ddp, device):
        """True when a signal came; under DDP when one came to any rank, so all stop at the same step
        (one rank leaving alone would leave the others waiting in all_reduce forever)."""
        stop = bool(self.signals)
        if ddp:
            import torch.distributed as dist

            flag = torch.tensor(float(stop), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


# -----------------------------------------------------------------------------
# chat examples: what data/sft_mix.py writes and finetune_sft.py loads
#
# A split is the examples' tokens back to back in {split}_000000.bin (the shard format
# above) plus {split}_offsets.npy, int64 boundaries: example i is tokens[offsets[i]:offsets[i+1]].
# The loss mask is not stored: reply_mask() re-derives it from the special ids, which
# ordinary text never produces.

SFT_PREPARE_HINT = "python data/sft_mix.py --out_dir {dir}"


def write_examples(out_dir, split, examples):
    """Write token-id lists as one split: the shard, then its offsets (both atomically)."""
    out_dir = Path(out_dir)
    lengths = np.array([len(ids) for ids in examples], dtype=np.int64)
    write_shard(out_dir / f"{split}_000000.bin", np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in examples]))
    tmp = out_dir / f"{split}_offsets.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate([[0], np.cumsum(lengths)]))
    os.replace(tmp, out_dir / f"{split}_offsets.npy")


def read_examples(data_dir, split):
    """(tokens, offsets) of a split written by write_examples, checked against each other."""
    path = Path(data_dir) / f"{split}_offsets.npy"
    if not path.is_file():
        raise UserError(f"no {path.name} in {data_dir}; prepare the examples with: "
                        f"{SFT_PREPARE_HINT.format(dir=data_dir)}")
    tokens = np.concatenate([read_shard(f) for f in list_shards(data_dir, split)])
    offsets = np.load(path)
    if (offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(tokens)
            or np.any(np.diff(offsets) <= 0)):
        raise UserError(f"{path} does not match the {len(tokens):,} tokens of the {split} shards; re-run "
                        f"{SFT_PREPARE_HINT.format(dir=data_dir)}")
    return tokens, offsets


def reply_mask(ids):
    """1 on the tokens render_chat masks with 1 (each reply and its closing <|endoftext|>), 0 elsewhere:
    a token is reply iff the last special token before it is <|assistant|>."""
    ids = np.asarray(ids)
    is_special = (ids == USER) | (ids == ASSISTANT) | (ids == EOT)
    latest = np.maximum.accumulate(np.where(is_special, np.arange(len(ids)), -1))  # at or before each position
    before = np.concatenate([[-1], latest[:-1]])  # strictly before it; -1: none
    return ((before >= 0) & (ids[before] == ASSISTANT)).astype(np.uint8)


class ExampleLoader:
    """Micro-batches of B chat examples of one split as (x, y), y = -1 wherever there is no loss: on the
    prompts, the markers and the padding. Examples are cut to T + 1 tokens.

    Training order: the examples in a permutation seeded by (seed, epoch), endlessly. Micro-batch g
    takes positions g*B .. g*B+B-1 of that stream; rank r of W takes g = r, r+W, r+2W, ... (as
    BatchLoader does), so the order follows from (seed, step) and the state is one counter."""

    def __init__(self, data_dir, split, batch_size, block_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.tokens, self.offsets = read_examples(data_dir, split)
        self.n = len(self.offsets) - 1
        self.B, self.T, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.position = 0  # micro-batches handed out so far, all ranks together
        self.epoch, self.order = -1, None

    def batch(self, indices):
        """Examples -> x, y of shape (len(indices), longest example - 1), right-padded."""
        rows = [self.tokens[self.offsets[i] : self.offsets[i + 1]][: self.T + 1].astype(np.int64) for i in indices]
        T = max(len(ids) for ids in rows) - 1
        # padding sits after each example, so causal attention never lets a real position see it
        x = np.full((len(rows), T), EOT, dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        for row, ids in enumerate(rows):
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = np.where(reply_mask(ids)[1:] == 1, ids[1:], -1)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def next_batch(self):
        index = self.position + self.rank
        self.position += self.world_size
        picks = []
        for p in range(index * self.B, (index + 1) * self.B):
            if p // self.n != self.epoch:
                self.epoch = p // self.n
                self.order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            picks.append(self.order[p % self.n])
        return self.batch(picks)

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "examples": self.n}

    def load_state_dict(self, state):
        if (state["seed"], state["examples"]) != (self.seed, self.n):
            raise UserError(
                f"the checkpoint's loader used seed={state['seed']} over {state['examples']} train examples, this run "
                f"seed={self.seed} over {self.n}; resume with the same seed and data_dir"
            )
        if state["position"] % self.world_size:
            raise UserError(f"cannot resume loader position {state['position']} with {self.world_size} ranks")
        self.position = state["position"]
