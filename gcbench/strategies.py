"""Ways to get contrastive-loss gradients for one batch, behind one interface.

Every strategy accumulates gradients for one batch into ``.grad`` and returns the loss, detached:

- ``full``: encode the whole batch with its graph, one loss, one backward (the naive baseline);
- ``cache``: GradCache (exact, activation memory of one chunk);
- ``cache-rerun``: GradCache re-encoding every chunk, as the paper and public libraries do;
- ``accumulate``: gradient accumulation over micro-batches, in-batch negatives only within a
  micro-batch. NOT equivalent to ``full``: that is what it is here to show;
- ``checkpoint``: ``full`` with per-layer activation checkpointing of the encoders;
- ``cache-checkpoint``: ``cache`` with every chunk's forward checkpointed per layer.

The harness swaps them freely: they differ only in :meth:`Strategy.forward_backward`. Each also
names the order in which it encodes its inputs (:meth:`Strategy.encode_order`), so that a reference
with the full-batch loss can draw the same dropout masks (see :mod:`gcbench.measure.equivalence`).

What a strategy *is* (exact or not, chunked, caching representations, the reference) is stated by its
class as :class:`StrategyTraits`; the sweep, the estimate and the report ask for those, never for a
name, so a strategy added later (an extra, a user's class) is treated by what it declares.
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeGuard

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gcbench.cache.batching import Batch, Rows, batch_size, chunk_bounds, distinct, row_lengths, slice_batch, take_rows
from gcbench.cache.checkpointing import checkpoint_layers, uncheckpoint_layers
from gcbench.cache.engine import GradCache, KeepGraphs, as_chunk_sizes, encode, unwrap_ddp
from gcbench.cache.loss import contrastive_loss
from gcbench.cache.objective import Objective
from gcbench.cache.phases import phase
from gcbench.errors import UsageError
from gcbench.imports import import_object, is_import_path
from gcbench.typed import Bool, typed
from gcbench.workloads.config import WorkloadConfig

EncodeStep = tuple[int, Rows]  # (encoder index, rows of its batch: a range, or the rows of a token chunk)


@typed
class StrategyTraits:
    """What a strategy is, as the harness needs to know it (recorded with every result)."""

    exact: Bool  # its gradients equal the full batch's (up to rounding)
    uses_chunks: Bool  # chunk sizes change what it does
    caches_representations: Bool  # GradCache-like: representations first, their gradients cached, then re-encoding
    reference: Bool  # the full-batch baseline the others are compared with
    global_negatives: Bool  # on W ranks its loss sees the global batch (DDP gathers the representations)
    keeps_graphs: Bool = False  # takes keep_graphs: how many first-pass graphs it keeps (memory for time)


@dataclass(frozen=True)
class StrategyUse:
    """How an experiment would run a strategy, for :meth:`Strategy.check_use` to refuse before any work."""

    workload: WorkloadConfig
    chunk_settings: tuple[tuple[int, ...], ...] = ()
    nproc: int = 1
    equivalence: bool = True


def backward_in_order(
    objective: Objective,
    batches: Sequence[Batch],
    order: Sequence[EncodeStep],
    loss_kwargs: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    weight: float = 1.0,
    trim_padding: bool = False,
) -> Tensor:
    """Encode the pieces in ``order`` keeping every graph, then one loss (times ``weight``) over the rows in
    their batch's order, and backward. A token chunk is padded to its own longest row, as the engine pads it;
    a range of rows too with ``trim_padding`` (for a strategy that trims its chunks: its ``trims_padding``)."""
    pieces: list[list[Tensor]] = [[] for _ in objective.encoders]
    taken: list[list[int]] = [[] for _ in objective.encoders]
    lengths = [row_lengths(batch) for batch in batches]
    with phase("encode with graph"):
        for i, rows in order:
            trim = trim_padding or not isinstance(rows, slice)
            batch = take_rows(batches[i], rows, lengths[i] if trim else None)
            pieces[i].append(encode(objective.encoders[i], batch, objective.get_rep, f"encoders[{i}]"))
            taken[i].extend(range(rows.start, rows.stop) if isinstance(rows, slice) else rows)
    with phase("loss and backward"):
        reps = [_in_batch_order(torch.cat(p) if len(p) > 1 else p[0], rows) for p, rows in zip(pieces, taken)]
        loss = contrastive_loss(objective.loss_fn, reps, loss_kwargs)
        target = loss * weight if weight != 1.0 else loss
        (scaler.scale(target) if scaler is not None else target).backward()
    return loss.detach()


def _in_batch_order(rep: Tensor, rows: list[int]) -> Tensor:
    """``rep``'s rows (encoded in the order ``rows``) put back in batch order (differentiably)."""
    if rows == sorted(rows):
        return rep
    inverse = sorted(range(len(rows)), key=rows.__getitem__)
    return rep[torch.tensor(inverse, device=rep.device)]


