"""Errors the command line turns into a one-line message and exit status 2."""


class UsageError(ValueError):
    """Bad input from a user (a flag, a config key, a file): message names what is wrong."""
