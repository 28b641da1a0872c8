"""What every checker shares: its verdicts, and switching the package's own code off while it runs.

A checker returns a `Checked` (true when right; its repr is the report a cell shows), returns a
false one saying "not attempted yet" for a blank answer, and raises `WrongAnswer` (an
AssertionError) with a hint when the answer is wrong.

`switched_off(...)` makes the package's implementation of a concept (and PyTorch's or
transformers' ready-made one) raise while the learner's function runs, so an answer that merely
calls it is refused. It swaps the code of each function object, so a name the notebook imported
before the check (`from mixtral_edu.model.norm import rms_norm`) is switched off too.
"""

from __future__ import annotations

import ast
import re
import importlib
import inspect
import sys
import textwrap
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch


class WrongAnswer(AssertionError):
    """The answer was checked and is not right; the message says where it goes wrong."""


class Checked:
    """What a checker returns: true when the answer is right. Its repr is the checker's report, so a
    notebook cell that ends with the call shows it."""

    def __init__(self, ok: bool, message: str) -> None:
        self.ok, self.message = ok, message

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.message

    __str__ = __repr__


def correct(message: str) -> Checked:
    return Checked(True, message)


def blank(answer: Any) -> bool:
    return answer is None or answer is Ellipsis


def not_attempted(label: str, what: str) -> Checked:
    return Checked(False, f"{label}: not attempted yet — replace the `...` in {what} and run this cell again")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise WrongAnswer(message)


def blank_function(fn: Any) -> bool:
    """True for `...`/None, or a function whose body is only a docstring, `...` or `pass`."""
    if blank(fn):
        return True
    if not callable(fn):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and (s.value.value is Ellipsis or isinstance(s.value.value, str)))
               for s in node.body)


# ------------------------------------------------------------------ switching implementations off
SWITCHED_OFF = "switched off while this check runs"


def _refusing_code(name: str) -> types.CodeType:
    namespace: dict = {}
    message = f"{name} is {SWITCHED_OFF}: write this part yourself"
    exec(f"def refuse(*args, **kwargs):\n    raise RuntimeError({message!r})\n", namespace)
    return namespace["refuse"].__code__


def _functions_of(module: types.ModuleType) -> Iterable[tuple[Any, str, Callable]]:
    """(owner, attribute, function) for every function and method defined in `module`."""
    for attr, value in list(vars(module).items()):
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if isinstance(value, types.FunctionType):
            yield module, attr, value
        elif isinstance(value, type):
            for name, member in list(vars(value).items()):
                if isinstance(member, types.FunctionType) and name not in ("__init__", "__repr__", "extra_repr"):
                    yield value, name, member


@contextmanager
def switched_off(modules: Iterable[str] = (), attributes: Iterable[tuple[Any, str]] = ()):
    """Every function and method of the named modules (those not yet imported are skipped), and each
    `(owner, attribute)`, raise while the block runs; all are restored after it."""
    swapped: list[tuple[Callable, types.CodeType]] = []
    patched: list[tuple[Any, str, Any]] = []
    try:
        for module_name in modules:
            if module_name.startswith("mixtral_edu."):
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError:       # a module another version of the package does not have
                    continue
            elif module_name in sys.modules:
                module = sys.modules[module_name]
            else:
                continue
            for owner, attr, fn in _functions_of(module):
                label = f"{module_name}.{getattr(owner, '__name__', '') + '.' if owner is not module else ''}{attr}"
                if fn.__code__.co_freevars:          # a closure's code cannot be swapped: replace the name
                    patched.append((owner, attr, fn))
                    setattr(owner, attr, _refusing_function(label))
                else:
                    swapped.append((fn, fn.__code__))
                    fn.__code__ = _refusing_code(label)
        for owner, attr in attributes:
            if hasattr(owner, attr):
                name = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
                patched.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, _refusing_function(name))
        yield
    finally:
        for fn, code in reversed(swapped):
            fn.__code__ = code
        for owner, attr, value in reversed(patched):
            setattr(owner, attr, value)


def _refusing_function(name: str) -> Callable:
    return types.FunctionType(_refusing_code(name), {})


def call(label: str, case: str, fn: Callable, *args):
    """Run the learner's function on one case; a switched-off call or a crash becomes a WrongAnswer."""
    require(callable(fn), f"{label}: expected a function, got {type(fn).__name__}")
    try:
        return fn(*args)
    except WrongAnswer:
        raise
    except RuntimeError as err:
        if SWITCHED_OFF in str(err):
            raise WrongAnswer(f"{label}: {err}") from None
        raise WrongAnswer(f"{label}, case '{case}': your function raised RuntimeError: {err}") from err
    except Exception as err:
        raise WrongAnswer(f"{label}, case '{case}': your function raised {type(err).__name__}: {err}") from err


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| over the largest |want| (both taken in float64)."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def compare(label: str, case: str, got: Any, want: torch.Tensor, tol: float, diagnoses=()) -> None:
    """Require `got` to be a finite tensor of want's shape within `tol` of it (relative to want's
    largest entry). diagnoses: (hint, wrong_output) pairs; when got is close to one, its hint is given."""
    require(isinstance(got, torch.Tensor),
            f"{label}, case '{case}': expected a tensor, got {type(got).__name__}")
    require(tuple(got.shape) == tuple(want.shape),
            f"{label}, case '{case}': expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    require(got.is_floating_point() and bool(torch.isfinite(got).all()),
            f"{label}, case '{case}': the output must be finite floating-point numbers")
    err = relative_error(got, want)
    if err <= tol:
        return
    for hint, wrong in diagnoses:
        if wrong is not None and tuple(wrong.shape) == tuple(want.shape) and relative_error(got, wrong) <= tol:
            raise WrongAnswer(f"{label}, case '{case}': {hint}")
    raise WrongAnswer(f"{label}, case '{case}': off by up to {err:.1%} of the output's largest value")


# ------------------------------------------------------------------ answers given as values
def input_history() -> list[str]:
    """The source of every cell run so far in this IPython kernel (empty outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    return list(shell.user_ns.get("In", [])) if shell is not None else []


_ASSIGN = re.compile(r"(?<![=!<>])=(?!=)")          # an assignment's "=", not ==, <=, >= or !=


def refuse_shortcut_in_history(label: str, variables: list[str], functions: list[str], history=None) -> None:
    """A value answer cannot switch anything off: instead, refuse it when a cell that assigns one of
    `variables` calls one of `functions` (the package's own computation of the answer)."""
    cells = input_history() if history is None else history
    for cell in cells:
        targets = [_ASSIGN.split(line)[0] for line in cell.splitlines() if _ASSIGN.search(line)]
        assigns = any(re.search(rf"\b{re.escape(v)}\b", t) for t in targets for v in variables)
        called = [f for f in functions if re.search(rf"\b{re.escape(f)}\s*\(", cell)]
        if assigns and called:
            raise WrongAnswer(f"{label}: the answer calls {called[0]}, the package's own computation of it: "
                              "work it out yourself")
