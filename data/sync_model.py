"""
Copy train_gpt.py's model section into the other stage scripts, so that each of them reads on its own
and all of them build the same model. Edit the model in train_gpt.py, then run this once.

    python data/sync_model.py           # rewrite the copies that differ
    python data/sync_model.py --check   # only say which differ (exit 1 if any): CI and the tests run this

The model section is the text from the `# ---...--- model` line to the `# ---...--- end of model` line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import REPO_ROOT, ArgumentParser, UserError, one_line_errors  # noqa: E402

SOURCE = "train_gpt.py"
COPIES = ("finetune_sft.py", "sample.py", "eval_hellaswag.py", "export_hf.py")
RULE = "# " + "-" * 77
MODEL_BEGIN, MODEL_END = f"{RULE} model\n", f"{RULE} end of model\n"


def split_model_section(path):
    """(before, model section with both marker lines, after) of a stage script's text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: every stage script ({SOURCE}, {', '.join(COPIES)}) holds the model")
    text = path.read_text(encoding="utf-8")
    if text.count(MODEL_BEGIN) != 1 or text.count(MODEL_END) != 1 or text.index(MODEL_BEGIN) > text.index(MODEL_END):
        raise UserError(f"{path}: expected one {MODEL_BEGIN.strip()!r} line, then one {MODEL_END.strip()!r} line")
    start, end = text.index(MODEL_BEGIN), text.index(MODEL_END) + len(MODEL_END)
    return text[:start], text[start:end], text[end:]


def model_section(path):
    return split_model_section(path)[1]


def sync(check=False, root=REPO_ROOT):
    """Bring every copy in line with train_gpt.py (or, with check, only list those that differ)."""
    reference = model_section(root / SOURCE)
    stale = []
    for name in COPIES:
        before, section, after = split_model_section(root / name)
        if section != reference:
            stale.append(name)
            if not check:
                tmp = root / f"{name}.tmp"
                tmp.write_text(before + reference + after, encoding="utf-8")
                tmp.replace(root / name)  # whole or not at all
    return stale


def main(argv=None):
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list the copies that differ; exit 1 if any do")
    args = parser.parse_args(argv)
    stale = sync(check=args.check)
    if args.check and stale:
        raise UserError(f"the model section of {', '.join(stale)} differs from {SOURCE}'s; "
                        "run python data/sync_model.py")
    if args.check or not stale:
        print(f"every stage script's model section matches {SOURCE}'s")
    else:
        print(f"{', '.join(stale)}: model section updated from {SOURCE}'s")


if __name__ == "__main__":
    one_line_errors()
    main()
