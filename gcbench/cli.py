"""The ``gcbench`` command: a thin shell over the Python API.

Bad input ends in one line on stderr naming the flag or key, and exit status 2; never a traceback.
A command checks all of its input before it creates a file or a folder. The flags that set experiment
keys are made from the experiment schema (:mod:`gcbench.experiment.schema`): their names and help
have one home, shared by every command that takes them.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gcbench.errors import EstimateError, UsageError, unknown_key
from gcbench.experiment import Experiment, load_experiment
from gcbench.experiment.schema import Key, find_key, flag_keys, override_value, value_from_text
from gcbench.results.units import parse_bytes
from gcbench.tune import DEFAULT_MARGIN, DEFAULT_MEASURED

console = Console(width=None if sys.stdout.isatty() else 120)

# Spellings of earlier versions, refused with the one that replaced them.
RENAMED = {
    "--dtype": "--precision",
    "--strategy": "--strategies",
    "--chunk-size": "--chunk-sizes",
    "--budget": "--memory-budget",
    "--batch": "--batch-size",
}
_command: list[str] = []  # the subcommand being run, for error lines


def name_list(flag: str, text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; an empty item is a UsageError naming ``flag``."""
    items = [part.strip() for part in text.split(",")]
    if any(not item for item in items):
        raise UsageError(f"{flag}: empty item in {text!r} (separate values by single commas)")
    return items


def schema_key(dotted: str) -> Key:
    entry = find_key(dotted)
    assert entry is not None, dotted
    return entry


def from_text(dotted: str, flag: str, text: str) -> Any:
    """A flag's text as the value of the experiment key ``dotted`` (the same parsing as ``sweep``'s flags)."""
    return value_from_text(schema_key(dotted), text, flag)


def help_of(dotted: str) -> str:
    return schema_key(dotted).help


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gcbench")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Gradient caching for contrastive training: exactness, memory and speed, measured."""
    _command[:] = [ctx.invoked_subcommand or ""]


VERIFY_WORKLOADS = ("dpr", "clip", "siglip", "simclr")


