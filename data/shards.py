"""
The on-disk formats the data-prep scripts write and the loaders read (no torch here).

Token shards: the llm.c / modded-nanogpt .bin layout, so their readers load ours. A header of
256 int32: [0] magic, [1] version, [2] number of tokens, as llm.c; then in its spare words
[3] the vocab size, [4] a hash of the tokenizer, [5] the prep id (a hash of the prep's script and
settings; 0 for shards made by hand), [6:10] the tokenizer's name in ASCII. Then the tokens as uint16.

Chat examples (data/sft_mix.py): a split is the examples' tokens back to back in
{split}_000000.bin plus {split}_offsets.npy, int64 boundaries: example i is
tokens[offsets[i]:offsets[i+1]]. The loss mask is not stored: data/tokenizer.py reply_mask()
re-derives it from the special ids, which ordinary text never produces.

The manifest: a prep writes into a folder beside out_dir (staged_prep) and, when done, writes the manifest
listing every file it wrote (tokens, bytes, sha256), its settings and the tokenizer, then swaps the folder
in whole; a failed or interrupted prep leaves the earlier one as it was. list_shards() refuses a dir
without a finished manifest or whose files differ from it (missing, extra, resized, or from another
prep), so a half-deleted dir or a mix of two runs' shards never trains silently.
"""

import contextlib
import functools
import hashlib
import io
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np

from data import UserError
from data.tokenizer import ASSISTANT, BPE_SHA256, EOT, PAT_STR, TOKENIZER, USER, VOCAB_SIZE

PREPARE_HINT = "python data/fineweb_edu.py --out_dir {dir}"
SFT_PREPARE_HINT = "python data/sft_mix.py --out_dir {dir}"

MAGIC, VERSION = 20240520, 1  # llm.c's GPT-2 shards; what we add sits in words llm.c leaves zero
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
NAME_WORDS = slice(6, 10)  # 16 bytes for the tokenizer's name
MANIFEST = "manifest.json"


def _int32_hash(text):
    """A nonzero int32 fixed by text (0 in a header means: not recorded)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little", signed=True) or 1


@functools.cache
def tokenizer_record():
    """What shards and manifests record of the tokenizer: its name, the vocab size and a hash of
    everything that fixes the ids (the BPE ranks, the split regex, the special ids)."""
    definition = json.dumps([TOKENIZER, VOCAB_SIZE, BPE_SHA256, PAT_STR, EOT, USER, ASSISTANT])
    return {"name": TOKENIZER, "vocab_size": VOCAB_SIZE, "hash": _int32_hash(definition)}


def prep_id(made_by, settings):
    """The id a prep writes into every shard header and its manifest: shards of two preps with
    different settings never pass for one prep's, even when their names and sizes agree."""
    return _int32_hash(json.dumps([made_by, settings, tokenizer_record()], sort_keys=True))


def command_line(made_by, settings, data_dir):
    """The shell command that re-runs a prep with these settings into data_dir."""
    args = []
    for key, value in settings.items():
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                args.append(f"--{key}")
            elif v is not False and v != "":
                args.append(f"--{key}={shlex.quote(str(v))}")
    return " ".join(["python", made_by, *args, f"--out_dir {shlex.quote(str(data_dir))}"])


