"""``gcbench report``: results files in; report.md with figures (PNG, SVG) and tables (CSV, Markdown,
LaTeX) out; a summary table for the terminal."""

import matplotlib

matplotlib.use("Agg")  # before anything here can import pyplot: reports are drawn without a display

from gcbench.report.load import Run, load_runs
from gcbench.report.markdown import ReportFiles, write_report
from gcbench.report.tables import summary_table

__all__ = ["ReportFiles", "Run", "load_runs", "summary_table", "write_report"]
