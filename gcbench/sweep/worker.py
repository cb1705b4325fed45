"""The process of one sweep point: its output to a log, its record to a file, whatever happens.

Started by :func:`gcbench.processes.run_child` (see :mod:`gcbench.sweep.runner`), it measures the point
with :func:`gcbench.sweep.point.measurer` and returns the record; a crash becomes an ``error`` record
with the exception's first line, and the full traceback stays in the point's log.
"""

from __future__ import annotations

import traceback
from typing import Any

from gcbench.errors import first_line
from gcbench.experiment import Experiment
from gcbench.results.records import Point, Record
from gcbench.sweep.point import bare_record, measurer
from gcbench.typed import load


def child_main(
    experiment_data: dict[str, Any],
    point_data: dict[str, Any],
    git_commit: str | None,
    round: int = 1,
    reference_data: dict[str, Any] | None = None,
) -> str:
    """Entry point of a point's process (one round of it), run by :func:`gcbench.processes.run_child`: the
    record as JSON, an ``error`` record when measuring is interrupted or ended."""
    experiment, point = Experiment.from_dict(experiment_data), load(Point, point_data)
    reference = load(Point, reference_data) if reference_data is not None else None
    try:
        record = measured_record(experiment, point, git_commit, round, reference)
    except BaseException as error:  # interrupted or ended: the record still says how
        traceback.print_exc()
        record = bare_record(experiment, point, "error", first_line(error), git_commit, round)
    return record.to_json()


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
