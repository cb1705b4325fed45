"""One training step, the unit everything measures: zero grads, strategy forward+backward, optimizer step.

:class:`StepConfig` says everything a step depends on; :func:`build_step` makes it from scratch (the
same weights and data for a seed), on a real device or under fake tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from gcbench.cache.batching import Batch, tensors
from gcbench.cache.engine import KeepGraphs
from gcbench.cache.objective import Objective
from gcbench.device import autocast, grad_scaler, param_dtype
from gcbench.errors import UsageError
from gcbench.strategies import Strategy, make_strategy
from gcbench.typed import Bool, Float, key, typed
from gcbench.workloads import Workload, WorkloadConfig, build_workload

OptimizerName = Literal["adamw", "adam", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


@typed
class OptimizerConfig:
    """The optimizer a step ends with (``[optimizer]`` in an experiment): its state is part of the memory."""

    name: OptimizerName = key("adamw, adam or sgd (with momentum 0.9)", default="adamw")
    lr: Float = key("learning rate", default=1e-4, ge=0.0)
    weight_decay: Float = key("weight decay (adamw)", default=0.01, ge=0.0)
    foreach: Bool | None = key(
        "torch's multi-tensor implementation (none: torch's default, foreach on CUDA)", default=None
    )


def make_optimizer(params: list[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=config.foreach)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, foreach=config.foreach)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, foreach=config.foreach)
    raise UsageError(f"optimizer: unknown optimizer {config.name!r}; choose from {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class StepConfig:
    """Everything one measured training step depends on."""

    workload: WorkloadConfig
    strategy: str
    batch_size: int
    chunk_sizes: tuple[int, ...] | None = None  # one for all inputs, or one per input
    precision: str = "float32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    keep_graphs: KeepGraphs | None = None  # None: the strategy's default
    chunk_tokens: tuple[int, ...] | None = None  # chunks by tokens instead of chunk_sizes (strategies that can)

    def build_strategy(self, objective: Objective, scaler: torch.amp.GradScaler | None) -> Strategy:
        """This step's strategy on ``objective`` (the workload's, or a wrapped one)."""
        return make_strategy(self.strategy, objective, self.chunk_sizes, scaler, self.keep_graphs, self.chunk_tokens)


WARM_UP_MOST = 16  # extra warm-up steps at most: the scaler halves its scale at each skip (2^16 to 1)


@dataclass
class TrainingStep:
    config: StepConfig
    workload: Workload
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    batches: list[Batch]
    device: torch.device
    scaler: torch.amp.GradScaler | None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self) -> Tensor:
        with autocast(self.config.precision, self.device):
            return self.strategy.forward_backward(self.batches)

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def __call__(self) -> Tensor:
        self.zero_grad()
        loss = self.forward_backward()
        self.optimizer_step()
        return loss

    def warm_up(self, steps: int) -> None:
        """``steps`` steps, then more until the optimizer holds its state. A GradScaler skips the optimizer's
        step while the scaled gradients overflow (fp16 at 2^16 can on a first step); state made inside a
        measured step would count in its peak and not in its baseline."""
        for _ in range(steps):
            self()
        for _ in range(WARM_UP_MOST if steps else 0):
            if self.optimizer_ready():
                return
            self()
        if steps and not self.optimizer_ready():
            raise RuntimeError(
                f"the optimizer made no state in {steps + WARM_UP_MOST} warm-up steps (the GradScaler skipped them all)"
            )

    def optimizer_ready(self) -> bool:
        """Every parameter that has a gradient has its optimizer state (adamw, adam and sgd with momentum keep
        some)."""
        return all(self.optimizer.state.get(p) for p in self.parameters() if p.grad is not None)

    @property
    def examples(self) -> int:
        return self.config.batch_size

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.workload.objective.parameters()

    def resident(self) -> dict[str, list[Tensor]]:
        """Tensors alive between steps, by category: what a step starts from."""
        modules = self.workload.objective.modules()
        return {
            "parameters": [*self.parameters(), *(b for m in modules for b in m.buffers())],
            "gradients": [p.grad for p in self.parameters() if p.grad is not None],
            "optimizer": list(_optimizer_tensors(self.optimizer)),
            "inputs": [t for batch in self.batches for _, t in tensors(batch)],
        }


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                yield value


def build_step(config: StepConfig, device: torch.device) -> TrainingStep:
    """A fresh model, optimizer and batch for ``config``: the same weights and data for a seed."""
    workload = build_workload(config.workload, seed=config.seed, device=device, dtype=param_dtype(config.precision))
    for module in workload.objective.modules():
        module.train()
    optimizer = make_optimizer(workload.objective.parameters(), config.optimizer)
    return step_on(workload, optimizer, config, device)


def step_on(
    workload: Workload,
    optimizer: torch.optim.Optimizer,
    config: StepConfig,
    device: torch.device,
    *,
    objective: Objective | None = None,
    loss_scaling: bool = True,
) -> TrainingStep:
    """A step for ``config`` on a workload and optimizer that already exist (the estimator reuses one model).

    ``objective`` replaces the workload's own (wrapped encoders); ``loss_scaling=False`` drops fp16's
    GradScaler, whose overflow check needs real values.
    """
    scaler = grad_scaler(config.precision, device) if loss_scaling else None
    strategy = config.build_strategy(objective or workload.objective, scaler)
    batches = workload.batches(
        config.batch_size, seed=config.seed + 1, device=device, dtype=param_dtype(config.precision)
    )
    return TrainingStep(config, workload, strategy, optimizer, batches, device, scaler)
