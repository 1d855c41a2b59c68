"""
lm-evaluation-harness next to eval_hellaswag.py, on the same HellaSwag rows, for one checkpoint:
ours scores the checkpoint, the harness scores its export_hf.py folder, both offline from a local file.

    python bench/bench_lm_eval.py --ckpt=logs/gpt2_124m --limit=500
    python bench/bench_lm_eval.py --ckpt=logs/smoke --data=data/samples/hellaswag_val_200.jsonl --device=cpu
    python bench/bench_lm_eval.py --ckpt=logs/smoke --lm_eval=/path/to/venv/bin/lm_eval   # lm-eval from another env

lm-eval is not a dependency of this repo: when lm_eval="" and this Python lacks it, it is installed
with pip (it pulls in many packages; use a virtual environment). Its own `hellaswag` task downloads
Rowan/hellaswag from the Hub, so this script writes two local tasks reading `data` instead:

    hellaswag_local      the harness's hellaswag, row for row: its own preprocessing (lm_eval.tasks.hellaswag)
    hellaswag_local_raw  the text eval_hellaswag.py scores: ctx, then " " + each ending, as in the file

Conventions. acc is the same rule everywhere: the ending with the highest total log-likelihood. The
scores differ because of what is scored and how acc_norm normalises:
  - text: the harness scores "{activity_label}: {ctx_a} {Ctx_b}" with WikiHow's [title]/[step] markers
    removed, and cleaned endings; eval_hellaswag.py (build-nanogpt's convention) scores the raw ctx
    and endings. hellaswag_local_raw gives the harness our text, so its acc must equal ours.
  - acc_norm: the harness divides each ending's log-likelihood by its length in characters,
    eval_hellaswag.py by its number of tokens.
  - the harness tokenizes context + ending together and splits after the context's tokens; we tokenize
    them apart. With GPT-2's BPE the split falls on the same token boundary (a word's leading space
    starts its token), so both score the same tokens.
  For GPT-2 124M on all 10,042 rows: ours 0.2859 / 0.2955, the harness 0.2892 / 0.3114 (build-nanogpt).

The same run as one command, for any exported folder (on the Hub's copy of the data):

    lm_eval --model hf --model_args pretrained=hf/gpt2_124m --tasks hellaswag --batch_size 16

Settings: the block below, then --key=value (or --key value).
"""

import glob
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from data import UserError, one_line_errors  # noqa: E402
from data.checkpoint import resolve_checkpoint  # noqa: E402
from data.settings import parse_settings  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402

one_line_errors()

# ----------------------------------------------------------------------------- settings
ckpt = ""  # checkpoint file or run dir; "" = the newest logs/*/ckpt.pt
hf_dir = ""  # its export_hf.py folder; "" = export the checkpoint to a temp folder first
data = "data/hellaswag/hellaswag_val.jsonl"  # HellaSwag val jsonl, read by both
limit = 500  # score the first N rows; 0 = all 10,042
batch_size = 16  # lm-eval's and eval_hellaswag.py's batch size
device = "cpu"  # "cpu" or "cuda", for both
lm_eval = ""  # the lm_eval command; "" = python -m lm_eval here, pip-installed when missing

config = parse_settings(globals(), sys.argv[1:])
globals().update(config)

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
training_split: null
validation_split: validation
test_split: null
process_docs: !function utils.{process}
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
UTILS = '''from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401  (the harness's own preprocessing)


def process_docs_raw(dataset):
    """eval_hellaswag.py's text: ctx and the endings as they are in the file."""
    return dataset.map(lambda doc: {"query": doc["ctx"], "choices": doc["endings"], "gold": int(doc["label"])})
'''


