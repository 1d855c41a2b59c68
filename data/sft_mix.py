"""
Build the instruction-tuning mix that finetune_sft.py trains on: prompt-response pairs from
three sources, filtered, deduplicated, split into train and val, and tokenized with the chat template.

    python data/sft_mix.py                                  # download all three sources into data/sft/
    python data/sft_mix.py --sources=raschka --raschka=instruction-data.json --out_dir=data/sft_raschka
    python data/sft_mix.py --smoltalk=smol-smoltalk.parquet --alpaca=alpaca_data_cleaned.json --weights=alpaca=0.5

Sources (--sources picks them; default all three). Each is downloaded unless --NAME PATH names a
local copy: a .jsonl (one object per line), .json (a list of objects) or .parquet file. Text files are
UTF-8, or UTF-16 / UTF-32 with a byte-order mark.
  smoltalk  HuggingFaceTB/smol-smoltalk, the bulk of the mix: `messages`, a list of {role, content}.
            A leading system message is joined to the first user message (system + "\n\n" + user),
            since the template has no system slot.
  raschka   instruction-data.json of rasbt/LLMs-from-scratch ch07 (1,100 short examples).
  alpaca    yahma/alpaca-cleaned; pairs whose prompt or answer is over --alpaca_max_chars characters are dropped.
raschka and alpaca rows are {instruction, input, output}: the prompt is the instruction, plus "\n\n"
and the input when there is one; the response is the output. All text is stripped of surrounding whitespace.

Examples. One prompt-response pair each by default: a conversation gives its first user/assistant
exchange. With --multi_turn it gives all its exchanges as alternating turns (a trailing message
without a reply is dropped), and the token limits apply to every turn.

Filters, in this order, each counted per source: malformed rows (missing fields, wrong types, turns
that do not alternate user/assistant), empty prompts or responses, (alpaca) too many characters, exact
duplicates of an earlier example of any source (compared as the tokenizer sees the text: lone
surrogates become U+FFFD), and prompts or responses over --max_prompt_tokens / --max_response_tokens
tokens.

Mixing. --weights NAME=W,... (1 for each source not named): W <= 1 keeps that fraction of the
source's surviving examples (a seeded random subset); W > 1 keeps them all and repeats its train
examples W times on average. --val_fraction of the kept examples of all sources (at least one) are
held out as val before any repeating, so no val example is ever in train too.

Output in --out_dir: train and val, each as the examples' tokens back to back in {split}_000000.bin
plus {split}_offsets.npy (data/shards.py write_examples), in a seeded random order, summary.json
with the counts, and manifest.json (data/shards.py), written beside --out_dir and swapped in whole
when done: a refused, failed or interrupted mix leaves the earlier one usable.
An example is <|endoftext|> (where every pretraining document starts), then per turn
`<|user|>{prompt}<|assistant|>{response}<|endoftext|>` with single special ids (data/tokenizer.py
render_chat); the loss mask is re-derived from those ids when training.
The same inputs and arguments give byte-identical files.
"""

import hashlib
import json
import math
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import ArgumentParser, UserError, one_line_errors, reach_hub  # noqa: E402
from data.fineweb_edu import as_tokenized, json_lines, text_encoding  # noqa: E402
from data.shards import prep_id, prep_out_dir, staged_prep, write_examples, write_manifest  # noqa: E402
from data.tokenizer import EOT, render_chat  # noqa: E402

MADE_BY = "data/sft_mix.py"  # recorded in the manifest: the fix a loader names is re-running it
SOURCES = ("smoltalk", "raschka", "alpaca")
HUB = {"smoltalk": "HuggingFaceTB/smol-smoltalk", "alpaca": "yahma/alpaca-cleaned"}
RASCHKA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
               "instruction-data.json")
FIELDS = {"smoltalk": ("messages",), "raschka": ("instruction", "input", "output"),
          "alpaca": ("instruction", "input", "output")}
SCHEMA = {"smoltalk": "messages (a list of {role, content} objects)",
          "raschka": "instruction, input, output (strings)", "alpaca": "instruction, input, output (strings)"}
