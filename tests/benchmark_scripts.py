"""benchmarks/ holds scripts, not a package: a test loads one by path, as a fresh module of its own name.

Not put on sys.path like tools/: `benchmarks/llama_cpp.py` would then shadow llama.cpp's own `llama_cpp`
bindings, which that script imports.
"""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(script: str, name: str):
    """benchmarks/`script`.py executed as module `name`, registered in sys.modules (dataclasses look there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
