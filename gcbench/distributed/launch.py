"""Run a function on W processes in one process group, on torch's own machinery, and get every result back.

The ranks are children of this process, started by :func:`gcbench.processes.run_children` (the one
way gcbench starts processes: a forkserver, results back through files, parent-death and timeouts).
They meet through a file store in a private folder (no port to race for). What a rank returns comes
back in rank order; a rank of a process that logs (a sweep point's) logs beside it, ``NAME.rankR.log``.
Failure ends the whole run:

- a rank that raises ends every rank (the others are terminated, then killed) and the caller gets a
  :class:`RankError` with that rank's message, traceback and, where it pickles, the exception itself;
  when several ranks fail, the first to fail is reported (its peers' "connection closed" follows it);
- a collective that hangs raises in the waiting rank after ``collective_timeout`` (the process
  group's timeout), which ends the run as above;
- anything else that hangs is ended by the wall-clock ``timeout``: every rank is killed and the
  caller gets a ``TimeoutError``;
- a rank ends the moment the process that launched it ends, however it ends, so a killed sweep
  leaves no rank behind.

Under torch's own launcher (``torchrun``, one or several nodes) the ranks exist already: :func:`launch`
then runs the function in this process as the rank torchrun made it, in the group torchrun's
``env://`` variables describe (joined once per process), and every rank gets every rank's result. A
failing rank's error reaches every rank as a :class:`RankError` once the others reach the exchange of
results; a rank that dies inside a collective leaves its peers to the collective's timeout, and
ending the processes is torchrun's job.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gcbench.errors import UsageError
from gcbench.processes import ChildFailure, current_log, failure_of, run_children

T = TypeVar("T")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class RankInfo:
    """What a rank's function is told: who it is and where it runs (the process group is up)."""

    rank: int
    world_size: int
    device: torch.device
    backend: str


class RankError(RuntimeError):
    """A rank failed and the whole run was ended; ``message`` is the rank's own error line."""

    def __init__(self, rank: int, message: str, traceback_text: str = "", exception: BaseException | None = None):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        self.message = message
        self.traceback = traceback_text
        self.exception = exception


@dataclass(frozen=True)
class _Spec:
    """How to start a rank: everything but its index."""

    world_size: int
    device: str
    backend: str
    collective_timeout_s: float
    threads: int
    folder: str  # the file store's

    def device_of(self, rank: int) -> torch.device:
        device = torch.device(self.device)
        return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


@dataclass(frozen=True)
class LaunchedRanks:
    """This process as one of the ranks another launcher started (torchrun sets torch's ``env://`` variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environment(cls) -> LaunchedRanks | None:
        """The ranks torchrun (or a launcher setting the same variables) started; None when there are none."""
        names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        if not all(name in os.environ for name in names):
            return None
        try:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        except ValueError:
            raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
        return cls(rank, world_size, local_rank, local_world_size)

    @property
    def leader(self) -> bool:
        return self.rank == 0


def ranks_wanted(nproc: int) -> int:
    """``nproc``, or under torchrun with ``nproc`` 1 (the default) torchrun's world size. (torchrun's own
    parser takes ``--nproc`` after the module for its ``--nproc-per-node``, so it is best left out there.)"""
    launched = LaunchedRanks.from_environment()
    return launched.world_size if launched is not None and nproc == 1 else nproc


def is_leader() -> bool:
    """Whether this process speaks for the run: always, unless it is one of torchrun's ranks other than 0."""
    launched = LaunchedRanks.from_environment()
    return launched is None or launched.leader


