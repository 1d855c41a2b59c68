r"""
Tokenize FineWeb-Edu (or local text files) into the .bin token shards that the
training loaders read (see data/shards.py for the format).

    python data/fineweb_edu.py                                  # stream HF sample-10BT
    python data/fineweb_edu.py --max_tokens 1e9                 # the first ~1B tokens of it
    python data/fineweb_edu.py --source 'corpus/*.jsonl' --out_dir data/mine
    python data/fineweb_edu.py --source 'notes/**/*.md' --out_dir data/notes   # a document per file

Sources. By default the HuggingFaceFW/fineweb-edu `sample-10BT` train split is
streamed from the Hub with `datasets`. `--source PATH_OR_GLOB` (repeatable, or
comma separated) reads local files instead, all of them in sorted path order:
  .jsonl    one JSON object per line; the document is its string `text` field.
            Lines that are not valid JSON, not an object, or have no string
            `text` are counted as malformed and skipped (the first few are named).
            Blank lines are not documents.
  .parquet  a `text` column; a null entry counts as malformed.
  .txt/.md  one document per file, or with --separator=S the file split at S
            (--separator='\n': a document per line, like HF's `text` loader;
            '\n\n': per paragraph); parts of only whitespace are no documents.
            Invalid UTF-8 becomes U+FFFD. A document per line is a trap for
            code or prose: the model learns to end every line with <|endoftext|>.
Text files are UTF-8, or UTF-16 / UTF-32 with a byte-order mark (the mark is not
text); a .txt/.md (or the start of a .jsonl) with NUL bytes and no mark is refused:
it is UTF-16 saved without one, or not text.
Documents that are empty or only whitespace are skipped and counted.

Output. Every document is tokenized with the GPT-2 BPE and gets <|endoftext|>
prepended. It goes to val iff a hash of (seed, its text) falls below
--val_fraction, else to train. The rule depends only on the text as the
tokenizer sees it (lone surrogates, which JSON can carry, become U+FFFD), so
duplicates share a split, and a document is never cut across splits. Once val
holds --val_tokens (if set), a later val document goes to train, unless it is a
copy of a val document (then it is skipped: in train it would leak val); both are
counted. Each split is written as shards of exactly --shard_size tokens (the last
one partial): train_000000.bin, ..., val_000000.bin, ...
manifest.json (see data/shards.py) lists them. The prep writes into a folder beside
--out_dir and swaps it in whole when done, so a refused, failed or interrupted prep
leaves the earlier one usable, and a second prep into the same dir meanwhile is
refused. Files in --out_dir that are not a prep's own stay. The same inputs and
arguments give byte-identical files, whatever --num_proc is.
"""

import argparse
import codecs
import glob
import hashlib
import json
import os
import sys
from functools import partial
from itertools import chain, islice
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import ArgumentParser, UserError, one_line_errors, reach_hub  # noqa: E402
from data.shards import prep_id, prep_out_dir, staged_prep, write_manifest, write_shard  # noqa: E402
from data.tokenizer import EOT, get_tokenizer  # noqa: E402

MADE_BY = "data/fineweb_edu.py"  # recorded in the manifest: the fix a loader names is re-running it
HF_DATASET, HF_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
SUFFIXES = (".jsonl", ".parquet", ".txt", ".md")
TEXT_SUFFIXES = (".txt", ".md")
MALFORMED_SHOWN = 5  # how many malformed records the summary names
# UTF-32 LE's mark begins with UTF-16 LE's, so it is looked for first
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class Malformed(NamedTuple):
    """A record that held no usable text; it travels with the documents so it is counted in order."""

    where: str  # "file:line" or "file:row N"
    why: str


# -----------------------------------------------------------------------------
# reading documents


