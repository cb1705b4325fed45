"""Errors the command line turns into a one-line message: usage errors exit 2, a failed estimate 1."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(ValueError):
    """Bad input from a user (a flag, a config key, a file): message names what is wrong."""


class EstimateError(RuntimeError):
    """The step cannot run under fake tensors (an op whose output depends on tensor values)."""


def unknown_key(label: str, name: str, known: Iterable[str], quoted: bool = True) -> UsageError:
    """``label: unknown key 'name'; did you mean 'closest'?`` (every known key when none is close)."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    shown = repr(name) if quoted else name
    return UsageError(f"{label}: unknown key {shown}; {hint}")


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters: what a record or a log line keeps."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]
