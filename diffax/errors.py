"""User errors: what the `diffax` command reports as one `diffax: error:` paragraph.

A `UserError` is something the user can fix: a config value, a missing or
damaged file, a busy or unwritable workdir, a full disk. Its message names the
file, field or value and says what to do. Everything else is a bug in diffax
(or in a library) and keeps its traceback. `ValueError`, `FileNotFoundError`
and `PermissionError` raised anywhere in diffax are treated as user errors
too, so code may raise those with a clear message; `UserError` subclasses
`ValueError` so such code keeps working when it switches.
"""
from __future__ import annotations

import errno

# OSErrors about the user's files or machine, not about diffax's code.
_USER_ERRNOS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
}


class UserError(ValueError):
    """Bad input or a broken environment the user can fix (the message says how)."""


def is_user_error(error: BaseException) -> bool:
    """Whether the CLI should print `error` as a message instead of a traceback."""
    if isinstance(error, (ValueError, FileNotFoundError, PermissionError, RuntimeError)):
        return True
    return isinstance(error, OSError) and error.errno in _USER_ERRNOS


def os_error_message(error: OSError, what: str = "") -> str:
    """One sentence for an OSError: the file, what went wrong, and what to do about it."""
    path = error.filename or what or "a file"
    reason = _USER_ERRNOS.get(error.errno, error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "Free some space there (or choose another folder) and run the same command again."
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "Choose a folder you can write to, or fix its permissions."
    else:
        advice = "Check the path."
    return f"{path}: {reason}. {advice}"


def message(error: BaseException) -> str:
    """The text to print for a user error."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.errno in _USER_ERRNOS:
        return os_error_message(error)
    return str(error)


class Stopped(Exception):
    """Training stopped early on request (SIGTERM / SIGINT) after saving; the message says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
