"""``gcbench.report``: the files it writes, the numbers behind its figures and tables, and results
files that are odd (every status, repeats, one batch, several ranks) or not usable at all.

Fixtures in tests/fixtures/report were cut from a real ``quick`` sweep on CPU, with points crafted
for the statuses that sweep did not produce; mixed.jsonl is read with a 64 MiB budget.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from gcbench.errors import UsageError
from gcbench.report import ReportFiles, Run, load_runs, summary_table, write_report
from gcbench.report.data import ReportData, pareto_frontier
from gcbench.report.figures import (
    breakdown_figure,
    caching_cost_figure,
    gradient_error_figure,
    largest_batch_figure,
    memory_figure,
    pareto_figure,
    report_figures,
    throughput_figure,
)
from gcbench.report.headline import headline
from gcbench.report.tables import every_point, pareto, report_tables, summary
from gcbench.results import Point, Record, ResultsStore, current, time_result
from gcbench.results.units import format_bytes
from gcbench.strategies import resolve_strategy

FIXTURES = Path(__file__).parent / "fixtures" / "report"
MIXED = FIXTURES / "mixed.jsonl"
MiB = 2**20
BUDGET = 64 * MiB
FIGURES = (
    "memory",
    "largest-batch",
    "breakdown",
    "throughput",
    "caching-cost",
    "pareto",
    "gradient-error",
    "prediction",
)
TABLES = ("summary", "pareto", "points", "runs")


def records(path: Path) -> dict[str, Record]:
    """The fixture's records by point id, read without the report code (the expected values)."""
    return {r.point.id: r for r in ResultsStore(path).load(repair=False)}


def mixed_data(budget: int | None = BUDGET) -> ReportData:
    return ReportData.of(load_runs([MIXED]), budget)


def empty_file(path: Path) -> Path:
    path.touch()
    return path


def lines_by_label(figure) -> dict[str, np.ndarray]:
    return {line.get_label(): line.get_xydata() for line in figure.axes[0].get_lines()}


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report([MIXED], tmp_path_factory.mktemp("report"), memory_budget=BUDGET)


# Files ------------------------------------------------------------------------------------------------


def test_every_promised_file_is_written_and_linked(mixed_report: ReportFiles) -> None:
    out = mixed_report.report.parent
    expected = {f"figures/{name}.{ext}" for name in FIGURES for ext in ("png", "svg")}
    expected |= {f"tables/{name}.{ext}" for name in TABLES for ext in ("csv", "md", "tex")}
    written = {str(path.relative_to(out)) for path in (*mixed_report.figures, *mixed_report.tables)}
    assert written == expected
    assert all(path.stat().st_size > 0 for path in mixed_report.all)
    text = mixed_report.report.read_text()
    for relative in expected:
        assert f"]({relative})" in text, relative
    for name in FIGURES:
        assert f"](figures/{name}.png)" in text.split("![", 1)[1]  # embedded, not only linked
    with open(out / "figures" / "memory.png", "rb") as f:
        width, _ = struct.unpack(">II", f.read(24)[16:24])
    assert width == 800  # README width
    assert (out / "tables" / "points.tex").read_text().count("\\toprule") >= 1
    assert "| series" in (out / "tables" / "summary.md").read_text()


def test_report_md_starts_with_a_headline_from_the_data(mixed_report: ReportFiles) -> None:
    first = mixed_report.report.read_text().splitlines()
    assert first[0] == "# gcbench report: quick"
    bullets = [line for line in first[1:6] if line.startswith("- ")]
    assert len(bullets) == 3
    peak = {point: record.memory.peak_bytes for point, record in records(MIXED).items() if record.memory}
    full_32, cache_32 = peak["full batch=32 chunks=-"], peak["cache batch=32 chunks=8"]
    assert peak["full batch=64 chunks=-"] > BUDGET >= full_32  # what the sentence is about, in the fixture
    assert bullets[0] == (
        f"- full went over the {format_bytes(BUDGET)} budget at batch 64 "
        f"({format_bytes(peak['full batch=64 chunks=-'])}); its largest batch was 32 at {format_bytes(full_32)}."
    )
    assert bullets[1] == (
        f"- cache (chunk 8) ran batch 128 in {format_bytes(peak['cache batch=128 chunks=8'])}; at batch 32, the "
        f"largest where both fit, it needed {full_32 / cache_32:.1f}× less than full ({format_bytes(cache_32)} "
        f"against {format_bytes(full_32)})."
    )


# Figures ---------------------------------------------------------------------------------------------


