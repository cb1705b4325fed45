"""The sweep: every point of an experiment in its own process, each record stored as it ends, in rounds.

A point's process is started by :func:`gcbench.processes.run_child` (forked from a server that has
imported torch and gcbench but run nothing, so a point starts in milliseconds, not the second and more
of a fresh interpreter, and no thread pool is inherited; it ends with the sweep, however the sweep
ends); allocator state, peak statistics and a crash stay with that point, its output in ``logs/``.
Round 1 measures every point in full; rounds 2 to ``sweep.rounds`` time every point that ran ok again, each in a fresh
process, round after round over the whole grid (as asv interleaves its rounds), so that neither one
process's state nor one stretch of the machine's time decides a point's time. A point other than the
reference is timed in turns with the reference at its batch, once that ran ok. Finished rounds are
kept across interruptions: running the same sweep again resumes.

Under ``torchrun`` every rank runs the sweep and each point runs on all of torchrun's ranks (an
experiment's ``nproc`` of 1 means that many): it is measured in the rank's own process (the ranks exist
already, so there is no process per point and no point timeout but the collectives'), rank 0 decides
what is done already and keeps the results, and the other ranks keep nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from gcbench.device import resolve_device
from gcbench.distributed import LaunchedRanks, join_launched_group, ranks_wanted, resolve_backend
from gcbench.errors import EstimateError, UsageError
from gcbench.estimate import Estimator
from gcbench.experiment import Experiment
from gcbench.processes import run_child
from gcbench.results.environment import git_commit
from gcbench.results.records import FAILED, OVER_BUDGET, RESULTS_FILE, Point, Prediction, Record, Status
from gcbench.results.store import ResultsStore, current
from gcbench.results.table import records_frame
from gcbench.results.units import format_bytes
from gcbench.sweep.point import bare_record
from gcbench.sweep.worker import child_main, measured_record
from gcbench.typed import dump

PREDICTED_SKIP_MARGIN = 1.25  # with --predict, a point predicted over budget x this is not run


@dataclass
class SweepOutcome:
    out_dir: Path
    stored: list[Record]  # every record of the results file, one per point and round
    ran: int = 0  # points measured (round 1)
    resumed: int = 0  # points kept from an earlier run
    timed: int = 0  # later timing rounds run
    interrupted: bool = False

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS_FILE

    @property
    def records(self) -> list[Record]:
        """One record per point, its rounds merged (what reports and tables show)."""
        return current(self.stored)


@dataclass
class SweepEvents:
    """What a front end (the rich progress bar, a quiet log) hears about: (total, done) at the start of
    each round, each process as it starts (point and round), each record as it is stored."""

    on_start: Callable[[int, int], None] = lambda total, done: None
    on_point: Callable[[Point, int], None] = lambda point, round: None
    on_record: Callable[[Record], None] = lambda record: None


def run_sweep(
    experiment: Experiment,
    out_dir: Path,
    *,
    fresh: bool = False,
    retry_failed: bool = False,
    events: SweepEvents | None = None,
    on_ready: Callable[[], None] | None = None,
) -> SweepOutcome:
    """Measure every point not yet in ``out_dir``'s results; ``fresh``: discard them first; ``retry_failed``:
    measure again the points that ended in error or timeout (their old records stay in the file, superseded).

    Everything is checked before anything is written: the device, the predictor (``sweep.predict``; an
    EstimateError when the model cannot run under fake tensors), earlier results of another experiment
    (UsageError), and whether ``out_dir`` can be made (UsageError naming it).
    """
    events = events or SweepEvents()
    device = resolve_device(experiment.sweep.device)
    launched = LaunchedRanks.from_environment()
    if launched is not None:  # each point runs on all of torchrun's ranks
        if ranks_wanted(experiment.sweep.nproc) != launched.world_size:
            raise UsageError(
                f"sweep.nproc: torchrun started {launched.world_size} ranks (WORLD_SIZE) and each point runs on "
                f"all of them; leave sweep.nproc at 1 or set it to {launched.world_size}, not {experiment.sweep.nproc}"
            )
        experiment = replace(experiment, sweep=replace(experiment.sweep, nproc=launched.world_size))
    keeps = launched is None or launched.leader  # the process that keeps the results
    predict = _predictor(experiment) if experiment.sweep.predict else None
    store = ResultsStore(out_dir / RESULTS_FILE)
    done = {} if fresh or not keeps else _load_previous(store, experiment)
    if retry_failed:
        done = {key: record for key, record in done.items() if record.status not in FAILED}
    logs = out_dir / "logs"
    if keeps:
        try:
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out: cannot write results to {out_dir} ({error.strerror or error})") from None
        if fresh:
            store.reset()
    if launched is not None:
        if predict is not None:  # a rank's prediction runs in a fake process group: before torchrun's is joined
            predictions = {point.id: predict(point) for point in experiment.points()}
            predict = lambda point: predictions[point.id]  # noqa: E731
        join_launched_group(resolve_backend(experiment.sweep.backend, device), experiment.sweep.timeout)
        done = _from_rank_zero(done)
    if on_ready is not None:
        on_ready()
    outcome = SweepOutcome(out_dir, list(done.values()), resumed=sum(round == 1 for _, round in done))
    points = experiment.points()
    rounds = experiment.sweep.rounds
    commit = git_commit()
    try:
        for round in range(1, rounds + 1):
            due = [p for p in points if round == 1 or _ran_ok(done, p)]
            # Later rounds time the points that ran ok: until round 1 ends, as many as there are points.
            events.on_start(len(points) + (rounds - 1) * len(due), len(done))
            for point in due:
                if (point.id, round) in done:
                    continue
                events.on_point(point, round)
                record = _measure(experiment, point, round, done, predict, commit, logs, in_ranks=launched is not None)
                outcome.ran += round == 1 and record.status != "skipped"
                outcome.timed += round > 1
                if keeps:
                    store.append(record)
                done[point.id, round] = record
                outcome.stored.append(record)
                events.on_record(record)
    except KeyboardInterrupt:
        outcome.interrupted = True
    if keeps:
        write_csv(outcome.records, out_dir / "results.csv")
        if experiment.sweep.timeline and not outcome.interrupted:
            from gcbench.sweep.timeline import run_timelines

            run_timelines(experiment, outcome.records, out_dir)
    return outcome


def _from_rank_zero(done: dict[tuple[str, int], Record]) -> dict[tuple[str, int], Record]:
    """Rank 0's finished points on every rank, so that all ranks run (and skip) the same points."""
    shared: list[object] = [done]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]  # type: ignore[return-value]


