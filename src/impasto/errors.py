"""The one error type for a user's mistake; the CLI turns it into one line on stderr and exit 2."""


class ImpastoError(Exception):
    """A problem with the user's input or options, explained in one sentence."""


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def warn(message: str) -> None:
    """A user-facing warning; the CLI prints it as one line on stderr."""
    import warnings

    warnings.warn(message, ImpastoWarning, stacklevel=2)


class ImpastoWarning(UserWarning):
    """Something the user should know about a run that still goes ahead."""
