"""mixtral_edu: Mixtral-8x7B built piece by piece, small enough to read, exact enough to check.

The package imports without Jupyter, transformers or mistral-common; those serve notebooks and tests.
"""

from .config import MixtralConfig

__all__ = ["MixtralConfig"]
__version__ = "0.1.0"
