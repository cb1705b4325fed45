"""``gcbench tune``: the fastest exact setting of a batch under a memory budget, predicted, then measured.

1. **Search** with the estimator (fake tensors, no allocation): ``full`` and ``checkpoint`` of the whole
   batch, and for each chunk size (the experiment's proportions, doubling up to whole inputs) the most
   first-pass graphs a caching strategy can keep (``keep_graphs``, found by bisection: memory grows with
   it) with the predicted peak within the budget less a margin.
2. **Rank** what fits by the work of its step: the floating-point operations counted under fake tensors
   (what is encoded again shows here), then fewer encoder calls (larger chunks run faster per example).
3. **Measure** the best few for real, as the sweep does (:class:`~gcbench.measure.step.StepProtocol`):
   each one's peak in a process of its own, under the budget's CUDA cap, and drop any whose
   allocator-level peak (``max_memory_allocated`` plus nothing: the sweep's ``peak_bytes``) is over the
   budget; then their step times in turns in one process (:meth:`~gcbench.measure.step.StepProtocol.turns`),
   in rounds of fresh processes, with 95% intervals (:func:`~gcbench.measure.stats.estimate`).

The winner is the fastest measured; ``measure_all`` measures every candidate, and says how far the
model's pick (the best of the few it would have measured) is from the fastest of the grid.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gcbench.device import point_threads, resolve_device
from gcbench.errors import EstimateError, UsageError, first_line
from gcbench.estimate import Estimator
from gcbench.estimate.plan import chunk_candidates
from gcbench.experiment import Experiment
from gcbench.measure.allocator import steady_allocator
from gcbench.measure.memory import is_out_of_memory
from gcbench.measure.stats import Estimate, estimate
from gcbench.processes import run_child
from gcbench.results.records import Point
from gcbench.results.units import format_bytes
from gcbench.strategies import resolve_strategy
from gcbench.training import build_step

DEFAULT_MARGIN = 0.05
DEFAULT_MEASURED = 4
FLOPS_TIE = 0.01  # candidates whose work differs by less than this fraction rank by their encoder calls


@dataclass
class Candidate:
    """One setting of the step: a strategy, its chunks and the graphs it keeps, and what is known of it."""

    strategy: str
    chunk_sizes: tuple[int, ...] | None
    keep_graphs: int | str | None
    predicted_peak_bytes: int
    calls: int  # encoder calls per step: chunks of the first pass, plus those encoded again
    flops: int | None = None
    measured_peak_bytes: int | None = None
    time: Estimate | None = None
    vs_winner: Estimate | None = None  # step time over the winner's, paired turn by turn
    note: str = ""
    chunk_tokens: tuple[int, ...] | None = None  # chunks by tokens (sweep.chunk_tokens) instead of chunk_sizes

    @property
    def label(self) -> str:
        """The sweep's series name, one chunk size where every input has the same."""
        sizes, tokens = self.chunk_sizes, self.chunk_tokens
        shown = sizes[:1] if sizes and len(set(sizes)) == 1 else sizes
        budgets = tokens[:1] if tokens and len(set(tokens)) == 1 else tokens
        return Point(self.strategy, 0, shown, self.keep_graphs, budgets).series  # type: ignore[arg-type]

    def point(self, batch_size: int) -> Point:
        keep = self.keep_graphs
        return Point(self.strategy, batch_size, self.chunk_sizes, keep, self.chunk_tokens)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        def interval(e: Estimate | None) -> dict[str, float] | None:
            return None if e is None else {"value": e.value, "low": e.low, "high": e.high, "rounds": e.rounds}

        return {
            "strategy": self.strategy,
            "chunk_sizes": list(self.chunk_sizes) if self.chunk_sizes else None,
            "chunk_tokens": list(self.chunk_tokens) if self.chunk_tokens else None,
            "keep_graphs": self.keep_graphs,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "encoder_calls": self.calls,
            "flops": self.flops,
            "measured_peak_bytes": self.measured_peak_bytes,
            "step_time_s": interval(self.time),
            "vs_winner": interval(self.vs_winner),
            "note": self.note,
        }


