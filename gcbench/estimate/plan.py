"""``gcbench estimate``: predicted peaks over an experiment's grid, what fits, which chunk size to use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gcbench.errors import EstimateError
from gcbench.estimate.estimator import Estimator
from gcbench.experiment import Experiment
from gcbench.losses import tiling_loss
from gcbench.results.records import Point, Prediction
from gcbench.results.units import format_bytes
from gcbench.strategies import resolve_strategy


@dataclass(frozen=True)
class EstimateRow:
    point: Point
    prediction: Prediction | None
    error: str | None = None


@dataclass(frozen=True)
class ChunkAdvice:
    """The largest chunk sizes (one per input) whose predicted peak fits ``device_memory``."""

    strategy: str
    batch_size: int
    device_memory: int
    chunk_sizes: tuple[int, ...] | None
    peak_bytes: int | None
    tried: tuple[tuple[tuple[int, ...], int], ...]
    reason: str


@dataclass(frozen=True)
class EstimatePlan:
    experiment: str
    target: str
    world_size: int
    device_memories: tuple[int, ...]
    rows: tuple[EstimateRow, ...]
    advice: tuple[ChunkAdvice, ...]

    def largest_batch(self, series: str, device_memory: int) -> int | None:
        """The largest batch of ``series`` whose predicted peak fits, with every smaller one fitting too."""
        best = None
        for row in sorted((r for r in self.rows if r.point.series == series), key=lambda r: r.point.batch_size):
            if row.prediction is None or row.prediction.peak > device_memory:
                break
            best = row.point.batch_size
        return best

    def series(self) -> list[str]:
        return list(dict.fromkeys(r.point.series for r in self.rows))

    def stopper(self, series: str, device_memory: int) -> EstimateRow | None:
        """The smallest batch of ``series`` that does not fit (what stops it), if one was predicted."""
        rows = sorted((r for r in self.rows if r.point.series == series), key=lambda r: r.point.batch_size)
        return next((r for r in rows if r.prediction is not None and r.prediction.peak > device_memory), None)


def estimate_experiment(
    experiment: Experiment, target: str, device_memories: Sequence[int], advice_batch: int | None = None
) -> EstimatePlan:
    estimator = Estimator(
        experiment.workload, experiment.sweep.precision, target, experiment.sweep.seed, experiment.optimizer
    )
    rows = tuple(predict_row(estimator, experiment, point) for point in experiment.points())
    chunked = [s for s in experiment.sweep.strategies if advisable(s)]
    batch = advice_batch or max(experiment.sweep.batch_sizes)
    advice = (
        tuple(safe_advice(estimator, experiment, chunked[0], batch, memory) for memory in device_memories)
        if chunked
        else ()
    )
    return EstimatePlan(experiment.name, target, experiment.sweep.nproc, tuple(device_memories), rows, advice)


def advisable(strategy: str) -> bool:
    """Chunk advice is for exact strategies whose memory is one chunk's: those that cache representations."""
    traits = resolve_strategy(strategy).traits()
    return traits.exact and traits.caches_representations and traits.uses_chunks


def predict_row(estimator: Estimator, experiment: Experiment, point: Point) -> EstimateRow:
    try:
        return EstimateRow(point, estimator.predict(experiment.step_config(point), experiment.sweep.nproc))
    except EstimateError as error:
        return EstimateRow(point, None, str(error))


def safe_advice(
    estimator: Estimator, experiment: Experiment, strategy: str, batch_size: int, device_memory: int
) -> ChunkAdvice:
    """:func:`recommend_chunks`, or no advice with the reason when a chunk setting cannot be predicted."""
    try:
        return recommend_chunks(estimator, experiment, strategy, batch_size, device_memory)
    except EstimateError as error:
        return ChunkAdvice(strategy, batch_size, device_memory, None, None, (), str(error))


def _chunkless_floor(prediction: Prediction) -> int:
    """A peak no chunk size goes below: what the step starts from plus the loss's own peak (the loss runs
    over every representation with all of that held; neither depends on the chunk size)."""
    return (prediction.baseline_bytes or 0) + (prediction.loss_peak_bytes or 0)


def chunk_candidates(base: tuple[int, ...], rows: Sequence[int]) -> list[tuple[int, ...]]:
    """Chunk settings in the experiment's proportions (16/8 -> 2:1), smallest first, up to whole inputs."""
    base = base * len(rows) if len(base) == 1 else base
    unit = min(base)
    ratio = [size / unit for size in base]
    candidates: list[tuple[int, ...]] = []
    scale = 1
    while True:
        sizes = tuple(max(1, min(row, round(r * scale))) for r, row in zip(ratio, rows))
        if not candidates or sizes != candidates[-1]:
            candidates.append(sizes)
        if all(size >= row for size, row in zip(sizes, rows)):
            return candidates
        scale *= 2


def recommend_chunks(
    estimator: Estimator, experiment: Experiment, strategy: str, batch_size: int, device_memory: int
) -> ChunkAdvice:
    """Binary search for the largest chunk setting that fits: larger chunks run faster."""
    local_rows = estimator.workload.rows(batch_size // experiment.sweep.nproc)
    candidates = chunk_candidates(experiment.sweep.chunk_sizes[0], local_rows)
    tried: dict[tuple[int, ...], Prediction] = {}

    def peak(sizes: tuple[int, ...]) -> int:
        if sizes not in tried:
            tried[sizes] = estimator.predict(
                experiment.step_config(Point(strategy, batch_size, sizes)), experiment.sweep.nproc
            )
        return tried[sizes].peak

    def advice(chunks: tuple[int, ...] | None, reason: str) -> ChunkAdvice:
        return ChunkAdvice(
            strategy,
            batch_size,
            device_memory,
            chunks,
            tried[chunks].peak if chunks else None,
            tuple((sizes, p.peak) for sizes, p in tried.items()),
            reason,
        )

    low, high = -1, len(candidates) - 1  # candidates[:low + 1] fit; larger chunks need more memory
    while low < high:  # small chunks are the slow ones to predict: probe them only when larger ones fail
        middle = (low + high + 1) // 2
        if peak(candidates[middle]) <= device_memory:
            low = middle
            continue
        high = middle - 1
        floor = _chunkless_floor(tried[candidates[middle]])
        if floor > device_memory:  # what the step holds anyway, and the loss, whatever the chunk size
            loss = tried[candidates[middle]].loss_peak_bytes or 0
            start = f"parameters, gradients and optimizer state and the inputs take {format_bytes(floor - loss)}"
            if floor - loss > device_memory:
                return advice(None, f"nothing fits {format_bytes(device_memory)} at any chunk size: {start}")
            return advice(
                None,
                f"nothing fits {format_bytes(device_memory)} at any chunk size: {start}, and the loss alone "
                f"needs {format_bytes(loss)} more"
                + (
                    " (workload.loss_tile computes it in tiles)"
                    if not experiment.workload.loss_tile and tiling_loss(estimator.workload.objective.loss_fn)
                    else ""
                ),
            )
    if low < 0:
        smallest = candidates[0]
        held = sum(tried[smallest].peak_breakdown.get(k, 0) for k in ("parameters", "gradients", "optimizer"))
        return advice(
            None,
            f"nothing fits {format_bytes(device_memory)}: even chunks of "
            f"{'/'.join(map(str, smallest))} need {format_bytes(peak(smallest))}, of which parameters, "
            f"gradients and optimizer state alone take {format_bytes(held)}",
        )
    best = candidates[low]
    return advice(
        best, f"the largest chunks whose predicted peak fits {format_bytes(device_memory)}; larger chunks run faster"
    )