REASONS = ("malformed", "empty", "too_long_chars", "duplicate", "too_long_tokens")


# -----------------------------------------------------------------------------
# reading rows


def read_local(source, path):
    """The rows of a local file; a line of a .jsonl file that is not valid JSON becomes None (malformed)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--{source} {path}: a folder; name the file in it (expected {SCHEMA[source]})")
    if not path.is_file():
        raise UserError(f"--{source} {path}: no such file (expected {SCHEMA[source]})")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(path).names
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:150]})") from None
        missing = [f for f in FIELDS[source] if f not in columns]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns)}); a {source} "
                            f"file needs {SCHEMA[source]}")
        return (row for batch in pq.ParquetFile(path).iter_batches(columns=list(FIELDS[source]), batch_size=1024)
                for row in batch.to_pylist())
    if path.suffix == ".json":
        try:  # from bytes, the parser reads UTF-8, -16 and -32, with or without a byte-order mark
            rows = json.loads(path.read_bytes())
        except OSError as e:
            raise UserError(f"--{source} {path}: cannot read it ({e.strerror})") from None
        except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8
            raise UserError(f"{path}: not valid JSON ({e}); a {source} file needs {SCHEMA[source]}") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json source must hold a list of objects with {SCHEMA[source]}")
        return rows
    if path.suffix == ".jsonl":
        encoding = text_encoding(path, f"--{source}", whole=False)
        return (record for _, record in json_lines(path, encoding))
    raise UserError(f"--{source} {path}: unsupported file type; use .jsonl, .json or .parquet")


def download(source):
    """The rows of a source from the Hugging Face Hub (smoltalk, alpaca) or GitHub (raschka)."""
    where = HUB.get(source, RASCHKA_URL)
    if source != "raschka":
        reach_hub(HUB[source], f"to use a local copy pass --{source} PATH (.jsonl, .json or .parquet)")
    try:
        if source == "raschka":
            with urllib.request.urlopen(RASCHKA_URL, timeout=60) as response:
                return json.load(response)
        import datasets

        return datasets.load_dataset(HUB[source], split="train")
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"cannot download {source} from {where} ({type(e).__name__}: {reason}); to use a local copy "
                        f"pass --{source} PATH (.jsonl, .json or .parquet)") from None


# -----------------------------------------------------------------------------
# rows -> turns: a list of (prompt, response), or the name of the filter that drops the row


def instruction_turns(row, multi_turn):
    values = [row.get(k) for k in FIELDS["raschka"]] if isinstance(row, dict) else None
    if values is None or not all(isinstance(v, str) for v in values):
        return "malformed"
    instruction, extra, output = (v.strip() for v in values)
    return [("\n\n".join(filter(None, (instruction, extra))), output)]


def conversation_turns(row, multi_turn):
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return "malformed"
    roles, texts = [m["role"] for m in messages], [m["content"].strip() for m in messages]
    if roles[:1] == ["system"] and len(roles) > 1:
        texts[1] = "\n\n".join(filter(None, (texts[0], texts[1])))
        roles, texts = roles[1:], texts[1:]
    n = len(roles) // 2 * 2 if multi_turn else 2
    if len(roles) < 2 or roles[:n] != ["user", "assistant"] * (n // 2):
        return "malformed"
    return list(zip(texts[0:n:2], texts[1:n:2], strict=True))


TURNS = {"smoltalk": conversation_turns, "raschka": instruction_turns, "alpaca": instruction_turns}


def render(turns, max_prompt_tokens, max_response_tokens):
    """The example's token ids, or None if a prompt or response is over its limit."""
    ids = [EOT]  # every pretraining document starts after an <|endoftext|>, and so does every sample.py prompt
    for turn in turns:  # render_chat of several turns is its single-turn renders back to back
        turn_ids, mask = render_chat([turn])
        n_reply = sum(mask)  # the response and its <|endoftext|>
        if len(turn_ids) - n_reply - 2 > max_prompt_tokens or n_reply - 1 > max_response_tokens:
            return None
        ids += turn_ids
    return np.array(ids, dtype=np.uint16)