def test_memory_figure_has_one_line_per_series_through_its_ok_points() -> None:
    expected = records(MIXED)
    figure = memory_figure(mixed_data())
    lines = lines_by_label(figure)
    assert set(lines) == {"full", "cache (chunk 8)", "accumulate (chunk 8)", "budget 64.00 MiB"}  # checkpoint: no ok
    full = [(b, expected[f"full batch={b} chunks=-"].memory.peak_bytes / MiB) for b in (8, 16, 32)]
    np.testing.assert_allclose(lines["full"], full)
    cache = [(b, expected[f"cache batch={b} chunks=8"].memory.peak_bytes / MiB) for b in (8, 16, 32, 64, 128)]
    np.testing.assert_allclose(lines["cache (chunk 8)"], cache)
    np.testing.assert_allclose(
        lines["accumulate (chunk 8)"], [(8, expected["accumulate batch=8 chunks=8"].memory.peak_bytes / MiB)]
    )
    assert lines["budget 64.00 MiB"][:, 1].tolist() == [64, 64]
    ax = figure.axes[0]
    assert ax.get_ylabel() == "peak memory (MiB)" and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32", "64", "128"]
    # Out of memory: full at 64 at the peak it reached; checkpoint at 16 (peak unknown) on the top edge.
    marks = [collection.get_offsets().tolist() for collection in ax.collections]
    assert [[64, expected["full batch=64 chunks=-"].memory.peak_bytes / MiB]] in marks
    assert [[16, 1.0]] in marks
    assert "peak unknown" in [text.get_text() for text in ax.texts]


def test_a_series_keeps_its_colour_and_a_run_its_line_style_in_every_figure(tmp_path: Path) -> None:
    for folder in ("cpu", "gpu"):
        (tmp_path / folder).mkdir()
        shutil.copy(MIXED, tmp_path / folder / "results.jsonl")
    data = ReportData.of(load_runs([tmp_path / "cpu", tmp_path / "gpu"]), BUDGET)
    assert data.look.runs == ("quick (cpu)", "quick (gpu)")
    styles: dict[str, set] = {}
    for figure in (
        memory_figure(data),
        throughput_figure(data),
        gradient_error_figure(data),
        caching_cost_figure(data),
    ):
        for line in figure.axes[0].get_lines():
            series, _, run = line.get_label().partition(" [")
            if run:
                styles.setdefault(series, set()).add((line.get_color(), run, line.get_linestyle()))
        legend = [text.get_text() for text in figure.legends[0].get_texts()]
        assert "run: quick (cpu)" in legend and "run: quick (gpu)" in legend
    assert set(styles) >= {"full", "cache (chunk 8)", "accumulate (chunk 8)"}
    for series, seen in styles.items():
        assert len({colour for colour, _, _ in seen}) == 1, series  # one colour per series
        assert {(run, style) for _, run, style in seen} == {("quick (cpu)]", "-"), ("quick (gpu)]", "--")}


def test_throughput_error_bars_span_the_step_time_quartiles() -> None:
    expected = records(MIXED)["full batch=16 chunks=-"].time
    figure = throughput_figure(mixed_data())
    (bars,) = [c for c in figure.axes[0].containers if c.get_label() == "full"]
    segment = bars.lines[2][0].get_segments()[1]  # batch 16
    np.testing.assert_allclose(segment[:, 1], [16 / expected.q3_s, 16 / expected.q1_s])


def test_breakdown_defaults_to_the_largest_batch_full_ran_and_stacks_the_categories() -> None:
    data = mixed_data()
    assert data.breakdown_batch(None) == 32
    figure = breakdown_figure(data, 8)
    ax = figure.axes[0]
    assert "batch 8" in ax.get_title("left")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["full", "cache (chunk 8)", "accumulate (chunk 8)"]
    breakdown = records(MIXED)["full batch=8 chunks=-"].memory.breakdown
    full_bar = [patch.get_width() for patch in ax.patches if patch.get_y() < 0]  # the first bar, centred on 0
    assert sum(full_bar) == pytest.approx(sum(breakdown.values()) / MiB)
    with pytest.raises(UsageError, match="breakdown batch 100: no point ran ok"):
        data.breakdown_batch(100)


def test_largest_batch_figure_marks_series_that_never_fit() -> None:
    ax = largest_batch_figure(mixed_data()).axes[0]
    texts = [t.get_text().strip() for t in ax.texts]
    assert texts == ["32", "128 (the largest tried)", "8", "none fit"]
    assert ax.get_title("left") == "Largest batch within the 64.00 MiB budget"


