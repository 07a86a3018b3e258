"""The one exception type a user can cause; the CLI prints it as a single line."""


class CifarkitError(Exception):
    """Bad input or environment: the message says what happened and what to do."""
