"""Real encoders and a peer implementation, as optional extras, measured in the same run as gcbench's own.

- model kinds (extra ``real``): ``hf`` (any Hugging Face encoder from a config or a local folder) and the
  ``hf`` image tower (ViT, CLIP, SigLIP, DINOv2), see :mod:`gcbench.peers.hf`; ``minilm`` (all-MiniLM-L6-v2,
  trained weights, offline), ``hf-minilm`` and ``hf-bert-base`` (random weights), see :mod:`gcbench.peers.models`;
- with the extra ``peers``: the model kind ``sentence-transformers`` (a local model folder as it is), and the
  strategies ``st-full`` and ``st-cached``, sentence-transformers' ranking losses on gcbench's model, data
  and scores; see :mod:`gcbench.peers.strategies`.

:func:`register` adds the names to gcbench's registries without importing anything optional, so that
choosing one without its extra is a UsageError that names the ``pip install`` line, before any work.
"""

from gcbench.peers import hf, models, strategies
from gcbench.peers.extras import installed_versions


def register() -> None:
    hf.register()
    models.register()
    strategies.register()


__all__ = ["hf", "installed_versions", "models", "register", "strategies"]
