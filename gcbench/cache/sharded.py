"""How GradCache drives a wrapped encoder: when its gradients are reduced, and how a chunk goes backward.

GradCache back-propagates one chunk at a time, and a data-parallel wrapper reduces gradients after every
backward unless told otherwise: a step of n chunks would communicate n times. Each wrapper has its own
way to wait, so each gets a :class:`Wrapping`:

- a plain module: nothing to arrange;
- DDP: ``no_sync()`` around every chunk but the module's last. DDP arms its reducer in the forward, so the
  context spans the chunk's forward as well as its backward (and :class:`~gcbench.cache.engine.GradCache`
  does not keep the syncing chunk's first-pass graph when the module has others);
- FSDP2 (``fully_shard`` on the encoder or on any of its submodules):
  ``set_requires_gradient_sync(False)`` on every backward but the module's last, FSDP2's ``no_sync``: the
  unsharded gradients accumulate on each rank and the last backward reduce-scatters them once, one
  reduce-scatter per sharded unit per step. ``reduce="chunk"`` leaves FSDP2 to reduce-scatter after every
  chunk instead (gradients stay sharded: less memory, more communication). ``keep_unsharded`` gathers the
  parameters once for the step and reshards them at its end (fewer all-gathers, a full copy per rank);
- a DeepSpeed engine: a direct ``tensor.backward()`` bypasses the engine (ZeRO-0 refuses it, ZeRO-2 gets
  the gradients wrong), so every chunk goes through ``engine.backward`` on the surrogate
  ``(rep * cached_gradient).sum()``, whose gradient with respect to ``rep`` is exactly the cached one.
  ZeRO-1/2/3 run the whole step inside ``engine.coalesce_grad_reduction()`` (one reduction when it exits);
  ZeRO-0 sets the accumulation boundary on the module's last backward only (one all-reduce).
  ``reduce="chunk"``: ZeRO-1/2/3 reduce every chunk into their partitions (the boundary on the last
  only, as DeepSpeed accumulates micro-batches); ZeRO-0 all-reduces the accumulated gradients each time.

DeepSpeed is never imported here: an encoder is a DeepSpeed engine only if ``deepspeed`` is already loaded
(it must be, to have built one).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, Literal

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

Reduce = Literal["step", "chunk"]  # reduce gradients once per step (the default) or after every chunk
REDUCE_CHOICES: tuple[str, ...] = ("step", "chunk")


def check_reduce(reduce: Any, name: str = "reduce") -> Reduce:
    if reduce not in REDUCE_CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, REDUCE_CHOICES))}, got {reduce!r}")
    return reduce


class Wrapping:
    """A plain module: its gradients are whatever its backwards accumulate."""

    kind = "plain"
    arms_in_forward = False  # whether the syncing chunk's forward must come after every other chunk's backward

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def syncs(self) -> bool:
        """Whether one chunk of this module per step must be told apart as the one that reduces."""
        return False

    def no_grad_module(self) -> nn.Module:
        """What encodes a chunk without a graph (no wrapper bookkeeping is needed there)."""
        return self.module

    def step(self) -> contextlib.AbstractContextManager[Any]:
        """Around the whole GradCache call (entered once per distinct module)."""
        return contextlib.nullcontext()

    def chunk(self, syncing: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a chunk's forward with a graph and its backward; ``syncing``: the module's last backward."""
        return contextlib.nullcontext()

    def backward(self, rep: Tensor, grad: Tensor) -> None:
        rep.backward(grad)


class DDPWrapping(Wrapping):
    kind = "ddp"
    arms_in_forward = True

    def __init__(self, module: nn.Module, reduce: Reduce) -> None:
        super().__init__(module)
        self.reduce = reduce

    @property
    def syncs(self) -> bool:
        return self.reduce == "step"

    def no_grad_module(self) -> nn.Module:
        assert isinstance(self.module, DistributedDataParallel)
        return self.module.module

    def chunk(self, syncing: bool) -> contextlib.AbstractContextManager[Any]:
        assert isinstance(self.module, DistributedDataParallel)
        return self.module.no_sync() if self.syncs and not syncing else contextlib.nullcontext()


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The ``fully_shard`` modules in ``module`` (itself included), outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


