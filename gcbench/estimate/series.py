"""A series of batch sizes from a few fake steps: the peak is a polynomial of degree two in the batch.

For one strategy and chunking, every byte count a prediction reports (the peak, each category of its
breakdown, the baseline, the phase peaks, the loss's own peak) is, batch by batch, a quadratic in the
batch size once the step's shape settles: activations and inputs grow with the rows, the score matrix
with their square (checked on every shipped experiment, tests/test_estimate_series.py). So the batches
of a series are predicted in increasing order by real fake steps until four in a row lie on one
quadratic (the fourth checks the fit through the first three); the batches after them are read off that
quadratic, and the largest of them is still predicted by a fake step, a second check, because a peak
that is the larger of two quadratics (the encoders' activations, the score matrix) changes from one to
the other somewhere. When a check fails, the series goes on from the next batch with real steps.

Not a proof: a quadratic that agrees with the step at five batches could leave it between them if the
peak moved from one part of the step to another and back. The tests hold the series to a fake step at
every batch of every shipped experiment, byte for byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction

from gcbench.results.records import Prediction

FIT_POINTS = 3  # a quadratic; one more point checks it


FITTED = ("peak_bytes", "baseline_bytes", "forward_backward_peak_bytes", "optimizer_peak_bytes")


def _numbers(prediction: Prediction) -> dict[str, int] | None:
    """The byte counts of a prediction that are fitted, by name; None when any is missing. The loss's own
    peak is not one of them (it moves from one op to another at small batches): it is measured apart."""
    values: dict[str, int | None] = {name: getattr(prediction, name) for name in FITTED}
    values.update({f"breakdown.{k}": v for k, v in (prediction.breakdown or {}).items()})
    if prediction.breakdown is None or any(v is None for v in values.values()):
        return None
    return {k: v for k, v in values.items() if v is not None}


def _through(points: Sequence[tuple[int, int]], x: int) -> Fraction:
    """The polynomial of degree ``len(points) - 1`` through ``points`` at ``x`` (Lagrange, exact)."""
    total = Fraction(0)
    for i, (xi, yi) in enumerate(points):
        term = Fraction(yi)
        for j, (xj, _) in enumerate(points):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return total


def _fitted(probes: Sequence[tuple[int, Prediction]], batch: int) -> Prediction | None:
    """The prediction at ``batch`` read off the quadratic through ``probes`` (its loss's own peak left out);
    None where a number is not a whole, non-negative count of bytes or the probes differ in what they have."""
    numbers = [_numbers(p) for _, p in probes]
    if any(n is None for n in numbers) or len({tuple(sorted(n or {})) for n in numbers}) != 1:
        return None
    first = probes[0][1]
    values: dict[str, int] = {}
    for name in numbers[0] or {}:
        value = _through([(b, (n or {})[name]) for (b, _), n in zip(probes, numbers)], batch)
        if value.denominator != 1 or value < 0:
            return None
        values[name] = int(value)
    breakdown = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("breakdown.")}
    return replace(
        first,
        peak_bytes=values["peak_bytes"],
        baseline_bytes=values["baseline_bytes"],
        forward_backward_peak_bytes=values["forward_backward_peak_bytes"],
        optimizer_peak_bytes=values["optimizer_peak_bytes"],
        breakdown={k: breakdown[k] for k in first.breakdown or {}},
        loss_peak_bytes=None,
        seconds=None,
    )


def _agree(fitted: Prediction | None, real: Prediction) -> bool:
    return fitted is not None and fitted == replace(real, loss_peak_bytes=None, seconds=None)


def predict_series(
    predict: Callable[[int], Prediction],
    batch_sizes: Sequence[int],
    loss_peak: Callable[[int], int | None],
    fit: bool = True,
) -> dict[int, Prediction]:
    """``predict`` (a fake step at a batch size) for every batch of ``batch_sizes``; with ``fit``, a few
    steps and the rest read off a checked quadratic (see the module), their loss's own peak from
    ``loss_peak``. An error of either propagates."""
    batches = sorted(set(batch_sizes))
    real: dict[int, Prediction] = {}
    read: dict[int, Prediction] = {}

    def step(batch: int) -> Prediction:
        if batch not in real:
            real[batch] = predict(batch)
        return real[batch]

    for index, batch in enumerate(batches):
        step(batch)
        done, rest = batches[: index + 1], batches[index + 1 :]
        if not fit or not rest or len(done) < FIT_POINTS + 1:
            continue
        if not _agree(_fitted([(b, real[b]) for b in done[-FIT_POINTS - 1 : -1]], batch), real[batch]):
            continue
        probes = [(b, real[b]) for b in done[-FIT_POINTS:]]
        guesses = {b: _fitted(probes, b) for b in rest}
        if not _agree(guesses[rest[-1]], step(rest[-1])):  # the peak moved to another part of the step
            continue
        for b in rest[:-1]:
            started = time.perf_counter()
            guess = guesses[b]
            if guess is None:
                read[b] = step(b)
                continue
            read[b] = replace(guess, loss_peak_bytes=loss_peak(b), seconds=time.perf_counter() - started)
        break
    return {b: real.get(b) or read[b] for b in batch_sizes}
