"""sentence-transformers' ranking losses as gcbench strategies: the peer, measured with gcbench's yardstick.

- ``st-full``: ``MultipleNegativesRankingLoss``, the peer's full batch;
- ``st-cached``: ``CachedMultipleNegativesRankingLoss``, the peer's GradCache, ``mini_batch_size`` = chunk.

Both train the objective's own encoders (same weights, same token ids) on dpr's in-batch softmax. The
peer's scores are made gcbench's: ``similarity_fct=dot_score`` and ``scale = 1 / temperature`` (its
default, cosine times 20, equals gcbench's dot product / 0.05 only on normalised embeddings). The
passages, grouped per query in gcbench (positive, then its hard negatives), become the peer's columns:
positives, then hard negative 1, 2, ... (rows ``j::group``); the loss is the same, candidates reordered.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gcbench.cache.batching import Batch
from gcbench.cache.engine import encode
from gcbench.cache.objective import Objective
from gcbench.errors import UsageError
from gcbench.losses import InBatchSoftmax
from gcbench.peers.extras import PEERS, require
from gcbench.peers.models import TOWERS
from gcbench.strategies import STRATEGIES, EncodeStep, Strategy, StrategyUse, chunk_order, whole_batches

ST_MODULES = ("sentence_transformers",)
ROUTE = "gcbench_input"  # which of the objective's encoders a column goes through


class _Encoders(nn.Module):
    """What the peer's losses call as their model: a features dict in, ``sentence_embedding`` added.

    Queries go through ``encoders[0]``, passages through ``encoders[1]`` (one module when tied), the
    way sentence-transformers' Router sends each column to its module by a key in its features.
    """

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(objective.encoders)
        self.get_rep = objective.get_rep

    def forward(self, features: dict[str, Any]) -> dict[str, Any]:
        index = features[ROUTE]
        inputs = {key: value for key, value in features.items() if key != ROUTE}
        rep = encode(self.encoders[index], inputs, self.get_rep, f"encoders[{index}]")
        return {**features, "sentence_embedding": rep}


def columns(batches: Sequence[Batch], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The peer's input layout: anchors, then the passages column by column (positives, hard negative 1, ...)."""
    queries, passages = batches
    if not isinstance(queries, Mapping) or not isinstance(passages, Mapping):
        raise TypeError(
            f"sentence-transformers' losses take features dicts (token ids), not {type(queries).__name__} batches"
        )
    if sizes[1] % sizes[0]:
        raise ValueError(f"{sizes[1]} passages do not split into groups for {sizes[0]} queries")
    group = sizes[1] // sizes[0]
    strided = [
        {key: value[j::group] if isinstance(value, Tensor) else value for key, value in passages.items()}
        for j in range(group)
    ]
    return [{**queries, ROUTE: 0}, *({**column, ROUTE: 1} for column in strided)]


