"""Loaded by pytest for every path it collects here: the unit tests (tests/) and the notebooks (nbval).

No test and no notebook kernel (nbval's kernels inherit this process's environment) starts a background build
of the compiled decode step (mixtral_edu/inference/background.py): the tests that check it turn it on themselves.
"""

import os

os.environ["MIXTRAL_EDU_BACKGROUND_BUILD"] = "0"
