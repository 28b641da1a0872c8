"""Where the project's own files live: the embedded tiny checkpoint and the data folder.

The tiny trained Mixtral in `data/tiny-mixtral/` is the default model of the command line and the
notebooks; the environment variable MIXTRAL_EDU_WEIGHTS points them at another folder instead.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
TINY_MODEL_DIR = DATA_DIR / "tiny-mixtral"


def default_weights_dir() -> Path:
    """The folder of weights to use when none is given: $MIXTRAL_EDU_WEIGHTS, else data/tiny-mixtral."""
    override = os.environ.get("MIXTRAL_EDU_WEIGHTS")
    return Path(override) if override else TINY_MODEL_DIR
