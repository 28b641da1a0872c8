"""The package imports without Jupyter, transformers or mistral-common (they serve notebooks and tests)."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transformers", "mistral_common", "IPython", "jupyter_core", "nbformat",
                                  "ipykernel", "fastchat", "triton"}:
            raise ImportError(f"blocked {name}")

sys.meta_path.insert(0, Block())
import mixtral_edu
failed = []
for module in pkgutil.walk_packages(mixtral_edu.__path__, "mixtral_edu."):
    if module.name != "mixtral_edu.__main__":          # importing it runs the command line
        try:
            importlib.import_module(module.name)
        except ImportError as err:
            failed.append(f"{module.name}: {err}")
print("\n".join(failed) or "ok")
"""


def test_every_module_imports_without_notebook_or_reference_packages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout


def test_the_public_names_are_at_the_top_and_are_the_modules_own():
    import mixtral_edu
    from mixtral_edu.analysis.routing import trace_routing
    from mixtral_edu.inference.decode import FastDecoder
    from mixtral_edu.weights.load import load_model
    assert mixtral_edu.load_model is load_model and mixtral_edu.FastDecoder is FastDecoder
    assert mixtral_edu.trace_routing is trace_routing
    for name in mixtral_edu.__all__:
        assert callable(getattr(mixtral_edu, name)), name
    import pytest
    with pytest.raises(AttributeError, match="no attribute 'decode_step'"):
        mixtral_edu.decode_step