def test_gradient_error_draws_exact_zeros_at_a_floor_and_says_so() -> None:
    figure = gradient_error_figure(mixed_data())
    lines = lines_by_label(figure)
    floor_label = next(label for label in lines if label.startswith("exactly 0"))
    floor = lines[floor_label][0, 1]
    assert 0 < floor < 8e-8
    assert lines["cache (chunk 8)"][0].tolist() == [8, floor]  # its error at batch 8 is exactly 0
    assert lines["cache (chunk 8)"][1, 1] == records(MIXED)["cache batch=16 chunks=8"].equivalence.max_rel_err
    assert figure.axes[0].get_yscale() == "log"


def test_caching_cost_is_step_time_over_full_where_both_ran() -> None:
    expected = records(MIXED)
    lines = lines_by_label(caching_cost_figure(mixed_data()))
    time = {point: record.time.median_s for point, record in expected.items() if record.time}
    ratio = [(b, time[f"cache batch={b} chunks=8"] / time[f"full batch={b} chunks=-"]) for b in (8, 16, 32)]
    np.testing.assert_allclose(lines["cache (chunk 8)"], ratio)
    assert lines["as fast as full"][:, 1].tolist() == [1, 1]


def test_prediction_figure_only_when_predictions_exist() -> None:
    assert "prediction" in report_figures(mixed_data())
    plain = [replace(r, prediction=None) for r in records(MIXED).values()]
    assert "prediction" not in report_figures(ReportData.of([Run("quick", MIXED, tuple(plain))]))


# Tables ----------------------------------------------------------------------------------------------


def test_summary_per_series() -> None:
    frame = summary(mixed_data()).frame.set_index("series")
    assert list(frame.columns) == [
        "largest batch within 64.00 MiB",
        "peak memory there (MiB)",
        "examples/s there",
        "max grad rel err",
        "ok",
        "oom",
        "error",
        "timeout",
        "skipped",
    ]
    expected = records(MIXED)
    full = frame.loc["full"]
    assert full["largest batch within 64.00 MiB"] == 32
    assert full["peak memory there (MiB)"] == pytest.approx(expected["full batch=32 chunks=-"].memory.peak_bytes / MiB)
    assert full["examples/s there"] == pytest.approx(expected["full batch=32 chunks=-"].time.examples_per_s)
    assert full[["ok", "oom", "error", "timeout", "skipped"]].tolist() == [3, 1, 0, 0, 1]
    cache_errors = [expected[f"cache batch={b} chunks=8"].equivalence.max_rel_err for b in (8, 16, 32, 64, 128)]
    assert frame.loc["cache (chunk 8)", "max grad rel err"] == max(cache_errors)
    assert frame.loc["accumulate (chunk 8)", ["ok", "timeout"]].tolist() == [1, 1]
    checkpoint = frame.loc["checkpoint"]  # never ran ok
    assert np.isnan(checkpoint["largest batch within 64.00 MiB"])
    assert checkpoint[["ok", "oom", "error"]].tolist() == [0, 1, 1]


def test_every_point_with_predictions_and_reasons() -> None:
    table = every_point(mixed_data())
    frame = table.frame
    assert list(frame.columns) == [
        "series",
        "batch",
        "chunks",
        "status",
        "reason",
        "peak memory (MiB)",
        "step time (ms)",
        "step time IQR (ms)",
        "examples/s",
        "grad rel err",
        "predicted peak (MiB)",
        "prediction error (%)",
    ]
    assert len(frame) == 14
    row = frame[(frame["series"] == "cache (chunk 8)") & (frame["batch"] == 64)].iloc[0]
    assert row["prediction error (%)"] == pytest.approx(20, abs=1e-6)
    time = records(MIXED)["cache batch=64 chunks=8"].time
    assert row["step time (ms)"] == pytest.approx(time.median_s * 1e3)
    assert row["step time IQR (ms)"] == pytest.approx((time.q3_s - time.q1_s) * 1e3)
    statuses = dict(zip(frame["series"] + " " + frame["batch"].astype(str), frame["status"]))
    assert statuses["full 128"] == "skipped" and statuses["accumulate (chunk 8) 16"] == "timeout"
    text = table.text()
    assert text.loc[frame["status"] == "timeout", "reason"].item() == "no result after 300 s"
    assert text.loc[frame["status"] == "error", "peak memory (MiB)"].item() == "-"
    assert "| reason" in table.markdown() and "\\begin{longtable}" not in table.latex()


def test_summary_table_for_the_terminal() -> None:
    table = summary_table(load_runs([MIXED]), BUDGET)
    assert table.row_count == 4
    assert [column.header for column in table.columns][:2] == ["series", "largest batch within 64.00 MiB"]


# Odd results -----------------------------------------------------------------------------------------