def join_launched_group(backend: str, timeout: float) -> None:
    """Join the process group torchrun's variables describe (once per process; left at exit)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout))
    atexit.register(_leave_group)


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto``: nccl on CUDA, gloo otherwise; nccl needs CUDA."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise UsageError(f"--backend: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UsageError(f"--backend: nccl needs CUDA devices, not {device.type}; use gloo")
    return backend


def launch(
    fn: Callable[..., T],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    timeout: float = 600.0,
    collective_timeout: float | None = None,
    threads: int = 0,
) -> list[T]:
    """``fn(RankInfo, *args)`` on ``nproc`` ranks; their return values, by rank.

    ``fn`` and ``args`` must pickle (a module-level function). On CUDA, rank r runs on device
    ``index + r``. ``threads``: torch threads per rank (0: the CPU cores shared out evenly).
    ``collective_timeout`` (default ``timeout``) bounds each collective. Raises :class:`RankError`
    or ``TimeoutError``; no rank outlives the call.
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    launched = LaunchedRanks.from_environment()
    if launched is not None:
        return _run_as_launched(launched, fn, nproc, args, device, backend, collective_timeout or timeout, threads)
    if device.type == "cuda" and (device.index or 0) + nproc > torch.cuda.device_count():
        raise UsageError(
            f"--nproc: {nproc} ranks need {nproc} CUDA devices from {device}, "
            f"this machine has {torch.cuda.device_count()}"
        )
    with tempfile.TemporaryDirectory(prefix="gcbench-ranks-") as folder:
        spec = _Spec(
            nproc,
            str(device),
            backend,
            collective_timeout or timeout,
            threads or max(1, (os.cpu_count() or 1) // nproc),
            folder,
        )
        log = current_log()
        outcomes = run_children(
            _rank_main,
            [(rank, spec, fn, tuple(args)) for rank in range(nproc)],
            timeout=timeout,
            logs=None if log is None else [log.with_name(f"{log.stem}.rank{rank}.log") for rank in range(nproc)],
            together=True,
        )
    running = [o.index for o in outcomes if o.timed_out]
    if running:  # the wall clock first, as a rank that failed meanwhile was waiting on the hung ones
        raise TimeoutError(
            f"{nproc} ranks did not finish within {timeout:g} s (a hung collective?); "
            f"ranks {running} were still running and all were ended"
        )
    failures = [o.failure for o in outcomes if o.failure is not None]
    if failures:
        raise _error_of(min(failures, key=lambda f: f.at))
    for outcome in outcomes:
        if not outcome.finished:  # a signal or a crash, before any rank could report
            raise RankError(outcome.index, outcome.exit_reason())
    return [o.value for o in outcomes]


def _run_as_launched(
    launched: LaunchedRanks,
    fn: Callable[..., T],
    nproc: int,
    args: Sequence[Any],
    device: torch.device,
    backend: str,
    collective_timeout: float,
    threads: int,
) -> list[T]:
    """``fn`` in this process as torchrun's rank; every rank's result (or the first failure) on every rank."""
    if nproc != launched.world_size:
        raise UsageError(
            f"--nproc: {nproc} ranks asked for, but torchrun started {launched.world_size} (WORLD_SIZE); "
            f"pass --nproc {launched.world_size}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", (device.index or 0) + launched.local_rank)
        torch.cuda.set_device(device)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // launched.local_world_size))
    join_launched_group(backend, collective_timeout)
    outcome: Any
    try:
        outcome = fn(RankInfo(launched.rank, launched.world_size, device, backend), *args)
    except Exception as error:
        outcome = failure_of(launched.rank, error)
    everyone: list[Any] = [None] * launched.world_size
    dist.all_gather_object(everyone, outcome)
    failures = [result for result in everyone if isinstance(result, ChildFailure)]
    if failures:
        raise _error_of(min(failures, key=lambda f: f.at))
    return everyone


def _error_of(failure: ChildFailure) -> RankError:
    return RankError(failure.index, failure.message, failure.traceback, failure.exception_object())


def _rank_main(rank: int, spec: _Spec, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """A rank's process: join the group, run ``fn`` (a failure ends the process, see gcbench.processes)."""
    torch.set_num_threads(spec.threads)
    device = spec.device_of(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        spec.backend,
        init_method=f"file://{spec.folder}/rendezvous",
        rank=rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.collective_timeout_s),
    )
    result = fn(RankInfo(rank, spec.world_size, device, spec.backend), *args)
    dist.destroy_process_group()
    return result
