"""Run a function on W processes in one process group, on torch's own machinery, and get every result back.

``torch.multiprocessing.start_processes`` starts the ranks, forked from a forkserver that has imported
torch and gcbench but run nothing (a tenth of a second per launch instead of seconds; safe with CUDA,
as the server never touches it), or spawned where there is no forkserver. They meet through a file
store in a private folder (no port to race for). What a rank returns
comes back through a file, in rank order. Failure ends the whole run:

- a rank that raises ends every rank (the others are terminated, then killed) and the caller gets a
  :class:`RankError` with that rank's message, traceback and, where it pickles, the exception itself;
  when several ranks fail, the first to fail is reported (its peers' "connection closed" follows it);
- a collective that hangs raises in the waiting rank after ``collective_timeout`` (the process
  group's timeout), which ends the run as above;
- anything else that hangs is ended by the wall-clock ``timeout``: every rank is killed and the
  caller gets a ``TimeoutError``;
- a rank ends the moment the process that launched it ends, however it ends (a watcher thread on
  a pidfd), so a killed sweep leaves no rank behind. ``PR_SET_PDEATHSIG`` is not enough: a forkserver's
  ranks are the server's children, and their inherited end of its "alive" pipe keeps it running.

Under torch's own launcher (``torchrun``, one or several nodes) the ranks exist already: :func:`launch`
then runs the function in this process as the rank torchrun made it, in the group torchrun's
``env://`` variables describe (joined once per process), and every rank gets every rank's result. A
failing rank's error reaches every rank as a :class:`RankError` once the others reach the exchange of
results; a rank that dies inside a collective leaves its peers to the collective's timeout, and
ending the processes is torchrun's job.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import select
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessContext, ProcessException, start_processes

from gcbench.errors import UsageError
from gcbench.imports import adopt, import_path

T = TypeVar("T")
BACKENDS = ("auto", "gloo", "nccl")
_GRACE_S = 0.2  # after a rank fails: wait this long for the others, SIGTERM, again, SIGKILL
# What ranks import; a superset of the sweep runner's preload, should both share one server.
_PRELOAD = ["gcbench", "torch._dynamo", "torch.profiler"]


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
class _Failure:
    rank: int
    at: float  # time.time() of the failure: the first one is the cause
    message: str
    traceback: str
    exception: bytes | None  # the pickled exception, when it pickles


@dataclass(frozen=True)
class _Spec:
    """How to start a rank: everything but its index."""

    world_size: int
    device: str
    backend: str
    collective_timeout_s: float
    threads: int
    folder: str
    launcher_pid: int
    import_path: tuple[str, ...] = ()  # the launcher's sys.path: a user's code imports on every rank

    def device_of(self, rank: int) -> torch.device:
        device = torch.device(self.device)
        return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device

    def result_path(self, rank: int) -> Path:
        return Path(self.folder) / f"rank{rank}.pickle"


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
            os.getpid(),
            import_path(),
        )
        context = start_processes(
            _rank_main, args=(spec, fn, tuple(args)), nprocs=nproc, join=False, start_method=_start_method()
        )
        try:
            _join(context, timeout)
        except ProcessException as error:
            raise _rank_error(spec, error) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [_read(spec.result_path(rank)) for rank in range(nproc)]


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
        outcome = _failure(launched.rank, error)
    everyone: list[Any] = [None] * launched.world_size
    dist.all_gather_object(everyone, outcome)
    failures = [result for result in everyone if isinstance(result, _Failure)]
    if failures:
        raise _error_of(min(failures, key=lambda f: f.at))
    return everyone


def _failure(rank: int, error: BaseException) -> _Failure:
    """What a failed rank reports: its message, its traceback and, where it pickles, the exception."""
    try:
        pickled: bytes | None = pickle.dumps(error)
    except Exception:
        pickled = None
    return _Failure(rank, time.time(), f"{type(error).__name__}: {error}", traceback.format_exc(), pickled)


def _error_of(failure: _Failure) -> RankError:
    exception = None
    if failure.exception is not None:
        try:
            exception = pickle.loads(failure.exception)
        except Exception:
            exception = None
    return RankError(failure.rank, failure.message, failure.traceback, exception)


def _start_method() -> str:
    if "forkserver" in multiprocessing.get_all_start_methods():
        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)  # no effect once it runs
        return "forkserver"
    return "spawn"


def _join(context: ProcessContext, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=_GRACE_S):
        if time.monotonic() >= deadline:
            running = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            raise TimeoutError(
                f"{len(context.processes)} ranks did not finish within {timeout:g} s (a hung "
                f"collective?); ranks {running} were still running and all were ended"
            )


def _rank_error(spec: _Spec, error: ProcessException) -> RankError:
    """The first failed rank's own report, or what its exit says when no rank left one (a signal, a crash)."""
    reports = [_read(spec.result_path(rank)) for rank in range(spec.world_size) if spec.result_path(rank).exists()]
    failures = [report for report in reports if isinstance(report, _Failure)]
    if not failures:
        return RankError(error.error_index, str(error).strip())
    return _error_of(min(failures, key=lambda f: f.at))


def _read(path: Path) -> Any:
    with path.open("rb") as file:
        return pickle.load(file)


def _write(path: Path, value: Any) -> None:
    """Whole or not at all: a rank may be killed while it writes."""
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        pickle.dump(value, file)
    partial.replace(path)


def _rank_main(rank: int, spec: _Spec, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A rank's process: join the group, run ``fn``, leave the result (or the failure) in its file."""
    threading.Thread(target=_end_with, args=(spec.launcher_pid,), name="gcbench-launcher-watch", daemon=True).start()
    adopt(spec.import_path)
    torch.set_num_threads(spec.threads)
    device = spec.device_of(rank)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            spec.backend,
            init_method=f"file://{spec.folder}/rendezvous",
            rank=rank,
            world_size=spec.world_size,
            timeout=timedelta(seconds=spec.collective_timeout_s),
        )
        _write(spec.result_path(rank), fn(RankInfo(rank, spec.world_size, device, spec.backend), *args))
    except BaseException as error:
        failure = _failure(rank, error)
        print(f"[rank {rank}] {failure.traceback}", file=sys.stderr, flush=True)
        _write(spec.result_path(rank), failure)
        sys.stdout.flush()
        os._exit(1)  # not a clean exit: tearing down a group whose peers wait in a collective can hang
    dist.destroy_process_group()


def _end_with(pid: int) -> None:
    """Kill this rank once process ``pid`` has ended (a rank blocked in a collective hears no signal sooner)."""
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable once pid has exited, zombie or not
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3), or pid already gone: ask twice a second
        while _alive(pid):
            time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
