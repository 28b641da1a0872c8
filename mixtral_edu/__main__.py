"""`python -m mixtral_edu ...` is the `mixtral-edu` command line."""

import sys

from .cli import main

sys.exit(main())
