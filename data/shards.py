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
import errno
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np

from data import UserError, refuse_clobber
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
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += memoryview(chunk).nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # write() and fsync() name no file; the message should
            e.filename = str(path)
        raise
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
    with open(path, "rb") as f:
        return _check_header(f, Path(path), prep_id)


def _check_header(f, path, prep_id):
    """read_header on the open file f: its size and its header come from one file, even if path is replaced."""
    size = os.fstat(f.fileno()).st_size
    fix = lambda: f"re-run the data prep: {prep_command(path.parent)}"  # the manifest is read only on error
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; {fix()}")
    header = np.frombuffer(f.read(HEADER_BYTES), dtype=np.int32)
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
    path = Path(path)
    with open(path, "rb") as f:
        ntok = _check_header(f, path, prep_id)
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


def _split_file(name):
    """A split's file, or one half written: what a prep replaces, and what is stale when it writes no such file."""
    return (_in_split(name, "train") or _in_split(name, "val")
            or (name.startswith(("train_", "val_")) and name.endswith(".tmp")))


def _prep_own(name):
    """A file a prep writes into its folder; any other file of out_dir is the user's and moves along."""
    return _split_file(name) or name in (MANIFEST, MANIFEST + ".tmp", "summary.json")


def prep_out_dir(out_dir, reads=()):
    """The real folder (links followed) that a prep into out_dir replaces whole, refused before the prep runs
    where that would lose something: out_dir is a file, the current dir or holds it (the shell would be left in
    a deleted folder), a mount point (it cannot be swapped), or is or holds an input (data.refuse_clobber;
    reads: (path, setting) pairs). A link keeps pointing at the new contents."""
    try:
        real = Path(out_dir).expanduser().resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop of links, later ones OSError
        raise UserError(f"--out_dir={out_dir} is a loop of symbolic links; point it at a folder") from None
    if real.exists() and not real.is_dir():
        raise UserError(f"--out_dir={out_dir} is a file; pick a folder")
    above = next(p for p in real.parents if p.exists())
    if not above.is_dir():
        raise UserError(f"--out_dir={out_dir} lies under {above}, which is a file; pick a folder")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--out_dir={out_dir} is the current dir{'' if real == cwd else ' or holds it'}: a prep "
                        "replaces its out_dir whole; pick a folder of its own, e.g. --out_dir=shards")
    if real.is_dir() and os.path.ismount(real):
        raise UserError(f"--out_dir={out_dir} is a mount point, which a prep cannot replace whole; pick a folder "
                        f"inside it, e.g. --out_dir={Path(out_dir) / 'shards'}")
    refuse_clobber([(out_dir, "--out_dir", True)], reads)
    return real


def _beside(out_dir, kind):
    """The folders of this kind ("new": a prep's stage, "old": an earlier prep being swapped out) beside out_dir.
    Matched by name, not glob: an out_dir named like a pattern (run[1]) must not match another's folders."""
    pattern = re.compile(re.escape(f".{out_dir.name}.{kind}") + r"\d+")
    return sorted(p for p in out_dir.parent.iterdir() if pattern.fullmatch(p.name))


def _clear_beside(out_dir):
    """Undo what a prep that stopped before or during its swap (an error, or killed outright) left beside out_dir:
    an earlier prep moved aside comes back, the user's files go back into out_dir, and the rest, the prep's own
    files, is removed. A folder that still holds a file of the user's is never removed."""
    olds, news = _beside(out_dir, "old"), _beside(out_dir, "new")
    if olds and not out_dir.exists():  # stopped between the swap's two renames: the earlier prep is the one to keep
        os.replace(olds.pop(), out_dir)
    for left in (*news, *olds):
        for path in sorted(left.iterdir()):
            if _prep_own(path.name):
                continue
            if (out_dir / path.name).exists() or (out_dir / path.name).is_symlink():
                raise UserError(f"{path} was moved there by a prep that was interrupted, and {out_dir} now has a "
                                f"{path.name} too; move one of them elsewhere and re-run")
            out_dir.mkdir(exist_ok=True)
            os.replace(path, out_dir / path.name)
        shutil.rmtree(left)


