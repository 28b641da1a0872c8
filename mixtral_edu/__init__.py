"""mixtral_edu: Mixtral-8x7B built piece by piece, small enough to read, exact enough to check.

The model's parts are `config`, `tokenizer`, `chat` and the `model` subpackage (norm, rope,
attention, router, experts, moe, mixtral); `weights`, `inference`, `training`, `analysis`,
`parallel` and `course` are the machinery around that one model (the README's "map of the
package" says what each holds). The names most programs need are also here at the top:

    from mixtral_edu import load_model, generate, FastDecoder, trace_routing

They are looked up on first use, so `import mixtral_edu` stays light. The package imports without
Jupyter, transformers or mistral-common; those serve notebooks and tests.
"""

from importlib import import_module

from .interrupt import on_command_line

on_command_line()       # `mixtral-edu ...`: from here on Ctrl-C is one line and status 130 (interrupt.py)

from .config import MixtralConfig  # noqa: E402

# public name -> the module that defines it
_PUBLIC = {
    "Mixtral": "model.mixtral", "load_model": "weights.load", "save_model": "weights.save",
    "generate": "inference.generate", "FastDecoder": "inference.decode",
    "plan_placement": "inference.placement", "load_placed": "inference.placement",
    "trace_routing": "analysis.routing", "record_routing": "analysis.routing",
}

__all__ = ["MixtralConfig", *_PUBLIC]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'mixtral_edu' has no attribute {name!r}")
