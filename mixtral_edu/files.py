"""Opening a file someone named, to read it: never blocking, never a FIFO or a device, never too much.

A name can be swapped between a check and an open (a FIFO put where a file was), so nothing is
checked by name. The open itself cannot block (O_NONBLOCK: opening a FIFO that has no writer waits
for one forever), and `fstat` of what was opened must show a regular file (a FIFO or a terminal
would hang a read, /dev/zero never ends) of at most `max_bytes`, before a byte is read. On a
regular file O_NONBLOCK changes nothing.

Every reader of a user's file in the package opens it here; each turns the two refusals below into
its own message (the tokenizer's, a config's, a checkpoint's).
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Optional

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)   # no flag on Windows
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(ValueError):
    """What was opened is not a regular file; `kind` says what it is ("a folder", "a FIFO", ...)."""

    def __init__(self, path, mode: int) -> None:
        self.path = path
        self.kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        super().__init__(f"{path}: {self.kind}, not a regular file")


class FileTooLarge(ValueError):
    """A file over `limit` bytes; `size` is its size, or None when it grew past the limit while being read."""

    def __init__(self, path, size: Optional[int], limit: int) -> None:
        self.path, self.size, self.limit = path, size, limit
        super().__init__(f"{path}: {'more than ' if size is None else f'{size:,} bytes, more than '}"
                         f"the {limit:,} bytes allowed")


def open_regular(path, max_bytes: Optional[int] = None, flags: int = 0) -> BinaryIO:
    """`path` opened for binary reading (`flags` added to the open, e.g. O_DIRECT).

    Raises the open's own OSError (FileNotFoundError, PermissionError, ...), NotRegularFile, or
    FileTooLarge when `max_bytes` is given and the file is larger; nothing has been read then.
    """
    fd = os.open(path, _FLAGS | flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, info.st_mode)
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLarge(path, info.st_size, max_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, max_bytes: int) -> bytes:
    """All bytes of the regular file `path`, at most `max_bytes` (open_regular's refusals); a file that grows
    past the limit after it was opened is refused too (FileTooLarge with size None), never read on."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(path, None, max_bytes)
    return data
