"""Writes that an interruption cannot leave half done: the new content is built beside its target
(on the same file system), flushed to disk, then renamed into place; a rename is all or nothing.

Two sizes of the one idea, used by the tokenizer files, the checkpoint savers and training:

* `write_atomic(path, data)`: one file;
* `replace_folder(staging, out)`: a whole finished folder at `out`, the old one removed only once the
  new one is there.

A set of files inside a folder that stays (a checkpoint beside the user's own files) is published
through a journal instead: publish.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def fsync(path: PathLike) -> None:
    """Flush a file, or a folder's entries (its renames), to disk. For a folder, a no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one, never a part.

    The bytes go to a fresh temporary file in the same folder, are flushed to disk, then renamed over
    `path`; the folder entry is flushed too. A symlink at `path` is refused: writing through it would
    change a file elsewhere, and replacing it would quietly undo whatever the link was for.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path} is a symlink; refusing to write through or replace it")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it 0600; these files are for everyone to read
        os.replace(temp, path)
    except BaseException:
        try:                    # the old file is untouched; only the temporary one has to go
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync(path.parent)


def replace_folder(staging: Path, out: Path) -> None:
    """Put the finished folder `staging` at `out` by renames (both in the same parent folder); an old
    `out` is moved aside first and removed only once the new one is in place, or put back on failure."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(aside)
        os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