@dataclass
class TuneResult:
    experiment: str
    batch_size: int
    budget_bytes: int
    margin: float
    target: str
    candidates: list[Candidate]  # what fits the budget as predicted, best first by the model
    measured: int  # how many of them (from the top) were measured for real
    refused: list[str] = field(default_factory=list)  # settings left out, and why
    seconds: float = 0.0

    @property
    def timed(self) -> list[Candidate]:
        return [c for c in self.candidates if c.time is not None]

    @property
    def winner(self) -> Candidate | None:
        """The fastest measured setting within the budget."""
        timed = self.timed
        return min(timed, key=lambda c: c.time.value if c.time else 0.0) if timed else None

    @property
    def model_pick(self) -> Candidate | None:
        """The fastest of the few the model would measure (``DEFAULT_MEASURED``), whatever else was measured."""
        few = [c for c in self.candidates[:DEFAULT_MEASURED] if c.time is not None]
        return min(few, key=lambda c: c.time.value if c.time else 0.0) if few else None

    def to_dict(self) -> dict[str, Any]:
        winner, pick = self.winner, self.model_pick
        return {
            "experiment": self.experiment,
            "batch_size": self.batch_size,
            "memory_budget_bytes": self.budget_bytes,
            "margin": self.margin,
            "target": self.target,
            "winner": None if winner is None else winner.to_dict(),
            "call": None if winner is None else paste(winner),
            "model_pick": None if pick is None else pick.label,
            "candidates": [c.to_dict() for c in self.candidates],
            "measured": self.measured,
            "refused": self.refused,
            "seconds": self.seconds,
        }


def paste(candidate: Candidate) -> str:
    """What to write in one's own training for ``candidate``."""
    if candidate.chunk_tokens is not None:
        tokens = candidate.chunk_tokens
        budget = str(tokens[0]) if len(set(tokens)) == 1 else "[" + ", ".join(map(str, tokens)) + "]"
        kept = candidate.keep_graphs if candidate.keep_graphs != "all" else '"all"'
        engine = f"GradCache(encoders, loss_fn, chunk_tokens={budget}, keep_graphs={kept})"
        return engine if candidate.strategy == "cache" else f"{candidate.strategy} as {engine} in gcbench's engine"
    if candidate.chunk_sizes is None:
        if resolve_strategy(candidate.strategy).uses_chunks:
            return candidate.strategy
        if candidate.strategy == "full":
            return "no cache: the whole batch fits (loss.backward() over one forward of every input)"
        return f"the whole batch with the {candidate.strategy!r} strategy (no chunks)"
    sizes = candidate.chunk_sizes
    chunk = str(sizes[0]) if len(set(sizes)) == 1 else "[" + ", ".join(map(str, sizes)) + "]"
    keep = candidate.keep_graphs if candidate.keep_graphs != "all" else '"all"'
    call = f"GradCache(encoders, loss_fn, chunk_size={chunk}, keep_graphs={keep})"
    if candidate.strategy == "cache":
        return call
    return f"{candidate.strategy} with chunk_size={chunk}, keep_graphs={keep} ({call} in gcbench's engine)"