def resolve_sources(specs):
    """--source values (paths or globs, possibly comma separated) -> sorted list of files, each once (a file
    named twice, or by a link, would be read twice)."""
    files = {}
    for spec in specs:
        for pattern in filter(None, (p.strip() for p in spec.split(","))):
            if glob.has_magic(pattern):
                matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
                if not matches:
                    raise UserError(f"--source {pattern!r} matches no files")
            else:
                matches = [Path(pattern)]
                if not matches[0].exists():
                    raise UserError(f"--source {pattern}: no such file")
            for path in matches:
                if path.is_dir():
                    raise UserError(f"--source {pattern!r} matches the folder {path}; name files, e.g. {path}/*.jsonl")
                if path.suffix not in SUFFIXES:
                    raise UserError(f"--source {path}: unsupported file type; use {', '.join(SUFFIXES)} files")
                if not path.is_file():
                    raise UserError(f"--source {path}: not a regular file (a pipe or a device); name a file")
                files.setdefault(path.resolve(), path)
    if not files:
        raise UserError("--source names no files")
    return sorted(files.values())


def text_encoding(path, setting, whole=True):
    """The encoding of a local text source: the one its byte-order mark names, else UTF-8. Without a mark, NUL
    bytes are refused: UTF-8 text has none, and UTF-16 saved without a mark has one beside every ASCII letter,
    which decoding as UTF-8 would tokenize. whole=False looks at the start only: enough to tell UTF-16, and a
    .jsonl's parser judges each of its lines anyway."""
    try:
        with open(path, "rb") as f:
            block = f.read(1 << 16)
            for bom, encoding in BOMS:
                if block.startswith(bom):
                    return encoding
            while block:
                if b"\0" in block:
                    raise UserError(f"{setting} {path}: holds NUL bytes and no byte-order mark, so it is not UTF-8 "
                                    "text (UTF-16 without a BOM, or binary); save it as UTF-8")
                block = f.read(1 << 20) if whole else b""
    except OSError as e:
        raise UserError(f"{setting} {path}: cannot read it ({e.strerror})") from None
    return "utf-8-sig"


def json_lines(path, encoding):
    """(line number, record or None if the line is not valid JSON) for each non-blank line of a .jsonl file."""
    # UTF-8 lines reach the parser as bytes, so a line of bad UTF-8 is one malformed line; UTF-16 and UTF-32
    # cannot be cut into lines at b"\n", so those files are decoded first (a bad code unit becomes U+FFFD)
    utf8 = encoding.startswith("utf-8")
    with open(path, "rb") if utf8 else open(path, encoding=encoding, errors="replace", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except (ValueError, RecursionError):  # bad JSON or bad UTF-8
                yield lineno, None


def read_jsonl(path, encoding="utf-8-sig"):
    for lineno, record in json_lines(path, encoding):
        if record is None:
            yield Malformed(f"{path}:{lineno}", "not valid JSON")
        elif not isinstance(record, dict):
            yield Malformed(f"{path}:{lineno}", "not a JSON object")
        elif not isinstance(record.get("text"), str):
            yield Malformed(f"{path}:{lineno}", "no string 'text' field")
        else:
            yield record["text"]


def read_parquet(path):
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield text if isinstance(text, str) else Malformed(f"{path}:row {row}", "text is not a string")
            row += 1


def read_txt(path, encoding="utf-8-sig", separator=""):
    """The documents of a text file: all of it, or its parts between separators, read 1M characters at a time."""
    with open(path, encoding=encoding, errors="replace") as f:
        if not separator:
            yield f.read()
            return
        rest = ""
        while chunk := f.read(1 << 20):
            *parts, rest = (rest + chunk).split(separator)
            yield from (part for part in parts if part.strip())
        if rest.strip():
            yield rest


# The pool's feeder thread iterates the documents, and an exception raised there would
# end that thread silently and hang the run, so every check that can fail
# with one happens up front in open_files / open_hub, in the main thread.


def open_files(files, separator=""):
    encodings = {}
    for path in files:
        if path.suffix != ".parquet":
            encodings[path] = text_encoding(path, "--source", whole=path.suffix in TEXT_SUFFIXES)
        else:
            import pyarrow.parquet as pq

            try:
                columns = pq.read_schema(path).names
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise UserError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:150]})") from None
            if "text" not in columns:
                raise UserError(f"{path}: no 'text' column (columns: {', '.join(columns)})")

    def read(path):
        if path.suffix == ".parquet":
            return read_parquet(path)
        if path.suffix in TEXT_SUFFIXES:
            return read_txt(path, encodings[path], separator)
        return read_jsonl(path, encodings[path])

    return (doc for path in files for doc in read(path))


