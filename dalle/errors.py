"""Errors meant for the user: their message says what to fix, and no traceback is shown.

The command line (:mod:`dalle.cli`) turns each of :func:`user_errors` into one
line on stderr and a non-zero exit; :mod:`dalle.serve` raises :class:`UsageError`
where starting the page fails for a reason the user can fix (a port in use).
Both import this module, so neither imports the other for its errors.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user; the message says what to fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is for the user (imported here, on first use, to keep this module light)."""
    from dalle.config import ConfigError
    from dalle.io import ModelLoadError

    errors: list[type[BaseException]] = [UsageError, ConfigError, ModelLoadError, FileNotFoundError, NotADirectoryError]
    try:
        from dalle.data.images import BadImageError, DataError

        errors += [BadImageError, DataError]
    except ImportError:
        pass
    try:
        from dalle.training.state import NonFiniteError

        errors.append(NonFiniteError)
    except ImportError:
        pass
    return tuple(errors)
