"""The one error type for a user's mistake; the CLI turns it into one line on stderr and exit 2."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable


class ImpastoError(Exception):
    """A problem with the user's input or options, explained in one sentence."""


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def refuse_non_finite(options: object, flag: Callable[[str], str]) -> None:
    """Refuse NaN or infinite values in an options dataclass (alone or in a list or tuple): NaN passes every
    range check as False, and either makes the loss NaN hours later."""
    for f in dataclasses.fields(options):  # type: ignore[arg-type]
        value = getattr(options, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ImpastoError(f"{flag(f.name)} must be a finite number, got {value}")


def warn(message: str) -> None:
    """A user-facing warning; the CLI prints it as one line on stderr."""
    import warnings

    warnings.warn(message, ImpastoWarning, stacklevel=2)


class ImpastoWarning(UserWarning):
    """Something the user should know about a run that still goes ahead."""