def test_repeated_points_are_merged_into_medians(tmp_path: Path) -> None:
    files = write_report([FIXTURES / "repeats.jsonl"], tmp_path)
    frame = every_point(ReportData.of(load_runs([FIXTURES / "repeats.jsonl"]))).frame.set_index("series")
    full = frame.loc["full"]
    assert full["runs"] == 3 and full["status"] == "ok"  # two ok runs, one out of memory
    runs = [r for r in ResultsStore(FIXTURES / "repeats.jsonl").load(repair=False) if r.point.strategy == "full"]
    ok = [r.time.median_s for r in runs if r.status == "ok" and r.time]
    assert len(runs) == 3 and len(ok) == 2
    assert full["step time (ms)"] == pytest.approx(float(np.median(ok)) * 1e3)
    assert full["reason"] == "2 of 3 runs ok, others 1 oom"
    assert frame.loc["cache (chunk 8)", "runs"] == 2
    assert "2 points were recorded more than once" in files.report.read_text()


def test_one_batch_size(tmp_path: Path) -> None:
    files = write_report([FIXTURES / "one-batch.jsonl"], tmp_path)
    data = ReportData.of(load_runs([FIXTURES / "one-batch.jsonl"]))
    ax = memory_figure(data).axes[0]
    assert {label: xy[:, 0].tolist() for label, xy in lines_by_label(memory_figure(data)).items()} == {
        "full": [32],
        "cache (chunk 8)": [32],
        "cache (chunk 16/8)": [32],
        "accumulate (chunk 8)": [32],
    }
    low, high = ax.get_xlim()
    assert low < 32 < high
    assert len(files.figures) == 14  # all but the prediction figure


def test_several_ranks_use_the_largest_rank_peak(tmp_path: Path) -> None:
    data = ReportData.of(load_runs([FIXTURES / "ranks.jsonl"]))
    assert lines_by_label(memory_figure(data))["full"].tolist() == [[16, 40]]
    assert every_point(data).frame["world size"].tolist() == [2, 2]
    assert "world size" in summary(data).frame.columns
    assert headline(data)[0] == "full's largest batch was 16 at 40.00 MiB (the largest of 2 ranks), the largest tried."


def test_nothing_ran_ok_and_no_full_or_cache(tmp_path: Path) -> None:
    broken = tuple(r for r in records(MIXED).values() if r.point.strategy == "checkpoint")
    run = Run("broken", MIXED, broken)
    assert headline(ReportData.of([run])) == [
        "no `full` points: nothing to compare the other strategies against.",
        "no caching points: nothing to say about the memory caching saves.",
        "step time: no batch where both a caching strategy and full ran ok, nothing to compare.",
    ]
    files = write_report([run], tmp_path)
    assert {path.stem for path in files.figures} == {"memory", "largest-batch"}  # out of memory marks; no bars
    no_full = tuple(r for r in records(MIXED).values() if r.point.strategy != "full")
    lines = headline(ReportData.of([Run("no full", MIXED, no_full)]))
    cache_128 = format_bytes(records(MIXED)["cache batch=128 chunks=8"].memory.peak_bytes)
    assert lines[1] == f"cache (chunk 8) ran batch 128 in {cache_128}; full fit no batch it ran, nothing to compare."


def test_compare_the_same_file_twice(tmp_path: Path) -> None:
    files = write_report([MIXED, MIXED], tmp_path, memory_budget=BUDGET)
    text = files.report.read_text()
    assert text.startswith("# gcbench report: quick #1 vs quick #2")
    assert "- quick #2: full went over the 64.00 MiB budget at batch 64" in text
    assert "line style and marker the run" in text
    frame = summary(ReportData.of(load_runs([MIXED, MIXED]), BUDGET)).frame
    assert frame["run"].tolist() == ["quick #1"] * 4 + ["quick #2"] * 4
    runs = load_runs([MIXED, MIXED], labels=["before", "after"])
    assert [run.label for run in runs] == ["before", "after"]


def test_a_sweep_folder_is_a_source(tmp_path: Path) -> None:
    shutil.copy(MIXED, tmp_path / "results.jsonl")
    (run,) = load_runs([tmp_path])
    assert (run.label, run.source, len(run.records)) == ("quick", tmp_path / "results.jsonl", 14)


