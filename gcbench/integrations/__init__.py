"""GradCache inside the trainers people use: one module per framework, each imported only when asked for.

- :mod:`gcbench.integrations.transformers`: :class:`GradCacheTrainer`, a Hugging Face ``Trainer`` (extra ``trainer``);
- :mod:`gcbench.integrations.sentence_transformers`: the cached ranking losses for ``SentenceTransformerTrainer``
  (extra ``peers``);
- :mod:`gcbench.integrations.lightning`: :class:`GradCacheModule`, a LightningModule mixin (extra ``lightning``).

``import gcbench`` imports none of these frameworks; importing a module here without its extra is a
one-line UsageError naming the ``pip install`` line. What they share: :mod:`gcbench.integrations.common`.
"""
