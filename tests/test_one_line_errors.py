"""Bad inputs that once gave tracebacks (the second attack audit): each is one `error:` line on stderr, exit 1,
and nothing written. The stage scripts run as a user runs them, in a subprocess."""

import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, SAMPLES, run_cli

HELLASWAG_200 = SAMPLES / "hellaswag_val_200.jsonl"
RASCHKA_500 = SAMPLES / "raschka_instruction_500.json"


def cases(run, tmp):
    (tmp / "afile").write_text("")
    (tmp / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp / "bad.parquet").write_text("not parquet")
    (tmp / "folder.jsonl").mkdir()
    (tmp / "hs.jsonl").write_bytes(HELLASWAG_200.read_bytes()[:3000].rsplit(b"\n", 1)[0] + b'\n{"ctx": "caf\xe9"}\n')
    return {
        "sample --prompt_file latin-1": (["sample.py", f"--prompt_file={tmp / 'latin1.txt'}", f"--ckpt={run}"],
                                         "not valid UTF-8"),
        "sample --seed=1e30": (["sample.py", "hi", f"--ckpt={run}", "--seed=1e30"], "--seed="),
        "export out_dir under a file": (["export_hf.py", f"--ckpt={run}", f"--out_dir={tmp / 'afile' / 'hf'}"],
                                        "is a file"),
        "curves --out in a missing folder": (["data/curves.py", str(run), f"--out={tmp / 'nowhere' / 'c.png'}"],
                                             "does not exist"),
        "hellaswag non-UTF-8 row": (["eval_hellaswag.py", f"--ckpt={run}", f"--data={tmp / 'hs.jsonl'}"],
                                    "not valid UTF-8"),
        "hellaswag --out in a missing folder": (["eval_hellaswag.py", f"--ckpt={run}", f"--data={HELLASWAG_200}",
                                                 f"--out={tmp / 'nowhere' / 's.json'}"], "does not exist"),
        "fineweb corrupt parquet": (["data/fineweb_edu.py", f"--source={tmp / 'bad.parquet'}",
                                     f"--out_dir={tmp / 'out'}"], "not a readable parquet file"),
        "fineweb glob matches a folder": (["data/fineweb_edu.py", f"--source={tmp / 'folder*'}",
                                           f"--out_dir={tmp / 'out'}"], "matches the folder"),
        "fineweb out_dir is a file": (["data/fineweb_edu.py", f"--source={SAMPLES / 'fineweb_edu_100.jsonl'}",
                                       f"--out_dir={tmp / 'afile'}"], "is a file"),
        "sft_mix corrupt parquet": (["data/sft_mix.py", "--sources=raschka", f"--raschka={tmp / 'bad.parquet'}",
                                     f"--out_dir={tmp / 'out'}"], "not a readable parquet file"),
        "sft_mix --weights=raschka=inf": (["data/sft_mix.py", "--sources=raschka", f"--raschka={RASCHKA_500}",
                                           "--weights=raschka=inf", f"--out_dir={tmp / 'out'}"], "finite W"),
    }


NAMES = [  # the keys above, for the test ids
    "sample --prompt_file latin-1", "sample --seed=1e30", "export out_dir under a file",
    "curves --out in a missing folder", "hellaswag non-UTF-8 row", "hellaswag --out in a missing folder",
    "fineweb corrupt parquet", "fineweb glob matches a folder", "fineweb out_dir is a file", "sft_mix corrupt parquet",
    "sft_mix --weights=raschka=inf"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_line(name, smoke_run, tmp_path):
    args, message = cases(smoke_run, tmp_path)[name]
    device = ["--device=cpu"] if args[0] in ("sample.py", "eval_hellaswag.py") else []
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(*args, *device, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
        result.stderr[-2000:])
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the inputs


def test_a_tiny_temperature_is_greedy(smoke_run):
    tiny, greedy = (run_cli("sample.py", "Once", f"--ckpt={smoke_run}", "--device=cpu", "--max_new_tokens=8",
                            f"--temperature={t}", timeout=300) for t in ("1e-40", "0"))
    assert tiny.returncode == 0 and tiny.stdout == greedy.stdout, tiny.stderr


def test_stdout_closed_early_ends_quietly(smoke_run):
    head = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    sample = subprocess.Popen([sys.executable, "sample.py", "Once", f"--ckpt={smoke_run}", "--device=cpu",
                               "--max_new_tokens=300", "--num_samples=4"], cwd=REPO_ROOT, stdout=head.stdin,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    head.stdin.close()  # the sample process holds its own copy
    _, stderr = sample.communicate(timeout=300)
    assert len(head.stdout.read()) == 10 and head.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
