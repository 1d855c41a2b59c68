"""The tests import the stage scripts' modules from the repo root, run offline, and read only what
ships in the repo (data/gpt2.tiktoken, data/samples/): never data from outside it and never the network."""

import os
import sys
from pathlib import Path

# The tests' models are tiny: one thread runs them faster than two that fight each other and the
# subprocesses (training runs, torchrun ranks) for CI's 2 cores; pytest-xdist runs a worker per core
# instead (pyproject.toml). Set before torch is imported; the subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
from helpers import run_script  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real pretraining run of configs/smoke.toml on the bundled sample shards (6 steps, with val loss,
    HellaSwag and a sample at steps 3 and 6), shared by every test that needs a trained checkpoint."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    run_script("train_gpt.py", "configs/smoke.toml", f"--out_dir={out}", "--device=cpu", "--max_iters=6",
               "--log_interval=1", "--eval_interval=3",
               "--sample_interval=3",
               "--hellaswag_interval=3", "--hellaswag_limit=8")
    return out