class PeerStrategy(Strategy):
    """One step through a sentence-transformers loss built on the objective's encoders."""

    exact = True

    def __init__(
        self,
        objective: Objective,
        chunk_sizes: int | Sequence[int] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        super().__init__(objective, chunk_sizes, scaler)
        require(f"strategy {self.name!r}", PEERS, ST_MODULES)
        if not isinstance(objective.loss_fn, InBatchSoftmax) or len(objective.encoders) != 2:
            raise UsageError(
                f"{self.name}: sentence-transformers' ranking loss is dpr's in-batch softmax over "
                f"two inputs, not {type(objective.loss_fn).__name__}"
            )
        from sentence_transformers.util import dot_score

        model = nn.Sequential(_Encoders(objective))  # its losses look at model[0]
        self.loss = self.make_loss(model, scale=1.0 / objective.loss_fn.temperature, similarity_fct=dot_score)

    @abstractmethod
    def make_loss(self, model: nn.Module, **similarity: Any) -> nn.Module:
        """The peer's loss on ``model`` with gcbench's similarity (``scale``, ``similarity_fct``)."""

    def loss_rows(self, sizes: Sequence[int]) -> None:
        """None: the peer computes its own loss (in mini-batches of rows), not the objective's."""
        return None

    @classmethod
    def check_use(cls, use: StrategyUse) -> None:
        """UsageError, before any work, for what the peer cannot run or gcbench cannot check."""
        require(f"strategy {cls.name!r}", PEERS, ST_MODULES)
        workload = use.workload
        if workload.name != "dpr":
            raise UsageError(
                f"sweep.strategies: {cls.name} is sentence-transformers' ranking loss, dpr's in-batch "
                f"softmax; workload {workload.name!r} has another loss"
            )
        if workload.model.kind == "mlp":
            raise UsageError(f"sweep.strategies: {cls.name} feeds token ids; model.kind 'mlp' has none")
        if use.nproc > 1:
            raise UsageError(f"sweep.strategies: {cls.name} runs in one process here; set sweep.nproc = 1")
        if workload.loss_tile:
            raise UsageError(
                f"workload.loss_tile: {cls.name} computes sentence-transformers' own loss, not gcbench's "
                "tiled one; set workload.loss_tile = 0"
            )
        if use.equivalence and workload.hard_negatives:
            raise UsageError(
                f"sweep.equivalence: {cls.name} embeds hard negatives column by column, an order "
                "gcbench's reference cannot follow; set workload.hard_negatives = 0 or "
                "sweep.equivalence = false (its gradients are checked in tests/test_peers.py)"
            )

    def forward_backward(self, batches: Sequence[Batch], **loss_kwargs: Any) -> Tensor:
        if loss_kwargs:
            raise TypeError(f"{self.name}: the peer's loss takes no loss arguments, got {', '.join(loss_kwargs)}")
        loss = self.loss(columns(batches, self.check_batches(batches)), None)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()


class SentenceTransformersFull(PeerStrategy):
    """``MultipleNegativesRankingLoss``: anchors in one forward, the passage columns merged into another."""

    name = "st-full"
    uses_chunks = False

    def make_loss(self, model: nn.Module, **similarity: Any) -> nn.Module:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        # sentence-transformers types its model as a SentenceTransformer; it calls it and looks at model[0],
        # which the nn.Sequential it is given supports too
        return MultipleNegativesRankingLoss(model, **similarity)  # type: ignore[arg-type]

    def encode_order(self, sizes: Sequence[int]) -> list[EncodeStep]:
        """Queries, then passages (the candidate columns, merged into one forward when there are several)."""
        _require_pairs(self.name, sizes)
        return whole_batches(sizes)


class SentenceTransformersCached(PeerStrategy):
    """``CachedMultipleNegativesRankingLoss``: every column in mini-batches of the chunk size, each encoded twice."""

    name = "st-cached"
    trims_padding = True  # the peer pads each mini-batch to its own longest row
    uses_chunks = True
    caches_representations = True

    def make_loss(self, model: nn.Module, **similarity: Any) -> nn.Module:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        assert self.chunk_sizes is not None
        if len(set(self.chunk_sizes)) > 1:
            raise UsageError(
                f"{self.name}: the peer has one mini_batch_size for every input, got chunk sizes {self.chunk_sizes}"
            )
        # sentence-transformers types its model as a SentenceTransformer; it calls it and looks at model[0],
        # which the nn.Sequential it is given supports too
        return CachedMultipleNegativesRankingLoss(
            model,  # type: ignore[arg-type]
            mini_batch_size=self.chunk_sizes[0],
            **similarity,
        )

    @classmethod
    def check_use(cls, use: StrategyUse) -> None:
        super().check_use(use)
        workload = use.workload
        for setting in use.chunk_settings:
            if len(set(setting)) > 1:
                raise UsageError(
                    f"sweep.chunk_sizes: {cls.name} has one mini_batch_size for every input, "
                    f"not {'/'.join(map(str, setting))}"
                )
        if use.equivalence and workload.model.dropout > 0 and workload.model.kind not in TOWERS:
            raise UsageError(
                f"sweep.equivalence: {cls.name} trims trailing padding per mini-batch, so on padded "
                f"rows (model.kind {workload.model.kind!r}) its dropout masks are not those of gcbench's "
                f"reference; set model.dropout = 0, sweep.equivalence = false, or a kind whose rows "
                f"fill their windows ({', '.join(TOWERS)})"
            )

    def encode_order(self, sizes: Sequence[int]) -> list[EncodeStep]:
        """Column by column in chunks: for pairs exactly ``cache``'s order."""
        _require_pairs(self.name, sizes)
        assert self.chunk_sizes is not None
        return chunk_order(sizes, self.chunk_sizes)


def _require_pairs(name: str, sizes: Sequence[int]) -> None:
    if sizes[1] != sizes[0]:
        raise UsageError(
            f"{name}: with hard negatives the peer embeds the passages column by column (rows "
            "j::group), an order gcbench's encode steps (contiguous rows) cannot express"
        )


PEER_STRATEGIES: tuple[type[PeerStrategy], ...] = (SentenceTransformersFull, SentenceTransformersCached)


def register() -> None:
    """Make the strategies known to gcbench's registry; imports nothing optional."""
    STRATEGIES.update({cls.name: cls for cls in PEER_STRATEGIES})
