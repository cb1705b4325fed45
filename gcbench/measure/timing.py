"""Step time: warmed up, synchronised, repeated until it settles; several candidates timed in turns.

One process times for as long as its :class:`RepeatPolicy` says: at least ``min_repeats`` turns, then
until the spread (interquartile range over median) is under ``target_spread``, ``max_time_s`` of timed
calls have passed, or ``max_repeats`` turns were taken (torch.utils.benchmark's adaptive_autorange
stops the same way). :func:`time_in_turns` times several candidates alternately in one process
(A B, B A, A B, ...: each turn starts with the next candidate), so what drifts on the machine over the
seconds of a measurement hits all of them alike and their ratios, turn by turn, cancel it; the
candidates' own spreads may then stay wide while their ratios settle, and either ends the timing.
The sweep uses it for a strategy against ``full`` at the same batch; anything that compares a few
settings for real (``gcbench tune``) can use it as it is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from gcbench.device import synchronize
from gcbench.measure.stats import Estimate, estimate, quartiles, spread


@dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]  # wall time of each timed call
    # the process's CPU time over the same calls (time.process_time): with one torch thread, the seconds
    # the process waited for a core on a shared machine are not in it; empty where not taken
    cpu_samples_s: tuple[float, ...] = ()

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def quartiles_s(self) -> tuple[float, float]:
        q1, _, q3 = quartiles(self.samples_s)
        return q1, q3

    @property
    def iqr_s(self) -> float:
        q1, q3 = self.quartiles_s
        return q3 - q1


@dataclass(frozen=True)
class RepeatPolicy:
    """When one process stops timing (turns: one call of every candidate)."""

    min_repeats: int = 5
    max_repeats: int = 50
    max_time_s: float = 2.0  # of timed calls, all candidates together; min_repeats are taken regardless
    target_spread: float = 0.05  # interquartile range over median at which timing stops early

    def __post_init__(self) -> None:
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError(f"RepeatPolicy: need 1 <= min_repeats <= max_repeats, got {self}")

    @classmethod
    def fixed(cls, repeats: int) -> RepeatPolicy:
        """Exactly ``repeats`` turns."""
        return cls(repeats, repeats, 0.0, 0.0)


@dataclass(frozen=True)
class Turns:
    """Candidates timed in turns in one process: ``samples_s[name][i]`` is ``name``'s call in turn ``i``."""

    samples_s: dict[str, tuple[float, ...]]
    cpu_s: dict[str, tuple[float, ...]] | None = None  # the process's CPU time of the same calls

    def timing(self, name: str) -> Timing:
        return Timing(self.samples_s[name], self.cpu_s[name] if self.cpu_s else ())

    def ratios(self, name: str, baseline: str) -> tuple[float, ...]:
        """``name``'s time over ``baseline``'s, turn by turn (paired: the same seconds of the machine)."""
        return tuple(a / b for a, b in zip(self.samples_s[name], self.samples_s[baseline]))

    @property
    def turns(self) -> int:
        return len(next(iter(self.samples_s.values())))

    def estimate(self, name: str, baseline: str | None = None) -> Estimate:
        """``name``'s median time, or its median ratio to ``baseline``, with a 95% interval (this process
        only: one round; pool rounds of several processes with :func:`~gcbench.measure.stats.estimate`)."""
        return estimate([self.ratios(name, baseline) if baseline is not None else self.samples_s[name]])


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device) -> Timing:
    """Wall time of ``repeats`` calls, the device synchronised before and after each."""
    return time_in_turns({"": fn}, device, RepeatPolicy.fixed(repeats)).timing("")


def time_adaptive(
    fn: Callable[[], object],
    device: torch.device,
    policy: RepeatPolicy,
    *,
    before_each: Callable[[], None] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Timing:
    """``fn`` timed until it settles (see :class:`RepeatPolicy`)."""
    return time_in_turns({"": fn}, device, policy, before_each=before_each, agree=agree).timing("")


def time_in_turns(
    candidates: Mapping[str, Callable[[], object]],
    device: torch.device,
    policy: RepeatPolicy,
    *,
    before_each: Callable[[], None] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Turns:
    """Time the candidates alternately, each turn starting with the next one, until they settle: every
    candidate's spread, or every ratio to the first candidate, under ``policy.target_spread``.

    ``before_each`` runs before every timed call, untimed (a barrier across ranks); ``agree`` turns this
    process's wish to stop into the decision all processes share (ranks must time the same turns).
    """
    names = list(candidates)
    if not names:
        raise ValueError("time_in_turns: no candidates")
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    timed = 0.0
    turn = 0
    while True:
        first = turn % len(names)
        for name in names[first:] + names[:first]:
            if before_each is not None:
                before_each()
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            candidates[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            cpu[name].append(time.process_time() - cpu_start)
            samples[name].append(elapsed)
            timed += elapsed
        turn += 1
        stop = turn >= policy.max_repeats or (
            turn >= policy.min_repeats and (timed >= policy.max_time_s or _settled(samples, policy.target_spread))
        )
        if agree is not None:
            stop = agree(stop)
        if stop:
            return Turns(
                {name: tuple(values) for name, values in samples.items()},
                {name: tuple(values) for name, values in cpu.items()},
            )


def _settled(samples: dict[str, list[float]], target: float) -> bool:
    names = list(samples)
    if all(spread(samples[name]) <= target for name in names):
        return True
    baseline = samples[names[0]]
    return len(names) > 1 and all(
        spread([a / b for a, b in zip(samples[name], baseline)]) <= target for name in names[1:]
    )