def run(cmd, what, env=None):
    started = time.time()
    result = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise UserError(f"{what} failed (exit {result.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    print(f"{what}: {time.time() - started:.0f} s", flush=True)
    return result


# ----------------------------------------------------------------------------- main
if not Path(data).is_file():
    raise UserError(f"--data={data}: not found; fetch it with python eval_hellaswag.py --download_only")
data = str(Path(data).resolve())
ckpt_path = resolve_checkpoint(ckpt)
if lm_eval:
    command = shlex.split(lm_eval)
else:
    if importlib.util.find_spec("lm_eval") is None:
        print("lm-eval is not installed here: pip install lm-eval[hf] (it pulls in many packages)", flush=True)
        run([sys.executable, "-m", "pip", "install", "lm-eval[hf]"], "pip install lm-eval[hf]")
    command = [sys.executable, "-m", "lm_eval"]

with tempfile.TemporaryDirectory(prefix="bench_lm_eval_") as tmp:
    tmp = Path(tmp)
    folder = Path(hf_dir) if hf_dir else tmp / "hf"
    if not hf_dir:
        run([sys.executable, "export_hf.py", f"--ckpt={ckpt_path}", f"--out_dir={folder}"], "export_hf.py")
    run([sys.executable, "eval_hellaswag.py", f"--ckpt={ckpt_path}", f"--data={data}", f"--limit={limit}",
         f"--batch_size={batch_size}", f"--device={device}", "--dtype=float32", f"--out={tmp / 'ours.json'}"],
        "eval_hellaswag.py")
    ours = json.loads((tmp / "ours.json").read_text())

    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    for name, process in (("hellaswag_local", "process_docs"), ("hellaswag_local_raw", "process_docs_raw")):
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=json.dumps(data), process=process))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run([*command, "--model", "hf", "--model_args", f"pretrained={folder.resolve()},dtype=float32",
         "--tasks", "hellaswag_local,hellaswag_local_raw", "--include_path", tasks, "--batch_size", batch_size,
         "--device", device, "--output_path", tmp / "lm_eval", "--log_samples",
         *(["--limit", limit] if limit else [])], "lm_eval", env=env)
    found = glob.glob(str(tmp / "lm_eval" / "**" / "results_*.json"), recursive=True)
    if not found:
        raise UserError(f"lm_eval wrote no results_*.json under {tmp / 'lm_eval'}")
    results = json.loads(Path(found[0]).read_text())
    harness = {name: (r["acc,none"], r["acc_norm,none"]) for name, r in results["results"].items()}
    n_harness = {name: results.get("n-samples", {}).get(name, {}).get("effective") for name in harness}
    # The harness's log-likelihoods of our text, normalised per token as eval_hellaswag.py does
    samples = glob.glob(str(tmp / "lm_eval" / "**" / "samples_hellaswag_local_raw_*.jsonl"), recursive=True)
    enc, right = get_tokenizer(), []
    for line in Path(samples[0]).read_text().splitlines() if samples else []:
        sample = json.loads(line)
        lls = [float(resp[0][0] if isinstance(resp[0], list) else resp[0]) for resp in sample["filtered_resps"]]
        per_token = [ll / len(enc.encode_ordinary(" " + ending)) for ll, ending in
                     zip(lls, sample["doc"]["choices"], strict=True)]
        right.append(max(range(4), key=lambda i: (per_token[i], -i)) == sample["doc"]["gold"])

print(f"\nHellaSwag, the first {ours['n']} rows of {data}; {ckpt_path} (ours) and its export (lm-eval "
      f"{results.get('lm_eval_version', '?')}, transformers {results.get('transformers_version', '?')})")
print(f"{'':28s} {'acc':>7s} {'acc_norm':>9s}  rows  text scored; acc_norm divides the log-likelihood by")
print(f"{'eval_hellaswag.py':28s} {ours['acc']:7.4f} {ours['acc_norm']:9.4f} {ours['n']:5d}  raw ctx + endings; tokens")
for name, text in (("hellaswag_local_raw", "raw ctx + endings; characters"),
                   ("hellaswag_local", "harness preprocessing; characters")):
    acc, acc_norm = harness[name]
    print(f"{'lm-eval ' + name:28s} {acc:7.4f} {acc_norm:9.4f} {n_harness[name] or 0:5d}  {text}")
if right:
    print(f"{'lm-eval hellaswag_local_raw':28s} {'':7s} {sum(right) / len(right):9.4f} {len(right):5d}  "
          "raw ctx + endings; tokens (from its logged log-likelihoods)")
same_acc = abs(harness["hellaswag_local_raw"][0] - ours["acc"]) < 0.5 / ours["n"]
same_norm = bool(right) and abs(sum(right) / len(right) - ours["acc_norm"]) < 0.5 / ours["n"]
print(f"same text, same rule: acc {'equal' if same_acc else 'DIFFERENT'}, per-token acc_norm "
      f"{'equal' if same_norm else 'DIFFERENT'}; the other numbers differ by convention only (see the docstring)")
