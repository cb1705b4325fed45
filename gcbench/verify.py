"""``gcbench verify``: are the gradients really the full-batch ones? A check to run in CI.

One process: each strategy's one step against the mask-consistent full-batch reference
(:func:`gcbench.measure.equivalence.check_strategy`). W ranks: the W-rank gradients after DDP's
all-reduce against one process over the global batch (:mod:`gcbench.measure.ranks`).

Workloads and strategies may be a user's own, by import path (``mylib.cached:MyCachedLoss``): a maintainer
of a GradCache-style implementation wraps it in a :class:`~gcbench.strategies.Strategy` and runs ``gcbench
verify --strategies mylib.cached:MyCachedLoss`` in CI, which exits 1 with the error figures when its
gradients are wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from gcbench.device import check_precision
from gcbench.distributed import ranks_wanted
from gcbench.errors import UsageError
from gcbench.imports import is_import_path
from gcbench.measure.equivalence import GradComparison, check_strategy
from gcbench.measure.ranks import check_distributed
from gcbench.strategies import resolve_strategy
from gcbench.testing import TOLERANCE
from gcbench.training import StepConfig
from gcbench.workloads import WORKLOADS, ModelConfig, WorkloadConfig, check_user_workload

DEFAULT_TOLERANCE = TOLERANCE  # why each bound: gcbench.testing.exactness
VERIFY_MODEL = ModelConfig(hidden=64, layers=2, heads=4, features=32)


@dataclass(frozen=True)
class VerifyResult:
    workload: str
    strategy: str
    precision: str
    batch_size: int
    chunk_sizes: tuple[int, ...]
    comparison: GradComparison
    tolerance: float
    chunk_tokens: tuple[int, ...] | None = None  # chunks by tokens (then chunk_sizes is not used)

    @property
    def chunk_label(self) -> str:
        if self.chunk_tokens:
            return "/".join(map(str, self.chunk_tokens)) + " tokens"
        return "/".join(map(str, self.chunk_sizes))

    @property
    def passed(self) -> bool:
        return self.comparison.passes(self.tolerance)


def workload_config(name: str, dropout: float | None, tied: bool = False, loss_tile: int = 0) -> WorkloadConfig:
    """The small default model of each built-in workload, big enough to exercise masks, pooling and chunking;
    a user's workload (an import path) as its factory makes it (``dropout`` None: the model's own)."""
    if is_import_path(name):
        if dropout is not None:
            raise UsageError(f"--dropout: {name} is your own workload; its model's dropout is its own")
        return WorkloadConfig(factory=name, loss_tile=loss_tile)
    if name not in WORKLOADS:
        raise UsageError(
            f"--workload: unknown workload {name!r}; choose from {', '.join(WORKLOADS)}, or your own as "
            "package.module:function"
        )
    return WorkloadConfig(
        name=name,
        model=replace(VERIFY_MODEL, dropout=0.1 if dropout is None else dropout),
        query_length=16,
        passage_length=24,
        tied=tied,
        loss_tile=loss_tile,
    )


def verify(
    workloads: Sequence[str] = tuple(WORKLOADS),
    strategies: Sequence[str] = ("cache",),
    *,
    precision: str = "float32",
    device: torch.device | str = "cpu",
    batch_size: int = 12,
    chunk_sizes: Sequence[Sequence[int]] | Sequence[int] = ((5,),),
    tolerance: float | None = None,
    seed: int = 0,
    dropout: float | None = None,
    nproc: int = 1,
    backend: str = "auto",
    timeout: float = 600.0,
    loss_tile: int = 0,
    chunk_tokens: Sequence[Sequence[int]] | None = None,
) -> list[VerifyResult]:
    """One comparison per workload, strategy and chunk setting (one size, or one per input).

    ``loss_tile`` > 0: the strategies compute the loss in tiles, the reference whole (as always).
    ``chunk_tokens``: token-budget settings, checked besides the chunk sizes for the strategies that chunk by
    tokens (rows sorted by length, the loss's order restored).

    One process (``nproc=1``): against the mask-consistent full-batch reference, dropout 0.1 by default.
    W ranks: all cases in one launch, ``batch_size`` the global batch (each rank gets ``batch_size / nproc``,
    chunk sizes apply to each rank's rows), dropout 0 (see :mod:`gcbench.measure.ranks`). Under torchrun
    ``nproc`` 1 means torchrun's ranks. A user's workload (``package.module:function``) keeps its model's own
    dropout.
    """
    nproc = ranks_wanted(nproc)
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    if loss_tile < 0:
        raise UsageError(f"--loss-tile must be >= 0 (0: the whole score matrix), got {loss_tile}")
    if nproc > 1 and batch_size % nproc:
        raise UsageError(f"--batch-size {batch_size} must split evenly over --nproc {nproc} ranks")
    if nproc > 1 and dropout:
        raise UsageError(
            "--dropout: the distributed check runs with dropout 0 (ranks draw masks from their own "
            f"random streams, which one process cannot replay); got {dropout}"
        )
    built_in_dropout = (0.1 if nproc == 1 else 0.0) if dropout is None else dropout
    configs = {
        name: workload_config(name, dropout if is_import_path(name) else built_in_dropout, loss_tile=loss_tile)
        for name in workloads
    }
    settings = check_arguments(configs, strategies, precision, batch_size, chunk_sizes, tolerance, seed)
    budgets = check_budgets(configs, strategies, chunk_tokens)
    cases: list[tuple[str, str, tuple[int, ...], tuple[int, ...] | None]] = [
        (name, strategy, chunks, None)
        for name in workloads
        for strategy in strategies
        for chunks in _settings_for(strategy, settings[name])
    ]
    cases += [
        (name, strategy, settings[name][0], tokens)
        for name in workloads
        for strategy in strategies
        if resolve_strategy(strategy).token_chunks
        for tokens in budgets
    ]
    if nproc == 1:
        comparisons = [
            check_strategy(
                configs[name],
                strategy,
                batch_size,
                None if tokens else chunks,
                precision=precision,
                device=device,
                seed=seed,
                reference_workload=workload_config(name, dropout),
                chunk_tokens=tokens,
            )
            for name, strategy, chunks, tokens in cases
        ]
    else:
        steps = [
            StepConfig(
                configs[name],
                strategy,
                batch_size,
                None if tokens else chunks,
                precision,
                seed=seed,
                chunk_tokens=tokens,
            )
            for name, strategy, chunks, tokens in cases
        ]
        comparisons = check_distributed(steps, nproc, device=device, backend=backend, timeout=timeout)
    tol = DEFAULT_TOLERANCE[precision] if tolerance is None else tolerance
    return [
        VerifyResult(name, strategy, precision, batch_size, chunks, comparison, tol, tokens)
        for (name, strategy, chunks, tokens), comparison in zip(cases, comparisons)
    ]


def check_budgets(
    configs: Mapping[str, WorkloadConfig], strategies: Sequence[str], chunk_tokens: Sequence[Sequence[int]] | None
) -> list[tuple[int, ...]]:
    """``--chunk-tokens``: each budget >= 1 and at least the longest row of a built-in workload's inputs."""
    if not chunk_tokens:
        return []
    if not any(resolve_strategy(s).token_chunks for s in strategies):
        raise UsageError("--chunk-tokens: none of the strategies chunks by tokens (cache does)")
    budgets = [tuple(setting) for setting in chunk_tokens]
    for name, config in configs.items():
        caps = config.longest_rows(2)
        for setting in budgets:
            if not setting or any(b < 1 for b in setting) or len(setting) not in (1, len(caps)):
                raise UsageError(f"--chunk-tokens: one budget, or one per input, each >= 1; got {setting}")
            for budget, cap in zip(setting * len(caps) if len(setting) == 1 else setting, caps):
                if cap is not None and budget < cap:
                    raise UsageError(
                        f"--chunk-tokens: a budget of {budget} tokens is smaller than the longest row of {name} ({cap})"
                    )
    return budgets


def verify_distributed(
    nproc: int, workloads: Sequence[str] = tuple(WORKLOADS), strategies: Sequence[str] = ("cache",), **options: Any
) -> list[VerifyResult]:
    """``gcbench verify --nproc N``: :func:`verify` on ``nproc`` ranks."""
    return verify(workloads, strategies, nproc=nproc, **options)


def _settings_for(strategy: str, settings: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Every chunk setting for a strategy that uses chunks; the first only (it is ignored) for one that does not."""
    return settings if resolve_strategy(strategy).uses_chunks else settings[:1]


def check_arguments(
    workloads: Mapping[str, WorkloadConfig],
    strategies: Sequence[str],
    precision: str,
    batch_size: int,
    chunk_sizes: Sequence[Sequence[int]] | Sequence[int],
    tolerance: float | None = None,
    seed: int = 0,
) -> dict[str, list[tuple[int, ...]]]:
    """UsageError naming the flag for a bad value; by workload, the chunk settings with one size per input."""
    check_precision(precision)
    inputs = {
        name: check_user_workload(config, seed, "--workload") if config.user_factory is not None else 2
        for name, config in workloads.items()
    }
    if not strategies:
        raise UsageError("--strategies: name at least one strategy")
    for name in strategies:
        try:
            resolve_strategy(name)
        except UsageError as error:
            raise UsageError(f"--strategies: {error}") from None
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if tolerance is not None and not tolerance > 0:
        raise UsageError(f"--tolerance must be > 0, got {tolerance}")
    given: list[Sequence[int]] = []
    for item in chunk_sizes:  # settings, or one setting given flat: (5,) or (16, 8)
        if isinstance(item, int):
            given = [[size for size in chunk_sizes if isinstance(size, int)]]
            break
        given.append(item)
    if not given:
        raise UsageError("--chunk-sizes: give at least one chunk setting, e.g. 5 or 8/4")
    settings: dict[str, list[tuple[int, ...]]] = {}
    for name, count in inputs.items():
        settings[name] = []
        for setting in given:
            sizes = tuple(setting)
            if not sizes or len(sizes) not in (1, count) or any(c < 1 for c in sizes):
                raise UsageError(
                    f"--chunk-sizes: one size, or one per input ({count} for {name}), each >= 1; got "
                    f"{'/'.join(map(str, sizes))}"
                )
            settings[name].append(sizes * (count // len(sizes)))
    return settings
