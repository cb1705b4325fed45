"""Records as a flat table (pandas): one row per point, one column per measured quantity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from gcbench.measure.tracker import CATEGORIES
from gcbench.results.records import Point, Record

TRAITS = ("exact", "uses_chunks", "caches_representations", "reference", "global_negatives")
MEMORY_COLUMNS = (
    "peak_bytes",
    "baseline_bytes",
    "step_peak_bytes",
    "forward_backward_peak_bytes",
    "optimizer_peak_bytes",
    "reserved_bytes",
    "tracked_peak_bytes",
    "loss_peak_bytes",
)


def record_row(record: Record) -> dict[str, Any]:
    p, memory, time, eq = record.point, record.memory, record.time, record.equivalence
    breakdown = (memory.breakdown if memory else None) or {}
    prediction, distributed, traits, paired = record.prediction, record.distributed, record.traits, record.paired
    noise = [*(time.noise if time else ()), *(f"ratio: {reason}" for reason in (paired.noise if paired else ()))]
    crowded = [record.env.oversubscribed] if record.env is not None and record.env.oversubscribed else []
    return {
        "experiment": record.experiment,
        "point": p.id,
        "strategy": p.strategy,
        "batch_size": p.batch_size,
        "chunk_sizes": p.chunk_label,
        "keep_graphs": p.keep_graphs,
        "series": p.series,
        "status": record.status,
        "reason": record.reason,
        "loss_tile": record.loss_tile,
        **{column: getattr(memory, column, None) if memory else None for column in MEMORY_COLUMNS},
        **{f"memory_{category}": breakdown.get(category) for category in CATEGORIES},
        "memory_method": memory.method if memory else None,
        "predicted_peak_bytes": prediction.peak_bytes if prediction else None,
        "predicted_loss_peak_bytes": prediction.loss_peak_bytes if prediction else None,
        "time_median_s": time.median_s if time else None,
        "time_q1_s": time.q1_s if time else None,
        "time_q3_s": time.q3_s if time else None,
        "time_iqr_s": time.iqr_s if time else None,
        "examples_per_s": time.examples_per_s if time else None,
        "time_low_s": time.low_s if time else None,
        "time_high_s": time.high_s if time else None,
        "time_rounds": len(time.rounds) if time else None,
        "time_samples": len(time.samples_s) if time else None,
        "load_average_1m": (time.load_average_1m if time else None) or record.env.load_average_1m,
        "paired_reference": paired.reference if paired else None,
        "paired_ratio": paired.ratio if paired else None,
        "paired_low": paired.low if paired else None,
        "paired_high": paired.high if paired else None,
        "time_cpu_median_s": time.cpu_median_s if time else None,
        "paired_cpu_ratio": paired.cpu_ratio if paired else None,
        "paired_cpu_low": paired.cpu_low if paired else None,
        "paired_cpu_high": paired.cpu_high if paired else None,
        "torch_threads": record.env.torch_threads,
        "noisy": bool(noise),
        "noise": "; ".join(noise + crowded) or None,  # an oversubscribed start is said beside the times it stretched
        "grad_reference": eq.reference if eq else None,
        "grad_max_abs_err": eq.max_abs_err if eq else None,
        "grad_max_rel_err": eq.max_rel_err if eq else None,
        "grad_cosine": eq.cosine if eq else None,
        "loss_diff": eq.loss_diff if eq else None,
        "grad_note": eq.note if eq else None,
        "world_size": distributed.world_size if distributed else 1,
        "rank_peak_max_bytes": distributed.peak_max_bytes if distributed else None,
        "rank_peak_mean_bytes": distributed.peak_mean_bytes if distributed else None,
        **{f"is_{name}": getattr(traits, name) if traits else None for name in TRAITS},
        "device": record.env.device,
        "device_name": record.env.device_name,
        "torch": record.env.torch,
        "git_commit": record.env.git_commit,
        "finished_at": record.finished_at,
        "wall_s": record.wall_s,
    }


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    rows = [record_row(r) for r in records]
    columns = list(record_row(Record("", "", Point("full", 1), "skipped")))
    return pd.DataFrame(rows, columns=columns)