class FSDPWrapping(Wrapping):
    kind = "fsdp2"

    def __init__(self, module: nn.Module, units: list[nn.Module], reduce: Reduce, keep_unsharded: bool) -> None:
        super().__init__(module)
        self.units: list[Any] = units  # FSDPModule instances
        self.reduce = reduce
        self.keep_unsharded = keep_unsharded

    @property
    def syncs(self) -> bool:
        return self.reduce == "step"

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not self.keep_unsharded:
            yield
            return
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for unit in self.units:
                unit.set_reshard_after_backward(True, recurse=False)
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()

    @contextlib.contextmanager
    def chunk(self, syncing: bool) -> Iterator[None]:
        if not self.syncs:
            yield
            return
        self._require_sync(syncing)
        try:
            yield
        finally:
            self._require_sync(True)  # as FSDP2 starts: a backward outside GradCache reduces

    def _require_sync(self, value: bool) -> None:
        for unit in self.units:
            unit.set_requires_gradient_sync(value, recurse=False)


def is_deepspeed_engine(module: nn.Module) -> bool:
    deepspeed = sys.modules.get("deepspeed")
    engine = getattr(deepspeed, "DeepSpeedEngine", None) if deepspeed is not None else None
    return engine is not None and isinstance(module, engine)


class DeepSpeedWrapping(Wrapping):
    kind = "deepspeed"

    def __init__(self, module: nn.Module, reduce: Reduce) -> None:
        super().__init__(module)
        engine: Any = module
        self.engine = engine
        self.stage = int(self.engine.zero_optimization_stage())
        self.reduce = reduce
        self.kind = f"deepspeed-zero{self.stage}"

    @property
    def syncs(self) -> bool:
        # The accumulation boundary marks the module's last backward: at ZeRO-0 for one all-reduce a step,
        # at ZeRO-1/2/3 for a reduction per chunk accumulated into the partitions (DeepSpeed's own
        # gradient accumulation; with a boundary on every backward each would overwrite the last).
        return (self.reduce == "step") == (self.stage == 0)

    def no_grad_module(self) -> nn.Module:
        return self.module  # the engine's forward: ZeRO-3 gathers parameters in its hooks either way

    def step(self) -> contextlib.AbstractContextManager[Any]:
        if self.reduce == "step" and self.stage > 0:
            return self.engine.coalesce_grad_reduction()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def chunk(self, syncing: bool) -> Iterator[None]:
        if not self.syncs:
            yield
            return
        saved = self.engine._is_gradient_accumulation_boundary  # None: the engine counts micro-steps itself
        self.engine.set_gradient_accumulation_boundary(syncing)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(saved)

    def backward(self, rep: Tensor, grad: Tensor) -> None:
        # One GradCache call is one whole batch: no division by the engine's accumulation steps.
        self.engine.backward((rep * grad).sum(), scale_wrt_gas=False)


def wrapping_of(module: nn.Module, reduce: Reduce = "step", keep_unsharded: bool = False) -> Wrapping:
    """The :class:`Wrapping` for ``module``; ``keep_unsharded`` applies to FSDP2 modules only."""
    if isinstance(module, DistributedDataParallel):
        wrapping: Wrapping = DDPWrapping(module, reduce)
    elif is_deepspeed_engine(module):
        wrapping = DeepSpeedWrapping(module, reduce)
    elif units := fsdp_modules(module):
        return FSDPWrapping(module, units, reduce, keep_unsharded)
    else:
        wrapping = Wrapping(module)
    if keep_unsharded:
        raise ValueError(f"keep_unsharded applies to fully_shard (FSDP2) modules, not {type(module).__name__}")
    return wrapping


__all__ = [
    "REDUCE_CHOICES",
    "DDPWrapping",
    "DeepSpeedWrapping",
    "FSDPWrapping",
    "Reduce",
    "Wrapping",
    "check_reduce",
    "fsdp_modules",
    "is_deepspeed_engine",
    "wrapping_of",
]