def whole_batches(sizes: Sequence[int]) -> list[EncodeStep]:
    return [(i, slice(0, size)) for i, size in enumerate(sizes)]


def chunk_order(sizes: Sequence[int], chunk_sizes: Sequence[int]) -> list[EncodeStep]:
    """Every chunk of input 0 in order, then of input 1, ...: GradCache's first pass (and most cached losses')."""
    return [
        (i, slice(start, stop))
        for i, (size, chunk) in enumerate(zip(sizes, chunk_sizes))
        for start, stop in chunk_bounds(size, chunk)
    ]


class Strategy(ABC):
    """One way to compute the gradients of a contrastive loss over a batch.

    A subclass states its name and its traits as class attributes; ``global_negatives`` defaults to
    ``exact`` (an exact strategy on W ranks must see the global batch's negatives to stay exact).
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    uses_chunks: ClassVar[bool]
    caches_representations: ClassVar[bool] = False
    reference: ClassVar[bool] = False
    global_negatives: ClassVar[bool | None] = None
    keeps_graphs: ClassVar[bool] = False
    token_chunks: ClassVar[bool] = False  # takes chunk_tokens: chunks by token count instead of row count
    trims_padding: ClassVar[bool] = False  # pads each chunk by rows to its own longest row (a reference must too)

    @classmethod
    def traits(cls) -> StrategyTraits:
        global_negatives = cls.exact if cls.global_negatives is None else cls.global_negatives
        return StrategyTraits(
            cls.exact, cls.uses_chunks, cls.caches_representations, cls.reference, global_negatives, cls.keeps_graphs
        )

    def __init__(
        self,
        objective: Objective,
        chunk_sizes: int | Sequence[int] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        keep_graphs: KeepGraphs | None = None,
        *,
        chunk_tokens: int | Sequence[int] | None = None,
    ) -> None:
        if keep_graphs is not None and not self.keeps_graphs:
            raise ValueError(f"strategy {self.name!r} keeps no first-pass graphs; it takes no keep_graphs")
        if chunk_tokens is not None and not self.token_chunks:
            raise ValueError(f"strategy {self.name!r} chunks by rows only; it takes no chunk_tokens")
        self.objective = objective
        self.scaler = scaler
        count = len(objective.encoders)
        self.chunk_tokens = as_chunk_sizes(chunk_tokens, count, "chunk_tokens") if chunk_tokens is not None else None
        self.chunk_sizes: tuple[int, ...] | None = None
        if self.uses_chunks and self.chunk_tokens is None:
            if chunk_sizes is None:
                raise ValueError(f"strategy {self.name!r} needs chunk sizes")
            self.chunk_sizes = as_chunk_sizes(chunk_sizes, count, "chunk_sizes")

    def check_batches(self, batches: Sequence[Batch]) -> list[int]:
        if len(batches) != len(self.objective.encoders):
            raise ValueError(f"batches: got {len(batches)} batches for {len(self.objective.encoders)} encoders")
        return [batch_size(b, f"batches[{i}]") for i, b in enumerate(batches)]

    @abstractmethod
    def forward_backward(self, batches: Sequence[Batch], **loss_kwargs: Any) -> Tensor:
        """Accumulate this batch's gradients into ``.grad``; return the loss, detached."""

    @abstractmethod
    def encode_order(self, sizes: Sequence[int]) -> list[EncodeStep]:
        """The pieces of each input in the order this strategy first encodes them."""

    def encode_steps(self, batches: Sequence[Batch]) -> list[EncodeStep]:
        """:meth:`encode_order` for these batches (chunks by tokens depend on the rows' lengths, not only on sizes)."""
        return self.encode_order(self.check_batches(batches))

    def release(self) -> None:
        """Undo what the strategy changed on the model (the estimator reuses one model for many points)."""

    def loss_rows(self, sizes: Sequence[int]) -> list[int] | None:
        """Rows of each input the objective's loss sees at once (here the whole batch); None for a strategy
        that computes a loss of its own. The loss's own memory is measured at these sizes."""
        return list(sizes)

    @classmethod
    def check_use(cls, use: StrategyUse) -> None:
        """Raise UsageError, before any work, for a use this strategy cannot run (built-ins: none)."""


class Full(Strategy):
    name = "full"
    exact = True
    uses_chunks = False
    reference = True

    def forward_backward(self, batches: Sequence[Batch], **loss_kwargs: Any) -> Tensor:
        sizes = self.check_batches(batches)
        return backward_in_order(self.objective, batches, whole_batches(sizes), loss_kwargs, self.scaler)

    def encode_order(self, sizes: Sequence[int]) -> list[EncodeStep]:
        return whole_batches(sizes)