def collect(source, rows, name, args, seen):
    """The token ids of a source's examples that pass the filters, and the counts of the rest by reason."""
    counts = dict.fromkeys(("rows", *REASONS), 0)
    examples = []
    for row in tqdm(rows, desc=source, unit=" rows", leave=False, disable=None):  # a terminal only
        counts["rows"] += 1
        turns = TURNS[source](row, args.multi_turn)
        if isinstance(turns, list):  # so two rows that tokenize alike are duplicates
            turns = [(as_tokenized(p), as_tokenized(r)) for p, r in turns]
        if isinstance(turns, str):
            counts[turns] += 1
        elif not all(p and r for p, r in turns):
            counts["empty"] += 1
        elif source == "alpaca" and any(max(len(p), len(r)) > args.alpaca_max_chars for p, r in turns):
            counts["too_long_chars"] += 1
        elif (key := hashlib.blake2b(json.dumps(turns).encode(), digest_size=16).digest()) in seen:
            counts["duplicate"] += 1
        elif (ids := render(turns, args.max_prompt_tokens, args.max_response_tokens)) is None:
            counts["too_long_tokens"] += 1
        else:
            seen.add(key)
            examples.append(ids)
    if not counts["rows"]:
        raise UserError(f"{name}: no rows (an empty file?); a {source} file needs {SCHEMA[source]}")
    if counts["malformed"] == counts["rows"]:
        raise UserError(f"{name}: {counts['rows']} rows, none with the {source} fields {SCHEMA[source]}")
    counts["kept"] = len(examples)
    return examples, counts


