"""The compiled CPU step's package built in the background, so that even a learner who only calls `generate`
gets it: the first run on a machine stays eager (building takes tens of seconds, more than a short
generation can repay) and starts one low-priority process that builds it; later calls and processes find
it on disk and load it in a fraction of a second (`decode.DefaultStep`'s rule, unchanged).

The builder is a separate process, not a thread (export and inductor hold the GIL for seconds), started
after the generation that asked for it, at the lowest priority (nice 19, SCHED_IDLE), detached from the
learner's process (its own session; its output goes to a log file beside the package). It rebuilds the
model from what the parent's model is at that moment: the config, the cache length, and every parameter
and buffer's name, shape, strides and dtype, over empty tensors (the package holds no weights, so their
values never matter), then compiles it exactly as `FastDecoder(model, length, compile=True)` does, so it
writes the package the parent will look up.

While any process generates (`generating`, held by `generate`), the build is paused. One builder per
model shape and cache length at a time (an exclusive `flock` on a lock file, released by
the kernel when the builder exits, however it exits); a failed build leaves a `.failed` note, and no later
run starts another. MIXTRAL_EDU_BACKGROUND_BUILD=0 turns it off (the tests do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import MixtralConfig
from .build_supervisor import held

ANNOUNCE = "building the compiled decode step in the background (once per machine; later runs load it)"
_started: dict = {}            # lock path -> the builder's Popen, one per shape in this process


def enabled() -> bool:
    return os.environ.get("MIXTRAL_EDU_BACKGROUND_BUILD", "1") != "0"


def spec_of(model: nn.Module, length: int, folder: Path) -> dict:
    """What the builder needs to rebuild the model as it is now: config, cache length, the cache folder,
    and per parameter/buffer its name, shape, strides, dtype and (for a shared tensor) the first name it had."""
    tensors, first = [], {}
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            same = first.setdefault(id(t), name)
            tensors.append({"kind": kind, "name": name, "shape": list(t.shape), "stride": list(t.stride()),
                            "dtype": str(t.dtype).removeprefix("torch."), "same_as": None if same == name else same})
    return {"config": dataclasses.asdict(model.config), "length": length, "folder": str(folder), "tensors": tensors}


def model_from_spec(spec: dict) -> nn.Module:
    """A Mixtral with the spec's config and, in place of every parameter and buffer, an empty tensor of the
    recorded shape, strides and dtype (shared where the parent's were shared)."""
    from ..model.mixtral import Mixtral

    with torch.device("meta"):
        model = Mixtral(MixtralConfig(**spec["config"])).eval()
    made: dict = {}
    for t in spec["tensors"]:
        owner_name, _, leaf = t["name"].rpartition(".")
        owner = model.get_submodule(owner_name)
        if t["same_as"] is not None:
            value = made[t["same_as"]]
        else:
            value = torch.empty_strided(t["shape"], t["stride"], dtype=getattr(torch, t["dtype"]))
            if t["kind"] == "param":
                value = nn.Parameter(value, requires_grad=False)
        made[t["name"]] = value
        (owner._parameters if t["kind"] == "param" else owner._buffers)[leaf] = value
    left = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if left:
        raise ValueError(f"the spec gives no tensor for {left}")
    return model


def build(spec: dict) -> None:
    """(In the builder's child process.) Build the package for the spec's model, as the first step of
    `FastDecoder(model, length, compile=True)` does (the start-up is recorded for the parent's rule too)."""
    from .decode import FastDecoder

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["folder"]
    model = model_from_spec(spec)
    with torch.no_grad():
        FastDecoder(model, spec["length"], compile=True, progress=None).step()   # empty weights: output unused


def _paths(folder: Path, key: str) -> tuple[Path, Path, Path, Path]:
    base = Path(folder) / "aoti" / f"build-{key}"
    return tuple(base.with_name(base.name + ext) for ext in (".lock", ".json", ".log", ".failed"))


def start(model: nn.Module, length: int, folder: Path, key: str) -> bool:
    """Start the builder for this model and cache length unless turned off, unsupported here (no flock),
    already started by this process, running elsewhere, or failed before. Returns whether it started."""
    if not enabled() or sys.platform == "win32":
        return False
    lock, spec_file, log, failed = _paths(folder, key)
    if str(lock) in _started or failed.exists():
        return False
    lock.parent.mkdir(parents=True, exist_ok=True)
    if held(lock):
        return False
    part = spec_file.with_suffix(f".{os.getpid()}.part")
    part.write_text(json.dumps(spec_of(model, length, folder)))
    part.replace(spec_file)
    with open(log, "w") as out:
        _started[str(lock)] = subprocess.Popen(
            command(folder, key), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    print(ANNOUNCE, file=sys.stderr, flush=True)
    return True


def command(folder: Path, key: str) -> list:
    """The builder's command line (the spec written by `start`): `build_supervisor.py`, which sets the lowest
    priority first (nice 19 and, on Linux, SCHED_IDLE, inherited by the build and the C++ compiler)."""
    lock, spec_file, _, failed = _paths(folder, key)
    supervisor = Path(__file__).with_name("build_supervisor.py")
    return [sys.executable, "-I", str(supervisor), str(spec_file), str(lock), str(failed)]


def generating(folder: Path):
    """A context held (a shared lock on `folder`/aoti/generating.lock) while a generation runs: builders pause
    meanwhile (`build_supervisor.py`). The kernel drops the lock with the process, however it ends. Nothing
    where no package was ever built or started in `folder`."""
    aoti = Path(folder) / "aoti"
    if sys.platform == "win32" or not aoti.is_dir():
        return contextlib.nullcontext()
    import fcntl

    f = open(aoti / "generating.lock", "a")
    fcntl.flock(f, fcntl.LOCK_SH)
    return f                                   # closing it (the with-block's end) releases the lock
