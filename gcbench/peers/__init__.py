"""Real encoders and a peer implementation, as optional extras, measured in the same run as gcbench's own.

- model kinds (extra ``real``): ``minilm`` (all-MiniLM-L6-v2, trained weights, offline), ``hf-minilm`` and
  ``hf-bert-base`` (random weights); see :mod:`gcbench.peers.models`;
- strategies (extra ``peers``): ``st-full`` and ``st-cached``, sentence-transformers' ranking losses on
  gcbench's model, data and scores; see :mod:`gcbench.peers.strategies`.

:func:`register` adds the names to gcbench's registries without importing anything optional, so that
choosing one without its extra is a UsageError that names the ``pip install`` line, before any work.
"""

from gcbench.peers import models, strategies
from gcbench.peers.extras import installed_versions


def register() -> None:
    models.register()
    strategies.register()


__all__ = ["installed_versions", "models", "register", "strategies"]
