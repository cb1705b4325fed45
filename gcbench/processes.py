"""The one way gcbench runs work in child processes: sweep points, the ranks of a launch, tune's measurements.

:func:`run_children` starts one process per argument tuple and returns, for each, what its function
returned or how it failed. Every child is started the same way and held to the same rules:

- **start**: forked from a forkserver that has imported torch and gcbench but run nothing (a point or a
  rank starts in a tenth of a second, not the seconds of a fresh interpreter, and inherits no thread
  pool; safe with CUDA, as the server never touches it), or spawned where there is no forkserver. The
  parent's ``sys.path`` is adopted, so a user's workload or strategy imports there as it did here.
- **output**: with a log path, the child's stdout and stderr go to that file (the callers keep them in
  the results folder's ``logs/``); without one, they stay the parent's.
- **results**: what the function returns travels back pickled through a file in a private folder,
  written whole or not at all; an exception comes back as a :class:`ChildFailure` (its message,
  traceback, the moment it happened and, where it pickles, the exception itself).
- **timeouts**: past ``timeout`` seconds every child still running is killed and marked ``timed_out``.
  With ``together`` (the ranks of one process group) the first child to fail ends the others too,
  after a short grace in which their own failures may still arrive.
- **no orphan**: a child kills itself the moment the parent ends, however it ends (a watcher thread on
  a pidfd; ``PR_SET_PDEATHSIG`` is not enough, as a forkserver's children are the server's), and
  the parent ends every child it started before :func:`run_children` returns or raises (an interrupt
  included), so a finished child's result is kept and nothing is left running.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
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
from pathlib import Path
from typing import Any

from gcbench import _cuda_double
from gcbench.imports import adopt, import_path

GRACE_S = 0.2  # after a child of a ``together`` run fails: wait this long for the others, SIGTERM, again, SIGKILL
# What every child imports before it runs (the optimizer's first step imports torch._dynamo and sympy: a
# second per child if not preloaded); extras' packages the parent has imported already are added.
PRELOAD = ("gcbench.sweep.worker", "gcbench.tune", "torch._dynamo", "torch.profiler")
_EXTRAS = ("transformers", "sentence_transformers")
_this_child: dict[str, Path] = {}  # "log": this process's log, when it is a child started with one


@dataclass(frozen=True)
class ChildFailure:
    """A child whose function raised: where, when, and what."""

    index: int
    at: float  # time.time() of the failure: the first one is the cause
    message: str  # "ExceptionType: message"
    traceback: str
    exception: bytes | None  # the pickled exception, when it pickles

    def exception_object(self) -> BaseException | None:
        if self.exception is None:
            return None
        try:
            loaded = pickle.loads(self.exception)
        except Exception:
            return None
        return loaded if isinstance(loaded, BaseException) else None


@dataclass(frozen=True)
class ChildOutcome:
    """One child: its function's value, or its failure, or (neither) how its process ended."""

    index: int
    value: Any = None
    failure: ChildFailure | None = None
    finished: bool = False  # the function returned and its value came back
    exitcode: int | None = None
    timed_out: bool = False
    log: Path | None = None

    def exit_reason(self) -> str:
        """Why a child left no value and no failure: a signal (SIGKILL: out of host memory?) or a bare exit."""
        tail = ""
        if self.log is not None and self.log.exists():
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
            tail = f"; last output: {lines[-1][:300]}" if lines else ""
        code = self.exitcode
        if code == -signal.SIGKILL:
            return f"worker killed by SIGKILL (out of host memory?){tail}"
        if code is not None and code < 0:
            return f"worker killed by {signal.Signals(-code).name}{tail}"
        return f"worker exited with status {code} and no record{tail}"


def current_log() -> Path | None:
    """The log this process writes to, when it is a child started with one (its own children log beside it)."""
    return _this_child.get("log")


def run_children(
    function: Callable[..., Any],
    arguments: Sequence[tuple[Any, ...]],
    *,
    timeout: float,
    logs: Sequence[Path | None] | None = None,
    together: bool = False,
) -> list[ChildOutcome]:
    """``function(*arguments[i])`` in child ``i``, all at once; each child's outcome, in order (see the module).

    ``function`` and the arguments must pickle (a module-level function).
    """
    logs = list(logs) if logs is not None else [None] * len(arguments)
    if len(logs) != len(arguments):
        raise ValueError(f"run_children: {len(arguments)} children but {len(logs)} logs")
    context = _context()
    with tempfile.TemporaryDirectory(prefix="gcbench-children-") as folder:
        processes = [
            context.Process(
                target=_child_main,
                args=(
                    index,
                    folder,
                    os.getpid(),
                    import_path(),
                    _settings(),
                    None if log is None else str(log),
                    function,
                    args,
                ),
                name=f"gcbench-child-{index}",
            )
            for index, (args, log) in enumerate(zip(arguments, logs))
        ]
        timed_out: set[int] = set()
        try:
            for process in processes:
                process.start()
            timed_out = _wait(processes, folder, timeout, together)
        finally:
            _end(processes, grace=GRACE_S if together else 0.0)
        return [
            _outcome(index, folder, process, index in timed_out, log)
            for index, (process, log) in enumerate(zip(processes, logs))
        ]


