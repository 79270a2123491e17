"""Open only regular files: a FIFO, a device, a socket or a symlink loop is refused before it can block a reader.

``check_regular(path)`` stats the path (following links) and raises the toolkit's error for anything that is not a
regular file. ``open_regular(path)`` opens with ``O_NONBLOCK`` (so even a FIFO swapped in after the check cannot
block the open), checks the *opened* file with ``fstat`` and only then hands back a normal blocking file object.
Every message names the file.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import IO, Union

from ..errors import FileNotFound, ModelFileError

PathLike = Union[str, "os.PathLike[str]"]

_O_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0) \
    | getattr(os, "O_BINARY", 0)


def describe_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse_mode(path: PathLike, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise ModelFileError("is a directory, not a model file", path)
    raise ModelFileError(f"is {describe_mode(mode)}, not a regular file; refused without reading it", path)


def os_error(path: PathLike, e: OSError) -> ModelFileError:
    """The toolkit's error for an ``OSError`` met while statting or opening ``path``."""
    if e.errno == errno.ENOENT:
        try:
            if os.path.islink(path):
                return ModelFileError("broken symbolic link (its target does not exist)", path)
        except (OSError, ValueError):
            pass
        return FileNotFound("no such file", path)
    if e.errno == errno.ELOOP:
        return ModelFileError("symbolic link loop (too many levels of symbolic links)", path)
    if e.errno == errno.ENAMETOOLONG:
        return ModelFileError("file name too long", path)
    if e.errno in (errno.EACCES, errno.EPERM):
        return ModelFileError("permission denied", path)
    if e.errno == errno.ENOTDIR:
        return FileNotFound("no such file (a part of the path is not a folder)", path)
    if e.errno == errno.EISDIR:
        return ModelFileError("is a directory, not a model file", path)
    return ModelFileError(f"cannot read: {e.strerror or e}", path)


def check_regular(path: PathLike) -> os.stat_result:
    """``os.stat`` of ``path``; raises ``ModelFileError`` / ``FileNotFound`` unless it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise os_error(path, e) from None
    except ValueError as e:  # NUL byte in the path
        raise ModelFileError(f"invalid path ({e})", str(path).replace("\x00", "\\x00")) from None
    _refuse_mode(path, st.st_mode)
    return st


def open_regular(path: PathLike, buffering: int = -1) -> IO[bytes]:
    """Open ``path`` for binary reading, only if it is a regular file (checked on the opened descriptor)."""
    check_regular(path)
    try:
        fd = os.open(path, _O_FLAGS)
    except OSError as e:
        raise os_error(path, e) from None
    try:
        st = os.fstat(fd)
        _refuse_mode(path, st.st_mode)
        if getattr(os, "O_NONBLOCK", 0):
            try:
                import fcntl

                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
            except (ImportError, OSError):  # pragma: no cover - non-POSIX; regular files never block anyway
                pass
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


__all__ = ["check_regular", "open_regular", "os_error", "describe_mode"]