@cli.command()
@click.option(
    "--workload",
    default=None,
    help=f"Workloads, comma-separated: built-in names, or your own as package.module:function "
    f"[default: {','.join(VERIFY_WORKLOADS)}].",
)
@click.option(
    "--strategies",
    default="cache",
    show_default=True,
    help="Strategies to check against the full-batch reference, comma-separated: built-in names, or your own "
    "as package.module:ClassName (a gcbench.Strategy subclass).",
)
@click.option(
    "--precision", default=None, help=f"{help_of('sweep.precision')} [default: float32; float64 with --steps]"
)
@click.option("--device", default="auto", show_default=True, help=help_of("sweep.device"))
@click.option("--batch-size", type=int, default=12, show_default=True, help="Examples per batch (global with --nproc).")
@click.option(
    "--chunk-sizes",
    default="5",
    show_default=True,
    metavar="5|8/4",
    help=f"{help_of('sweep.chunk_sizes')}; each setting is checked.",
)
@click.option(
    "--chunk-tokens",
    default=None,
    metavar="48|32/64",
    help=f"{help_of('sweep.chunk_tokens')}; each setting is checked for the strategies that chunk by tokens.",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Max relative gradient error [default: 1e-10 float64, 1e-5 float32, 3e-2 bf16, 3e-3 fp16].",
)
@click.option("--dropout", type=float, default=None, help="Dropout of the test models [default: 0.1; 0 with --nproc].")
@click.option(
    "--loss-tile",
    type=int,
    default=0,
    show_default=True,
    help=f"{help_of('workload.loss_tile')}; the reference always computes it whole.",
)
@click.option("--seed", type=int, default=0, show_default=True, help=help_of("sweep.seed"))
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ranks: >1 checks N-rank gradients (DDP, gathered loss) against one process over the global batch.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "gloo", "nccl"]),
    default="auto",
    show_default=True,
    help=help_of("sweep.backend"),
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Train N optimizer steps with each strategy beside its full-batch reference and report, per step, the "
    "loss difference and the parameter distance [default precision float64, bound 1e-9].",
)
@click.option(
    "--experiment",
    default=None,
    help="With --steps: train the workload, model and optimizer of this experiment (a shipped name or a file).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="With --steps: write steps.json, steps.png, report.md."
)
def verify(
    workload: str | None,
    strategies: str,
    precision: str | None,
    device: str,
    batch_size: int,
    chunk_sizes: str,
    chunk_tokens: str | None,
    tolerance: float | None,
    dropout: float | None,
    loss_tile: int,
    seed: int,
    nproc: int,
    backend: str,
    steps: int | None,
    experiment: str | None,
    out: Path | None,
) -> int:
    """Check that a strategy's gradients equal full-batch ones; exit 1 if any check fails."""
    from gcbench.device import resolve_device
    from gcbench.verify import verify as run_verify

    names = name_list("--strategies", strategies)
    settings = from_text("sweep.chunk_sizes", "--chunk-sizes", chunk_sizes)
    if steps is not None or experiment is not None or out is not None:
        given = name_list("--workload", workload) if workload is not None else None
        step_options = {"strategies": names, "batch_size": batch_size, "chunk_sizes": settings, "seed": seed}
        precision = precision or "float64"
        return verify_many_steps(
            steps, given, experiment, out, precision, resolve_device(device), tolerance, dropout, nproc, step_options
        )
    workloads = name_list("--workload", workload or ",".join(VERIFY_WORKLOADS))
    precision = precision or "float32"
    options: dict[str, Any] = {
        "precision": precision,
        "device": resolve_device(device),
        "batch_size": batch_size,
        "chunk_sizes": settings,
        "tolerance": tolerance,
        "seed": seed,
        "loss_tile": loss_tile,
        "chunk_tokens": from_text("sweep.chunk_tokens", "--chunk-tokens", chunk_tokens) if chunk_tokens else None,
    }
    from gcbench.distributed import RankError, is_leader, ranks_wanted

    nproc = ranks_wanted(nproc)  # under torchrun: its ranks
    try:
        results = run_verify(workloads, names, **options, dropout=dropout, nproc=nproc, backend=backend)
    except (RankError, TimeoutError) as error:
        console.print(f"[red]distributed check failed[/red]: {error}", highlight=False)
        return 1
    failed = sum(not r.passed for r in results)
    if not is_leader():  # under torchrun rank 0 speaks for all; every rank exits alike
        return 1 if failed else 0
    ranks = f", {nproc} ranks vs 1 process" if nproc > 1 else ""
    tiled = f", loss in tiles of {loss_tile} vs whole" if loss_tile else ""
    table = Table(
        title=f"gradient equivalence vs full batch ({precision}{ranks}{tiled}, tolerance {results[0].tolerance:g})"
    )
    for column in (
        "workload",
        "strategy",
        "batch",
        "chunks",
        "max abs err",
        "max rel err",
        "cosine",
        "loss diff",
        "result",
    ):
        table.add_column(  # a user's workload or strategy is an import path: shown whole, folded if need be
            column, justify="left" if column in ("workload", "strategy") else "right", overflow="fold"
        )
    for r in results:
        c = r.comparison
        verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(
            r.workload,
            r.strategy,
            str(r.batch_size),
            r.chunk_label,
            f"{c.max_abs_err:.2e}",
            f"{c.max_rel_err:.2e}",
            f"{c.cosine:.12f}",
            f"{c.loss_diff:.2e}",
            verdict,
        )
    console.print(table)
    if failed:
        console.print(f"[red]{failed} of {len(results)} checks failed[/red]")
    return 1 if failed else 0