def run_child(
    function: Callable[..., Any], args: tuple[Any, ...], *, timeout: float, log: Path | None = None
) -> ChildOutcome:
    """``function(*args)`` in one child process (see :func:`run_children`)."""
    return run_children(function, [args], timeout=timeout, logs=[log])[0]


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        extras = [name for name in _EXTRAS if name in sys.modules]
        context.set_forkserver_preload([*PRELOAD, *extras])  # no effect once the server runs
        return context
    return multiprocessing.get_context("spawn")


def _wait(processes: list[Any], folder: str, timeout: float, together: bool) -> set[int]:
    """Until every child has ended (or, ``together``, one has failed); the children still running at the
    deadline."""
    deadline = time.monotonic() + timeout
    running = dict(enumerate(processes))
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            return set(running)
        ended = multiprocessing.connection.wait([p.sentinel for p in running.values()], timeout=left)
        for index, process in list(running.items()):
            if process.sentinel in ended:
                process.join()
                del running[index]
                if together and process.exitcode != 0:
                    return set()
    return set()


def _end(processes: list[Any], grace: float) -> None:
    """Every child started is ended and reaped: a grace to end on their own, then SIGTERM, then SIGKILL."""
    started = [p for p in processes if p.pid is not None]
    for step in ("wait", "terminate", "kill"):
        alive = [p for p in started if p.is_alive()]
        if not alive:
            break
        if step == "terminate":
            for p in alive:
                p.terminate()
        elif step == "kill":
            for p in alive:
                p.kill()
        deadline = time.monotonic() + grace
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()) if step != "kill" else None)
    for p in started:
        p.join()


def _result_path(folder: str, index: int) -> Path:
    return Path(folder) / f"child{index}.pickle"


def _outcome(index: int, folder: str, process: Any, timed_out: bool, log: Path | None) -> ChildOutcome:
    path = _result_path(folder, index)
    exitcode = process.exitcode
    if path.exists():
        with path.open("rb") as file:
            kind, payload = pickle.load(file)
        if kind == "value":
            return ChildOutcome(index, payload, None, True, exitcode, timed_out, log)
        return ChildOutcome(index, None, payload, False, exitcode, timed_out, log)
    return ChildOutcome(index, None, None, False, exitcode, timed_out, log)


def _write(path: Path, value: Any) -> None:
    """Whole or not at all: a child may be killed while it writes."""
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        pickle.dump(value, file)
    partial.replace(path)


def _child_main(
    index: int,
    folder: str,
    parent_pid: int,
    parent_path: Sequence[str],
    settings: dict[str, str],
    log: str | None,
    function: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """A child's process: watch the parent, log, run ``function``, leave its value (or failure) in a file."""
    threading.Thread(target=_end_with, args=(parent_pid,), name="gcbench-parent-watch", daemon=True).start()
    adopt(parent_path)
    _adopt_settings(settings)
    gc.freeze()  # what the fork server imported stays put: each gc.collect() here skips it
    if log is not None:
        _this_child["log"] = Path(log)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    path = _result_path(folder, index)
    try:
        value = function(*args)
    except BaseException as error:
        failure = failure_of(index, error)
        print(failure.traceback, file=sys.stderr, flush=True)
        _write(path, ("failure", failure))
        sys.stdout.flush()
        os._exit(1)  # not a clean exit: tearing down a process group whose peers wait in a collective can hang
    _write(path, ("value", value))
    sys.stdout.flush()
    sys.stderr.flush()


def _settings() -> dict[str, str]:
    """The parent's ``GCBENCH_*`` variables: a fork server started earlier holds the environment of then."""
    return {name: value for name, value in os.environ.items() if name.startswith("GCBENCH_")}


def _adopt_settings(settings: dict[str, str]) -> None:
    """The parent's ``GCBENCH_*`` variables in this child, and the CUDA double if they ask for it."""
    for name in [name for name in os.environ if name.startswith("GCBENCH_") and name not in settings]:
        del os.environ[name]
    os.environ.update(settings)
    if _cuda_double.installed() is None:
        _cuda_double.install_if_asked()


def failure_of(index: int, error: BaseException) -> ChildFailure:
    """What a failed child (or rank) reports: its message, its traceback and, where it pickles, the exception."""
    try:
        pickled: bytes | None = pickle.dumps(error)
    except Exception:
        pickled = None
    return ChildFailure(index, time.time(), f"{type(error).__name__}: {error}", traceback.format_exc(), pickled)


def _end_with(pid: int) -> None:
    """Kill this child once process ``pid`` has ended (a child blocked in a collective hears no signal sooner)."""
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