def _measure(
    experiment: Experiment,
    point: Point,
    round: int,
    done: dict[tuple[str, int], Record],
    predict: Callable[[Point], Prediction] | None,
    commit: str | None,
    logs: Path,
    in_ranks: bool = False,
) -> Record:
    """One round of ``point``: round 1 predicted and perhaps skipped, else measured in its own process
    (``in_ranks``: in this one, a rank of torchrun's, as every other rank does)."""
    reference = experiment.reference_point(point)
    if reference is not None and not _ran_ok(done, reference):
        reference = None  # nothing to time in turns with: the reference did not run at this batch

    def measure() -> Record:
        if in_ranks:
            return measured_record(experiment, point, commit, round, reference)
        return run_point_process(experiment, point, commit, logs, round, reference)

    if round > 1:
        return measure()
    prediction = predict(point) if predict else None
    reason = _skip_reason(experiment, point, done, prediction)
    record = bare_record(experiment, point, "skipped", reason, commit) if reason is not None else measure()
    record.prediction = prediction
    return record


def _ran_ok(done: dict[tuple[str, int], Record], point: Point) -> bool:
    first = done.get((point.id, 1))
    return first is not None and first.status == "ok"


def _load_previous(store: ResultsStore, experiment: Experiment) -> dict[tuple[str, int], Record]:
    """The finished rounds of this experiment's points in the store, by point id and round (the latest
    record of each)."""
    records = store.load()
    others = {r.fingerprint for r in records} - {experiment.fingerprint}
    if others:
        raise UsageError(
            f"{store.path} holds results of a different experiment (fingerprint {others.pop()}, this one "
            f"{experiment.fingerprint}); use --fresh to replace them or --out for another folder"
        )
    return {(r.point.id, r.round): r for r in records}


def _skip_reason(
    experiment: Experiment, point: Point, done: dict[tuple[str, int], Record], prediction: Prediction | None
) -> str | None:
    """Why ``point`` is not worth running: a smaller batch of its series ran out of memory, or the
    prediction is far over the budget."""
    for record in done.values():
        p = record.point
        if (
            record.status == "oom"
            and p.strategy == point.strategy
            and p.chunk_sizes == point.chunk_sizes
            and p.chunk_tokens == point.chunk_tokens
            and p.batch_size < point.batch_size
        ):
            went = "went over the memory budget" if OVER_BUDGET in (record.reason or "") else "ran out of memory"
            return f"{p.series} {went} at batch {p.batch_size}"
    budget = experiment.sweep.memory_budget
    peak = prediction.peak_bytes if prediction else None
    if budget is not None and peak is not None and peak > budget * PREDICTED_SKIP_MARGIN:
        return f"skipped (predicted): predicted peak {format_bytes(peak)} is far over the budget {format_bytes(budget)}"
    return None


def _predictor(experiment: Experiment) -> Callable[[Point], Prediction]:
    """Predictions for the sweep's device, from one fake model built here (nothing is allocated)."""
    device = resolve_device(experiment.sweep.device)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--predict: no memory model for {device.type} devices (cpu and cuda have one)")
    try:
        estimator = Estimator(
            experiment.workload,
            experiment.sweep.precision,
            device.type,
            experiment.sweep.seed,
            experiment.optimizer,
            capability=torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        )
    except EstimateError as error:
        raise EstimateError(f"--predict: {error}") from None

    def predict(point: Point) -> Prediction:
        try:
            return estimator.predict(experiment.step_config(point), experiment.sweep.nproc)
        except EstimateError as error:
            return Prediction(error=str(error))

    return predict


def run_point_process(
    experiment: Experiment, point: Point, git: str | None, logs: Path, round: int = 1, reference: Point | None = None
) -> Record:
    """Measure one round of ``point`` in a child process (timed in turns with ``reference`` if given), its
    output in ``logs``; a timeout, crash or kill becomes a record too."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", point.id) + (f".round{round}" if round > 1 else "")
    args = (experiment.to_dict(), dump(point), git, round, dump(reference) if reference is not None else None)
    outcome = run_child(child_main, args, timeout=experiment.sweep.timeout, log=logs / f"{name}.log")
    if outcome.finished:
        return Record.from_dict(json.loads(outcome.value))
    status: Status
    if outcome.timed_out:
        status, reason = "timeout", f"exceeded the {experiment.sweep.timeout:g} s point timeout"
    elif outcome.failure is not None:
        status, reason = "error", outcome.failure.message.strip().split("\n")[0][:500]
    else:
        status, reason = "error", outcome.exit_reason()
    return bare_record(experiment, point, status, reason, git, round)


def write_csv(records: list[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records_frame(records).to_csv(path, index=False)
