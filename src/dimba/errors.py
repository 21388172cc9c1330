"""Errors a user can cause. The CLI prints their one-line message and exits with status 2."""


class DimbaError(ValueError):
    """Base class: a problem with the user's input, with a message naming the problem and the fix."""


class ConfigError(DimbaError):
    """An invalid configuration key, value or file."""


class CheckpointError(DimbaError):
    """A missing, corrupted or incompatible model directory or checkpoint."""


class DataError(DimbaError):
    """A missing, unreadable or unusable corpus, or data settings that do not fit it."""


class DiskError(DimbaError):
    """A write that failed for want of space or permission (a full disk, a read-only folder)."""


class UsageError(DimbaError):
    """A bad combination of command-line arguments (e.g. a prompt longer than the context)."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit`` characters:
    what a one-line error quotes of a library's own error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]