def test_a_torn_last_line_is_dropped_and_the_file_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    content = MIXED.read_bytes() + b'{"experiment": "qui'
    path.write_bytes(content)
    with pytest.warns(UserWarning, match="torn last line"):
        (run,) = load_runs([path])
    assert len(run.records) == 14 and path.read_bytes() == content


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jsonl", "no such results file or sweep folder"),
        (lambda d: d, "no results.jsonl in this folder"),
        (lambda d: empty_file(d / "empty.jsonl"), "no results records in it"),
        (lambda d: FIXTURES / "garbage.jsonl", "not a gcbench results record"),
        (lambda d: FIXTURES / "old-schema.jsonl", "results schema version 0; this gcbench reads version 2"),
    ],
)
def test_unusable_sources_are_refused_in_one_line_naming_the_file(tmp_path: Path, make, message: str) -> None:
    source = make(tmp_path)
    with pytest.raises(UsageError, match=message) as error:
        write_report([source], tmp_path / "out")
    assert str(source) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_labels_must_match_the_sources() -> None:
    with pytest.raises(UsageError, match="no results given"):
        load_runs([])
    with pytest.raises(UsageError, match="1 labels for 2 results sources"):
        load_runs([MIXED, MIXED], labels=["one"])
    with pytest.raises(UsageError, match="labels must differ"):
        load_runs([MIXED, MIXED], labels=["same", "same"])


def test_rendering_twice_gives_identical_files(tmp_path: Path) -> None:
    """Regenerating a committed report must not rewrite files whose content did not change."""
    first = write_report([MIXED], tmp_path / "a", memory_budget=BUDGET)
    second = write_report([MIXED], tmp_path / "b", memory_budget=BUDGET)
    svgs = [p for p in first.figures if p.suffix == ".svg"]
    assert svgs and all(p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() for p in svgs)
    assert first.report.read_text() == second.report.read_text()


# Times with rounds, paired ratios and noise -------------------------------------------------------------

ROUNDS = FIXTURES / "rounds.jsonl"  # quick, full and cache, 2 rounds, cut from a sweep on a busy 2-core machine


def rounds_data() -> ReportData:
    return ReportData.of(load_runs([ROUNDS]))


def merged(path: Path) -> dict[str, Record]:
    return {r.point.id: r for r in current(ResultsStore(path).load(repair=False))}


def test_the_caching_cost_is_the_paired_ratio_with_its_interval() -> None:
    expected = merged(ROUNDS)["cache batch=128 chunks=32"].paired
    assert expected.ratios_per_round and expected.reference == "full"
    cost = rounds_data().caching_cost().set_index("point")
    row = cost.loc["cache batch=128 chunks=32"]
    assert row["paired"] and row["time_ratio"] == expected.ratio
    assert (row["ratio_low"], row["ratio_high"]) == (expected.low, expected.high)
    figure = caching_cost_figure(rounds_data())
    assert "bars: 95% interval" in figure.axes[0].get_title("left")
    (bars,) = [c for c in figure.axes[0].containers if c.get_label() == "cache (chunk 32)"]
    segment = bars.lines[2][0].get_segments()[2]  # batch 128
    np.testing.assert_allclose(segment[:, 1], [expected.low, expected.high])


def test_the_headline_gives_the_cost_with_its_interval_and_why_it_is_noisy() -> None:
    line = headline(rounds_data())[2]
    paired = merged(ROUNDS)["cache batch=128 chunks=32"].paired
    low, high = paired.low - 1, paired.high - 1
    assert line.startswith(
        f"caching cost {paired.ratio - 1:.0%} step time (95% CI {low:.0%} to {high:.0%}) against full at batch 128 "
        "(cache (chunk 32), the cheapest setting there; timed in turns with full, 2 rounds)."
    ), line
    record = merged(ROUNDS)["cache batch=128 chunks=32"]
    (time_noise,), (ratio_noise,) = record.time.noise, record.paired.noise  # recorded when it was measured
    assert line.endswith(f" Noisy: {time_noise}; ratio: {ratio_noise}.")
    # A clean point says no more; results without intervals keep the old wording (the README quotes it).
    clean = [replace(r, time=replace(r.time, noise=()), paired=replace(r.paired, noise=())) if r.paired else r
             for r in merged(ROUNDS).values()]  # fmt: skip
    assert "Noisy" not in headline(ReportData.of([Run("quick", ROUNDS, tuple(clean))]))[2]
    assert "95% CI" not in headline(mixed_data())[2]


def test_throughput_bars_span_the_interval_and_noisy_points_are_hollow() -> None:
    data = rounds_data()
    record = merged(ROUNDS)["full batch=32 chunks=-"].time
    figure = throughput_figure(data)
    assert figure.axes[0].get_title("left") == "Throughput (median step; bars: 95% interval of the median)"
    (bars,) = [c for c in figure.axes[0].containers if c.get_label() == "full"]
    segment = bars.lines[2][0].get_segments()[1]  # batch 32
    np.testing.assert_allclose(segment[:, 1], [32 / record.high_s, 32 / record.low_s])
    hollow = {
        tuple(xy) for line in figure.axes[0].get_lines() if line.get_label() == "_noisy" for xy in line.get_xydata()
    }
    noisy = data.points[data.points["noisy"]]
    assert hollow == set(zip(noisy["batch_size"], noisy["examples_per_s"])) and hollow
    assert "hollow: noisy time" in [text.get_text() for text in figure.legends[0].get_texts()]