def verify_many_steps(
    steps: int | None,
    workloads: list[str] | None,
    experiment: str | None,
    out: Path | None,
    precision: str,
    device: Any,
    tolerance: float | None,
    dropout: float | None,
    nproc: int,
    options: dict[str, Any],
) -> int:
    """``verify --steps N``: each strategy's trajectory against the full batch's, a table, and with ``--out``
    the JSON, the figure and a page."""
    from dataclasses import replace

    from gcbench.report.steps import write_steps_report
    from gcbench.trajectory import verify_steps

    if steps is None:
        raise UsageError("--experiment and --out go with --steps N")
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if nproc > 1:
        raise UsageError("--steps runs in one process; drop --nproc")
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    configs, optimizer = None, None
    if experiment is not None:
        if workloads is not None:
            raise UsageError("--workload: --experiment names the workload already")
        chosen = load_experiment(experiment)
        config = chosen.workload
        if dropout is not None:
            config = replace(config, model=replace(config.model, dropout=dropout))
        configs, optimizer = {chosen.name: config}, chosen.optimizer
    trajectories = verify_steps(
        steps,
        workloads or list(VERIFY_WORKLOADS),
        precision=precision,
        device=device,
        tolerance=tolerance,
        dropout=dropout,
        optimizer=optimizer,
        configs=configs,
        **options,
    )
    bound = trajectories[0].tolerance
    table = Table(title=f"{steps} optimizer steps beside the full batch ({precision}, bound {bound:g})")
    for column in ("workload", "strategy", "exact", "max loss diff", "param distance, last", "max", "result"):
        table.add_column(column, justify="left" if column in ("workload", "strategy") else "right", overflow="fold")
    for t in trajectories:
        drift = max(p.param_distance for p in t.points)
        verdict = ("[green]pass[/green]" if t.passed else "[red]FAIL[/red]") if t.exact else "not exact"
        table.add_row(
            t.workload,
            t.label,
            "yes" if t.exact else "no",
            f"{max(p.loss_diff for p in t.points):.2e}",
            f"{t.points[-1].param_distance:.2e}",
            f"{drift:.2e}",
            verdict,
        )
    console.print(table)
    if out is not None:
        for path in write_steps_report(trajectories, out, _given_command()):
            console.print(f"wrote {path}", highlight=False)
    failed = sum(not t.passed for t in trajectories)
    if failed:
        console.print(f"[red]{failed} of {len(trajectories)} trajectories drifted past the bound[/red]")
    return 1 if failed else 0


def _given_command() -> str:
    """The running command as typed: its name and the options given on the command line."""
    ctx = click.get_current_context()
    given = []
    for param in ctx.command.params:
        if param.name and ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            given += [param.opts[0], str(ctx.params[param.name])]
    return " ".join(["gcbench", ctx.info_name or "verify", *given])


