"""Named phases of a step, for whoever listens (the timeline of :mod:`gcbench.measure.timeline`).

The engine and the strategies mark what they are doing (``encode without graph``, ``loss and cache``,
``re-encode and backward, chunk 3``); with nobody listening a mark costs one list check and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Listener = Callable[[str, bool], None]  # (phase name, True at its start / False at its end)
_listeners: list[Listener] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the code inside as the phase ``name``."""
    if not _listeners:
        yield
        return
    for listener in list(_listeners):
        listener(name, True)
    try:
        yield
    finally:
        for listener in list(_listeners):
            listener(name, False)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` at the start and end of every phase marked inside."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
