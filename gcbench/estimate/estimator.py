"""Predict a training step's peak memory without allocating it: the sweep's step under fake tensors.

The model is built once under ``FakeTensorMode`` (CPU fake tensors: shapes, dtypes, no storage),
its optimizer state is created by one optimizer step on zero gradients, and each point then runs
the very strategy code the sweep measures, under the same dispatch-level tracker that gives the
sweep its breakdown. See :mod:`gcbench.estimate.target` for what is modelled of the target device
and :mod:`gcbench.estimate.repeats` for how repeated chunks are skipped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from gcbench.cache.objective import Objective
from gcbench.device import param_dtype
from gcbench.distributed.objective import ddp_bucket_bytes, gathers
from gcbench.errors import EstimateError
from gcbench.estimate.ranks import DDP_GRADIENT_COPIES, fake_world, gathering_objective
from gcbench.estimate.repeats import skipping_objective
from gcbench.estimate.target import Target, target
from gcbench.estimate.workspaces import HOPPER
from gcbench.measure.loss import loss_memory
from gcbench.measure.memory import track_step
from gcbench.results.records import Prediction
from gcbench.training import OptimizerConfig, StepConfig, TrainingStep, make_optimizer, step_on
from gcbench.workloads import WorkloadConfig, build_workload
from gcbench.workloads.shapes import value_free_init

WORKSPACES = "cublas_workspaces"  # the breakdown's line for them (see gcbench.estimate.workspaces)


class Estimator:
    """One fake model for a workload, precision and target; :meth:`predict` for each point."""

    def __init__(
        self,
        workload: WorkloadConfig,
        precision: str,
        target_name: str = "cuda",
        seed: int = 0,
        optimizer: OptimizerConfig | None = None,
        skip_repeats: bool = True,
        capability: tuple[int, int] | None = None,
    ) -> None:
        """``capability``: the CUDA card's compute capability (default Hopper's, 9.0)."""
        self.target: Target = target(target_name, capability or HOPPER)
        self.fake_steps = 0  # steps run under fake tensors, predictions and FLOP counts: what an answer costs
        self.skip_repeats = skip_repeats
        self.precision = precision
        self.optimizer_config = self.target.optimizer(optimizer or OptimizerConfig())
        self.mode = FakeTensorMode()
        self.device = torch.device("cpu")
        with self.mode, value_free_init(), _explained():
            self.workload = build_workload(workload, seed=seed, device=self.device, dtype=param_dtype(precision))
            for module in self.workload.objective.modules():
                module.train()
            self.optimizer = make_optimizer(self.workload.objective.parameters(), self.optimizer_config)
            for p in self.workload.objective.parameters():
                p.grad = torch.zeros_like(p)
            self.optimizer.step()  # creates the optimizer state a warmed-up step starts from
            self.optimizer.zero_grad(set_to_none=True)

    def flops(self, config: StepConfig) -> int:
        """Floating-point operations of one step of ``config`` (matrix products and attention, as
        :class:`~torch.utils.flop_counter.FlopCounterMode` counts them), every chunk run, re-encoding
        included: the work a strategy does, for ranking candidates of equal batch by speed."""
        with self._fake_step(config, self.workload.objective) as step, FlopCounterMode(display=False) as counter:
            step()
        return int(counter.get_total_flops())

    def token_chunk_count(self, config: StepConfig) -> int:
        """How many chunks ``config``'s step (chunked by tokens) encodes in its first pass."""
        with self._fake_step(config, self.workload.objective) as step:
            return len(step.strategy.encode_steps(step.batches))

    @contextlib.contextmanager
    def _fake_step(self, config: StepConfig, objective: Objective) -> Iterator[TrainingStep]:
        """``config``'s step on the fake model (this estimator's optimizer), released and zeroed after use."""
        config = replace(config, optimizer=self.optimizer_config)
        self.fake_steps += 1
        with self.mode, self.target.kernels(), _explained():
            step = step_on(self.workload, self.optimizer, config, self.device, objective=objective, loss_scaling=False)
            try:
                yield step
            finally:
                step.strategy.release()
                step.zero_grad()

    def predict(self, config: StepConfig, world_size: int = 1) -> Prediction:
        """Peak memory of ``config``'s step on the target (its workload must be this estimator's).

        With ``world_size`` > 1: one rank's peak, ``config.batch_size`` being the global batch.
        """
        started = time.perf_counter()
        config, objective, buckets, world = self._rank_step(config, world_size)
        with world, self._fake_step(config, objective) as step:
            baseline, tracked = track_step(step, self.target.block_size, self.target.count_cpu_rng_states)
            loss = loss_memory(step, self.target.block_size)
        breakdown = {**tracked.breakdown, "gradients": tracked.breakdown["gradients"] + buckets}
        held = buckets + self.target.workspace_bytes  # beside the tracked tensors, the whole step long
        if self.target.workspace_bytes:
            breakdown[WORKSPACES] = self.target.workspace_bytes
        return Prediction(
            target=self.target.name,
            peak_bytes=tracked.total + held,
            baseline_bytes=baseline + held,
            forward_backward_peak_bytes=tracked.phase_peaks["forward_backward"] + held,
            optimizer_peak_bytes=tracked.phase_peaks["optimizer"] + held,
            breakdown=breakdown,
            loss_peak_bytes=loss,
            seconds=time.perf_counter() - started,
            world_size=world_size,
        )

    def loss_peak(self, config: StepConfig, world_size: int = 1) -> int | None:
        """:meth:`predict`'s ``loss_peak_bytes`` without the step: the loss alone, every parameter holding a
        gradient as after the step :meth:`predict` runs first (no fake step is counted)."""
        config, objective, _, world = self._rank_step(config, world_size)
        config = replace(config, optimizer=self.optimizer_config)
        with world, self.mode, self.target.kernels(), _explained():
            step = step_on(self.workload, self.optimizer, config, self.device, objective=objective, loss_scaling=False)
            try:
                for p in step.parameters():
                    p.grad = torch.zeros_like(p)
                return loss_memory(step, self.target.block_size)
            finally:
                step.strategy.release()
                step.zero_grad()

    def _rank_step(
        self, config: StepConfig, world_size: int
    ) -> tuple[StepConfig, Objective, int, contextlib.AbstractContextManager[None]]:
        """One rank's config, objective (repeats skipped, gathers stood in for), DDP bucket bytes and the fake world
        its loss runs in."""
        config = replace(config, optimizer=self.optimizer_config, batch_size=config.batch_size // world_size)
        objective = skipping_objective(self.workload.objective) if self.skip_repeats else self.workload.objective
        buckets = 0
        world: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if world_size > 1:
            buckets = DDP_GRADIENT_COPIES * ddp_bucket_bytes(self.workload.objective.encoders)
            if gathers(config.strategy):
                objective = gathering_objective(objective, world_size)
                world = fake_world(world_size)
        return config, objective, buckets, world


@contextlib.contextmanager
def _explained() -> Iterator[None]:
    """Turn fake-tensor failures into an :class:`EstimateError` that names the op."""
    try:
        yield
    except (DynamicOutputShapeException, DataDependentOutputException) as error:
        op = getattr(error, "func", None) or "an op"
        raise EstimateError(
            f"cannot predict without allocating: {op} has an output that depends on tensor values "
            "(a data-dependent shape or a .item() call)"
        ) from None