def _flag_option(entry: Key) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A command-line option for an experiment key, named and described by the schema."""
    assert entry.flag is not None
    param = entry.dotted.replace(".", "__")
    help_text = f"{entry.help} (sets {entry.dotted})"
    if entry.is_bool:
        return click.option(entry.flag, param, is_flag=True, default=None, help=help_text)
    return click.option(entry.flag, param, metavar=entry.metavar or "VALUE", help=help_text)


def experiment_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The experiment argument, a flag per experiment key that has one, and ``--set`` for any key."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.argument("experiment", default="quick"),
        *(_flag_option(entry) for entry in flag_keys().values()),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any experiment key, e.g. --set model.hidden=256.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_with_overrides(experiment: str, settings: Sequence[str], flags: dict[str, Any]) -> Experiment:
    """The experiment with ``--set`` and the key flags applied (flags win), all checked."""
    overrides: dict[str, tuple[Any, str]] = {}
    for text in settings:
        dotted, sep, value = text.partition("=")
        dotted = dotted.strip()
        if not sep or "." not in dotted:
            raise UsageError(f"--set: expected section.key=value, got {text!r}")
        label = f"--set {dotted}"
        entry = find_key(dotted)
        if entry is None:
            from gcbench.experiment.experiment import section_keys
            from gcbench.experiment.schema import SECTIONS

            raise unknown_key(label, dotted, (f"{s}.{k}" for s in SECTIONS for k in section_keys(s)))
        overrides[dotted] = (override_value(entry, value, label), label)
    keyed = {entry.dotted.replace(".", "__"): entry for entry in flag_keys().values()}
    for param, value in flags.items():
        if value is None or param not in keyed:
            continue
        entry = keyed[param]
        assert entry.flag is not None
        overrides[entry.dotted] = (value if entry.is_bool else value_from_text(entry, value, entry.flag), entry.flag)
    return load_experiment(experiment, overrides)


@cli.command()
@experiment_options
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Results folder [default: reports/EXPERIMENT]."
)
@click.option("--fresh", is_flag=True, help="Discard earlier results in the folder instead of resuming.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Measure again the points that ended in error or timeout; keep every other result.",
)
@click.option("--quiet", is_flag=True, help="No progress bar: one line per point (for CI logs).")
def sweep(
    experiment: str,
    settings: tuple[str, ...],
    out: Path | None,
    fresh: bool,
    retry_failed: bool,
    quiet: bool,
    **flags: Any,
) -> int:
    """Measure strategies across batch and chunk sizes, one process per point; resumes."""
    from gcbench.distributed import is_leader
    from gcbench.sweep.display import make_progress, progress_events, quiet_events, summary_tables
    from gcbench.sweep.runner import run_sweep

    if fresh and retry_failed:
        raise UsageError("--retry-failed: keeps earlier results, --fresh discards them; give one of the two")
    chosen = load_with_overrides(experiment, settings, flags)
    out_dir = out or Path("reports") / chosen.name
    if not is_leader():  # one of torchrun's ranks other than 0: it measures, rank 0 keeps and shows
        run_sweep(chosen, out_dir, fresh=fresh, retry_failed=retry_failed)
        return 0
    title = f"sweep [bold]{chosen.name}[/] ({len(chosen.points())} points) -> {out_dir}"
    display = contextlib.nullcontext(None) if quiet else make_progress(console)
    with display as progress:
        outcome = run_sweep(
            chosen,
            out_dir,
            fresh=fresh,
            retry_failed=retry_failed,
            events=quiet_events(console) if progress is None else progress_events(progress),
            on_ready=lambda: console.print(title, highlight=False),
        )
    for table in summary_tables(outcome.records):
        console.print(table)
    if outcome.records:
        from gcbench.report import write_report

        files = write_report([outcome.results_path], out_dir, memory_budget=chosen.sweep.memory_budget)
        console.print(f"report: {files.report}", highlight=False)
    rounds = f" and {outcome.timed} later timing rounds" if outcome.timed else ""
    console.print(
        f"{outcome.ran} points measured, {outcome.resumed} kept from an earlier run{rounds}; "
        f"results: {outcome.results_path}",
        highlight=False,
    )
    if outcome.interrupted:
        console.print("[yellow]interrupted[/]: finished points are kept; run the same command again to resume")
        return 130
    return 0


@cli.command()
@experiment_options
@click.option(
    "--device-memory",
    "device_memory",
    default="11GiB,24GiB,80GiB",
    show_default=True,
    help="Device memory sizes to fit, comma-separated.",
)
@click.option(
    "--target",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="The device the prediction is for (modelled on CPU fake tensors).",
)
@click.option("--batch-size", "advice_batch", type=int, help="Batch for the chunk-size advice [default: the largest].")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def estimate(
    experiment: str,
    settings: tuple[str, ...],
    device_memory: str,
    target: str,
    advice_batch: int | None,
    fmt: str,
    **flags: Any,
) -> int:
    """Predict peak memory per strategy and batch without allocating it; advise a chunk size."""
    from gcbench.estimate.plan import estimate_experiment
    from gcbench.estimate.render import render

    chosen = load_with_overrides(experiment, settings, flags)
    memories = [parse_bytes(text, "--device-memory") for text in name_list("--device-memory", device_memory)]
    if advice_batch is not None and advice_batch < 1:
        raise UsageError(f"--batch-size must be >= 1, got {advice_batch}")
    output = render(estimate_experiment(chosen, target, memories, advice_batch), fmt)
    if isinstance(output, str):
        click.echo(output, nl=not output.endswith("\n"))
    else:
        for table in output:
            console.print(table)
    return 0


@cli.command()
@experiment_options
@click.option("--batch-size", "batch_size", type=int, required=True, help="The batch to train with.")
@click.option(
    "--margin",
    type=float,
    default=DEFAULT_MARGIN,
    show_default=True,
    help="Fraction of the budget kept free of the predicted peak (the estimate's error).",
)
@click.option(
    "--measure",
    "measure",
    default=str(DEFAULT_MEASURED),
    show_default=True,
    help="How many of the best predicted settings to measure for real, or 'all' (checks the model's pick).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder whose logs/ keeps the measuring processes' output [default: reports/EXPERIMENT].",
)
def tune(
    experiment: str,
    settings: tuple[str, ...],
    batch_size: int,
    margin: float,
    measure: str,
    fmt: str,
    out: Path | None,
    **flags: Any,
) -> int:
    """The fastest exact setting (chunk size, kept graphs, or none) of a batch under --memory-budget."""
    from gcbench.tune import render_tune
    from gcbench.tune import tune as tune_batch

    chosen = load_with_overrides(experiment, settings, flags)
    every = measure.strip().lower() == "all"
    try:
        count = DEFAULT_MEASURED if every else int(measure)
    except ValueError:
        raise UsageError(f"--measure: expected a number or 'all', got {measure!r}") from None
    quiet = fmt == "json"
    result = tune_batch(
        chosen,
        batch_size,
        margin=margin,
        measure=count,
        measure_all=every,
        progress=None if quiet else (lambda line: console.print(f"[dim]{line}[/]", highlight=False)),
        logs=(out or Path("reports") / chosen.name) / "logs",
    )
    if quiet:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for item in render_tune(result):
            console.print(item, highlight=False)
    return 0 if result.winner is not None else 1


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder [default: the folder of a single RESULTS, else reports/comparison].",
)
@click.option("--show", is_flag=True, help="Also print the summary table here.")
@click.option("--memory-budget", help="Memory budget to draw and judge fits against, e.g. 11GiB.")
@click.option(
    "--batch-size", "breakdown_batch", type=int, help="Batch of the memory breakdown [default: the largest full ran]."
)
@click.option(
    "--pareto-batch",
    type=int,
    help="Batch of the time-against-memory (Pareto) figure [default: the largest where 3 settings ran ok].",
)
@click.option("--label", "labels", multiple=True, help="A name per RESULTS, in order, for legends and tables.")
def report(
    results: tuple[Path, ...],
    out: Path | None,
    show: bool,
    memory_budget: str | None,
    breakdown_batch: int | None,
    pareto_batch: int | None,
    labels: tuple[str, ...],
) -> int:
    """Figures and tables (report.md) from sweep results; several RESULTS are compared."""
    from gcbench.report import load_runs, summary_table, write_report

    budget = parse_bytes(memory_budget, "--memory-budget") if memory_budget else None
    runs = load_runs(results, labels or None)
    out_dir = out or (runs[0].source.parent if len(runs) == 1 else Path("reports") / "comparison")
    files = write_report(
        runs, out_dir, memory_budget=budget, breakdown_batch=breakdown_batch, pareto_batch=pareto_batch
    )
    if show:
        console.print(summary_table(runs, budget))
    console.print(
        f"report: {files.report} ({len(files.figures)} figure files, {len(files.tables)} table files)", highlight=False
    )
    return 0


def _error_line(message: str) -> None:
    command = f" {_command[0]}" if _command and _command[0] else ""
    click.echo(f"gcbench{command}: error: {message}", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the command, map usage errors to one line and exit status 2."""
    _command.clear()
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="gcbench", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        code = exit_.exit_code
    except click.exceptions.Abort:
        click.echo("gcbench: aborted", err=True)
        code = 130
    except click.NoSuchOption as error:
        command = f" {error.ctx.command_path.split(' ', 1)[1]}" if error.ctx and " " in error.ctx.command_path else ""
        renamed = RENAMED.get(error.option_name)
        message = f"{error.option_name} is now {renamed}" if renamed else error.format_message()
        click.echo(f"gcbench{command}: error: {message}", err=True)
        code = 2
    except click.UsageError as error:
        command = f" {error.ctx.command_path.split(' ', 1)[1]}" if error.ctx and " " in error.ctx.command_path else ""
        click.echo(f"gcbench{command}: error: {error.format_message()}", err=True)
        code = 2
    except UsageError as error:
        _error_line(str(error))
        code = 2
    except EstimateError as error:  # the model itself cannot run under fake tensors: no estimate at all
        _error_line(str(error))
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
