"""The one child-process runner: values and failures come back, logs are kept, timeouts end children, and a
parent that is interrupted or killed leaves no child behind (sweep points, ranks and tune's children all run
through it; test_distributed.py kills a launcher of ranks, test_sweep.py a sweep mid-way)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from gcbench.processes import current_log, run_child, run_children


def _square(x: int) -> int:
    print(f"squaring {x}", flush=True)
    return x * x


def _raise(message: str) -> None:
    raise ValueError(message)


def _sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def _my_log() -> str | None:
    log = current_log()
    return None if log is None else str(log)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_values_come_back_in_order_and_output_goes_to_the_log(tmp_path):
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    outcomes = run_children(_square, [(i,) for i in range(3)], timeout=60, logs=logs)
    assert [o.value for o in outcomes] == [0, 1, 4] and all(o.finished and o.exitcode == 0 for o in outcomes)
    assert logs[2].read_text() == "squaring 2\n"
    assert run_child(_my_log, (), timeout=60, log=logs[0]).value == str(logs[0])  # a child knows its log


def test_a_failure_comes_back_with_its_exception_and_traceback(tmp_path):
    outcome = run_child(_raise, ("boom",), timeout=60, log=tmp_path / "x.log")
    assert not outcome.finished and outcome.failure is not None
    assert outcome.failure.message == "ValueError: boom" and "_raise" in outcome.failure.traceback
    assert isinstance(outcome.failure.exception_object(), ValueError)
    assert "ValueError: boom" in (tmp_path / "x.log").read_text()  # the traceback stays in the log


def test_a_crash_says_how_the_child_ended():
    outcome = run_child(_die, (), timeout=60)
    assert not outcome.finished and outcome.failure is None
    assert outcome.exitcode == -signal.SIGKILL and "SIGKILL" in outcome.exit_reason()


def test_the_timeout_ends_the_slow_children_and_keeps_the_finished_ones():
    started = time.monotonic()
    fast, slow = run_children(_sleep_then, [(0.0, 1), (60.0, 2)], timeout=5)
    assert fast.finished and fast.value == 1 and not fast.timed_out
    assert slow.timed_out and not slow.finished
    assert time.monotonic() - started < 30


def test_together_the_first_failure_ends_the_others():
    started = time.monotonic()
    failed, waiting = run_children(_raise_or_sleep, [(0,), (1,)], timeout=60, together=True)
    assert failed.failure is not None and not waiting.finished and not waiting.timed_out
    assert time.monotonic() - started < 30


def _raise_or_sleep(index: int) -> None:
    if index == 0:
        raise ValueError("first")
    time.sleep(60)


def _pid_child(folder: str, index: int) -> None:
    partial = Path(folder) / f"{index}.partial"
    partial.write_text(str(os.getpid()))
    partial.replace(Path(folder) / f"{index}.pid")  # whole: the test reads it as soon as it appears
    time.sleep(60)


def _parent(folder: str) -> None:
    run_children(_pid_child, [(folder, 0), (folder, 1)], timeout=60)


def _ended(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] == "Z"


def _wait_for_pids(folder: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 300  # the forkserver's first start imports torch: slow on a loaded machine
    while len(list(folder.glob("*.pid"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in folder.glob("*.pid")]
    assert len(pids) == count, pids
    return pids


def _all_end(pids: list[int]) -> bool:
    deadline = time.monotonic() + 30
    while not all(map(_ended, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(map(_ended, pids))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_a_parent_killed_or_interrupted_leaves_no_child(tmp_path, how):
    """kill -9 (the children's watchers end them) and Ctrl-C (the parent ends them before it unwinds)."""
    parent = multiprocessing.get_context("forkserver").Process(target=_parent, args=(str(tmp_path),))
    parent.start()
    pids = _wait_for_pids(tmp_path, 2)
    os.kill(parent.pid, how)
    parent.join(60)
    assert _all_end(pids)


def test_tune_s_children_run_through_the_runner(tmp_path):
    """tune measures in the same runner: its child's output lands in the log folder it is given."""
    from gcbench import tune
    from gcbench.experiment import load_experiment
    from gcbench.results import Point

    experiment = load_experiment("quick")
    log = tune._log(tmp_path, "peak.full-8")
    peak = tune._in_child(tune._child_peak, experiment, [Point("full", 8)], log)
    assert isinstance(peak, int) and peak > 0 and log.parent == tmp_path and log.exists()
