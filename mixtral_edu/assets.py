"""Where the project's own files live: the embedded tiny checkpoint and the data folder.

The tiny trained Mixtral in `data/tiny-mixtral/` is the default model of the command line and the
notebooks; the environment variable MIXTRAL_EDU_WEIGHTS points them at another folder instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A clone (or `make install`'s editable install) has data/ beside the package; a plain `pip install .` puts the
# tiny models under <prefix>/share/mixtral-edu (pyproject.toml's data-files) and has no corpus.
_INSTALLED = Path(sys.prefix) / "share" / "mixtral-edu"
DATA_DIR = REPO_ROOT / "data" if (REPO_ROOT / "data" / "tiny-mixtral").is_dir() else _INSTALLED
TINY_MODEL_DIR = DATA_DIR / "tiny-mixtral"


def default_weights_dir() -> Path:
    """The folder of weights to use when none is given: $MIXTRAL_EDU_WEIGHTS, else data/tiny-mixtral."""
    override = os.environ.get("MIXTRAL_EDU_WEIGHTS")
    return Path(override) if override else TINY_MODEL_DIR