def tune(
    experiment: Experiment,
    batch_size: int,
    *,
    margin: float = DEFAULT_MARGIN,
    measure: int = DEFAULT_MEASURED,
    measure_all: bool = False,
    rounds: int | None = None,
    progress: Callable[[str], None] | None = None,
    logs: Path | None = None,
) -> TuneResult:
    """Search, rank and measure (see the module) the settings of ``experiment``'s step at ``batch_size``
    under ``experiment.sweep.memory_budget``. ``logs``: the folder for the measuring processes' output
    (``tune-*.log``; None: discarded)."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    sweep = experiment.sweep
    budget = sweep.memory_budget
    if budget is None:
        raise UsageError("--memory-budget: tune needs the memory to fit, e.g. --memory-budget 11GiB")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= margin < 1.0:
        raise UsageError(f"--margin must be in [0, 1), got {margin}")
    if measure < 1:
        raise UsageError(f"--measure must be >= 1, got {measure}")
    if sweep.nproc != 1:
        raise UsageError(f"--nproc: tune measures one process, got {sweep.nproc}")
    cached = _cached_strategy(experiment)
    device = resolve_device(sweep.device)
    target = "cuda" if device.type == "cuda" else "cpu"
    limit = int(budget * (1 - margin))
    capability = torch.cuda.get_device_capability(device) if target == "cuda" else None
    estimator = Estimator(
        experiment.workload, sweep.precision, target, sweep.seed, experiment.optimizer, capability=capability
    )
    say(f"searching chunk sizes and kept graphs at batch {batch_size} for {format_bytes(limit)} predicted")
    candidates, refused = _search(estimator, experiment, cached, batch_size, limit)
    if not candidates:
        raise EstimateError(
            f"nothing fits {format_bytes(budget)} at batch {batch_size} as predicted: " + "; ".join(refused)
        )
    for candidate in candidates:
        candidate.flops = estimator.flops(experiment.step_config(candidate.point(batch_size)))
    candidates = _rank(candidates)
    chosen = candidates if measure_all else candidates[:measure]
    for candidate in candidates[len(chosen) :]:  # a blank row says why it is blank
        candidate.note = f"not measured: ranked below the {len(chosen)} measured (--measure all measures every one)"
    say(f"measuring the peaks of {len(chosen)} settings, each in a process of its own")
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    for candidate in chosen:
        point = candidate.point(batch_size)
        candidate.measured_peak_bytes = _in_child(_child_peak, experiment, [point], _log(logs, f"peak.{point.id}"))
        if candidate.measured_peak_bytes is None:
            candidate.note = "ran out of memory"
        elif candidate.measured_peak_bytes > budget:
            candidate.note = f"measured peak over the budget by {format_bytes(candidate.measured_peak_bytes - budget)}"
    fitting = [c for c in chosen if c.measured_peak_bytes is not None and c.measured_peak_bytes <= budget]
    if fitting:
        _time(experiment, batch_size, fitting, rounds or sweep.rounds, say, logs)
    return TuneResult(
        experiment.name,
        batch_size,
        budget,
        margin,
        target,
        candidates,
        len(chosen),
        refused,
        time.perf_counter() - started,
    )


def _cached_strategy(experiment: Experiment) -> str:
    """The experiment's first exact strategy that keeps graphs (``cache`` when it names none)."""
    for name in experiment.sweep.strategies:
        strategy = resolve_strategy(name)
        if strategy.exact and strategy.uses_chunks and strategy.keeps_graphs:
            return name
    return "cache"