def _write_error(e, out_dir, stage):
    """A one-line error for an OSError met while a prep wrote (or read) its files: which file, why, what to do."""
    kept = f"{out_dir} is as it was" if out_dir.exists() else f"nothing was written to {out_dir}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        written = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()) if stage.is_dir() else 0
        free = shutil.disk_usage(out_dir.parent).free
        return UserError(f"disk full: free more than {max(1, -(-written // 10**6)):,} MB in {out_dir.parent} (this "
                         f"prep had written {written / 1e6:,.1f} MB beside {out_dir.name} when it ran out"
                         f"{f' writing {e.filename}' if e.filename else ''}; {free / 1e6:,.0f} MB free now), or pick "
                         f"an --out_dir on a disk with room, and re-run; {kept}")
    names = [n for n in (e.filename, e.filename2) if n]
    reason = e.strerror or " ".join(str(e).split())[:200] or type(e).__name__
    if names and any(Path(n).parent in (stage, out_dir, out_dir.parent) for n in names):
        return UserError(f"cannot write {' -> '.join(map(str, names))} ({reason}); {kept}")
    return UserError(f"{' -> '.join(map(str, names)) + ': ' if names else ''}{reason}; the prep stopped and {kept}")


@contextlib.contextmanager
def staged_prep(out_dir):
    """The folder a prep writes, beside out_dir, swapped in whole when the prep is done: a prep that is
    refused, fails or is interrupted leaves out_dir as it was, so the last complete prep stays usable. A
    second prep into the same out_dir meanwhile is refused. Files of out_dir that are not a prep's own
    (its splits, manifest.json, summary.json) move along, and come back if the prep stops mid-swap. A link
    out_dir is followed: its target is swapped, and the link stays. An OSError while writing (a full disk)
    is a one-line error. Yields (folder, stale): stale receives, at the swap, the names of the split files
    of the earlier prep that the new one does not have."""
    out_dir = prep_out_dir(out_dir)
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
        stage, stale = out_dir.with_name(f".{out_dir.name}.new{os.getpid()}"), []
        try:
            _clear_beside(out_dir)  # what a prep killed outright left
            stage.mkdir()
            yield stage, stale
            if out_dir.is_dir():
                new = set(os.listdir(stage))
                for path in sorted(out_dir.iterdir()):
                    if not _prep_own(path.name):
                        os.replace(path, stage / path.name)  # not the prep's: it stays
                    elif _split_file(path.name) and path.name not in new:
                        stale.append(path.name)
                os.replace(out_dir, out_dir.with_name(f".{out_dir.name}.old{os.getpid()}"))
            os.replace(stage, out_dir)
        except BrokenPipeError:  # stdout closed early: one_line_errors() ends the process quietly
            raise
        except OSError as e:
            raise _write_error(e, out_dir, stage) from None
        finally:
            with contextlib.suppress(OSError, UserError):  # what cannot be cleared now, the next prep clears
                _clear_beside(out_dir)
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


def prep_stamp(data_dir):
    """What tells the prep now in data_dir from any later one, for one stat: its manifest file's identity. A
    prep writes a new manifest file and swaps its folder in whole, so a later prep's manifest is another file
    (another inode, size or mtime), and reading the shards changes none of these. None: no manifest now."""
    try:
        st = os.stat(Path(data_dir) / MANIFEST)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def reprepared(data_dir, fix, when="during the run", changed=MANIFEST):
    """The error for a data_dir that a prep replaced while a reader had it open; fix: what to do once it is done."""
    return UserError(f"{data_dir} was re-prepared {when} (its {changed} is another file now), so its shards are no "
                     f"longer the ones this run opened; once the prep is done, {fix}")


def check_prep_stamp(data_dir, stamp, fix, when="during the run"):
    """Refuse a data_dir whose prep is no longer the one stamped (prep_stamp) when it was opened."""
    if prep_stamp(data_dir) != stamp:
        raise reprepared(data_dir, fix, when)


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
    stamp = prep_stamp(data_dir)  # the shards, the offsets and the manifest must all be one prep's
    try:
        tokens, offsets = _read_examples(data_dir, split)
    except (UserError, OSError):  # a prep that swapped in midway explains a mismatch better
        check_prep_stamp(data_dir, stamp, "run the command again", when="while it was read")
        raise
    check_prep_stamp(data_dir, stamp, "run the command again", when="while it was read")
    return tokens, offsets


def _read_examples(data_dir, split):
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
