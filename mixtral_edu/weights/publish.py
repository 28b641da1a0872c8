"""How a save puts a new checkpoint into a folder, and how a reader sees one whole checkpoint.

A checkpoint is several files (config.json and shards, or params.json and consolidated files) that
must change together, in a folder that also holds files of the user's (tokenizer.model, notes) and
keeps its place (a download folder, the current directory). No single rename swaps several files, so
a save publishes through a journal, and readers follow it:

1. under an exclusive lock on the folder (flock on the folder itself: one save at a time, and a save
   that finds leftovers knows their writer is dead), the new files are written and flushed into a
   hidden staging folder `.mixtral-edu-save-*` inside the target;
2. the journal `.mixtral-edu-commit.json` is written atomically: it names the staging folder, the
   files to put in place and the old files to remove. From this instant the save counts as done:
   the staging folder is complete and stays untouched while the journal exists;
3. each new file is hard-linked beside its target and renamed over it (the staging copy stays); the
   old files the new checkpoint does not overwrite are removed;
4. the journal is removed, then the staging folder.

A kill before step 2 leaves the old checkpoint and a staging folder nobody reads; a kill after it
leaves a journal. `finish` (run by the next save, under the lock) completes steps 3-4 from the
journal, and removes every leftover of a killed save; `check` reports them.

Readers (`load_model`, `check`) call `read_whole(folder, read)`: with a journal present they read the
complete new checkpoint in its staging folder, else the folder itself; they note the folder's state
(each entry's inode, change time and size, and the journal) before and after, and read again when it
changed in between, so a reader racing a writer never returns a mixture of two saves. Without hard
links (some network or FAT file systems) step 3 moves the files instead, and a reader that meets the
journal then reads again once the save is over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from ..files import read_regular
from .atomic import fsync, write_atomic
from .errors import CheckpointError

JOURNAL = ".mixtral-edu-commit.json"
STAGING_PREFIX = ".mixtral-edu-save-"
OLD_PREFIX = ".mixtral-edu-old-"          # left by saves before the journal (their files moved aside)
LINK_PREFIX = ".mixtral-edu-link-"
_LEFTOVER = re.compile(rf"({re.escape(STAGING_PREFIX)}|{re.escape(OLD_PREFIX)}|{re.escape(LINK_PREFIX)}).*"
                       rf"|{re.escape(JOURNAL)}")
_READ_TRIES = 3            # optimistic reads before a reader waits for the save lock
T = TypeVar("T")


@contextmanager
def _flock(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold a lock on `folder` itself (flock, no extra file); closing the descriptor releases it.
    A no-op where there is no flock (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def save_lock(folder: Path):
    """The exclusive lock a save holds: one save at a time, and leftovers found under it are a dead save's."""
    return _flock(folder, exclusive=True)


def _shared_lock(folder: Path):
    """The lock a reader waits for when saves keep changing the folder: no save starts while it is held."""
    return _flock(folder, exclusive=False)


def save_in_progress(folder: Path) -> bool:
    """True when a live save holds `folder`'s lock (False where locks do not exist)."""
    try:
        import fcntl
    except ImportError:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _plain_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) and n and "/" not in n and "\\" not in n
                                           and n not in (".", "..") and "\0" not in n for n in value)


def read_journal(folder: Path) -> Optional[dict]:
    """The journal of a save being published in `folder` (see the module docstring), or None."""
    path = folder / JOURNAL
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise ValueError("a symlink")
        data = json.loads(read_regular(path, 1 << 20).decode("utf-8"))   # it names one save's files: kilobytes
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: an unreadable save journal ({err}); remove it") from None
    if (not isinstance(data, dict) or not _plain_names([data.get("staging")])
            or not str(data["staging"]).startswith(STAGING_PREFIX)
            or not all(_plain_names(data.get(k)) for k in ("files", "new_only", "remove"))):
        raise CheckpointError(f"{path}: not a journal this package wrote; remove it")
    return data


def publish(folder: Path, staging: Path, files: list[str], new_only: list[str], remove: list[str]) -> None:
    """Put the finished files of `staging` into `folder` (steps 2-4 of the module docstring).

    files: replace what is there; new_only: put in place only where nothing of that name exists (a
    file of the user's is never replaced); remove: old files to delete once the new ones are in.
    The caller holds `save_lock` and has flushed every file of `staging`.
    """
    journal = {"staging": staging.name, "files": files, "new_only": new_only,
               "remove": [n for n in remove if n not in files and n not in new_only]}
    write_atomic(folder / JOURNAL, (json.dumps(journal, indent=1) + "\n").encode())
    finish(folder)


def finish(folder: Path) -> None:
    """Complete the publish a journal in `folder` describes (idempotent: a second run after a kill
    redoes nothing that is done). No journal: nothing to do."""
    journal = read_journal(folder)
    if journal is None:
        return
    staging = folder / journal["staging"]
    for name in journal["files"] + journal["new_only"]:
        source, target = staging / name, folder / name
        if not source.is_file():               # moved in by an earlier run (no hard links), or never staged
            continue
        if name in journal["new_only"] and (target.exists() or target.is_symlink()):
            continue
        if _same_file(source, target):        # in place already (a rename between two links of one
            continue                          # file does nothing, and would leave the link behind)
        link = folder / (LINK_PREFIX + name)
        if link.exists() or link.is_symlink():
            os.unlink(link)
        try:
            os.link(source, link)              # the staging copy stays whole for readers
        except OSError:
            link = source                      # no hard links here: move it (readers retry)
        os.replace(link, target)
    fsync(folder)
    for name in journal["remove"]:
        try:
            os.unlink(folder / name)
        except FileNotFoundError:
            pass
    fsync(folder)
    os.unlink(folder / JOURNAL)
    fsync(folder)
    shutil.rmtree(staging, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def leftovers(folder: Path) -> list[str]:
    """Names in `folder` that a killed save left (staging folders, moved-aside old files, the journal)."""
    try:
        return sorted(p.name for p in folder.iterdir() if _LEFTOVER.fullmatch(p.name))
    except OSError:
        return []


def clean(folder: Path) -> None:
    """Under `save_lock`: finish an interrupted publish, then remove what killed saves left behind."""
    finish(folder)
    for name in leftovers(folder):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


# ----------------------------------------------------------------------------- readers
def _state(folder: Path) -> tuple:
    """What changes when a save publishes: the journal, and each entry's identity (inode, change time, size)."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if _LEFTOVER.fullmatch(entry.name) and entry.name != JOURNAL:
                    continue                   # a save's staging folder fills while the checkpoint stays put
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entries.append((entry.name, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size))
    except OSError:
        return ()
    return tuple(sorted(entries))


def _source(folder: Path) -> Path:
    journal = read_journal(folder) if folder.is_dir() else None
    return folder / journal["staging"] if journal else folder


def read_whole(folder: Path, read: Callable[[Path], T]) -> T:
    """`read(source)` on one whole checkpoint of `folder`: the folder itself, or the staging folder a
    journal names while a save is published. Read again when the folder changed meanwhile (an error
    while it did not change is the checkpoint's own, and is raised); after a few tries, read under a
    shared lock on the folder, which waits for the running save and keeps the next one out."""
    for _ in range(_READ_TRIES):
        before = _state(folder)
        try:
            result = read(_source(folder))
        except (CheckpointError, OSError):
            if _state(folder) == before:
                raise
            continue
        if _state(folder) == before:
            return result
    with _shared_lock(folder):
        return read(_source(folder))