def test_every_point_shows_intervals_noise_and_load_only_where_there_are_some() -> None:
    columns = every_point(rounds_data()).frame.columns
    for column in ("step time 95% CI (ms)", "rounds", "vs full, paired", "vs full 95% CI", "noise", "load"):
        assert column in columns and column not in every_point(mixed_data()).frame.columns, column
    table = every_point(rounds_data()).text()
    busy = table[(table["series"] == "cache (chunk 8)") & (table["batch"] == "8")].iloc[0]
    busy_noise = merged(ROUNDS)["cache batch=8 chunks=8"].time.noise
    assert any(n.startswith("busy machine (load ") for n in busy_noise)
    assert all(n in busy["noise"] for n in busy_noise) and busy["rounds"] == "2"
    full = table[(table["series"] == "full") & (table["batch"] == "32")].iloc[0]
    load = merged(ROUNDS)["full batch=32 chunks=-"].time.load_average_1m
    assert full["vs full, paired"] == "-" and full["load"] == f"{load:.1f}"


def _retimed(path: Path, factor: float, rng: np.random.Generator | None) -> Path:
    """The rounds fixture with every step time replaced: steady times (1% noise) times ``factor``, or the
    fixture's own times times ``factor`` when no ``rng`` is given."""
    lines = []
    for record in ResultsStore(ROUNDS).load(repair=False):
        if record.time is not None:
            rounds = [
                [factor * (0.1 * (1 + 0.01 * rng.standard_normal()) if rng else s) for s in r]
                for r in record.time.rounds
            ]
            record = replace(record, time=time_result(rounds, record.point.batch_size))
        lines.append(record.to_json())
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_sweeps_are_compared_point_by_point_with_a_factor_and_a_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    steady, slower = _retimed(tmp_path / "a.jsonl", 1.0, rng), _retimed(tmp_path / "b.jsonl", 1.5, rng)
    files = write_report([steady, slower], tmp_path / "out", labels=["before", "after"])
    assert "## Step time against before" in files.report.read_text()
    table = report_tables(ReportData.of(load_runs([steady, slower], ["before", "after"])))["comparison"].frame
    assert len(table) == 9 and (table["difference"] == "slower").all()
    assert table["factor"].tolist() == pytest.approx([1.5] * 9, rel=0.02) and (table["p"] < 0.01).all()
    # The same change in the fixture's own times, measured on a busy machine: too noisy to call.
    noisy = _retimed(tmp_path / "c.jsonl", 1.5, None)
    table = report_tables(ReportData.of(load_runs([ROUNDS, noisy])))["comparison"].frame
    assert table["factor"].tolist() == pytest.approx([1.5] * 9) and (table["difference"] == "same").all()
    same = report_tables(ReportData.of(load_runs([ROUNDS, ROUNDS])))["comparison"].frame
    assert (same["difference"] == "same").all() and same["factor"].tolist() == pytest.approx([1.0] * 9)


def test_the_sweep_s_terminal_tables_name_the_noise_and_the_load() -> None:
    from gcbench.sweep.display import summary_tables

    console = Console(width=200, record=True)
    for table in summary_tables(merged(ROUNDS).values()):
        console.print(table)
    text = console.export_text()
    assert "vs full (95% CI)" in text and "noisy" in text
    (busy,) = [n for n in merged(ROUNDS)["cache batch=8 chunks=8"].time.noise if n.startswith("busy machine")]
    assert f"cache batch=8 chunks=8: {busy}" in text and "load average while timing" in text


# Time against memory: the Pareto figure and table ------------------------------------------------------

# (strategy, chunks, keep, peak MiB, step time s) at batch 32: keep 2 ties keep 1's memory and is slower,
# accumulate is beaten in both, checkpoint ties keep 1's time with more memory; keep all equals full.
SETTINGS = [
    ("full", None, None, 100, 1.0),
    ("cache", (8,), 0, 20, 1.6),
    ("cache", (8,), 1, 25, 1.3),
    ("cache", (8,), 2, 25, 1.4),
    ("cache", (8,), "all", 100, 1.0),
    ("accumulate", (8,), None, 30, 1.5),
    ("checkpoint", None, None, 60, 1.3),
]
ON_FRONTIER = {"full", "cache (chunk 8, keep 0)", "cache (chunk 8, keep 1)", "cache (chunk 8, keep all)"}


