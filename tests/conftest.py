"""The tests import the stage scripts' modules from the repo root, run offline, and read only what
ships in the repo (data/gpt2.tiktoken, data/samples/): never ../shared and never the network."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
