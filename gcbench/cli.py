"""The ``gcbench`` command: a thin shell over the Python API.

Bad input ends in one line on stderr naming the flag or key, and exit status 2; never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from gcbench.device import PRECISIONS, resolve_device
from gcbench.errors import EstimateError, UsageError

if TYPE_CHECKING:
    from gcbench.sweep.config import Experiment

console = Console(width=None if sys.stdout.isatty() else 120)


def int_list(flag: str, text: str) -> list[int]:
    """``"8,16,32"`` -> ``[8, 16, 32]``; a UsageError naming ``flag`` otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: expected at least one integer, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gcbench")
def cli() -> None:
    """Gradient caching for contrastive training: exactness, memory and speed, measured."""


@cli.command()
@click.option("--workload", default="dpr,clip,simclr", show_default=True, help="Workloads, comma-separated.")
@click.option("--strategy", default="cache", show_default=True,
              help="Strategies to check against the full-batch reference, comma-separated.")
@click.option("--dtype", "precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="float64/float32 parameters, or bf16/fp16 autocast (fp16 with a GradScaler).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--batch-size", type=int, default=12, show_default=True, help="Examples per batch.")
@click.option("--chunk-size", default="5", show_default=True, help="One chunk size, or one per input (q,p).")
@click.option("--tolerance", type=float, default=None,
              help="Max relative gradient error [default: 1e-10 float64, 1e-5 float32, 3e-2 bf16, 3e-3 fp16].")
@click.option("--dropout", type=float, default=None, help="Dropout of the test models [default: 0.1; 0 with --nproc].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ranks: >1 checks N-rank gradients (DDP, gathered loss) against one process over the global batch.")
@click.option("--backend", type=click.Choice(["auto", "gloo", "nccl"]), default="auto", show_default=True,
              help="Process-group backend with --nproc > 1 (auto: nccl on CUDA, gloo on CPU).")
def verify(workload: str, strategy: str, precision: str, device: str, batch_size: int, chunk_size: str,
           tolerance: float | None, dropout: float | None, seed: int, nproc: int, backend: str) -> int:
    """Check that a strategy's gradients equal full-batch ones; exit 1 if any check fails."""
    from gcbench.verify import verify as run_verify

    options = dict(precision=precision, device=resolve_device(device), batch_size=batch_size,
                   chunk_sizes=int_list("--chunk-size", chunk_size), tolerance=tolerance, seed=seed)
    if nproc > 1:
        from gcbench.distributed import RankError, verify_distributed

        try:
            results = verify_distributed(nproc, name_list(workload), name_list(strategy), **options,
                                         dropout=dropout or 0.0, backend=backend)
        except (RankError, TimeoutError) as error:
            console.print(f"[red]distributed check failed[/red]: {error}", highlight=False)
            return 1
    else:
        results = run_verify(name_list(workload), name_list(strategy), **options,
                             dropout=0.1 if dropout is None else dropout)
    ranks = f", {nproc} ranks vs 1 process" if nproc > 1 else ""
    table = Table(title=f"gradient equivalence vs full batch ({precision}{ranks}, tolerance {results[0].tolerance:g})")
    for column in ("workload", "strategy", "batch", "chunks", "max abs err", "max rel err", "cosine",
                   "loss diff", "result"):
        table.add_column(column, justify="left" if column in ("workload", "strategy") else "right")
    for r in results:
        c = r.comparison
        verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.workload, r.strategy, str(r.batch_size), ",".join(map(str, r.chunk_sizes)),
                      f"{c.max_abs_err:.2e}", f"{c.max_rel_err:.2e}", f"{c.cosine:.12f}", f"{c.loss_diff:.2e}",
                      verdict)
    console.print(table)
    failed = sum(not r.passed for r in results)
    if failed:
        console.print(f"[red]{failed} of {len(results)} checks failed[/red]")
    return 1 if failed else 0