def prep_command(data_dir):
    """The command that (re)makes data_dir: from its manifest when it has a readable one, else the
    default prep for what the dir holds (chat examples have offsets files)."""
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
        return command_line(manifest["made_by"], manifest["settings"], data_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    hint = SFT_PREPARE_HINT if any(data_dir.glob("*_offsets.npy")) else PREPARE_HINT
    return hint.format(dir=shlex.quote(str(data_dir)))


def _write_atomic(path, chunks):
    """Write byte chunks to path via a temp file renamed into place; return the manifest entry
    (bytes, sha256). fsync first, so the rename never lands before the data does."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            size += memoryview(chunk).nbytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_shard(path, tokens, prep_id=0):
    """Write a shard atomically; return its manifest entry (tokens, bytes, sha256)."""
    tokens = np.asarray(tokens)
    if len(tokens) >= 2**31:
        raise ValueError("a shard holds at most 2**31 - 1 tokens (its count is an int32)")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):  # ids past the vocab: the readers refuse them
        raise ValueError("token ids must fit in uint16")
    tok = tokenizer_record()
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:6] = MAGIC, VERSION, len(tokens), tok["vocab_size"], tok["hash"], prep_id
    header[NAME_WORDS] = np.frombuffer(tok["name"].encode("ascii").ljust(16, b"\0"), dtype=np.int32)
    body = np.ascontiguousarray(tokens, dtype=np.uint16)  # no copy when the prep hands uint16 already
    return {"tokens": len(tokens), **_write_atomic(path, [header.tobytes(), memoryview(body).cast("B")])}


def _tokenizer_name(header):
    return header[NAME_WORDS].tobytes().rstrip(b"\0").decode("ascii", "replace")


def read_header(path, prep_id=None):
    """Validate a shard's header and size (and its prep id, when given); return its number of tokens."""
    path = Path(path)
    size = path.stat().st_size
    fix = lambda: f"re-run the data prep: {prep_command(path.parent)}"  # the manifest is read only on error
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; {fix()}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise UserError(f"{path}: magic number {header[0]} is not {MAGIC}, so this is not a .bin token shard; {fix()}")
    if header[1] != VERSION:
        raise UserError(f"{path}: shard version {header[1]}, this code reads version {VERSION}; {fix()}")
    tok = tokenizer_record()
    if header[3] == 0 and header[4] == 0:
        raise UserError(f"{path}: its header records no tokenizer (an llm.c-style shard, or one from before shards "
                        f"recorded it), so its ids cannot be trusted; {fix()}")
    if (header[3], header[4]) != (tok["vocab_size"], tok["hash"]):
        raise UserError(f"{path}: made with tokenizer {_tokenizer_name(header)!r} (vocab {header[3]}, hash "
                        f"{header[4]}), this code uses {tok['name']!r} (vocab {tok['vocab_size']}, hash "
                        f"{tok['hash']}); {fix()}")
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        raise UserError(
            f"{path}: header promises {ntok:,} tokens ({HEADER_BYTES + 2 * ntok:,} bytes) but the file has "
            f"{size:,} bytes (truncated or partly written); {fix()}"
        )
    if prep_id is not None and header[5] != prep_id:
        raise UserError(f"{path}: written by another data prep run (prep id {header[5]}, the {MANIFEST} says "
                        f"{prep_id}), so the dir mixes two runs' shards; {fix()}")
    return ntok


def read_shard(path, prep_id=None):
    """All tokens of a shard as a uint16 array (read into memory, not memory-mapped), ids checked."""
    ntok = read_header(path, prep_id)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens = np.fromfile(f, dtype=np.uint16, count=ntok)
    if ntok and tokens.max() >= VOCAB_SIZE:
        i = int(np.argmax(tokens >= VOCAB_SIZE))
        raise UserError(f"{path}: token {i:,} is id {tokens[i]}, outside the {TOKENIZER} vocabulary (0.."
                        f"{VOCAB_SIZE - 1}): the file is damaged; re-run the data prep: {prep_command(path.parent)}")
    return tokens


# -----------------------------------------------------------------------------
# the manifest


def _in_split(name, split):
    return name.startswith(split + "_") and (name.endswith(".bin") or name == f"{split}_offsets.npy")


def split_files(data_dir, split):
    """The names of a split's files on disk: its .bin shards and, for chat examples, its offsets."""
    return sorted(p.name for p in Path(data_dir).glob(f"{split}_*") if _in_split(p.name, split))


@contextlib.contextmanager
def staged_prep(out_dir):
    """The folder a prep writes, beside out_dir, swapped in whole when the prep is done: a prep that is
    refused, fails or is interrupted leaves out_dir as it was, so the last complete prep stays usable. A
    second prep into the same out_dir meanwhile is refused. Files of out_dir that are not a prep's own
    (its splits, manifest.json, summary.json) move along. Yields (folder, stale): stale receives, at the
    swap, the names of the split files of the earlier prep that the new one does not have."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir={out_dir} is a file; pick a folder")
    lock_path = out_dir.with_name(f".{out_dir.name}.lock")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")
    except OSError as e:
        raise UserError(f"cannot write beside --out_dir={out_dir} ({e.strerror}); pick another --out_dir") from None
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks, no guard
            pass
        except OSError:  # the lock file stays: it is the other prep's
            raise UserError(f"another prep is writing {out_dir} now (it holds {lock_path}); wait for it to "
                            "end") from None
        for left in (*out_dir.parent.glob(f".{out_dir.name}.new*"), *out_dir.parent.glob(f".{out_dir.name}.old*")):
            shutil.rmtree(left, ignore_errors=True)  # left by a prep killed outright
        stage, stale = out_dir.with_name(f".{out_dir.name}.new{os.getpid()}"), []
        stage.mkdir()
        try:
            yield stage, stale
            if out_dir.is_dir():
                new = set(os.listdir(stage))
                for path in sorted(out_dir.iterdir()):
                    name = path.name
                    if _in_split(name, "train") or _in_split(name, "val") or (
                            name.startswith(("train_", "val_")) and name.endswith(".tmp")):
                        stale += [] if name in new else [name]
                    elif name not in (MANIFEST, "summary.json"):
                        os.replace(path, stage / name)  # not the prep's: it stays
                old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
                os.replace(out_dir, old)
                os.replace(stage, out_dir)
                shutil.rmtree(old)
            else:
                os.replace(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def write_manifest(out_dir, files=None, made_by="", settings=None, counts=None, prep_id=0):
    """Write out_dir/manifest.json atomically, as the prep's last act. files: name -> the entry that
    write_shard / write_examples returned. files=None records every split file now in out_dir
    (for dirs made by hand with write_shard, as the tests do)."""
    out_dir = Path(out_dir)
    if files is None:
        files = {}
        for path in sorted(out_dir.iterdir()):
            if _in_split(path.name, path.name.split("_")[0]):
                data = path.read_bytes()
                entry = {"tokens": read_header(path)} if path.suffix == ".bin" else {}
                files[path.name] = {**entry, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "made_by": made_by,
        "settings": settings or {},
        "tokenizer": tokenizer_record(),
        "prep_id": prep_id,
        "finished": True,
        "counts": counts or {},
        "files": dict(sorted(files.items())),
    }
    _write_atomic(out_dir / MANIFEST, [(json.dumps(manifest, indent=2) + "\n").encode()])
    return manifest


def read_manifest(data_dir):
    """data_dir's finished manifest, checked for shape and for the tokenizer this code uses."""
    path = Path(data_dir) / MANIFEST
    fix = f"re-run the data prep: {prep_command(data_dir)}"
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {data_dir}: its data prep did not finish (or predates manifests), so "
                        f"its shards cannot be trusted; {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        finished = manifest.get("finished")
        ok = finished is False or (finished is True and isinstance(manifest["prep_id"], int)
                                   and all(isinstance(e["bytes"], int) for e in manifest["files"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is damaged (not the JSON a data prep writes); {fix}")
    if finished is False:
        raise UserError(f"{path}: its data prep did not finish (interrupted, or still running), so the shards in "
                        f"{data_dir} cannot be trusted; {fix}")
    made, tok = manifest.get("tokenizer"), tokenizer_record()
    if made != tok:
        made = f"{made.get('name')!r} (vocab {made.get('vocab_size')})" if isinstance(made, dict) else repr(made)
        raise UserError(f"{path}: made with tokenizer {made}, this code uses {tok['name']!r} (vocab "
                        f"{tok['vocab_size']}, hash {tok['hash']}); {fix}")
    return manifest


def check_split(data_dir, split, manifest):
    """Refuse a split whose files on disk are not exactly those the manifest lists, at their sizes."""
    data_dir = Path(data_dir)
    fix = f"re-run the data prep: {prep_command(data_dir)}"
    listed = {name: e for name, e in manifest["files"].items() if _in_split(name, split)}
    on_disk = split_files(data_dir, split)
    missing, extra = sorted(set(listed) - set(on_disk)), sorted(set(on_disk) - set(listed))
    more = lambda names: f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    if missing:
        raise UserError(f"{data_dir / missing[0]}{more(missing)} is missing, though {MANIFEST} lists it (the dir "
                        f"was partly deleted); {fix}")
    if extra:
        raise UserError(f"{data_dir / extra[0]}{more(extra)} is not in {MANIFEST}: a stale file of another prep "
                        f"run; delete it, or {fix}")
    for name, entry in listed.items():
        size = (data_dir / name).stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"{data_dir / name}: {size:,} bytes, but {MANIFEST} records {entry['bytes']:,} (changed "
                            f"since the prep wrote it); {fix}")
        if name.endswith(".bin"):
            read_header(data_dir / name, manifest["prep_id"])


def list_shards(data_dir, split):
    """The sorted `{split}_NNNNNN.bin` files in data_dir, checked against its manifest (see check_split),
    or a clear error with the command that makes them."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist; prepare the shards with: {prep_command(data_dir)}")
    files = sorted(data_dir.glob(f"{split}_*.bin"))
    if not files and not (data_dir / MANIFEST).exists():
        raise UserError(f"no {split}_*.bin shards in {data_dir}; prepare them with: {prep_command(data_dir)}")
    check_split(data_dir, split, read_manifest(data_dir))
    if not files:
        raise UserError(f"no {split}_*.bin shards in {data_dir}: its data prep put no documents in {split} "
                        f"(see --val_fraction); re-run it: {prep_command(data_dir)}")
    return files


# -----------------------------------------------------------------------------
# chat examples


def write_examples(out_dir, split, examples, prep_id=0):
    """Write token-id lists as one split: the shard, then its offsets (both atomically).
    Returns the two files' manifest entries by name."""
    out_dir = Path(out_dir)
    lengths = np.array([len(ids) for ids in examples], dtype=np.int64)
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in examples])
    entries = {f"{split}_000000.bin": write_shard(out_dir / f"{split}_000000.bin", tokens, prep_id)}
    buf = io.BytesIO()
    np.save(buf, np.concatenate([[0], np.cumsum(lengths)]))
    entries[f"{split}_offsets.npy"] = _write_atomic(out_dir / f"{split}_offsets.npy", [buf.getvalue()])
    return entries


def read_examples(data_dir, split):
    """(tokens, offsets) of a split written by write_examples, checked against the manifest and each other."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}_offsets.npy"
    if not path.is_file() and not (data_dir / MANIFEST).is_file():
        raise UserError(f"no {path.name} in {data_dir}; prepare the examples with: "
                        f"{SFT_PREPARE_HINT.format(dir=shlex.quote(str(data_dir)))}")
    manifest = read_manifest(data_dir)
    if path.name not in manifest["files"]:
        raise UserError(f"no {path.name} in {data_dir}: it holds no chat examples (made by "
                        f"{manifest.get('made_by') or 'hand'}); prepare them with: "
                        f"{SFT_PREPARE_HINT.format(dir=shlex.quote(str(data_dir)))}")
    tokens = np.concatenate([read_shard(f, manifest["prep_id"]) for f in list_shards(data_dir, split)])
    fix = f"re-run the data prep: {prep_command(data_dir)}"
    try:  # memory-mapped, so a damaged header cannot ask for a huge allocation; np.load raises many kinds
        offsets = np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except Exception as e:
        raise UserError(f"{path} is not a readable .npy array ({type(e).__name__}); {fix}") from None
    if (offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 2 or offsets[0] != 0
            or offsets[-1] != len(tokens) or np.any(np.diff(offsets) <= 0)):
        raise UserError(f"{path} does not match the {len(tokens):,} tokens of the {split} shards; {fix}")
    return tokens, offsets.astype(np.int64)
