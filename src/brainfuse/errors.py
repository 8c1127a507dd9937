"""The errors brainfuse raises for input it cannot use, and their one-line form.

Every stage's own error class (``anat.InputError``, ``tensors.TensorError``, ``config.ConfigError`` …)
derives from :class:`BrainfuseError`, so the CLI prints each of them as one line - the file, what is wrong,
what to do - and exits non-zero, with no traceback (``--debug`` or ``BRAINFUSE_DEBUG=1`` shows it).

Light at import (standard library only): every stage imports it.
"""
from __future__ import annotations

import errno
import os

__all__ = ["BrainfuseError", "one_line", "os_error_line", "debug_enabled", "full_disk"]


class BrainfuseError(ValueError):
    """Input or a setting brainfuse cannot run with.

    ``BrainfuseError("message")`` keeps a message as written; ``BrainfuseError(problem, path=..., fix=...)``
    builds ``<path>: <problem>; <fix>``, so that every message names the file first and the remedy last.
    """

    def __init__(self, problem: str, *, path=None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        text = problem if self.path is None else f"{self.path}: {problem}"
        if fix:
            text += f"; {fix}"
        super().__init__(text)


def debug_enabled(argv=()) -> bool:
    """``--debug`` on the command line or ``BRAINFUSE_DEBUG`` set to anything but ``""``/``0``."""
    return "--debug" in argv or os.environ.get("BRAINFUSE_DEBUG", "") not in ("", "0")


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def os_error_line(e: OSError) -> str:
    """An OSError in words a user can act on: which file, what the system said, what to do."""
    name = e.filename or "(no file named)"
    if e.filename2:
        name = f"{e.filename} -> {e.filename2}"
    reason = e.strerror or str(e)
    if e.errno in _DISK_FULL:
        return f"{name}: {reason} while writing; free space or set output_dir on a larger file system, then rerun"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{name}: {reason}; check the permissions, or set output_dir to a writable folder"
    if e.errno == errno.ENOENT:
        return f"{name}: no such file or folder; check the path (or rerun the stage that writes it)"
    if e.errno == errno.ENOTDIR:
        return f"{name}: a file stands where a folder is needed; point the path at a folder"
    if e.errno == errno.EISDIR:
        return f"{name}: a folder stands where a file is needed; point the path at a file"
    return f"{name}: {reason}"


LOW_DISK_MB = 200


def full_disk(paths) -> str | None:
    """The first of ``paths`` (or its nearest existing parent) on a file system with under LOW_DISK_MB free,
    with the free megabytes; None when every one has room. Why: ITK and other C++ libraries report a full disk
    as their own failure ("antsApplyTransforms returned non-zero exit code 1" after ITK's "wrote only 0 of
    3063792 bytes"), never as an OSError a user would recognise."""
    import shutil

    for path in paths:
        p = os.path.abspath(str(path))
        while not os.path.exists(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)
        try:
            free_mb = shutil.disk_usage(p).free / 2 ** 20
        except OSError:
            continue
        if free_mb < LOW_DISK_MB:
            return f"{p} ({free_mb:.0f} MB free)"
    return None


def one_line(e: BaseException, outputs=()) -> str:
    """The message the CLI prints for ``e``: its own text for brainfuse errors, the file and the system's
    words for an OSError, and for anything else its type and message with a pointer to ``--debug``; then,
    when the disk of ``outputs`` (the command's output folders) or of the temporary folder is full, says so."""
    if isinstance(e, BrainfuseError):
        return str(e).replace("\n", " ")
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return os_error_line(e)
    import tempfile

    full = full_disk([*outputs, tempfile.gettempdir()])
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    if full:
        return (f"{text}; the disk is full at {full}: free space or set output_dir (and TMPDIR) on a larger "
                "file system, then rerun")
    if isinstance(e, OSError):
        return os_error_line(e)
    return f"unexpected error {text} (rerun with --debug or BRAINFUSE_DEBUG=1 for the traceback, and please report it)"