def open_hub():
    reach_hub(HF_DATASET, "to use local files pass --source PATH_OR_GLOB (.jsonl, .parquet, .txt or .md)")
    try:
        import datasets

        stream = iter(datasets.load_dataset(HF_DATASET, name=HF_CONFIG, split="train", streaming=True))
        first = next(stream)
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(
            f"cannot stream {HF_DATASET} {HF_CONFIG} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            f"to use local files pass --source PATH_OR_GLOB (.jsonl, .parquet, .txt or .md)"
        ) from None
    return (row["text"] if isinstance(row.get("text"), str) else Malformed(f"{HF_DATASET} row {i}", "no string text")
            for i, row in enumerate(chain([first], stream)))


# -----------------------------------------------------------------------------
# tokenizing (in worker processes)


def as_tokenized(text):
    """The text as the tokenizer sees it: tiktoken re-decodes a str it cannot encode as UTF-8 (lone
    surrogates, which JSON can carry) through UTF-16 with errors="replace", so two texts that differ
    only there give the same ids. Hashing this form keeps such texts on one side of the split."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split_hash(text, seed):
    """A uniform number in [0, 1) fixed by (seed, text): below val_fraction means val. text: as_tokenized."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}\0".encode())
    h.update(text.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") / 2**64


def tokenize_chunk(chunk, seed):
    """Documents -> per document: (split hash, uint16 tokens with EOT first), None if empty, or the Malformed."""
    chunk = [as_tokenized(d) if isinstance(d, str) else d for d in chunk]
    texts = [d for d in chunk if isinstance(d, str) and d.strip()]
    # one thread: the parallelism is the worker processes
    encoded = iter(get_tokenizer().encode_ordinary_batch(texts, num_threads=1))
    out = []
    for doc in chunk:
        if isinstance(doc, Malformed):
            out.append(doc)
        elif not doc.strip():
            out.append(None)
        else:
            ids = next(encoded)
            tokens = np.empty(len(ids) + 1, dtype=np.uint16)
            tokens[0] = EOT
            tokens[1:] = ids
            out.append((split_hash(doc, seed), tokens))
    return out


def chunked(docs, n):
    docs = iter(docs)
    return iter(lambda: list(islice(docs, n)), [])


# -----------------------------------------------------------------------------
# writing shards


class ShardWriter:
    """Packs one split's documents into shards of exactly shard_size tokens."""

    GROW_FROM = 1 << 20  # tokens: the buffer starts here and doubles up to shard_size

    def __init__(self, out_dir, split, shard_size, prep_id):
        self.out_dir, self.split, self.prep_id, self.shard_size = out_dir, split, prep_id, shard_size
        # grown as the tokens come: a buffer of shard_size up front is 8 GB of address space for both splits at
        # the largest --shard_size, which a machine with little memory refuses however small the corpus
        self.buf = np.empty(min(shard_size, self.GROW_FROM), dtype=np.uint16)
        self.fill = 0
        self.docs = self.tokens = 0
        self.written = {}  # name -> manifest entry

    def add(self, tokens):
        self.docs += 1
        self.tokens += len(tokens)
        while len(tokens):
            if self.fill == len(self.buf):  # only while it is smaller than a shard: a full shard is flushed below
                grown = np.empty(min(2 * len(self.buf), self.shard_size), dtype=np.uint16)
                grown[: self.fill] = self.buf[: self.fill]
                self.buf = grown
            n = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == self.shard_size:
                self.flush()

    def flush(self):
        if self.fill:
            name = f"{self.split}_{len(self.written):06d}.bin"
            self.written[name] = write_shard(self.out_dir / name, self.buf[: self.fill], self.prep_id)
            self.fill = 0


# -----------------------------------------------------------------------------


def count(text):
    """A whole number that may be written 100_000_000 or 1e8."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def unescape(text):
    """--separator as the shell hands it on: the two characters \\n are a newline (likewise \\t, \\r, \\\\)."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    out, chars = [], iter(text)
    for c in chars:
        out.append(escapes.get(next(chars, "\\"), None) if c == "\\" else c)
        if out[-1] is None:
            raise UserError(f"--separator={text}: use \\n, \\t, \\r or \\\\ for escapes, or the text itself")
    return "".join(out)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--source", action="append", default=[],
                        help=f"local .jsonl/.parquet/.txt/.md files or globs (repeat or comma separate); "
                             f"default: stream {HF_DATASET} {HF_CONFIG}")
    parser.add_argument("--separator", type=unescape, default="",
                        help="split each .txt/.md file into documents at this text ('\\n': a line each, "
                             "'\\n\\n': a paragraph each); default: a document per file")
    parser.add_argument("--out_dir", default="data/fineweb_edu", type=os.path.expanduser, help="where the shards go")
    parser.add_argument("--shard_size", type=count, default=100_000_000, help="tokens per shard")
    parser.add_argument("--max_tokens", type=count, default=0,
                        help="stop after the document that brings the total to this many tokens (0: no limit)")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents that go to val")
    parser.add_argument("--val_tokens", type=count, default=0,
                        help="once val holds this many tokens, later val documents are skipped, never sent to "
                             "train (0: no cap)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the train/val split")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    # small enough that a corpus of a few hundred documents still spreads over the workers
    parser.add_argument("--chunk_docs", type=int, default=64, help="documents per worker task")
    args = parser.parse_args(argv)
    # the shell leaves the ~ of --source=~/x alone, and the manifest should record the path that was read
    args.source = [",".join(os.path.expanduser(p.strip()) for p in spec.split(",")) for spec in args.source]
    if not 0 < args.shard_size < 2**31:
        raise UserError(f"--shard_size {args.shard_size}: must be in 1 .. 2**31-1 (a shard's count is an int32)")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: must lie in [0, 2**32)")
    if not 0 <= args.val_fraction <= 1:
        raise UserError(f"--val_fraction {args.val_fraction}: must be between 0 and 1")
    for name in ("max_tokens", "val_tokens"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be >= 0 (0 means no limit)")
    for name in ("num_proc", "chunk_docs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    files = resolve_sources(args.source) if args.source else []
    prep_out_dir(args.out_dir, [(path, "--source") for path in files])
    text_files = sum(path.suffix in TEXT_SUFFIXES for path in files)
    if text_files:
        print(f"{text_files} .txt/.md source file(s): " + (f"split into documents at --separator={args.separator!r}"
              if args.separator else "a document per file (--separator=S splits them at S)"))
    elif args.separator:
        raise UserError(f"--separator={args.separator!r} splits .txt/.md files, and --source names none; drop it")
    docs = open_files(files, args.separator) if files else open_hub()
    out_dir = Path(args.out_dir)
    get_tokenizer()  # fail here, not in a worker, if the BPE files cannot be loaded; forked workers inherit it
    # what fixes the output (not --out_dir, --num_proc, --chunk_docs): the manifest and prep id record it
    settings = {k: getattr(args, k) for k in ("source", "separator", "shard_size", "max_tokens", "val_fraction",
                                              "val_tokens", "seed")}
    pid = prep_id(MADE_BY, settings)
    with staged_prep(out_dir) as (stage, stale):  # out_dir changes only when the prep has finished
        writers = {split: ShardWriter(stage, split, args.shard_size, pid) for split in ("train", "val")}
        empty = total = val_full = val_to_train = 0
        malformed, val_seen = [], set()
        stopped = False
        tokenize = partial(tokenize_chunk, seed=args.seed)
        pool = Pool(args.num_proc) if args.num_proc > 1 else None
        try:
            # imap keeps document order, and reads ahead only as far as the task pipe holds, so memory stays bounded
            results = (pool.imap if pool else map)(tokenize, chunked(docs, args.chunk_docs))
            with tqdm(total=args.max_tokens or None, unit="tok", unit_scale=True, desc="tokenizing") as bar:
                for result in results:
                    for doc in result:
                        if doc is None:
                            empty += 1
                        elif isinstance(doc, Malformed):
                            malformed.append(doc)
                        else:
                            u, tokens = doc
                            if u >= args.val_fraction:
                                writers["train"].add(tokens)
                            elif not args.val_tokens or writers["val"].tokens < args.val_tokens:
                                writers["val"].add(tokens)
                                if args.val_tokens:  # the cap bounds this set
                                    val_seen.add(hashlib.sha256(tokens).digest())
                            elif hashlib.sha256(tokens).digest() in val_seen:  # a copy of a val document
                                val_full += 1
                                continue
                            else:  # a val document once val is full trains: no copy of it is in val
                                writers["train"].add(tokens)
                                val_to_train += 1
                            total += len(tokens)
                            bar.update(len(tokens))
                            if args.max_tokens and total >= args.max_tokens:
                                stopped = True
                                break
                    if stopped:
                        break
        finally:
            if pool:
                pool.terminate()  # also stops workers still busy with read-ahead past --max_tokens

        train, val = writers["train"], writers["val"]
        docs_read = train.docs + val.docs + val_full + empty + len(malformed)
        if total == 0:
            raise UserError(
                f"no text to tokenize: {docs_read} documents read, {empty} empty, {len(malformed)} malformed"
                + (f" (e.g. {malformed[0].where}: {malformed[0].why})" if malformed else "")
            )
        for w in writers.values():
            w.flush()
        counts = {
            "docs_read": docs_read,
            "train_docs": train.docs,
            "val_docs": val.docs,
            "val_full_skipped": val_full,
            "val_full_to_train": val_to_train,
            "empty_skipped": empty,
            "malformed": len(malformed),
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_shards": len(train.written),
            "val_shards": len(val.written),
            "stopped_at_max_tokens": stopped,
        }
        write_manifest(stage, {**train.written, **val.written}, MADE_BY, settings, counts, pid)
    summary = {"out_dir": str(out_dir), **counts, "stale_removed": stale,
               "malformed_examples": [f"{m.where}: {m.why}" for m in malformed[:MALFORMED_SHOWN]]}
    print_summary(summary)
    return summary


def print_summary(s):
    print(f"read {s['docs_read']:,} documents: {s['train_docs']:,} train, {s['val_docs']:,} val, "
          + (f"{s['val_full_to_train']:,} val past --val_tokens (to train), " if s.get("val_full_to_train") else "")
          + (f"{s['val_full_skipped']:,} copies of val documents past --val_tokens (skipped), "
             if s["val_full_skipped"] else "")
          + f"{s['empty_skipped']:,} empty (skipped), {s['malformed']:,} malformed (skipped)"
          + (" -- stopped at --max_tokens" if s["stopped_at_max_tokens"] else ""))
    for m in s["malformed_examples"]:
        print(f"  malformed: {m}")
    for split in ("train", "val"):
        n = s[split + "_shards"]
        print(f"{split}: {s[split + '_tokens']:,} tokens in {n} shard{'s' * (n != 1)} in {s['out_dir']}")
        if not s[split + "_shards"]:
            print(f"warning: no {split} documents, so no {split} shards; the training script needs both splits")
    if s["stale_removed"]:
        print(f"removed {len(s['stale_removed'])} stale shard files of an earlier run: {', '.join(s['stale_removed'])}")
    print(f"wrote {s['out_dir']}/manifest.json: the loaders check the shards against it")


if __name__ == "__main__":
    one_line_errors()
    main()
