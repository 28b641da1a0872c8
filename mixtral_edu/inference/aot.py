"""A compiled step kept on disk as an AOTInductor package: built once per model shape and machine, loaded
by every later process in milliseconds.

`torch.compile` traces a function again in every new process (seconds for the decode step, before its
kernels even come out of inductor's cache) and checks its guards and runs a Python wrapper on every call.
Here the step module is exported once (`torch.export`), compiled ahead of time by inductor into a shared
library with a C++ wrapper, and saved as a `.pt2` package WITHOUT its weights. A process that finds the
package loads it with torch's C++ loader (neither dynamo nor inductor is imported) and hands it the
module's own parameters and buffers, which the library then reads in place (user-managed constants).

    path = package_path(folder, module, example_args, options)     # named by everything the code depends on
    if not path.exists():
        build_package(module, example_args, path, options)         # export + compile: tens of seconds
    run = load_package(path, module)
    outputs = run(*args)                                            # a list of tensors; inputs may be written in place
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from itertools import chain
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# The package is compiled from this code: a change to any of these files names a new package.
_PACKAGE = Path(__file__).resolve().parent.parent
SOURCES = sorted((_PACKAGE / "model").glob("*.py")) + [
    _PACKAGE / "config.py", *(_PACKAGE / "inference" / f"{name}.py" for name in ("aot", "cpu", "decode", "dispatch"))]


@functools.lru_cache(maxsize=None)
def code_key() -> str:
    """A hash of the torch version and the sources above: what every package of this code has in common."""
    h = hashlib.sha256(torch.__version__.encode())
    for source in SOURCES:
        h.update(source.read_bytes())
    return h.hexdigest()


def package_path(folder: Path, module: nn.Module, example_args: tuple, options: dict) -> Path:
    """`folder`/aoti/step-<key>.pt2, the key a hash of the torch version and the sources above (`code_key`),
    the inductor options, the module's configuration and classes, and the name, shape, strides and dtype of
    every parameter, buffer and example input (the compiled code assumes all of them)."""
    h = hashlib.sha256(f"{code_key()}|{sorted(options.items())}|{getattr(module, 'config', '')}".encode())
    tensors = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False),
                    ((f"arg{i}", a) for i, a in enumerate(example_args)))
    for name, t in tensors:
        h.update(f"{name}|{tuple(t.shape)}|{t.stride()}|{t.dtype}".encode())
    h.update(" ".join(sorted({type(m).__qualname__ for m in module.modules()})).encode())
    return Path(folder) / "aoti" / f"step-{h.hexdigest()[:20]}.pt2"


def build_package(module: nn.Module, example_args: tuple, path: Path, options: dict) -> None:
    """Export `module` on `example_args` and compile it into the package `path` (written whole, then renamed
    into place), the weights left out."""
    import torch._inductor      # only here: a process that loads a package never imports inductor

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.stem}.{os.getpid()}.part.pt2")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)      # torch's own deprecations, raised inside export
            args = tuple(a.clone() for a in example_args)        # ordinary tensors, whatever mode the caller is in
            program = torch.export.export(module, args, strict=False)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(part),
                inductor_configs=dict(options, **{"aot_inductor.package_constants_in_so": False}))
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def load_package(path: Path, module: nn.Module) -> Callable[..., list]:
    """The compiled module from `path`, reading `module`'s parameters and buffers in place: a function of the
    example arguments' kind returning the outputs as a list."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    own = dict(chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)))
    constants = {name: own[name] for name in loader.get_constant_fqns()}
    loader.load_constants(constants, False, True, True)        # not the inactive set, check all are given, user-managed

    def run(*args: torch.Tensor) -> list:
        return loader.run(list(args))
    return run
