"""
A stage script's settings: the lower-case names at the top of the script are its defaults;
configs/*.toml files on the command line override them, then --key=value flags. Unknown keys,
ill-typed and out-of-range values are one-line errors, raised before the script does anything.
"""

import ast
import difflib
import math
import os
import re
import sys
from pathlib import Path

import torch

from data import REPO_ROOT, UserError
from data.checkpoint import upgrade_settings


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


PATHS = ("ckpt", "init_from", "data", "out")  # the path settings beside the *_dir and *_file ones
SETTING = re.compile(r"^([a-z_][a-z0-9_]*) = (.+?)(?:\s+#\s?(.*))?$")  # `name = value  # comment` at the top level


def help_text(script, defaults):
    """A script's --help: the usage lines of its docstring, then every setting with its default and the
    comment beside it in the script's settings block (a bench's train_gpt.py settings come last)."""
    script = Path(script)
    text = script.read_text(encoding="utf-8")
    lines = [(ast.get_docstring(ast.parse(text)) or "").strip(), "", f"settings of {script.name} (--key=value, "
             "or a configs/*.toml file; in that order after these defaults):"]
    comments = {}
    for source in (text, (REPO_ROOT / "train_gpt.py").read_text(encoding="utf-8")):
        for line in source.splitlines():
            match = SETTING.match(line)
            if match and match[1] in defaults and match[1] not in comments:
                comments[match[1]] = match[3] or ""
    width = max(map(len, defaults), default=0) + 2
    for key, value in defaults.items():
        lines.append(f"  --{key:<{width}} {value!r:<12} {comments.get(key, '')}".rstrip())
    return "\n".join(lines)


def parse_config(defaults, argv, positional=None):
    """Resolve a script's settings: `defaults` (name -> int/float/bool/str) overridden by any
    `configs/*.toml` files in argv, then by `--key=value` / `--key value` / bare `--flag`
    (for booleans). A bare word goes to the `positional` key, if the script has one.
    Unknown keys and ill-typed values are one-line errors. -h or --help prints the settings and exits."""
    if "-h" in argv or "--help" in argv:
        print(help_text(sys.argv[0], defaults))
        raise SystemExit(0)
    config = dict(defaults)

    def check_key(key, source):
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{source}: unknown setting {key!r}{hint}; the settings are at the top of {sys.argv[0]}")

    i = words = 0
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
                table = tomllib.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{arg}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
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
        elif positional is not None:  # the bare words, joined: an unquoted prompt keeps all its words
            config[positional] = f"{config[positional]} {arg}" if words else arg
            words += 1
        else:
            raise UserError(f"unexpected argument {arg!r}; use configs/NAME.toml or --key=value")
    for key, value in config.items():  # the shell leaves the ~ of --out_dir=~/x alone
        if type(value) is str and value.startswith("~") and (key.endswith(("_dir", "_file")) or key in PATHS):
            config[key] = os.path.expanduser(value)
    return config


def parse_settings(namespace, argv, positional=None):
    """A script's settings. The defaults are the lower-case int/float/bool/str names of `namespace`
    (the script's globals()) in order; upper-case names such as VOCAB_SIZE are constants. Config
    files and flags in argv override them (parse_config).

    With --init_from=resume the run's own settings (saved in out_dir/ckpt.pt) stand in for the
    script's defaults, so a bare `--out_dir=DIR --init_from=resume` continues the same run; config
    files and flags on the command line still override them."""
    defaults = {k: v for k, v in namespace.items()
                if not k.startswith("_") and k == k.lower() and type(v) in (int, float, bool, str)}
    config = parse_config(defaults, argv, positional)
    if config.get("init_from") == "resume" and "out_dir" in config:
        try:  # mmap: only the small settings dict is read, not the weights
            ckpt = torch.load(Path(config["out_dir"]) / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)
            saved = upgrade_settings(ckpt["config"], ckpt["model_config"])
        except Exception:  # no or damaged checkpoint: loading it later says so in one line
            saved = {}
        kept = {k: v for k, v in saved.items() if k in defaults and type(v) is type(defaults[k])}
        config = parse_config({**defaults, **kept}, argv, positional)
    return config


def check_settings(config, positive=(), non_negative=(), choices=None, fractions=(), below_one=(),
                   non_empty=()):
    """One-line errors for settings out of range, before anything runs or is written. Every float must be
    finite; fractions lie in [0, 1], below_one (betas, momentum) in [0, 1), a seed in numpy's [0, 2**32), and the
    non_empty strings (out_dir, paths) hold something."""
    for key, value in config.items():
        if type(value) is float and not math.isfinite(value):
            raise UserError(f"--{key}={value}: must be a finite number")
    for key in positive:
        if config[key] <= 0:
            raise UserError(f"--{key}={config[key]}: must be at least 1" if type(config[key]) is int
                            else f"--{key}={config[key]}: must be above 0")
    for key in non_negative:
        if not config[key] >= 0:
            raise UserError(f"--{key}={config[key]}: must be 0 or more")
    for key in fractions:
        if not 0 <= config[key] <= 1:
            raise UserError(f"--{key}={config[key]}: must lie between 0 and 1")
    for key in below_one:
        if not 0 <= config[key] < 1:
            raise UserError(f"--{key}={config[key]}: must lie in [0, 1)")
    for key in non_empty:
        if not config[key].strip():
            example = "logs/NAME" if key == "out_dir" else "a path"
            raise UserError(f"--{key} is empty; give it a value such as {example}")
    if "seed" in config and not 0 <= config["seed"] < 2**32:
        raise UserError(f"--seed={config['seed']}: must lie in [0, 2**32) (numpy's seeds)")
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise UserError(f"--{key}={config[key]!r}: use one of {', '.join(map(repr, allowed))}")
