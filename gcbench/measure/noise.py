"""When a time is not to be trusted, and why: each reason one short phrase a table can show.

- **spread**: a round's interquartile range is over 10% of its median (torch.utils.benchmark's
  ``Measurement`` warns at the same level);
- **rounds disagree**: the fastest and the slowest round differ by more than 5%, and by more than
  their interquartile ranges (their middle halves do not overlap): the process's own state (its
  allocator, where its pages landed) moved the time, not what it timed;
- **slow start**: a round's first sample lies past the outer Tukey fence of the others (Q3 + 3 IQR)
  and over 10% above their median: warm-up was not enough (hyperfine warns of a slow first run);
- **busy machine**: the 1-minute load average was over 1.5 per core while the point ran (a point's
  own threads count towards it: up to 1 per core).
"""

from __future__ import annotations

from collections.abc import Sequence

from gcbench.measure.stats import quartiles, spread

NOISY_SPREAD = 0.10
ROUNDS_DISAGREE = 0.05
SLOW_START = 1.10
BUSY_LOAD_PER_CORE = 1.5
MIN_SAMPLES = 4  # fewer in a round say nothing about its spread or its first sample


def noise_reasons(
    rounds: Sequence[Sequence[float]],
    *,
    load_average: float | None = None,
    cores: int | None = None,
) -> tuple[str, ...]:
    """Why the samples (one sequence per round, in the order taken) are noisy; empty when they are not."""
    reasons = []
    several = len(rounds) > 1

    def which(index: int) -> str:
        return f" in round {index + 1}" if several else ""

    spreads = [(i, spread(r)) for i, r in enumerate(rounds) if len(r) >= MIN_SAMPLES]
    wide = [(i, s) for i, s in spreads if s > NOISY_SPREAD]
    if wide:
        i, s = max(wide, key=lambda item: item[1])
        more = f" (and {len(wide) - 1} more)" if len(wide) > 1 else ""
        reasons.append(f"spread {s:.0%}{which(i)}{more}")
    filled = [r for r in rounds if len(r)]
    if len(filled) > 1:
        summaries = [quartiles(r) for r in filled]
        fast = min(summaries, key=lambda q: q[1])
        slow = max(summaries, key=lambda q: q[1])
        apart = slow[1] / fast[1] - 1
        if apart > ROUNDS_DISAGREE and slow[0] > fast[2]:
            reasons.append(f"rounds disagree by {apart:.0%}")
    for i, r in enumerate(rounds):
        if len(r) < MIN_SAMPLES:
            continue
        q1, median, q3 = quartiles(r[1:])
        if r[0] > q3 + 3 * (q3 - q1) and r[0] > SLOW_START * median:
            reasons.append(f"slow start{which(i)} ({r[0] / median:.1f}× the median)")
            break
    if load_average is not None and cores and load_average > BUSY_LOAD_PER_CORE * cores:
        reasons.append(f"busy machine (load {load_average:.1f} on {cores} cores)")
    return tuple(reasons)
