"""featurekit's error type: every message names the problem and the fix."""


class FeaturekitError(ValueError):
    """Bad input or a bad file. The message says what is wrong and how to fix it."""
