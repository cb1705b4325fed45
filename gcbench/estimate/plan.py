"""``gcbench estimate``: predicted peaks over an experiment's grid, what fits, which chunk size to use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from gcbench.errors import EstimateError
from gcbench.estimate.estimator import Estimator
from gcbench.estimate.series import predict_series
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


class PointPredictions:
    """One estimator's predictions for an experiment's points, each setting predicted once (the table and the
    chunk advice share them), a series of batch sizes from a few fake steps (:mod:`gcbench.estimate.series`)."""

    def __init__(self, estimator: Estimator, experiment: Experiment) -> None:
        self.estimator = estimator
        self.experiment = experiment
        self._done: dict[Point, Prediction] = {}

    def predict(self, point: Point) -> Prediction:
        if point not in self._done:
            config = self.experiment.step_config(point)
            self._done[point] = self.estimator.predict(config, self.experiment.sweep.nproc)
        return self._done[point]

    def rows(self, points: Sequence[Point], fit: bool = True) -> tuple[EstimateRow, ...]:
        """A row per point; with ``fit``, each series read off a checked quadratic where it can be."""
        series: dict[Point, list[int]] = {}
        for point in points:
            series.setdefault(replace(point, batch_size=0), []).append(point.batch_size)
        nproc = self.experiment.sweep.nproc
        for key, batches in series.items():

            def predict(batch: int, key: Point = key) -> Prediction:
                return self.predict(replace(key, batch_size=batch))

            def loss_peak(batch: int, key: Point = key) -> int | None:
                return self.estimator.loss_peak(self.experiment.step_config(replace(key, batch_size=batch)), nproc)

            try:
                found = predict_series(predict, batches, loss_peak, fit)
            except EstimateError:
                continue  # each point again, on its own, below: the rows that fail say why
            self._done.update({replace(key, batch_size=b): p for b, p in found.items()})
        return tuple(self.row(point) for point in points)

    def row(self, point: Point) -> EstimateRow:
        try:
            return EstimateRow(point, self.predict(point))
        except EstimateError as error:
            return EstimateRow(point, None, str(error))


def estimate_experiment(
    experiment: Experiment,
    target: str,
    device_memories: Sequence[int],
    advice_batch: int | None = None,
    fit: bool = True,
) -> EstimatePlan:
    """Predicted peaks over ``experiment``'s grid and chunk advice; ``fit=False`` runs a fake step at every
    point (the reference the fitted series are tested against)."""
    estimator = Estimator(
        experiment.workload, experiment.sweep.precision, target, experiment.sweep.seed, experiment.optimizer
    )
    predictions = PointPredictions(estimator, experiment)
    rows = predictions.rows(experiment.points(), fit)
    chunked = [s for s in experiment.sweep.strategies if advisable(s)]
    batch = advice_batch or max(experiment.sweep.batch_sizes)
    advice = tuple(safe_advice(predictions, chunked[0], batch, memory) for memory in device_memories) if chunked else ()
    return EstimatePlan(experiment.name, target, experiment.sweep.nproc, tuple(device_memories), rows, advice)


def advisable(strategy: str) -> bool:
    """Chunk advice is for exact strategies whose memory is one chunk's: those that cache representations."""
    traits = resolve_strategy(strategy).traits()
    return traits.exact and traits.caches_representations and traits.uses_chunks


def safe_advice(predictions: PointPredictions, strategy: str, batch_size: int, device_memory: int) -> ChunkAdvice:
    """:func:`recommend_chunks`, or no advice with the reason when a chunk setting cannot be predicted."""
    try:
        return recommend_chunks(
            predictions.estimator, predictions.experiment, strategy, batch_size, device_memory, predictions
        )
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
    estimator: Estimator,
    experiment: Experiment,
    strategy: str,
    batch_size: int,
    device_memory: int,
    predictions: PointPredictions | None = None,
) -> ChunkAdvice:
    """Binary search for the largest chunk setting that fits: larger chunks run faster. ``predictions``: the
    ones already made (the table's, other advice's), shared."""
    predictions = predictions or PointPredictions(estimator, experiment)
    local_rows = estimator.workload.rows(batch_size // experiment.sweep.nproc)
    candidates = chunk_candidates(experiment.sweep.chunk_sizes[0], local_rows)
    tried: dict[tuple[int, ...], Prediction] = {}

    def peak(sizes: tuple[int, ...]) -> int:
        if sizes not in tried:
            tried[sizes] = predictions.predict(Point(strategy, batch_size, sizes))
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