def setting(strategy: str, chunks, keep, peak_mib: float, time_s: float, batch: int = 32, noisy: bool = False):
    """A record that ran ok with this peak and step time, made from one of the fixture's."""
    base = records(MIXED)["cache batch=32 chunks=8"]
    time = time_result([[time_s] * 5], batch)
    return replace(
        base,
        point=Point(strategy, batch, chunks, keep),
        traits=resolve_strategy(strategy).traits(),
        memory=replace(base.memory, peak_bytes=int(peak_mib * MiB)),
        time=replace(time, noise=("rounds disagree",) if noisy else ()),
    )


def pareto_run(noisy: str | None = None, extra=()) -> Run:
    """SETTINGS at batch 32 (``noisy``: the series with a noisy time), 3 settings at 16, 2 at 64."""
    made = [setting(*s, noisy=Point(s[0], 32, s[1], s[2]).series == noisy) for s in SETTINGS]
    made += [setting("full", None, None, 50, 0.5, 16), setting("cache", (8,), 0, 10, 0.8, 16)]
    made += [setting("cache", (8,), 1, 12, 0.7, 16), setting("full", None, None, 200, 2, 64)]
    made += [setting("cache", (8,), 0, 40, 3.2, 64), *extra]
    return Run("pareto", MIXED, tuple(made))


def test_the_pareto_frontier_is_exactly_the_settings_no_other_beats_in_both() -> None:
    rows = ReportData.of([pareto_run()]).pareto(32).set_index("series")
    assert len(rows) == len(SETTINGS)
    assert set(rows.index[rows["on_frontier"]]) == ON_FRONTIER
    table = pareto(ReportData.of([pareto_run()]), 32).frame
    least_memory = ["cache (chunk 8, keep 0)", "cache (chunk 8, keep 1)", "cache (chunk 8, keep 2)"]
    assert table["series"].tolist()[:3] == least_memory
    assert dict(zip(table["series"], table["on frontier"])) == {
        series: "yes" if series in ON_FRONTIER else "no" for series in rows.index
    }
    assert "within budget" not in table.columns  # no budget given


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=12))
def test_pareto_frontier_matches_the_definition(points: list[tuple[int, int]]) -> None:
    memory, time = [m for m, _ in points], [t for _, t in points]
    dominated = [
        any(m2 <= m and t2 <= t and (m2, t2) != (m, t) for m2, t2 in points) for m, t in points
    ]  # equal ints: "at most in both, not equal" is "at most in both, less in one"
    assert pareto_frontier(memory, time).tolist() == [not d for d in dominated]


def test_the_pareto_figure_draws_the_frontier_the_budget_and_noisy_points_hollow() -> None:
    data = ReportData.of([pareto_run(noisy="checkpoint")], 80 * MiB)
    figure = pareto_figure(data, 32)
    ax = figure.axes[0]
    assert ax.get_title("left") == "Step time against peak memory at batch 32"
    assert ax.get_xlabel() == "peak memory (MiB)" and ax.get_ylabel() == "median step time (s)"
    lines = lines_by_label(figure)
    front = lines["Pareto frontier"]
    # Least memory first; at 100 MiB full and keep all tie exactly; then on to the right edge.
    np.testing.assert_allclose(front[:-1], [(20, 1.6), (25, 1.3), (100, 1.0), (100, 1.0)])
    assert front[-1, 1] == 1.0 and front[-1, 0] == pytest.approx(ax.get_xlim()[1])
    assert lines["budget 80.00 MiB"][:, 0].tolist() == [80, 80]
    for strategy, chunks, keep, peak, time in SETTINGS:
        series = Point(strategy, 32, chunks, keep).series
        assert lines[series].tolist() == [[peak, time]]
    labels = [name for text in ax.texts for name in text.get_text().split("\n")]  # ties share a label
    assert "full\ncache (chunk 8, keep all)" in [text.get_text() for text in ax.texts]
    named = [Point(s, 32, c, k).series + (", not exact" if s == "accumulate" else "") for s, c, k, _, _ in SETTINGS]
    assert sorted(labels) == sorted(named)
    hollow = {line.get_label() for line in ax.get_lines() if line.get_markerfacecolor() == "white"}
    assert hollow == {"checkpoint"}
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["Pareto frontier", "budget 80.00 MiB", "hollow: noisy time"]
    within = pareto(data, 32).frame.set_index("series")["within budget"]
    assert within["full"] == "no" and within["checkpoint"] == "yes"


