"""What the stage scripts share; each module owns one job:

    tokenizer.py   GPT-2's BPE (from the bundled gpt2.tiktoken) plus the chat tokens, template and reply mask
    shards.py      the .bin token-shard format and the SFT example format on disk
    loaders.py     batches for training and validation: BatchLoader, ValData, ExampleLoader
    checkpoint.py  atomic checkpoint writes, resolving a checkpoint path, weights_only loading, RNG state
    settings.py    a script's settings: defaults at its top < configs/*.toml < --key=value, and their checks
    run.py         the run dir (overwrite guard, lock, log), device and autocast, DDP, stop signals
    hellaswag.py   reading, rendering and scoring HellaSwag (eval_hellaswag.py and the training scripts)
    train.py       what both training scripts do alike around their loops (resume, rates, NaN guard, val loss)
    serve.py       sample.py --serve: the OpenAI-compatible API and its queue; chat.html is its page
    fineweb_edu.py, sft_mix.py   data-prep scripts (no torch)
"""

import argparse
import os
import socket
import sys
import urllib.parse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the scripts run from here


class UserError(Exception):
    """A bad input (a setting, a file, a checkpoint): the message says what is wrong and how to fix it.

    Library code raises it; a script that called one_line_errors() prints it as one line on stderr
    and exits with status 1, instead of a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument a UserError (one line, exit 1) rather than usage text and exit 2."""

    def error(self, message):
        raise UserError(f"{message}; see --help")


def one_line_errors():
    """Make this process print an uncaught UserError as `error: message` and Ctrl-C as `interrupted`, and
    end quietly when its stdout is closed early."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, BrokenPipeError):  # stdout closed early (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        elif issubclass(kind, UserError):
            print(f"error: {value}", file=sys.stderr, flush=True)
        elif issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr, flush=True)
        else:
            default(kind, value, tb)

    sys.excepthook = hook


def reach_hub(dataset, fix, timeout=5.0):
    """Fail in one line within seconds when the Hugging Face Hub cannot be reached (no network), instead of
    after the downloader's minute of retries. HF_HUB_OFFLINE=1 skips this: the local cache serves."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    host = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot reach the Hugging Face Hub at {host} for {dataset} ({reason}); {fix}") from None


def refuse_clobber(writes, reads=()):
    """One guard for every stage: refuse, before anything runs, an output that would overwrite an input.
    writes: (path, setting, folder) for each output, folder=True for a folder the stage writes into or
    replaces whole; reads: (path, setting) for each input file or folder, to which the config files on
    the command line and the project's own code and bundled data are added. An output inside an input
    folder counts as overwriting it. Paths are compared after following symbolic links (a link to an input
    is that input) and ~."""
    code = [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("data/*.py"), *REPO_ROOT.glob("bench/*"), REPO_ROOT / "configs"]
    reads = [*reads, *((a, "the config file") for a in sys.argv[1:] if a.endswith(".toml")),
             *((path, "the project's code") for path in code),
             *((path, "the project's bundled data") for path in [REPO_ROOT / "data/gpt2.tiktoken",
                                                                  *REPO_ROOT.glob("data/samples/*")] if path.is_file())]
    for out, out_setting, folder in writes:
        target = Path(out).expanduser().resolve()
        for path, setting in reads:
            source = Path(path).expanduser().resolve()
            inside = source in target.parents and source.is_dir()
            if source == target or inside or (folder and target in source.parents):
                what = f"{setting}={path}" if setting.startswith("-") else f"{setting} {path}"
                where = " (it lies inside)" if folder and target in source.parents else ""
                raise UserError(f"{out_setting}={out} would {'write inside' if inside else 'overwrite'} {what}, which "
                                f"this reads{where}; pick another {out_setting}")