def _search(
    estimator: Estimator, experiment: Experiment, cached: str, batch_size: int, limit: int
) -> tuple[list[Candidate], list[str]]:
    """What fits ``limit`` as predicted: whole-batch strategies, and per chunk size the most kept graphs."""
    inputs = len(estimator.workload.rows(batch_size))
    found: list[Candidate] = []
    refused: list[str] = []

    def peak(point: Point) -> int:
        return estimator.predict(experiment.step_config(point)).peak

    for name in ("full", "checkpoint"):
        try:
            predicted = peak(Point(name, batch_size, None))
        except (UsageError, EstimateError) as error:
            refused.append(f"{name}: {first_line(error)}")
            continue
        if predicted <= limit:
            found.append(Candidate(name, None, None, predicted, inputs))
        else:
            refused.append(f"{name}: predicted {format_bytes(predicted)}")
    rows = estimator.workload.rows(batch_size)
    smallest = min(min(sizes) for sizes in experiment.sweep.chunk_sizes)
    base = min(experiment.sweep.chunk_sizes, key=min)
    sizes_tried = chunk_candidates(base, rows)  # smallest first, in the experiment's proportions
    larger = [sizes for sizes in sizes_tried if min(sizes) >= smallest]
    smaller = [sizes for sizes in sizes_tried if min(sizes) < smallest]
    for sizes in [*larger, *reversed(smaller)]:  # below the experiment's chunks only while nothing fits
        if min(sizes) < smallest and any(c.chunk_sizes for c in found):
            break
        per_input = sizes * len(rows) if len(sizes) == 1 else sizes
        chunks = sum(-(-row // size) for row, size in zip(rows, per_input))
        peaks = _most_kept(partial(_predicted_keep, peak, cached, batch_size, sizes), chunks, limit)
        if not peaks:
            refused.append(f"{cached} chunk {'/'.join(map(str, sizes))}: nothing fits even re-encoding every chunk")
            continue
        kept = max(peaks)
        keep: int | str = "all" if kept >= chunks else kept
        found.append(Candidate(cached, sizes, keep, peaks[kept], chunks + chunks - kept))
    found += _token_candidates(estimator, experiment, cached, batch_size, limit, refused)
    return found, refused


def _token_candidates(
    estimator: Estimator, experiment: Experiment, cached: str, batch_size: int, limit: int, refused: list[str]
) -> list[Candidate]:
    """Per token budget of the experiment (``sweep.chunk_tokens``), the most kept graphs that fit."""
    if not experiment.sweep.chunk_tokens or not resolve_strategy(cached).token_chunks:
        return []
    found = []
    for tokens in experiment.sweep.chunk_tokens:
        chunks = estimator.token_chunk_count(experiment.step_config(Point(cached, batch_size, None, None, tokens)))

        def keep_peak(keep: Any, tokens: tuple[int, ...] = tokens) -> int:
            point = Point(cached, batch_size, None, keep, tokens)
            return estimator.predict(experiment.step_config(point)).peak

        peaks = _most_kept(keep_peak, chunks, limit)
        if not peaks:
            refused.append(f"{cached} chunk {'/'.join(map(str, tokens))} tokens: nothing fits even re-encoding")
            continue
        kept = max(peaks)
        keep: int | str = "all" if kept >= chunks else kept
        found.append(Candidate(cached, None, keep, peaks[kept], chunks + chunks - kept, chunk_tokens=tokens))
    return found


def _predicted_keep(
    peak: Callable[[Point], int], strategy: str, batch_size: int, sizes: tuple[int, ...], keep: int | str
) -> int:
    return peak(Point(strategy, batch_size, sizes, keep))  # type: ignore[arg-type]


def _most_kept(peak: Callable[[Any], int], chunks: int, limit: int) -> dict[int, int]:
    """The predicted peaks that fit ``limit``, by kept graphs, the most that fit the largest key (bisection:
    more kept graphs hold more memory); empty when not even 0 fits."""
    fitting: dict[int, int] = {}

    def fits(keep: int) -> bool:
        predicted = peak("all" if keep >= chunks else keep)
        if predicted <= limit:
            fitting[keep] = predicted
        return predicted <= limit

    if not fits(0):
        return {}
    low, high = 0, chunks
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return fitting


def _rank(candidates: list[Candidate]) -> list[Candidate]:
    """Less work first (FLOPs within ``FLOPS_TIE`` of the least work count as equal), then fewer encoder calls."""
    unit = max(1.0, min(c.flops or 0 for c in candidates) * FLOPS_TIE)
    return sorted(candidates, key=lambda c: (round((c.flops or 0) / unit), c.calls))


def _time(
    experiment: Experiment,
    batch_size: int,
    candidates: list[Candidate],
    rounds: int,
    say: Callable[[str], None],
    logs: Path | None = None,
) -> None:
    """Step times of ``candidates`` in turns, one fresh process per round, and each over the fastest's."""
    points = [c.point(batch_size) for c in candidates]
    samples: list[dict[str, tuple[float, ...]]] = []
    for round in range(1, rounds + 1):
        say(f"timing {len(points)} settings in turns, round {round} of {rounds}")
        samples.append(_in_child(_child_turns, experiment, points, _log(logs, f"turns.round{round}")))
    names = [p.id for p in points]
    for candidate, name in zip(candidates, names):
        candidate.time = estimate([s[name] for s in samples])
    best = min(zip(candidates, names), key=lambda pair: pair[0].time.value if pair[0].time else 0.0)[1]
    for candidate, name in zip(candidates, names):
        candidate.vs_winner = estimate([[a / b for a, b in zip(s[name], s[best])] for s in samples])


def _log(logs: Path | None, name: str) -> Path:
    return Path(os.devnull) if logs is None else logs / f"tune-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"


def _in_child(function: Callable[..., Any], experiment: Experiment, points: Sequence[Point], log: Path) -> Any:
    """``function`` in a fresh process of its own (:func:`gcbench.processes.run_child`, the sweep's point
    timeout): its allocator and peak statistics are its own; its exception, if it raises, is raised here."""
    timeout = experiment.sweep.timeout
    outcome = run_child(function, (experiment.to_dict(), [p.id for p in points], points), timeout=timeout, log=log)
    if outcome.finished:
        return outcome.value
    if outcome.timed_out:
        raise TimeoutError(f"tune: measuring {', '.join(p.id for p in points)} took over the {timeout:g} s timeout")
    if outcome.failure is not None:
        raise outcome.failure.exception_object() or RuntimeError(outcome.failure.message)
    raise RuntimeError(f"tune: measuring {', '.join(p.id for p in points)}: {outcome.exit_reason()}")


def _prepare(experiment_data: dict[str, Any]) -> tuple[Experiment, torch.device]:
    experiment = Experiment.from_dict(experiment_data)
    threads = point_threads(experiment.sweep.threads, resolve_device(experiment.sweep.device))
    if threads:
        torch.set_num_threads(threads)
    if experiment.sweep.malloc == "steady":
        steady_allocator()
    return experiment, resolve_device(experiment.sweep.device)


def _child_peak(experiment_data: dict[str, Any], names: list[str], points: list[Point]) -> int | None:
    """The allocator-level peak of one point's step, measured as a sweep point's (None: out of memory)."""
    experiment, device = _prepare(experiment_data)
    protocol = experiment.step_protocol()
    try:
        protocol.set_up(device)  # before the step is built, as the sweep's: its parameters count too
        return protocol.peak(build_step(experiment.step_config(points[0]), device)).peak_bytes
    except Exception as error:
        if is_out_of_memory(error):
            return None
        raise


def _child_turns(
    experiment_data: dict[str, Any], names: list[str], points: list[Point]
) -> dict[str, tuple[float, ...]]:
    """Every point's step built in this process, then warmed up and timed in turns as the sweep times."""
    experiment, device = _prepare(experiment_data)
    steps = {name: build_step(experiment.step_config(point), device) for name, point in zip(names, points)}
    return experiment.step_protocol().turns(steps, device).samples_s


def render_tune(result: TuneResult) -> list[Any]:
    """The candidates as a table, then the winner, its call, and how the model's pick fared."""
    from rich.table import Table

    table = Table(title=f"{result.experiment}: batch {result.batch_size}, budget {format_bytes(result.budget_bytes)}")
    for column in ("setting", "predicted peak", "GFLOP", "measured peak", "step time (ms)", "95% CI", "vs best"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for candidate in result.candidates:
        t, ratio = candidate.time, candidate.vs_winner
        table.add_row(
            candidate.label,
            format_bytes(candidate.predicted_peak_bytes),
            # three significant digits: a small user model's 3 MFLOP read "0.0" at one decimal
            f"{candidate.flops / 1e9:.3g}" if candidate.flops else "n/a",
            candidate.note if candidate.measured_peak_bytes is None else format_bytes(candidate.measured_peak_bytes),
            f"{t.value * 1e3:,.1f}" if t else (candidate.note if candidate.measured_peak_bytes is not None else ""),
            f"{t.low * 1e3:,.1f}-{t.high * 1e3:,.1f}" if t else "",
            f"x{ratio.value:.2f} ({ratio.low:.2f}-{ratio.high:.2f})" if ratio else "",
        )
    lines: list[Any] = [table]
    winner = result.winner
    if winner is None or winner.time is None:
        notes = [c.note for c in result.candidates if c.note and not c.note.startswith("not measured")]
        lines.append("nothing measured fits the budget: " + "; ".join(notes))
        return lines
    lines.append(
        f"fastest: {winner.label}: {winner.time.value * 1e3:,.1f} ms a step (95% CI {winner.time.low * 1e3:,.1f} to "
        f"{winner.time.high * 1e3:,.1f}, {winner.time.rounds} round{'s' if winner.time.rounds != 1 else ''}), "
        f"peak {format_bytes(winner.measured_peak_bytes)} "
        f"of {format_bytes(result.budget_bytes)}"
    )
    lines.append(f"use: {paste(winner)}")
    pick = result.model_pick
    if result.measured > DEFAULT_MEASURED and pick is not None and pick.vs_winner is not None:
        lines.append(
            f"the model's pick (the fastest of its best {DEFAULT_MEASURED}): {pick.label}, "
            f"x{pick.vs_winner.value:.3f} the fastest of all {result.measured} measured"
        )
    if result.refused:
        lines.append("left out: " + "; ".join(result.refused))
    return lines