def test_the_pareto_batch_is_the_largest_with_three_settings_or_the_one_asked_for(tmp_path: Path) -> None:
    data = ReportData.of([pareto_run()])
    assert data.pareto_batch(None) == 32  # 64 has two settings
    assert data.pareto_batch(64) == 64
    with pytest.raises(UsageError, match="pareto batch 128: no point ran ok with a time"):
        data.pareto_batch(128)
    three_at_64 = ReportData.of([pareto_run(extra=[setting("checkpoint", None, None, 60, 2.5, 64)])])
    assert three_at_64.pareto_batch(None) == 64
    # A batch where full ran beats a larger one where it did not.
    no_full = [setting("cache", (8,), k, 30 + k, 3 - k / 10, 128) for k in (0, 1, 2)]
    assert ReportData.of([pareto_run(extra=no_full)]).pareto_batch(None) == 32
    # No batch with 3 settings: no figure, no table, nothing said.
    two = Run("two", MIXED, tuple(r for r in pareto_run().records if r.point.strategy in ("full", "accumulate")))
    assert ReportData.of([two]).pareto_batch(None) is None
    files = write_report([two], tmp_path / "two")
    assert "pareto" not in {path.stem for path in (*files.figures, *files.tables)}
    assert "Pareto" not in files.report.read_text()
    # Asked for, it is drawn at that batch and its table follows it in report.md.
    files = write_report([pareto_run()], tmp_path / "asked", pareto_batch=16, memory_budget=BUDGET)
    assert (tmp_path / "asked" / "figures" / "pareto.png").stat().st_size > 0
    assert (tmp_path / "asked" / "figures" / "pareto.svg").stat().st_size > 0
    text = files.report.read_text()
    figure_at, table_at = text.index("](figures/pareto.png)"), text.index("## Settings at batch 16")
    assert figure_at < table_at < text.index("## Every point")
    assert (tmp_path / "asked" / "tables" / "pareto.csv").read_text().count("\n") == 4  # header and 3 settings


def test_an_inexact_setting_is_drawn_but_never_on_the_frontier() -> None:
    fast_but_wrong = setting("accumulate", (8,), None, 5, 0.1)  # least memory and time of all
    data = ReportData.of([pareto_run(extra=[fast_but_wrong])])
    rows = data.pareto(32).set_index("series")
    assert not rows.loc["accumulate (chunk 8)", "on_frontier"]
    assert rows.loc[rows["is_exact"], "on_frontier"].any()
    texts = [t.get_text() for t in pareto_figure(data, 32).axes[0].texts]
    assert "accumulate (chunk 8), not exact" in texts


def test_the_pareto_figure_of_compared_runs_has_a_frontier_per_run() -> None:
    data = ReportData.of([pareto_run(), replace(pareto_run(), label="again")])
    lines = lines_by_label(pareto_figure(data, 32))
    assert {"Pareto frontier [pareto]", "Pareto frontier [again]", "full [again]"} <= set(lines)
    table = pareto(data, 32).frame
    assert table["run"].tolist() == ["pareto"] * 7 + ["again"] * 7


def test_report_show_prints_the_summary_table_it_wrote(tmp_path: Path, monkeypatch, capsys) -> None:
    """``gcbench report --show``: the summary table in the terminal, the same numbers as tables/summary.csv."""
    from gcbench.cli import main

    monkeypatch.setenv("MPLBACKEND", "Agg")  # never a window
    shutil.copy(MIXED, tmp_path / "results.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--show", "--memory-budget", "64MiB"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "report: " in out
    frame = summary(mixed_data()).frame.set_index("series")
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert set(frame.index) <= set(rows)
    for series, row in frame.iterrows():
        largest = row["largest batch within 64.00 MiB"]
        cells = [cell.strip() for cell in rows[series].split("│")]
        assert (str(int(largest)) if largest == largest else "-") == cells[2], (series, cells)
    assert (tmp_path / "out" / "report.md").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--out", str(tmp_path / "quiet"), "--memory-budget", "64MiB"])
    assert not any(line.count("│") > 2 for line in capsys.readouterr().out.splitlines())  # the control: no --show


def test_runs_are_compared_only_with_a_run_of_their_own_experiment() -> None:
    """Four runs of two experiments: each later run against the first of its own (never CLIP's times
    against SimCLR's)."""
    quick = load_runs([ROUNDS])[0]
    other = Run("other", ROUNDS, tuple(replace(r, experiment="other") for r in quick.records))
    runs = [replace(quick, label="a"), replace(other, label="b"), replace(quick, label="c"), replace(other, label="d")]
    frame = report_tables(ReportData.of(runs))["comparison"].frame
    assert set(zip(frame["run"], frame["against"])) == {("c", "a"), ("d", "b")}
    assert (frame["factor"] == 1.0).all()  # the same times: the pairing, not the numbers, is under test
    alone = [replace(quick, label="a"), replace(other, label="b")]
    assert "comparison" not in report_tables(ReportData.of(alone))  # nothing of the same experiment to compare
