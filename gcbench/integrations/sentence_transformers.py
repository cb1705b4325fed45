"""The cached ranking losses for ``SentenceTransformerTrainer``, on gcbench's engine (extra ``peers``).

:class:`GradCachedMultipleNegativesRankingLoss` is ``MultipleNegativesRankingLoss`` (the same loss,
every option of it: directions, partition mode, hardness weighting, scale, similarity) with each column
encoded in chunks of ``mini_batch_size`` by :class:`~gcbench.cache.deferred.DeferredGradCache`: the
loss it returns pushes the cache into the model when the trainer runs ``backward`` on it, with the
trainer's accumulation factor and GradScaler, re-entering the forward's autocast.
:class:`GradCachedMultipleNegativesSymmetricRankingLoss` is its symmetric form.

What it does that ``CachedMultipleNegativesRankingLoss`` does not: it keeps the last ``keep_graphs``
chunks' first-pass graphs instead of encoding them again; under DDP it all-reduces gradients once per
optimizer step, not once per mini-batch (sentence-transformers issue #4027); and the step's embeddings
stay readable afterwards (:attr:`last_embeddings`, :meth:`last_scores`) for in-batch metrics, without a
second forward. ``gather_across_devices`` is refused (not tested with caching here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gcbench.cache.engine import KeepGraphs
from gcbench.errors import UsageError
from gcbench.integrations.common import GradientSync, cached_loss, check_chunk_size, check_keep, syncing, unwrap
from gcbench.peers.extras import require

require("gcbench.integrations.sentence_transformers", "peers", ["sentence_transformers"])

from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from sentence_transformers.util import cos_sim  # noqa: E402


def _embedding(output: Any) -> Tensor:
    return output["sentence_embedding"]


class GradCachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """``MultipleNegativesRankingLoss`` at the activation memory of ``mini_batch_size`` rows per column.

    ``keep_graphs``: first-pass graphs kept (an int >= 0 or ``"all"``; 1 keeps the last chunk's, 0 is
    what ``CachedMultipleNegativesRankingLoss`` does). Every other argument is MNRL's.
    """

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        keep_graphs: KeepGraphs = 1,
        **options: Any,
    ) -> None:
        if options.get("gather_across_devices"):
            raise UsageError("gather_across_devices: not supported by the cached loss here; leave it False")
        self.mini_batch_size = check_chunk_size(mini_batch_size, name="mini_batch_size")
        self.keep_graphs = check_keep(keep_graphs)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, **options)
        self.last_embeddings: list[Tensor] = []
        self._sync: GradientSync | None = None

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        columns = list(sentence_features)
        sync = None
        if syncing(self.model):
            if self._sync is None:
                self._sync = GradientSync(unwrap(self.model).parameters())
            sync = self._sync
        loss, cache = cached_loss(
            [self.model] * len(columns),
            lambda *embeddings: self.compute_loss_from_embeddings(list(embeddings), labels),  # type: ignore[arg-type]
            [(column,) for column in columns],  # a SentenceTransformer takes the features dict itself
            self.mini_batch_size,
            self.keep_graphs,
            get_rep=_embedding,
            sync=sync,
        )
        self.last_embeddings = cache.last_reps
        return loss

    def last_scores(self) -> Tensor:
        """The last step's anchor-to-candidate scores (rows: anchors; columns: every candidate column), scaled."""
        if not self.last_embeddings:
            raise RuntimeError("last_scores: the loss has not been called yet")
        anchors, *candidates = self.last_embeddings
        with torch.no_grad():
            return self.similarity_fct(anchors, torch.cat(candidates)) * self.scale

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size, "keep_graphs": self.keep_graphs}


class GradCachedMultipleNegativesSymmetricRankingLoss(GradCachedMultipleNegativesRankingLoss):
    """The symmetric form (``MultipleNegativesSymmetricRankingLoss``): query-to-document and back, two softmaxes."""

    def __init__(self, model: Any, *args: Any, **options: Any) -> None:
        """The cached MNRL's arguments, less ``directions`` and ``partition_mode`` (set here)."""
        for name in ("directions", "partition_mode"):
            if name in options:
                raise UsageError(f"{name}: the symmetric loss sets it; use GradCachedMultipleNegativesRankingLoss")
        super().__init__(
            model,
            *args,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
            **options,
        )


def _peer_strategy() -> type:
    """``GradCachedPeer``: the loss above as a gcbench strategy beside ``st-cached`` (the peers report's pairing)."""
    from torch import nn

    from gcbench.peers.strategies import SentenceTransformersCached

    class GradCachedPeer(SentenceTransformersCached):
        """This module's loss on the objective's encoders (``keep_graphs=1``), measured like ``st-cached``."""

        name = "st-gradcached"

        def make_loss(self, model: nn.Module, **similarity: Any) -> nn.Module:
            assert self.chunk_sizes is not None
            if len(set(self.chunk_sizes)) > 1:
                raise UsageError(f"{self.name}: one mini_batch_size for every input, got {self.chunk_sizes}")
            return GradCachedMultipleNegativesRankingLoss(model, mini_batch_size=self.chunk_sizes[0], **similarity)

    return GradCachedPeer


GradCachedPeer = _peer_strategy()
