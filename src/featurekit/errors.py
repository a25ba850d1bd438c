"""featurekit's error type (every message names the problem and the fix) and its warnings."""

import sys


class FeaturekitError(ValueError):
    """Bad input or a bad file. The message says what is wrong and how to fix it."""


def warn(message: str) -> None:
    """A warning the user must see: on stderr, prefixed like the CLI's errors."""
    print(f"featurekit: warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """Something the user should know (a step skipped, a fallback taken): on stderr."""
    print(f"featurekit: {message}", file=sys.stderr, flush=True)