# -----------------------------------------------------------------------------


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma separated, from " + ", ".join(SOURCES))
    for source in SOURCES:  # type: the shell leaves the ~ of --raschka=~/x alone
        parser.add_argument(f"--{source}", default="", metavar="PATH", type=os.path.expanduser,
                            help=f"local .jsonl/.json/.parquet copy of {source}; default: download it")
    parser.add_argument("--out_dir", default="data/sft", type=os.path.expanduser, help="where the splits go")
    parser.add_argument("--multi_turn", action="store_true", help="whole conversations, not their first exchange")
    parser.add_argument("--max_prompt_tokens", type=int, default=300, help="drop pairs with a longer prompt")
    parser.add_argument("--max_response_tokens", type=int, default=300, help="drop pairs with a longer response")
    parser.add_argument("--alpaca_max_chars", type=int, default=1000,
                        help="drop alpaca pairs whose prompt or answer has more characters")
    parser.add_argument("--weights", default="", help="NAME=W,...: W <= 1 keeps that fraction of a source, "
                                                      "W > 1 repeats its train examples W times; default 1")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="fraction of the examples held out as val")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the subsets, the split and the order")
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: must lie in [0, 2**32) (numpy's seeds)")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction {args.val_fraction}: must lie between 0 and 1")
    # a source named twice would put copies of its examples in both splits
    args.sources = list(dict.fromkeys(s.strip() for s in args.sources.split(",") if s.strip()))
    unknown = [s for s in args.sources if s not in SOURCES]
    if unknown or not args.sources:
        raise UserError(f"--sources {','.join(args.sources)}: use one or more of {', '.join(SOURCES)}")
    weights = dict.fromkeys(args.sources, 1.0)
    for item in filter(None, (w.strip() for w in args.weights.split(","))):
        source, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if source not in args.sources or not 0 <= weight < math.inf:
            raise UserError(f"--weights {item!r}: use NAME=W with a finite W >= 0 and NAME one of --sources "
                            f"({', '.join(args.sources)})")
        weights[source] = weight
    args.settings = {  # what fixes the output, for the manifest: the command line that remakes it
        "sources": ",".join(args.sources), **{s: getattr(args, s) for s in SOURCES}, "multi_turn": args.multi_turn,
        **{k: getattr(args, k) for k in ("max_prompt_tokens", "max_response_tokens", "alpaca_max_chars")},
        "weights": ",".join(f"{s}={w:g}" for s, w in weights.items()), "val_fraction": args.val_fraction,
        "seed": args.seed}
    args.weights = weights
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction {args.val_fraction}: must be between 0 and 1 (finetune_sft.py needs val)")
    for name in ("max_prompt_tokens", "max_response_tokens", "alpaca_max_chars"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    prep_out_dir(args.out_dir, [(getattr(args, s), f"--{s}") for s in args.sources if getattr(args, s)])
    seen, examples, stats = set(), {}, {}
    for source in args.sources:
        path = getattr(args, source)
        rows = read_local(source, path) if path else download(source)
        name = path or HUB.get(source, RASCHKA_URL)
        examples[source], stats[source] = collect(source, rows, name, args, seen)
        stats[source]["file"] = name

    rng = np.random.default_rng(args.seed)
    used = {}  # source -> indices of its examples that the weight keeps, in random order
    for source in args.sources:
        n = len(examples[source])
        used[source] = rng.permutation(n)[: round(min(args.weights[source], 1.0) * n)]
    pool = [(source, i) for source in args.sources for i in used[source]]
    if len(pool) < 2:
        dropped = "; ".join(f"{s}: {c['rows']} rows, " + ", ".join(f"{c[r]} {r}" for r in REASONS if c[r])
                            for s, c in stats.items())
        raise UserError(f"{len(pool)} examples left after the filters and weights, too few for a train and a val "
                        f"split ({dropped})")
    pool = [pool[i] for i in rng.permutation(len(pool))]
    n_val = max(1, round(args.val_fraction * len(pool)))
    if n_val == len(pool):
        raise UserError(f"--val_fraction={args.val_fraction:g} holds out all {len(pool)} examples as val, leaving "
                        f"none to train on; lower it below {(len(pool) - 0.5) / len(pool):.3g}, or give more examples")
    val = [examples[s][i] for s, i in pool[:n_val]]
    train = []
    for source in args.sources:
        mine = np.array([i for s, i in pool[n_val:] if s == source], dtype=np.int64)
        repeats = max(args.weights[source], 1.0)
        # the examples are in random order, so a fractional repeat count repeats a random subset once more
        picked = np.resize(mine, round(repeats * len(mine)))
        train += [examples[source][i] for i in picked]
        n_val_source = sum(s == source for s, _ in pool[:n_val])
        stats[source].update(weight=args.weights[source], train=len(picked), val=n_val_source)
    train = [train[i] for i in rng.permutation(len(train))]

    pid = prep_id(MADE_BY, args.settings)
    with staged_prep(args.out_dir) as (stage, stale):  # out_dir changes only when the prep has finished
        files = {**write_examples(stage, "train", train, pid), **write_examples(stage, "val", val, pid)}
        summary = {
            "multi_turn": args.multi_turn,
            "sources": stats,
            "train_examples": len(train),
            "val_examples": len(val),
            "train_tokens": int(sum(len(x) for x in train)),
            "val_tokens": int(sum(len(x) for x in val)),
        }
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        counts = {k: summary[k] for k in ("train_examples", "val_examples", "train_tokens", "val_tokens")}
        write_manifest(stage, files, MADE_BY, args.settings, counts, pid)
    print_summary(summary, args, stale)
    return summary


def print_summary(s, args, stale):
    for source, c in s["sources"].items():
        dropped = ", ".join(f"{c[r]:,} {r}" for r in REASONS if c[r]) or "none dropped"
        print(f"{source} ({c['file']}): {c['rows']:,} rows -> {c['kept']:,} kept ({dropped}); "
              f"weight {c['weight']:g} -> {c['train']:,} train, {c['val']:,} val")
    print(f"limits: prompt <= {args.max_prompt_tokens} tokens, response <= {args.max_response_tokens} tokens"
          + (f", alpaca <= {args.alpaca_max_chars} characters" if "alpaca" in s["sources"] else ""))
    for split in ("train", "val"):
        print(f"{split}: {s[split + '_examples']:,} examples, {s[split + '_tokens']:,} tokens in {args.out_dir}")
    if stale:
        print(f"removed {len(stale)} stale files of an earlier run: {', '.join(stale)}")
    print(f"wrote {args.out_dir}/manifest.json: the loader checks the examples against it")


if __name__ == "__main__":
    one_line_errors()
    main()
