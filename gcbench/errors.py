"""Errors the command line turns into a one-line message: usage errors exit 2, a failed estimate 1."""


class UsageError(ValueError):
    """Bad input from a user (a flag, a config key, a file): message names what is wrong."""


class EstimateError(RuntimeError):
    """The step cannot run under fake tensors (an op whose output depends on tensor values)."""


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters: what a record or a log line keeps."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]
