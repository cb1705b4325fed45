"""``gcbench verify --steps N``: does a strategy *train* the same as the full batch, step after step?

One step's gradients can agree while a run drifts (an optimizer amplifies what one step hides), so each
strategy trains N optimizer steps from one start, beside its full-batch reference on a copy of the same
model: the same weights, the same batch every step (as in every step gcbench measures), the same
optimizer. After each step the loss each reported and the distance between their parameters are
recorded. The reference draws the dropout masks the strategy draws (the full-batch loss over
representations encoded in the strategy's order, as in :mod:`gcbench.measure.equivalence`), so for an
exact strategy only rounding remains; with dropout off it is one full-batch forward up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from gcbench.cache import Objective
from gcbench.device import autocast, grad_scaler, param_dtype
from gcbench.errors import UsageError
from gcbench.strategies import EncodeStep, backward_in_order, make_strategy, resolve_strategy
from gcbench.testing import TOLERANCE
from gcbench.training import OptimizerConfig, make_optimizer
from gcbench.verify import check_arguments, workload_config
from gcbench.workloads import WorkloadConfig, build_workload

# Relative parameter distance allowed to an exact strategy over the run. float64: rounding, amplified by
# an optimizer over tens of steps, stays below 1e-9 (the bound the exactness claim is held to); the other
# precisions keep their one-step gradient bound (an update differs by lr times the gradient's error).
STEPS_TOLERANCE: dict[str, float] = {**TOLERANCE, "float64": 1e-9}
REFERENCE = "full-batch loss, same weights, batch, optimizer and dropout masks"


@dataclass(frozen=True)
class StepPoint:
    """One optimizer step of a strategy beside its reference (after the step's update)."""

    step: int  # 1-based
    loss: float  # what the strategy's forward_backward returned, before the update
    reference_loss: float
    param_distance: float  # ||theta - theta_ref|| / ||theta_ref|| over all parameters
    param_max_abs: float  # max |theta - theta_ref|

    @property
    def loss_diff(self) -> float:
        return abs(self.loss - self.reference_loss)


@dataclass(frozen=True)
class Trajectory:
    workload: str
    strategy: str
    exact: bool
    precision: str
    batch_size: int
    chunk_sizes: tuple[int, ...]  # () for a strategy that uses none
    optimizer: str
    lr: float
    tolerance: float
    points: tuple[StepPoint, ...]

    @property
    def passed(self) -> bool:
        """An exact strategy stays within the tolerance at every step; an inexact one is reported, not judged."""
        if not self.exact:
            return True
        return all(
            p.param_distance <= self.tolerance and p.loss_diff <= self.tolerance * max(1.0, abs(p.reference_loss))
            for p in self.points
        )

    @property
    def label(self) -> str:
        chunks = (
            f" (chunks {'/'.join(map(str, self.chunk_sizes))})" if resolve_strategy(self.strategy).uses_chunks else ""
        )
        return f"{self.strategy}{chunks}"

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["points"] = [{**asdict(p), "loss_diff": p.loss_diff} for p in self.points]
        record["passed"] = self.passed
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Trajectory:
        fields = {k: v for k, v in record.items() if k not in ("points", "passed")}
        points = tuple(StepPoint(**{k: v for k, v in p.items() if k != "loss_diff"}) for p in record["points"])
        return cls(**{**fields, "chunk_sizes": tuple(fields["chunk_sizes"]), "points": points})


def verify_steps(
    steps: int,
    workloads: Sequence[str] = ("dpr",),
    strategies: Sequence[str] = ("full", "cache", "accumulate"),
    *,
    precision: str = "float64",
    device: torch.device | str = "cpu",
    batch_size: int = 12,
    chunk_sizes: Sequence[Sequence[int]] | Sequence[int] = ((5,),),
    tolerance: float | None = None,
    seed: int = 0,
    dropout: float | None = None,
    optimizer: OptimizerConfig | None = None,
    configs: Mapping[str, WorkloadConfig] | None = None,
) -> list[Trajectory]:
    """One trajectory per workload, strategy and chunk setting, each ``steps`` optimizer steps long.

    ``configs``: workload configs by name to use instead of verify's small defaults (an experiment's own,
    ``--experiment``); ``optimizer``: default adamw at lr 1e-4, as a sweep's step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--steps must be an int >= 1, got {steps!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    if configs is None:
        configs = {name: workload_config(name, dropout) for name in workloads}
    settings = check_arguments(configs, strategies, precision, batch_size, chunk_sizes, tolerance, seed)
    optimizer = optimizer or OptimizerConfig()
    tol = STEPS_TOLERANCE[precision] if tolerance is None else tolerance
    device = torch.device(device)
    trajectories = []
    for name, config in configs.items():
        for strategy in strategies:
            uses_chunks = resolve_strategy(strategy).uses_chunks
            for chunks in settings[name] if uses_chunks else settings[name][:1]:
                points = _train_beside_reference(
                    config, strategy, chunks, steps, precision, device, batch_size, seed, optimizer
                )
                trajectories.append(
                    Trajectory(
                        name,
                        strategy,
                        resolve_strategy(strategy).exact,
                        precision,
                        batch_size,
                        chunks if uses_chunks else (),
                        optimizer.name,
                        optimizer.lr,
                        tol,
                        tuple(points),
                    )
                )
    return trajectories


def _train_beside_reference(
    config: WorkloadConfig,
    strategy_name: str,
    chunks: tuple[int, ...],
    steps: int,
    precision: str,
    device: torch.device,
    batch_size: int,
    seed: int,
    optimizer_config: OptimizerConfig,
) -> list[StepPoint]:
    dtype = param_dtype(precision)
    runs = []
    for _ in ("strategy", "reference"):
        workload = build_workload(config, seed=seed, device=device, dtype=dtype)
        for module in workload.objective.modules():
            module.train()
        objective = workload.objective
        optimizer = make_optimizer(objective.parameters(), optimizer_config)
        batches = workload.batches(batch_size, seed=seed + 1, device=device, dtype=dtype)
        runs.append((objective, optimizer, batches, grad_scaler(precision, device)))
    (objective, optimizer, batches, scaler), (ref_objective, ref_optimizer, ref_batches, ref_scaler) = runs
    strategy = make_strategy(strategy_name, objective, chunks, scaler)
    sizes = strategy.check_batches(batches)
    order = strategy.encode_order(sizes)  # with dropout off the same as one full-batch forward, up to rounding
    points = []
    for step in range(1, steps + 1):
        torch.manual_seed(seed + 2 + step)  # each step its own masks, the same for both
        loss = _one_step(optimizer, scaler, precision, device, lambda: strategy.forward_backward(batches))
        torch.manual_seed(seed + 2 + step)
        reference_loss = _one_step(
            ref_optimizer,
            ref_scaler,
            precision,
            device,
            lambda: _reference_backward(ref_objective, ref_batches, order, ref_scaler),
        )
        points.append(_compare(objective, ref_objective, step, loss, reference_loss))
    strategy.release()
    return points


def _reference_backward(
    objective: Objective, batches: list[Any], order: list[EncodeStep], scaler: torch.amp.GradScaler | None
) -> Tensor:
    return backward_in_order(objective, batches, order, {}, scaler)


def _one_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    precision: str,
    device: torch.device,
    forward_backward: Any,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, device):
        loss = forward_backward()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss)


def _compare(objective: Objective, reference: Objective, step: int, loss: float, reference_loss: float) -> StepPoint:
    with torch.no_grad():
        theta = torch.cat([p.detach().double().flatten() for p in objective.parameters()])
        theta_ref = torch.cat([p.detach().double().flatten() for p in reference.parameters()])
        difference = theta - theta_ref
        distance = float(difference.norm() / theta_ref.norm())
        return StepPoint(step, loss, reference_loss, distance, float(difference.abs().max()))