class Checkpoint(Full):
    """Full batch, every encoder layer recomputed in backward instead of storing its activations."""

    name = "checkpoint"
    reference = False

    def __init__(
        self,
        objective: Objective,
        chunk_sizes: int | Sequence[int] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        super().__init__(objective, chunk_sizes, scaler)
        for encoder in self._distinct_encoders():
            set_checkpointing(encoder, True)

    def release(self) -> None:
        for encoder in self._distinct_encoders():
            set_checkpointing(encoder, False)

    def _distinct_encoders(self) -> list[nn.Module]:
        return distinct_encoders(self.objective)


def distinct_encoders(objective: Objective) -> list[nn.Module]:
    """Each encoder once (a tied one is one), DDP's wrapper taken off."""
    return distinct(unwrap_ddp(e) for e in objective.encoders)


class _CheckpointingSwitch(Protocol):
    """Hugging Face's switch for per-layer activation checkpointing."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None: ...

    def gradient_checkpointing_disable(self) -> None: ...


def _has_checkpointing_switch(module: nn.Module) -> TypeGuard[_CheckpointingSwitch]:
    return hasattr(module, "gradient_checkpointing_enable")


def set_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Per-layer activation checkpointing on or off: Hugging Face's and gcbench's switches, else torch's
    ``checkpoint_wrapper`` around the model's repeated layers (:mod:`gcbench.cache.checkpointing`)."""
    if _has_checkpointing_switch(module):
        if enabled:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_disable()
    elif hasattr(module, "gradient_checkpointing"):
        # torch types Module.__setattr__ for tensors and modules only; a plain attribute takes any value
        module.gradient_checkpointing = enabled  # type: ignore[assignment]
    elif not enabled:
        uncheckpoint_layers(module)
    elif not checkpoint_layers(module):  # any other model: torch's checkpoint_wrapper around its layers
        raise UsageError(
            f"strategy checkpoint: {type(module).__name__} has no layers to checkpoint (no repeated layers "
            "and no child with parameters)"
        )


class Cache(Strategy):
    """GradCache; ``keep_graphs`` first-pass graphs kept (default 1: the last chunk's)."""

    name = "cache"
    exact = True
    uses_chunks = True
    caches_representations = True
    keeps_graphs = True
    token_chunks = True
    default_keep: ClassVar[KeepGraphs] = 1
    checkpoints_layers: ClassVar[bool] = False  # every chunk's forward checkpointed per layer

    def __init__(
        self,
        objective: Objective,
        chunk_sizes: int | Sequence[int] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        keep_graphs: KeepGraphs | None = None,
        *,
        chunk_tokens: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(objective, chunk_sizes, scaler, keep_graphs, chunk_tokens=chunk_tokens)
        self.keep_graphs = self.default_keep if keep_graphs is None else keep_graphs
        self.engine = GradCache(
            objective.encoders,
            objective.loss_fn,
            self.chunk_sizes,
            get_rep=objective.get_rep,
            scaler=scaler,
            keep_graphs=self.keep_graphs,
            chunk_tokens=self.chunk_tokens,
        )
        if self.checkpoints_layers:
            for encoder in distinct_encoders(objective):
                set_checkpointing(encoder, True)

    def release(self) -> None:
        if self.checkpoints_layers:
            for encoder in distinct_encoders(self.objective):
                set_checkpointing(encoder, False)

    def forward_backward(self, batches: Sequence[Batch], **loss_kwargs: Any) -> Tensor:
        return self.engine(*batches, **loss_kwargs)

    def encode_order(self, sizes: Sequence[int]) -> list[EncodeStep]:
        if self.chunk_sizes is None:
            raise ValueError(f"strategy {self.name!r} with chunk_tokens: its order depends on the rows' lengths")
        return chunk_order(sizes, self.chunk_sizes)

    def encode_steps(self, batches: Sequence[Batch]) -> list[EncodeStep]:
        return self.engine.encode_steps(*batches)


class CacheRerun(Cache):
    """GradCache as published: every chunk encoded twice (``cache`` with ``keep_graphs=0``, kept by name)."""

    name = "cache-rerun"
    keeps_graphs = False
    default_keep = 0


class CacheCheckpoint(Cache):
    """GradCache with every chunk's forward checkpointed per layer: a re-encoded chunk holds one layer's
    activations and the layers' inputs, not its whole graph (the checkpoint's RNG replay and the cache's
    together keep dropout exact)."""

    name = "cache-checkpoint"
    checkpoints_layers = True


class Accumulate(Strategy):
    """Micro-batches of ``chunk_sizes[0]`` examples; every other input sliced in proportion.

    Each micro-batch's loss sees only its own in-batch negatives and is weighted by its share of
    the batch, the usual way to accumulate a mean loss.
    """

    name = "accumulate"
    exact = False
    uses_chunks = True

    def micro_batches(self, sizes: Sequence[int]) -> list[list[slice]]:
        assert self.chunk_sizes is not None
        first = sizes[0]
        for i, size in enumerate(sizes):
            if size % first:
                raise ValueError(
                    f"accumulate: batches[{i}] has {size} rows, not a multiple of the {first} examples of batches[0]"
                )
        return [
            [slice(start * size // first, stop * size // first) for size in sizes]
            for start, stop in chunk_bounds(first, self.chunk_sizes[0])
        ]

    def forward_backward(self, batches: Sequence[Batch], **loss_kwargs: Any) -> Tensor:
        sizes = self.check_batches(batches)
        total = torch.zeros((), device=_device_of(self.objective))
        micro_batches = self.micro_batches(sizes)
        for index, rows in enumerate(micro_batches):
            share = (rows[0].stop - rows[0].start) / sizes[0]
            micro = [slice_batch(b, r.start, r.stop) for b, r in zip(batches, rows)]
            kwargs = {
                k: v[rows[0]] if isinstance(v, Tensor) and v.dim() and v.shape[0] == sizes[0] else v
                for k, v in loss_kwargs.items()
            }
            with _no_sync(self.objective.encoders, index < len(micro_batches) - 1):
                loss = backward_in_order(
                    self.objective,
                    micro,
                    whole_batches([r.stop - r.start for r in rows]),
                    kwargs,
                    self.scaler,
                    weight=share,
                )
            total = total + loss * share
        return total

    def encode_order(self, sizes: Sequence[int]) -> list[EncodeStep]:
        return [(i, r) for rows in self.micro_batches(sizes) for i, r in enumerate(rows)]

    def loss_rows(self, sizes: Sequence[int]) -> list[int]:
        return [rows.stop - rows.start for rows in self.micro_batches(sizes)[0]]


def _no_sync(encoders: Sequence[nn.Module], skip: bool) -> contextlib.ExitStack:
    """DDP all-reduces only after the last micro-batch: ``no_sync`` on every distinct DDP encoder before it."""
    stack = contextlib.ExitStack()
    if skip:
        for encoder in distinct(e for e in encoders if isinstance(e, DistributedDataParallel)):
            stack.enter_context(encoder.no_sync())
    return stack


def _device_of(objective: Objective) -> torch.device:
    for p in objective.parameters():
        return p.device
    return torch.device("cpu")


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Full, Cache, CacheRerun, Accumulate, Checkpoint, CacheCheckpoint)
}


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy class a name stands for, or a user's by import path (``package.module:ClassName``, a
    :class:`Strategy` subclass); a UsageError listing the known names, or saying why the class cannot be used."""
    if is_import_path(name):
        return _user_strategy(name)
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UsageError(
            f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}, or your own as package.module:ClassName"
        ) from None


def _user_strategy(path: str) -> type[Strategy]:
    found = import_object(path, f"strategy {path}")
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise UsageError(f"strategy {path}: not a subclass of gcbench.Strategy")
    if inspect.isabstract(found):
        missing = ", ".join(sorted(getattr(found, "__abstractmethods__", ())))
        raise UsageError(f"strategy {path}: {found.__name__} does not implement {missing}")
    for trait in ("exact", "uses_chunks"):
        if not isinstance(getattr(found, trait, None), bool):
            raise UsageError(f"strategy {path}: {found.__name__} must declare {trait} = True or False (a trait)")
    return found


def make_strategy(
    name: str,
    objective: Objective,
    chunk_sizes: int | Sequence[int] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    keep_graphs: KeepGraphs | None = None,
    chunk_tokens: int | Sequence[int] | None = None,
) -> Strategy:
    """The strategy ``name`` on ``objective``; chunk sizes are passed to those that use them, ``keep_graphs``
    (None: the strategy's default) only to those that keep graphs, ``chunk_tokens`` only to those that chunk
    by tokens (a ValueError for the others)."""
    cls = resolve_strategy(name)
    chunks = chunk_sizes if cls.uses_chunks else None
    if chunk_tokens is not None:
        if not cls.token_chunks:
            raise ValueError(f"strategy {name!r} chunks by rows only; it takes no chunk_tokens")
        return cls(objective, None, scaler, keep_graphs, chunk_tokens=chunk_tokens)
    if keep_graphs is None:
        return cls(objective, chunks, scaler)
    if not cls.keeps_graphs:
        raise ValueError(f"strategy {name!r} keeps no first-pass graphs; it takes no keep_graphs")
    return cls(objective, chunks, scaler, keep_graphs)
