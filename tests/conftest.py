"""Every test runs offline from the repo root's imports: the GPT-2 BPE comes from shared/tiktoken_cache
(a sibling of the repo), and the stage scripts and data/ import as top-level modules."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO_ROOT.parent / "shared" / "tiktoken_cache"))
sys.path.insert(0, str(REPO_ROOT))
