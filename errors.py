"""Errors that the CLI turns into one clear line instead of a traceback."""


class UsageError(Exception):
    """A user mistake (bad option, missing column, unreadable input): exit code 2, one line."""
