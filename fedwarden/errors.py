"""The one error type the command line turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names what was wrong and the accepted values."""
