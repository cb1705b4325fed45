"""One GradCache step per data-parallel engine on 2 CPU ranks (gloo): memory, collectives, time, gradient error.

    PYTHONPATH=. python experiments/sharded-step.py [--out reports/sharded-step]

The encoder is an MLP tower (6 blocks of width 256, two towers, dpr-like in-batch softmax over the global
batch of 64, chunks of 8). For each engine (DDP; FSDP2 reducing once per step, after every chunk, and with
parameters kept unsharded; DeepSpeed ZeRO-1, 2 and 3, once per step and per chunk) every rank reports:

- the step's peak: bytes of the tensors created during the step at its highest point, as gcbench's
  dispatch-level tracker counts them (the weights, optimizer state and inputs that exist before the step are
  not in it; accumulated gradients, unsharded gradients, all-gather buffers and activations are);
- the collectives of the step, calls and bytes by kind (:class:`gcbench.distributed.collectives.CountCollectives`);
- the step's wall time, median of 5 after one warm-up (the machine is shared: the load average is recorded);
- DeepSpeed's reduce and all-gather buckets at 2^18 elements (its default, 5e8, is a 2 GB buffer per
  rank that would hide everything else at this size);
- the gradients' largest relative error against one process over the global batch, in float32 (DeepSpeed
  has no float64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcbench import GradCache
from gcbench.distributed import GatherLoss, RankInfo, launch, shard
from gcbench.distributed.collectives import CountCollectives
from gcbench.distributed.sharding import deepspeed_engine, full_gradients, shard_fsdp2
from gcbench.losses import InBatchSoftmax
from gcbench.measure.equivalence import compare, gradients
from gcbench.measure.tracker import MemoryTracker

WIDTH, DEPTH, BATCH, CHUNK, REPEATS = 256, 6, 64, 8, 5
BUCKET = 2**18  # DeepSpeed's reduce and all-gather buckets, in elements (1 MiB of float32)
ENGINES = [
    ("ddp", {}),
    ("fsdp2", {"reduce": "step"}),
    ("fsdp2", {"reduce": "chunk"}),
    ("fsdp2", {"reduce": "step", "keep_unsharded": True}),
    ("zero1", {"reduce": "step"}),
    ("zero2", {"reduce": "step"}),
    ("zero2", {"reduce": "chunk"}),
    ("zero3", {"reduce": "step"}),
    ("zero3", {"reduce": "chunk"}),
]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class Tower(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, WIDTH, generator=generator) for _ in range(2)]


def wrap(engine: str, seed: int, info: RankInfo) -> nn.Module:
    tower = Tower(seed)
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(tower)
    if engine == "fsdp2":
        return shard_fsdp2(tower)
    buckets = {"reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}  # default 5e8 elements: 2 GB
    return deepspeed_engine(tower, int(engine[-1]), info.device, micro_batch=BATCH // info.world_size, zero=buckets)  # type: ignore[no-any-return]


def one_engine(info: RankInfo, engine: str, options: dict[str, Any]) -> dict[str, Any]:
    local = shard(batches(), info.rank, info.world_size)
    times = []
    for repeat in range(REPEATS + 2):  # fresh weights and gradients each time: every step is a first one
        towers = [wrap(engine, seed, info) for seed in (0, 1)]
        cache = GradCache(towers, GatherLoss(InBatchSoftmax(0.5)), CHUNK, **options)
        torch.distributed.barrier()
        if repeat == REPEATS + 1:  # the last, tracked and counted (the tracker slows the step: not timed)
            with CountCollectives() as counted, MemoryTracker() as tracker:
                value = cache(*local)
            break
        started = time.perf_counter()
        cache(*local)
        torch.distributed.barrier()
        if repeat:  # the first is the warm-up
            times.append(time.perf_counter() - started)
    grads = [g.double() for t in towers for g in full_gradients(t)]
    reference = [Tower(0).double(), Tower(1).double()]
    x, y = (b.double() for b in batches())
    ref_loss = InBatchSoftmax(0.5)(reference[0](x), reference[1](y))
    ref_loss.backward()
    comparison = compare(
        grads, gradients([p for m in reference for p in m.parameters()]), float(value), float(ref_loss)
    )
    return {
        "engine": engine,
        "options": options,
        "peak_bytes": tracker.result().total,
        "collectives": counted.collectives.to_dict(),
        "median_s": statistics.median(times),
        "spread_s": [min(times), max(times)],
        "max_rel_err": comparison.max_rel_err,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="reports/sharded-step")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    for engine, options in ENGINES:
        per_rank = launch(one_engine, 2, (engine, options), threads=1)
        rows.append({**per_rank[0], "rank_peak_bytes": [r["peak_bytes"] for r in per_rank]})
        print(engine, options, rows[-1]["rank_peak_bytes"], rows[-1]["collectives"]["calls"], flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    report = {
        "setting": {"width": WIDTH, "blocks": DEPTH, "towers": 2, "global_batch": BATCH, "chunk": CHUNK, "ranks": 2},
        "torch": torch.__version__,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    s = report["setting"]
    lines = [
        "# One GradCache step per engine, 2 CPU ranks (gloo)",
        "",
        f"Two MLP towers of {s['blocks']} residual blocks, width {s['width']}; global batch {s['global_batch']}, "
        f"chunks of {s['chunk']} (4 per tower per rank). torch {report['torch']}; produced by "
        "`experiments/sharded-step.py`. Load average before/after: "
        f"{' '.join(report['loadavg_before'])} / {' '.join(report['loadavg_after'])} (a shared machine: times are "
        "not quiet-machine figures).",
        "",
        "Peak: bytes created during the step at its highest, on rank 0 (resident weights and optimizer state "
        "excluded). Collectives: calls (MiB) per step on rank 0, the gathers of the loss included. Error: "
        "gradients against one process over the global batch in float64.",
        "",
        "| engine | reduce | peak (MiB) | all-gather | reduce-scatter | all-reduce | broadcast "
        "| step (s), median [min, max] | max rel. error |",
        "| --- | --- | ---: | --- | --- | --- | --- | --- | ---: |",
    ]
    for row in report["rows"]:
        calls, nbytes = row["collectives"]["calls"], row["collectives"]["bytes"]

        def cell(kind: str, calls: dict[str, int] = calls, nbytes: dict[str, int] = nbytes) -> str:
            return f"{calls[kind]} ({nbytes[kind] / 2**20:.2f})" if kind in calls else "-"

        options = row["options"]
        reduce = options.get("reduce", "step") + (", unsharded" if options.get("keep_unsharded") else "")
        lo, hi = row["spread_s"]
        lines.append(
            f"| {row['engine']} | {reduce} | {row['peak_bytes'] / 2**20:.2f} | {cell('all_gather')} | "
            f"{cell('reduce_scatter')} | {cell('all_reduce')} | {cell('broadcast')} | "
            f"{row['median_s']:.3f} [{lo:.3f}, {hi:.3f}] | {row['max_rel_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
