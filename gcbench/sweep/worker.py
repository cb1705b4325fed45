"""The process of one sweep point: its output to a log, its record to a file, whatever happens.

Forked from the sweep's server (see :mod:`gcbench.sweep.runner`), it measures the point with
:func:`gcbench.sweep.point.measurer` and writes the record atomically; a crash becomes an ``error``
record with the exception's first line, and the full traceback stays in the point's log.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcbench.errors import first_line
from gcbench.experiment import Experiment
from gcbench.imports import adopt
from gcbench.results.records import Point, Record
from gcbench.sweep.point import bare_record, measurer
from gcbench.typed import load


def child_main(
    experiment_data: dict[str, Any],
    point_data: dict[str, Any],
    git_commit: str | None,
    result_path: str,
    log_path: str,
    round: int = 1,
    reference_data: dict[str, Any] | None = None,
    parent_path: Sequence[str] = (),
) -> None:
    """Entry point of a point's process (one round of it): output to a log, the record to ``result_path``.

    ``parent_path``: the sweep's ``sys.path``, so that a user's workload or strategy imports here as it did there.
    """
    _die_with_parent()
    adopt(parent_path)
    gc.freeze()  # what the fork server imported stays put: each gc.collect() here skips it
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    experiment, point = Experiment.from_dict(experiment_data), load(Point, point_data)
    reference = load(Point, reference_data) if reference_data is not None else None
    try:
        record = measured_record(experiment, point, git_commit, round, reference)
    except BaseException as error:  # interrupted or ended: the record still says how
        traceback.print_exc()
        record = bare_record(experiment, point, "error", first_line(error), git_commit, round)
    sys.stdout.flush()
    sys.stderr.flush()
    temporary = Path(result_path + ".tmp")
    temporary.write_text(record.to_json())
    temporary.replace(result_path)


def measured_record(
    experiment: Experiment, point: Point, git_commit: str | None, round: int = 1, reference: Point | None = None
) -> Record:
    """One round of the point's record; an ``error`` record with the exception's first line when measuring
    raises."""
    try:
        return measurer(experiment, git_commit).measure(point, round, reference)
    except Exception as error:
        traceback.print_exc()
        return bare_record(experiment, point, "error", first_line(error), git_commit, round)


def _die_with_parent() -> None:
    """Linux: end this point's process if the process that started it dies (kill -9 of the sweep)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
