"""A point's times from its rounds: the estimate, its 95% interval and its noise, and rounds merged on reading.

A sweep with ``rounds = R`` measures every point once in full (round 1: memory, gradients, time) and
then R - 1 times more for its time alone, each round in a fresh process, round 2 only after round 1 of
every point. Each round appends its own record (``round`` > 1: time and paired ratio only); whoever
reads a results file takes :func:`merge_rounds`'s one record per point, whose times pool every round
that ran ok. The numbers are always recomputed from the samples, so a record of one round and the
merged record of several say the same things in the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from gcbench.measure.noise import noise_reasons
from gcbench.measure.stats import estimate, quartiles
from gcbench.results.records import PairedResult, Record, TimeResult


def time_result(
    rounds: Sequence[Sequence[float]],
    examples: int,
    load_average: float | None = None,
    cores: int | None = None,
    cpu_samples: Sequence[float] = (),
) -> TimeResult:
    """Step times of one or more rounds (samples in the order taken) as a record's ``time``; ``cpu_samples``:
    the process's CPU time of the same steps."""
    rounds = [tuple(r) for r in rounds if len(r)]
    median = estimate(rounds)
    samples = tuple(s for r in rounds for s in r)
    q1, _, q3 = quartiles(samples)
    return TimeResult(
        median.value,
        q1,
        q3,
        samples,
        examples / median.value,
        samples_per_round=tuple(len(r) for r in rounds) if len(rounds) > 1 else (),
        low_s=median.low,
        high_s=median.high,
        noise=noise_reasons(rounds, load_average=load_average, cores=cores),
        load_average_1m=load_average,
        cpu_samples_s=tuple(cpu_samples),
        cpu_median_s=statistics.median(cpu_samples) if cpu_samples else None,
    )


def paired_result(
    reference: str,
    rounds: Sequence[Sequence[float]],
    reference_medians_s: Sequence[float],
    cpu_rounds: Sequence[Sequence[float]] = (),
) -> PairedResult:
    """Ratios to the reference, turn by turn, of one or more rounds, as a record's ``paired``; ``cpu_rounds``:
    the same by the process's CPU time (every round, or none)."""
    rounds = [tuple(r) for r in rounds if len(r)]
    ratio = estimate(rounds)
    cpu = [tuple(r) for r in cpu_rounds if len(r)]
    by_cpu = estimate(cpu) if cpu and len(cpu) == len(rounds) else None
    return PairedResult(
        reference,
        ratio.value,
        ratio.low,
        ratio.high,
        tuple(x for r in rounds for x in r),
        ratios_per_round=tuple(len(r) for r in rounds) if len(rounds) > 1 else (),
        reference_median_s=statistics.median(reference_medians_s) if reference_medians_s else None,
        noise=noise_reasons(rounds),
        cpu_ratios=tuple(x for r in cpu for x in r) if by_cpu else (),
        cpu_ratio=by_cpu.value if by_cpu else None,
        cpu_low=by_cpu.low if by_cpu else None,
        cpu_high=by_cpu.high if by_cpu else None,
    )


def merge_rounds(records: Sequence[Record]) -> list[Record]:
    """One record per round-1 record, in file order, its times pooled with the later rounds of its point
    that ran ok (those that follow it and come before the point's next round-1 record: a file
    concatenated from several sweeps keeps each sweep's rounds apart). A later round without a
    first one (a file cut short by hand) has no point to join and is dropped."""
    firsts: list[Record] = []
    later: dict[int, list[Record]] = {}
    latest: dict[str, int] = {}
    for record in records:
        if record.round == 1:
            latest[record.point.id] = len(firsts)
            firsts.append(record)
        elif record.point.id in latest and record.status == "ok" and record.time is not None:
            later.setdefault(latest[record.point.id], []).append(record)
    return [_merged(first, later.get(i, [])) for i, first in enumerate(firsts)]


def _merged(first: Record, later: list[Record]) -> Record:
    if not later or first.time is None:
        return first
    records = [first, *later]
    loads = [
        load
        for r in records
        if (load := (r.time.load_average_1m if r.time else None) or r.env.load_average_1m) is not None
    ]
    rounds = [samples for r in records if r.time is not None for samples in r.time.rounds]
    cpu = [s for r in records if r.time is not None for s in r.time.cpu_samples_s]
    time = time_result(rounds, first.point.batch_size, max(loads, default=None), first.env.cpu_cores, cpu)
    paired = first.paired
    if paired is not None:
        same = [r.paired for r in records if r.paired is not None and r.paired.reference == paired.reference]
        medians = [p.reference_median_s for p in same if p.reference_median_s is not None]
        cpu_rounds = [x for p in same for x in p.cpu_rounds]
        paired = paired_result(paired.reference, [x for p in same for x in p.rounds], medians, cpu_rounds)
    return replace(first, time=time, paired=paired)
