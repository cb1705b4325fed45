"""GradCache: full-batch contrastive gradients at the activation memory of one chunk.

The three steps of Gao et al. (2021), one method each in :class:`GradCache`:

1. ``_encode_without_graph``: encode every chunk with no graph; keep only the representations (and
   the RNG state each chunk started from).
2. ``_cache_gradients``: compute the loss over all representations and back-propagate it to them
   only; their gradients are the cache (the loss's own parameters, e.g. a temperature, get theirs).
3. ``_push_gradients``: re-encode each chunk with a graph, replaying its RNG state so dropout draws
   the same masks, and back-propagate its slice of the cache into the encoder.

The last ``keep_graphs`` chunks of the first pass are encoded with their graphs kept: their second
forward would recompute exactly what is already there, so each kept graph saves one chunk forward per
step, at the cost of holding that chunk's activations while the loss is computed. ``keep_graphs=0`` is
the published order (every chunk encoded twice), 1 (the default) keeps the last chunk's, ``"all"``
keeps every graph: full-batch memory, one forward per chunk. The kept chunks are the *last* ones, so
no kept graph is held while the others are encoded, and they go backward *first* in step 3, so their
memory is freed before any chunk is encoded again.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from gcbench.cache.batching import (
    Batch,
    Rows,
    batch_devices,
    batch_size,
    call_encoder,
    chunk_bounds,
    distinct,
    module_devices,
    take_rows,
    token_chunks,
    token_lengths,
)
from gcbench.cache.loss import contrastive_loss
from gcbench.cache.phases import phase
from gcbench.cache.rng import RngState
from gcbench.cache.sharded import Reduce, Wrapping, check_reduce, wrapping_of

GetRep = Callable[[Any], Tensor]
OnReps = Callable[[tuple[Tensor, ...]], None]
ChunkId = tuple[int, int]  # (encoder index, chunk index)
KeepGraphs = int | Literal["all"]  # how many first-pass graphs to keep


def as_encoder_list(encoders: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(encoders, nn.Module):
        return [encoders]
    if isinstance(encoders, Sequence) and encoders and all(isinstance(e, nn.Module) for e in encoders):
        return list(encoders)
    raise TypeError("encoders must be an nn.Module or a non-empty sequence of nn.Module")


def as_chunk_sizes(chunk_size: int | Sequence[int], count: int, name: str = "chunk_size") -> tuple[int, ...]:
    """One chunk size per encoder (one int, or a one-item sequence, serves all); errors name ``name``."""
    sizes = [chunk_size] * count if not isinstance(chunk_size, Sequence) else list(chunk_size)
    if len(sizes) == 1:
        sizes = sizes * count
    if len(sizes) != count:
        raise ValueError(f"{name}: got {len(sizes)} sizes for {count} encoders")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"{name} must be an int or one int per encoder, got {size!r}")
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    return tuple(sizes)


def check_keep_graphs(keep_graphs: Any, name: str = "keep_graphs") -> KeepGraphs:
    """An int >= 0 or ``"all"``; errors name ``name``."""
    if keep_graphs == "all":
        return "all"
    if isinstance(keep_graphs, bool) or not isinstance(keep_graphs, int) or keep_graphs < 0:
        raise ValueError(f"{name} must be an int >= 0 or 'all', got {keep_graphs!r}")
    return keep_graphs


def encode(encoder: Callable[..., Any], batch: Batch, get_rep: GetRep | None, name: str) -> Tensor:
    """Run ``encoder`` on ``batch`` and pull out the representation tensor."""
    output = call_encoder(encoder, batch)
    rep = get_rep(output) if get_rep is not None else output
    if not isinstance(rep, Tensor):
        hint = "" if get_rep is not None else "; pass get_rep= to pull the representation tensor out of it"
        raise TypeError(f"{name} returned {type(output).__name__}, not a tensor{hint}")
    return rep


def unwrap_ddp(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


class GradCache:
    """Accumulates into ``.grad`` exactly what ``loss_fn(*reps).backward()`` on the whole batch would.

    ``encoders``: a module or one per input (the same module may appear twice: a tied encoder).
    ``chunk_size``: an int or one per encoder; need not divide the batch.
    ``get_rep``: pulls the representation tensor out of an encoder's output (HF outputs, tuples).
    ``scaler``: a ``torch.amp.GradScaler``; the loss is scaled before the cache is built, so the
    cached gradients carry the scale. Unscaling and stepping stay the caller's.
    ``keep_graphs``: how many chunks' first-pass graphs to keep instead of encoding them again (an int,
    or ``"all"``); more is faster and holds more memory (see the module docstring).
    ``reduce``: for DDP, FSDP2 (``fully_shard``) and DeepSpeed encoders, reduce gradients once per step
    (``"step"``) or after every chunk (``"chunk"``); ``keep_unsharded``: FSDP2 parameters gathered once
    for the whole step (see :mod:`gcbench.cache.sharded`).
    ``on_reps``: called with each input's representations, detached, once the cache is built and before
    step 3 frees them: in-batch metrics from the step's own tensors, with no second forward and no memory
    beyond what the step holds.
    ``chunk_tokens``: chunks by token count instead of row count (an int, or one per encoder): each chunk at
    most that many padded tokens (rows x its longest row), rows taken longest first so that a chunk holds
    rows of about one length; the loss still sees the batch in its own order. Rows are counted by their
    ``attention_mask``; an input without one counts one token a row. Each chunk is padded to its own
    longest row either way.

    Call it with one batch per encoder and the loss's keyword arguments; it returns the loss,
    detached, and never touches an optimizer (:meth:`step` also returns the representations).
    DDP-wrapped encoders all-reduce once per step.
    """

    def __init__(
        self,
        encoders: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., Tensor],
        chunk_size: int | Sequence[int] | None = None,
        *,
        get_rep: GetRep | None = None,
        scaler: torch.amp.GradScaler | None = None,
        keep_graphs: KeepGraphs = 1,
        reduce: Reduce = "step",
        keep_unsharded: bool = False,
        on_reps: OnReps | None = None,
        chunk_tokens: int | Sequence[int] | None = None,
    ) -> None:
        self.encoders = as_encoder_list(encoders)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if get_rep is not None and not callable(get_rep):
            raise TypeError(f"get_rep must be callable, got {type(get_rep).__name__}")
        self.loss_fn = loss_fn
        if chunk_size is None and chunk_tokens is None:
            raise TypeError("chunk_size must be an int or one int per encoder, got None (or give chunk_tokens)")
        if chunk_size is not None and chunk_tokens is not None:
            raise ValueError("GradCache: give chunk_size (rows per chunk) or chunk_tokens (tokens per chunk), not both")
        count = len(self.encoders)
        self.chunk_sizes = as_chunk_sizes(chunk_size, count) if chunk_size is not None else None
        self.chunk_tokens = as_chunk_sizes(chunk_tokens, count, "chunk_tokens") if chunk_tokens is not None else None
        self.get_rep = get_rep
        self.scaler = scaler
        self.keep_graphs = check_keep_graphs(keep_graphs)
        self.reduce = check_reduce(reduce)
        by_module = {id(e): wrapping_of(e, self.reduce, keep_unsharded) for e in self.encoders}
        self.wrappings: list[Wrapping] = [by_module[id(e)] for e in self.encoders]  # a tied encoder: one each
        if on_reps is not None and not callable(on_reps):
            raise TypeError(f"on_reps must be callable, got {type(on_reps).__name__}")
        self.on_reps = on_reps
        self._warned_batchnorm: set[str] = set()

    def __call__(self, *batches: Batch, **loss_kwargs: Any) -> Tensor:
        return self._step(batches, loss_kwargs, return_reps=False).loss

    def step(self, *batches: Batch, **loss_kwargs: Any) -> CachedStep:
        """As a call, also returning each input's representations: the tensors step 1 filled, detached (no
        copy, no second forward). Held until the caller drops them, so through step 3 as well: one more
        |S|d than a call there, the size of the gradient cache it holds then (``on_reps`` costs nothing)."""
        return self._step(batches, loss_kwargs, return_reps=True)

    def _step(self, batches: tuple[Batch, ...], loss_kwargs: dict[str, Any], return_reps: bool) -> CachedStep:
        if len(batches) != len(self.encoders):
            raise ValueError(f"batches: got {len(batches)} batches for {len(self.encoders)} encoders")
        self._warn_batchnorm()
        plan = _Plan.make(self.encoders, self.wrappings, batches, self.chunk_sizes, self.keep_graphs, self.chunk_tokens)
        with contextlib.ExitStack() as step:
            for wrapping in distinct(self.wrappings):
                step.enter_context(wrapping.step())
            with phase("encode without graph"):
                reps, kept, rng_states = self._encode_without_graph(plan)
            rng_after = RngState.capture(plan.devices)
            # Detached at once: the loss's graph reaches the representations, which step 3 frees.
            with phase("loss and cache"):
                loss = self._cache_gradients(reps, loss_kwargs).detach()
            if self.on_reps is not None:
                with torch.no_grad():
                    self.on_reps(tuple(rep.detach() for rep in reps))
            returned = tuple(rep.detach() for rep in reps) if return_reps else ()  # views: the same storage
            self._push_gradients(plan, reps, kept, rng_states)
        rng_after.restore()
        return CachedStep(loss, returned)

    def encode_steps(self, *batches: Batch) -> list[tuple[int, slice | tuple[int, ...]]]:
        """(encoder index, rows) of every chunk in the order of the first pass: what a mask-consistent
        full-batch reference encodes (gcbench.measure.equivalence)."""
        plan = _Plan.make(self.encoders, self.wrappings, batches, self.chunk_sizes, self.keep_graphs, self.chunk_tokens)
        return [(cid[0], plan.pieces[cid[0]][cid[1]]) for cid in plan.chunk_ids]

    # Step 1 ------------------------------------------------------------------------------------
    def _encode_without_graph(self, plan: _Plan) -> tuple[list[Tensor], dict[ChunkId, Tensor], dict[ChunkId, RngState]]:
        reps: dict[int, Tensor] = {}  # by encoder; every input has a chunk (_Plan refuses empty batches)
        rng_states: dict[ChunkId, RngState] = {}
        kept: dict[ChunkId, Tensor] = {}  # the chunks whose graphs step 3 reuses
        for cid in plan.chunk_ids:
            i = cid[0]
            rng_states[cid] = RngState.capture(plan.devices)
            if cid in plan.kept:
                with self._sync_context(cid, plan):
                    kept[cid] = self._encode(self.encoders[i], plan.chunk(cid), i)
                value = kept[cid].detach()
            else:
                with torch.no_grad():
                    value = self._encode(self.wrappings[i].no_grad_module(), plan.chunk(cid), i)
            rep = reps.get(i)
            if rep is None:
                rep = reps[i] = value.new_empty((plan.sizes[i], *value.shape[1:]))
            rows = plan.rows(cid)
            count, where = (
                (rows.stop - rows.start, f"rows {rows.start}:{rows.stop}")
                if isinstance(rows, slice)
                else (
                    len(rows),
                    f"{len(rows)} rows by tokens",
                )
            )
            if value.shape != (count, *rep.shape[1:]):  # the assignment would broadcast, silently
                raise ValueError(
                    f"encoders[{i}]: chunk {cid[1]} ({where}) gave representations of shape "
                    f"{tuple(value.shape)}, expected {(count, *rep.shape[1:])} as chunk 0's; "
                    "every chunk must give one row per example and the same trailing shape"
                )
            with torch.no_grad():
                rep[plan.rows(cid)] = value
        return [reps[i].requires_grad_() for i in range(len(self.encoders))], kept, rng_states

    # Step 2 ------------------------------------------------------------------------------------
    def _cache_gradients(self, reps: list[Tensor], loss_kwargs: dict[str, Any]) -> Tensor:
        loss = contrastive_loss(self.loss_fn, reps, loss_kwargs)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss

    # Step 3 ------------------------------------------------------------------------------------
    def _push_gradients(
        self, plan: _Plan, reps: list[Tensor], kept: dict[ChunkId, Tensor], rng_states: dict[ChunkId, RngState]
    ) -> None:
        caches = [rep.grad for rep in reps]
        reps.clear()  # the values are no longer needed, only their gradients
        for cid in plan.backward_order:  # kept chunks first: their graphs are freed before any re-encoding
            i = cid[0]
            cache = caches[i]
            reused = kept.pop(cid, None)
            if cache is None and cid not in plan.syncing:  # the loss does not depend on this input
                continue
            what = "backward of the kept graph" if reused is not None else "re-encode and backward"
            with self._sync_context(cid, plan), phase(f"{what}, input {i} chunk {cid[1] + 1}"):
                if reused is not None:
                    rep = reused
                else:
                    rng_states[cid].restore()
                    rep = self._encode(self.encoders[i], plan.chunk(cid), i)
                # A syncing chunk goes backward even when the loss ignores its input: with zeros, DDP still
                # reduces what the module's other chunks accumulated.
                self.wrappings[i].backward(rep, cache[plan.rows(cid)] if cache is not None else torch.zeros_like(rep))
            del rep, reused

    # Helpers -----------------------------------------------------------------------------------
    def _encode(self, encoder: nn.Module, batch: Batch, index: int) -> Tensor:
        return encode(encoder, batch, self.get_rep, f"encoders[{index}]")

    def _sync_context(self, cid: ChunkId, plan: _Plan) -> contextlib.AbstractContextManager[Any]:
        return self.wrappings[cid[0]].chunk(cid in plan.syncing)

    def _warn_batchnorm(self) -> None:
        for name, module in self._named_modules():
            if isinstance(module, _BatchNorm) and module.training and name not in self._warned_batchnorm:
                self._warned_batchnorm.add(name)
                warnings.warn(
                    f"GradCache: {name} is a BatchNorm in training mode; its statistics are per chunk and its "
                    "running stats are updated twice, so gradients will not equal full-batch ones",
                    stacklevel=3,
                )

    def _named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for i, encoder in enumerate(self.encoders):
            for name, module in encoder.named_modules():
                yield f"encoders[{i}]" + (f".{name}" if name else ""), module


@dataclass(frozen=True)
class CachedStep:
    """One step's detached loss and, from :meth:`GradCache.step`, each input's representations."""

    loss: Tensor
    reps: tuple[Tensor, ...]


@dataclass(frozen=True)
class _Plan:
    """How one call splits into chunks, in which order they go backward, and which one syncs DDP."""

    batches: tuple[Batch, ...]
    sizes: tuple[int, ...]
    pieces: tuple[tuple[Rows, ...], ...]  # per encoder, each chunk's rows
    lengths: tuple[list[int] | None, ...]  # per encoder, each row's length (None: unknown, no padding trimmed)
    devices: frozenset[torch.device]
    chunk_ids: tuple[ChunkId, ...]
    kept: frozenset[ChunkId]
    backward_order: tuple[ChunkId, ...]
    syncing: frozenset[ChunkId]

    @classmethod
    def make(
        cls,
        encoders: list[nn.Module],
        wrappings: list[Wrapping],
        batches: tuple[Batch, ...],
        chunk_sizes: tuple[int, ...] | None,
        keep: KeepGraphs,
        chunk_tokens: tuple[int, ...] | None = None,
    ) -> _Plan:
        sizes = tuple(batch_size(batch, f"batches[{i}]") for i, batch in enumerate(batches))
        for i, size in enumerate(sizes):
            if size == 0:
                raise ValueError(f"batches[{i}] is empty")
        pieces: tuple[tuple[Rows, ...], ...]
        lengths: tuple[list[int] | None, ...]
        if chunk_tokens is not None:
            counted = [token_lengths(b, f"chunk_tokens[{i}]") for i, b in enumerate(batches)]
            pieces = tuple(
                tuple(token_chunks(n, budget, f"chunk_tokens[{i}]"))
                for i, (n, budget) in enumerate(zip(counted, chunk_tokens))
            )
            lengths = tuple(counted)
        else:
            assert chunk_sizes is not None
            # Chunks by rows keep the batch's padding: trimming it is exact only for encoders that honour
            # their attention mask, which a user's encoder need not do (token chunks trim: they need to).
            lengths = tuple(None for _ in batches)
            pieces = tuple(
                tuple(slice(*bounds) for bounds in chunk_bounds(size, chunk)) for size, chunk in zip(sizes, chunk_sizes)
            )
        devices = frozenset().union(*(module_devices(e) for e in encoders), *(batch_devices(b) for b in batches))
        chunk_ids = tuple((i, j) for i, encoder_pieces in enumerate(pieces) for j in range(len(encoder_pieces)))
        count = len(chunk_ids) if keep == "all" else min(keep, len(chunk_ids))
        kept = set(chunk_ids[len(chunk_ids) - count :])
        for module in distinct(e for e, w in zip(encoders, wrappings) if w.arms_in_forward and w.syncs):
            # DDP arms its reducer in the forward of the chunk that syncs; another graph of the module going
            # backward after that forward would be reduced with it. So the module's syncing chunk is kept only
            # when it is the module's only chunk; otherwise it is encoded again, just before its backward.
            own = [c for c in chunk_ids if encoders[c[0]] is module]
            if len(own) > 1 and all(c in kept for c in own):
                kept.discard(own[-1])
        for module in distinct(e for e, w in zip(encoders, wrappings) if w.arms_in_forward and not w.syncs):
            # DDP reducing every chunk: each forward re-arms the reducer, so at most one graph of the module may
            # wait for its backward; the module keeps its last kept graph only.
            kept.difference_update([c for c in chunk_ids if encoders[c[0]] is module and c in kept][:-1])
        backward_order = tuple(c for c in chunk_ids if c in kept) + tuple(c for c in chunk_ids if c not in kept)
        last_use: dict[int, ChunkId] = {}  # per distinct module, the last chunk to go backward syncs
        for cid in backward_order:
            last_use[id(encoders[cid[0]])] = cid
        syncing = frozenset(c for c in last_use.values() if wrappings[c[0]].syncs)
        return cls(batches, sizes, pieces, lengths, devices, chunk_ids, frozenset(kept), backward_order, syncing)

    def rows(self, cid: ChunkId) -> slice | list[int]:
        """The chunk's rows, as indexing the representations takes them."""
        rows = self.pieces[cid[0]][cid[1]]
        return rows if isinstance(rows, slice) else list(rows)

    def chunk(self, cid: ChunkId) -> Batch:
        """The chunk's rows of its batch, padded to its own longest row."""
        return take_rows(self.batches[cid[0]], self.pieces[cid[0]][cid[1]], self.lengths[cid[0]])
