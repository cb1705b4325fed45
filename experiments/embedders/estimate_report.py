"""reports/embedders-estimate/: peak memory of today's embedders' training steps on 24, 80 and 141 GiB, predicted.

Each experiment here has the published sizes of one model (cited in its file); ``gcbench estimate`` runs its
training step under fake tensors, so the result is the same on any machine and needs no GPU. Per model this
writes ``NAME.txt`` (the tables ``gcbench estimate`` prints) and ``NAME.json`` (``--format json``, without the
seconds each prediction took, so that the files do not change from run to run), and then ``report.md``, the
summary across models.

    .venv/bin/python experiments/embedders/estimate_report.py              # all of them
    .venv/bin/python experiments/embedders/estimate_report.py bge-base     # one, then the summary again
    .venv/bin/python experiments/embedders/estimate_report.py --render     # the .txt and report.md from the .json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from gcbench.estimate.plan import ChunkAdvice, EstimatePlan, EstimateRow, estimate_experiment
from gcbench.estimate.render import plan_dict, tables
from gcbench.experiment import load_experiment
from gcbench.results.records import Point, Prediction
from gcbench.results.units import format_bytes, parse_bytes

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "reports" / "embedders-estimate"
MODELS = ("bge-base", "modernbert-base", "qwen3-embedding-0.6b", "qwen3-embedding-8b", "clip-vit-b16", "siglip-so400m")
# name -> (experiment, overrides): the 8B once more with AdamW's for-loop implementation, whose temporaries are one
# parameter's, not a copy of all of them (foreach's, CUDA's default), which alone would fill the 141 GiB card
VARIANTS = {"qwen3-embedding-8b-foreach-off": ("qwen3-embedding-8b", {"optimizer.foreach": False})}
REPORTED = (*MODELS[:4], *VARIANTS, *MODELS[4:])
MEMORIES = tuple(parse_bytes(text, "memory") for text in ("24GiB", "80GiB", "141GiB"))
ADVICE_BATCH = 4096  # the batch the chunk advice is for


def estimate(name: str) -> None:
    file, overrides = VARIANTS.get(name, (name, {}))
    experiment = load_experiment(str(HERE / f"{file}.toml"), {k: (v, f"{name} variant") for k, v in overrides.items()})
    data = plan_dict(estimate_experiment(experiment, "cuda", MEMORIES, ADVICE_BATCH))
    for row in data["predictions"]:
        row.pop("seconds", None)  # how long a prediction took is not what the report is about
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    render(name)
    print(f"{name}: done", flush=True)


def render(name: str) -> None:
    """``NAME.txt``: the tables ``gcbench estimate`` prints, from ``NAME.json`` (wide enough for every batch)."""
    with (OUT / f"{name}.txt").open("w") as file:
        console = Console(file=file, width=200, no_color=True, highlight=False)
        for table in tables(plan_from(json.loads((OUT / f"{name}.json").read_text()))):
            console.print(table)


def plan_from(data: dict) -> EstimatePlan:
    """The plan a ``--format json`` output describes (what its tables need: peaks, errors, advice)."""
    rows = []
    for row in data["predictions"]:
        chunks = None if row["chunk_sizes"] == "-" else tuple(int(c) for c in row["chunk_sizes"].split("/"))
        breakdown = {k.removeprefix("memory_"): v for k, v in row.items() if k.startswith("memory_") and v is not None}
        prediction = (
            Prediction(
                data["target"], row["peak_bytes"], breakdown=breakdown, loss_peak_bytes=row.get("loss_peak_bytes")
            )
            if row["peak_bytes"]
            else None
        )
        rows.append(EstimateRow(Point(row["strategy"], row["batch_size"], chunks), prediction, row["error"]))
    advice = tuple(
        ChunkAdvice(
            a["strategy"],
            a["batch_size"],
            a["device_memory"],
            tuple(a["chunk_sizes"]) if a["chunk_sizes"] else None,
            a["peak_bytes"],
            tuple((tuple(c), p) for c, p in a["tried"]),
            a["reason"],
        )
        for a in data["chunk_advice"]
    )
    memories = tuple(data["device_memories"])
    return EstimatePlan(data["experiment"], data["target"], data["world_size"], memories, tuple(rows), advice)


def largest(data: dict, series: str, memory: int) -> str:
    """The largest batch of ``series`` that fits; ">= N" when that is the largest tried."""
    batch = data["largest_batch"][series][str(memory)]
    tried = max(row["batch_size"] for row in data["predictions"] if row["series"] == series)
    if batch is None:
        return "none"
    return f">= {batch}" if batch == tried else str(batch)


def summary() -> str:
    lines = [
        "# Embedders on 24, 80 and 141 GiB, predicted",
        "",
        "Made by `experiments/embedders/estimate_report.py` under fake tensors (`gcbench estimate`, target `cuda`:",
        "512-byte blocks, foreach AdamW, the fused attention kernel), bf16 autocast with float32 weights and AdamW",
        "state, full fine-tuning on one device. Text: queries of 64 tokens, passages of 512, one hard negative per",
        "query, one tied encoder; image-text: CLIP's 77 and SigLIP's 64 text tokens, 224 and 384 pixel images.",
        f"Chunk advice for a batch of {ADVICE_BATCH}: the largest chunks whose predicted peak fits.",
        "",
        "| model | parameters (float32) | device | largest batch, full | largest batch, cache | chunks for "
        f"batch {ADVICE_BATCH} | predicted peak there |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in REPORTED:
        path = OUT / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        cache = next(s for s in data["largest_batch"] if s.startswith("cache"))
        held = next(row["memory_parameters"] for row in data["predictions"] if row["memory_parameters"] is not None)
        advice = {a["device_memory"]: a for a in data["chunk_advice"]}
        for memory in MEMORIES:
            chosen = advice[memory]
            chunks = "/".join(map(str, chosen["chunk_sizes"])) if chosen["chunk_sizes"] else "none fit"
            peak = format_bytes(chosen["peak_bytes"]) if chosen["peak_bytes"] else "-"
            lines.append(
                f"| [{name}]({name}.txt) | {format_bytes(held)} | {format_bytes(memory)} | "
                f"{largest(data, 'full', memory)} | {largest(data, cache, memory)} ({cache}) | {chunks} | {peak} |"
            )
    lines += [
        "",
        '"none": even the smallest batch tried does not fit; ">= N": N is the largest batch tried. The cache',
        f"column is at the experiment's chunk size, the advice for a batch of {ADVICE_BATCH}. Chunk sizes: one per",
        "input (queries/passages, texts/images). Each model's tables (every batch's predicted peak) are in its `.txt`,",
        "its numbers in its `.json`; its experiment file cites the published config.",
        "",
    ]
    return "\n".join(lines)


def main(names: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if names == ["--render"]:
        for name in REPORTED:
            if (OUT / f"{name}.json").exists():
                render(name)
    else:
        for name in names or REPORTED:
            estimate(name)
    (OUT / "report.md").write_text(summary())


if __name__ == "__main__":
    main(sys.argv[1:])
