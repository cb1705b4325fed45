"""A user's own workload, by import path: ``[workload] factory = "package.module:function"``.

The function takes the seed and returns a :class:`UserWorkload`; gcbench measures, estimates and verifies
it as it does its own workloads. :func:`check_user_workload` calls it before any work (under fake tensors
where it can, so a large model costs nothing) and turns what would fail later into one UsageError line: a
module that cannot be imported, a function that returns something else, batches of the wrong count, of
ragged sizes, or whose rows do not grow with the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gcbench.cache.batching import Batch, batch_size
from gcbench.cache.engine import GetRep, as_encoder_list
from gcbench.cache.objective import Objective
from gcbench.errors import UsageError, first_line
from gcbench.imports import import_object
from gcbench.losses import InBatchSoftmax, tiling_loss
from gcbench.workloads.config import WorkloadConfig
from gcbench.workloads.shapes import shapes_only
from gcbench.workloads.tasks import Workload


@dataclass
class UserWorkload:
    """What a user's factory returns (``gcbench.UserWorkload``).

    ``encoders``: one module per input (the same module twice when tied). ``make_batches(batch_size,
    generator)``: one batch per encoder, each a tensor, a mapping or a tuple (nested), as ``GradCache``
    takes them; the rows of each input grow in proportion to ``batch_size`` (a query and its passages).
    ``loss_fn(*reps)``: a scalar; by default in-batch InfoNCE of the first input against the second
    (:class:`FirstTwoInfoNCE`). ``get_rep``: pulls the representation tensor out of an encoder's output.
    """

    encoders: nn.Module | Sequence[nn.Module]
    make_batches: Callable[[int, torch.Generator], Sequence[Batch]]
    loss_fn: Callable[..., Tensor] | None = None
    get_rep: GetRep | None = None


class FirstTwoInfoNCE(nn.Module):
    """In-batch InfoNCE of the first input's representations against the second's (DPR's in-batch softmax:
    the second input may hold several rows per example, the positive first); other inputs are ignored."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.loss = InBatchSoftmax(temperature)

    def forward(self, *reps: Tensor) -> Tensor:
        return self.loss(reps[0], reps[1])


def make_user_workload(factory: str, seed: int, what: str = "workload.factory") -> UserWorkload:
    """Import ``factory`` and call it with ``seed``; a UsageError unless it returns a valid UserWorkload."""
    function = import_object(factory, what)
    if not callable(function):
        raise UsageError(f"{what}: {factory} is a {type(function).__name__}, not a function")
    made = function(seed)
    if not isinstance(made, UserWorkload):
        raise UsageError(f"{what}: {factory}({seed}) returned a {type(made).__name__}, not a gcbench.UserWorkload")
    try:
        encoders = as_encoder_list(made.encoders)
    except TypeError as error:
        raise UsageError(f"{what}: {factory}: UserWorkload.{error}") from None
    for name in ("make_batches", "loss_fn", "get_rep"):
        value = getattr(made, name)
        if not callable(value) and (value is not None or name == "make_batches"):
            raise UsageError(f"{what}: {factory}: UserWorkload.{name} must be callable, got {type(value).__name__}")
    if made.loss_fn is None and len(encoders) < 2:
        raise UsageError(
            f"{what}: {factory}: the default loss (in-batch InfoNCE) needs two inputs, got {len(encoders)} "
            "encoder; pass loss_fn="
        )
    return made


def example_rows(made: UserWorkload, examples: int, seed: int, what: str = "workload.factory") -> list[int]:
    """Rows of each input in a batch of ``examples``; a UsageError for the wrong count of batches or ragged ones."""
    with torch.random.fork_rng(devices=[]):
        batches = made.make_batches(examples, torch.Generator().manual_seed(seed))
    count = len(as_encoder_list(made.encoders))
    call = f"make_batches({examples}, generator)"
    if not isinstance(batches, (list, tuple)):
        raise UsageError(f"{what}: {call} returned a {type(batches).__name__}, not a list of {count} batches")
    if len(batches) != count:
        raise UsageError(f"{what}: {call} returned {len(batches)} batches for {count} encoders; give one per encoder")
    try:
        return [batch_size(batch, f"batches[{i}]") for i, batch in enumerate(batches)]
    except (TypeError, ValueError) as error:
        raise UsageError(f"{what}: {call}: {error}") from None


def build_user(config: WorkloadConfig, seed: int) -> Workload:
    """The Workload of a user's factory (called with ``seed``); its default loss: InfoNCE over the first two inputs."""
    factory = config.user_factory
    assert factory is not None
    made = make_user_workload(factory, seed)
    loss = made.loss_fn or FirstTwoInfoNCE(config.temperature or 1.0)
    if config.loss_tile:
        tiled = tiling_loss(loss)
        if tiled is None:
            raise _cannot_tile(factory, loss)
        tiled.tile_size = config.loss_tile_size
    objective = Objective(as_encoder_list(made.encoders), loss, made.get_rep)
    per_example = tuple(example_rows(made, 1, seed))
    return Workload(config, objective, lambda rows, g: list(made.make_batches(rows, g)), per_example)


def check_user_workload(config: WorkloadConfig, seed: int = 0, what: str = "workload.factory") -> int:
    """UsageError, before any work, for a factory that would fail later (see the module's docstring); its inputs.

    It runs under fake tensors (nothing allocated, however large the model); a factory that cannot (one
    that reads weights from a file, say) is called for real.
    """
    factory = config.user_factory
    assert factory is not None
    import_object(factory, what)  # outside fake tensors: what the module makes when imported stays real
    try:
        with shapes_only():
            return _check(factory, seed, what, config.loss_tile)
    except UsageError:
        raise
    except Exception:  # it cannot run under fake tensors: check it for real
        pass
    try:
        return _check(factory, seed, what, config.loss_tile)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"{what}: {factory}({seed}) raised {first_line(error)}") from None


def _cannot_tile(factory: str, loss: object) -> UsageError:
    name = getattr(loss, "__qualname__", type(loss).__qualname__)
    return UsageError(
        f"--loss-tile (workload.loss_tile): {factory}'s loss_fn {name} cannot compute in tiles; only gcbench's "
        "losses can (InBatchSoftmax, SymmetricInfoNCE, NTXent, SigmoidLoss, or the default loss): give one of "
        "them or drop the tile"
    )


def _check(factory: str, seed: int, what: str, loss_tile: int = 0) -> int:
    made = make_user_workload(factory, seed, what)
    if loss_tile and made.loss_fn is not None and tiling_loss(made.loss_fn) is None:
        raise _cannot_tile(factory, made.loss_fn)
    one, two = example_rows(made, 1, seed, what), example_rows(made, 2, seed, what)
    for i, (rows_one, rows_two) in enumerate(zip(one, two)):
        if rows_two != 2 * rows_one:
            raise UsageError(
                f"{what}: make_batches: batches[{i}] has {rows_one} rows for 1 example and {rows_two} for 2; an "
                "input's rows must grow in proportion to the batch"
            )
    return len(one)