SWEEP_FLAGS = {  # flag -> experiment key it overrides
    "strategies": "sweep.strategies", "batch_sizes": "sweep.batch_sizes", "chunk_sizes": "sweep.chunk_sizes",
    "device": "sweep.device", "precision": "sweep.precision", "memory_budget": "sweep.memory_budget",
    "repeats": "sweep.repeats", "warmup": "sweep.warmup", "seed": "sweep.seed", "threads": "sweep.threads",
    "timeout": "sweep.timeout", "nproc": "sweep.nproc", "backend": "sweep.backend",
}


def experiment_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The experiment argument and the flags that override its fields (shared by sweep and estimate)."""
    options = [
        click.argument("experiment", default="quick"),
        click.option("--strategies", help="Comma-separated strategies, e.g. full,cache."),
        click.option("--batch-sizes", help="Comma-separated batch sizes, e.g. 8,16,32."),
        click.option("--chunk-sizes", help="Chunk settings, e.g. 4,8; per input q/p: 16/8,32/16."),
        click.option("--device", help="auto, cpu, cuda, cuda:1, ..."),
        click.option("--precision", help="float32, float64, bf16 or fp16 (autocast)."),
        click.option("--memory-budget", help="e.g. 11GiB; points over it are out of memory."),
        click.option("--repeats", type=int, help="Timed steps per point."),
        click.option("--warmup", type=int, help="Untimed steps before measuring."),
        click.option("--seed", type=int),
        click.option("--threads", type=int, help="torch threads per point (0: torch's default)."),
        click.option("--timeout", type=float, help="Seconds per point before it is ended as timeout."),
        click.option("--nproc", type=int, help="Ranks per point (DDP); batch sizes are global, split evenly."),
        click.option("--backend", help="auto, gloo or nccl: the process-group backend with --nproc > 1."),
        click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="Override any experiment key, e.g. --set model.hidden=256."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_with_overrides(experiment: str, settings: Sequence[str], flags: dict[str, Any]) -> Experiment:
    from gcbench.sweep.config import load_experiment, parse_override

    overrides: dict[str, tuple[Any, str]] = {}
    for text in settings:
        key, value = parse_override(text)
        overrides[key] = (value, f"--set {key}")
    for name, value in flags.items():
        if value is not None and name in SWEEP_FLAGS:
            overrides[SWEEP_FLAGS[name]] = (value, "--" + name.replace("_", "-"))
    return load_experiment(experiment, overrides)


@cli.command()
@experiment_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder [default: reports/EXPERIMENT].")
@click.option("--fresh", is_flag=True, help="Discard earlier results in the folder instead of resuming.")
@click.option("--quiet", is_flag=True, help="No progress bar: one line per point (for CI logs).")
@click.option("--predict", is_flag=True, default=None,
              help="Record a predicted peak beside each measured one; skip points predicted far over the budget.")
def sweep(experiment: str, settings: tuple[str, ...], out: Path | None, fresh: bool, quiet: bool,
          predict: bool | None, **flags: Any) -> int:
    """Measure strategies across batch and chunk sizes, one process per point; resumes."""
    from gcbench.sweep.display import make_progress, progress_events, quiet_events, summary_tables
    from gcbench.sweep.runner import run_sweep

    chosen = load_with_overrides(experiment, (*settings, *(["sweep.predict=true"] if predict else [])), flags)
    out_dir = out or Path("reports") / chosen.name
    console.print(f"sweep [bold]{chosen.name}[/] ({len(chosen.points())} points) -> {out_dir}", highlight=False)
    if quiet:
        outcome = run_sweep(chosen, out_dir, fresh=fresh, events=quiet_events(console))
    else:
        with make_progress(console) as progress:
            outcome = run_sweep(chosen, out_dir, fresh=fresh, events=progress_events(progress))
    for table in summary_tables(outcome.records):
        console.print(table)
    if outcome.records:
        from gcbench.report import write_report

        files = write_report([outcome.results_path], out_dir, memory_budget=chosen.sweep.memory_budget)
        console.print(f"report: {files.report}", highlight=False)
    console.print(f"{outcome.ran} points measured, {outcome.resumed} kept from an earlier run; "
                  f"results: {outcome.results_path}", highlight=False)
    if outcome.interrupted:
        console.print("[yellow]interrupted[/]: finished points are kept; run the same command again to resume")
        return 130
    return 0


@cli.command()
@experiment_options
@click.option("--device-memory", "device_memory", default="11GiB,24GiB,80GiB", show_default=True,
              help="Device memory sizes to fit, comma-separated.")
@click.option("--target", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="The device the prediction is for (modelled on CPU fake tensors).")
@click.option("--batch", "advice_batch", type=int, help="Batch for the chunk-size advice [default: the largest].")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def estimate(experiment: str, settings: tuple[str, ...], device_memory: str, target: str, advice_batch: int | None,
             fmt: str, **flags: Any) -> int:
    """Predict peak memory per strategy and batch without allocating it; advise a chunk size."""
    from gcbench.estimate.plan import estimate_experiment
    from gcbench.estimate.render import render
    from gcbench.sweep.config import parse_bytes

    chosen = load_with_overrides(experiment, settings, flags)
    memories = [parse_bytes(text, "--device-memory") for text in name_list(device_memory)]
    if not memories:
        raise UsageError("--device-memory: give at least one size, e.g. 11GiB")
    if advice_batch is not None and advice_batch < 1:
        raise UsageError(f"--batch must be >= 1, got {advice_batch}")
    output = render(estimate_experiment(chosen, target, memories, advice_batch), fmt)
    if isinstance(output, str):
        click.echo(output, nl=not output.endswith("\n"))
    else:
        for table in output:
            console.print(table)
    return 0


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder [default: the folder of a single RESULTS, else reports/comparison].")
@click.option("--show", is_flag=True, help="Also print the summary table here.")
@click.option("--budget", help="Memory budget to draw and judge fits against, e.g. 11GiB.")
@click.option("--batch", "breakdown_batch", type=int, help="Batch of the memory breakdown [default: the largest full ran].")
@click.option("--label", "labels", multiple=True, help="A name per RESULTS, in order, for legends and tables.")
def report(results: tuple[Path, ...], out: Path | None, show: bool, budget: str | None,
           breakdown_batch: int | None, labels: tuple[str, ...]) -> int:
    """Figures and tables (report.md) from sweep results; several RESULTS are compared."""
    from gcbench.report import load_runs, summary_table, write_report
    from gcbench.sweep.config import parse_bytes

    memory_budget = parse_bytes(budget, "--budget") if budget else None
    runs = load_runs(results, labels or None)
    out_dir = out or (runs[0].source.parent if len(runs) == 1 else Path("reports") / "comparison")
    files = write_report(runs, out_dir, memory_budget=memory_budget, breakdown_batch=breakdown_batch)
    if show:
        console.print(summary_table(runs, memory_budget))
    console.print(f"report: {files.report} ({len(files.figures)} figure files, {len(files.tables)} table files)",
                  highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the command, map usage errors to one line and exit status 2."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="gcbench", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        code = exit_.exit_code
    except click.exceptions.Abort:
        click.echo("gcbench: aborted", err=True)
        code = 130
    except click.UsageError as error:
        command = f" {error.ctx.command_path.split(' ', 1)[1]}" if error.ctx and " " in error.ctx.command_path else ""
        click.echo(f"gcbench{command}: error: {error.format_message()}", err=True)
        code = 2
    except UsageError as error:
        click.echo(f"gcbench: error: {error}", err=True)
        code = 2
    except EstimateError as error:  # the model itself cannot run under fake tensors: no estimate at all
        click.echo(f"gcbench estimate: error: {error}", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
