"""A user's own code by import path (``package.module:name``): workload factories and strategy classes.

The module is searched for in the experiment file's folder and the current directory, before the rest of
``sys.path`` (a console script's ``sys.path`` holds neither). A child process (a sweep point, a rank)
starts from another ``sys.path``: it calls :func:`adopt` with :func:`import_path` of the process that
started it, so that it imports exactly what its parent could.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gcbench.errors import UsageError, first_line

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(text: str) -> bool:
    """``package.module:name``: a user's object, not a built-in name (built-in names hold no colon)."""
    return ":" in text


def search(folders: Iterable[str | Path]) -> None:
    """Put ``folders`` (absolute) at the front of ``sys.path``, the first one first; those present stay put."""
    for folder in reversed([str(Path(folder).resolve()) for folder in folders]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    importlib.invalidate_caches()


def import_path() -> tuple[str, ...]:
    """What a child process needs to import what this one can: this ``sys.path``."""
    return tuple(sys.path)


def adopt(parent_path: Sequence[str]) -> None:
    """In a child process: the entries of its parent's ``sys.path`` that it lacks, in the parent's order, first."""
    missing = [entry for entry in parent_path if entry not in sys.path]
    sys.path[:0] = missing
    if missing:
        importlib.invalidate_caches()


def import_object(spec: str, what: str) -> Any:
    """The object ``spec`` (``package.module:name``) names; a UsageError saying why it cannot be had.

    ``what`` names the setting in the message (``--strategies``, ``workload.factory``). The current directory
    is searched too (a console script's ``sys.path`` does not hold it).
    """
    if not _PATH.match(spec):
        raise UsageError(f"{what}: {spec!r} is not an import path (package.module:name)")
    module_name, _, attribute = spec.partition(":")
    search([os.getcwd()])
    try:
        value: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise UsageError(
                f"{what}: cannot import {module_name!r}: no module {error.name!r} in the experiment's folder, the "
                "current directory or the Python path"
            ) from None
        raise UsageError(f"{what}: importing {module_name!r} failed: {first_line(error)}") from None
    except Exception as error:  # the user's module raised while it was imported
        raise UsageError(f"{what}: importing {module_name!r} failed: {first_line(error)}") from None
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(f"{what}: module {module_name!r} has no {attribute!r}") from None
    return value
