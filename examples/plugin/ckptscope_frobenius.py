"""An example ckptscope analyzer in a package of its own: ‖W‖_F / √(rows·cols) of every matrix.

The root-mean-square entry of a matrix: its Frobenius norm with the size divided out, so
matrices of different shapes compare. Besides the metric rows it writes one row per matrix to
its own table, `frobenius_entries`, to show how an analyzer declares a table, and adds a chart
to the HTML report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ckptscope.analyzers.contract import AnalysisContext, Analyzer, LineChart, ReportSection
from ckptscope.options import Options, at_least, option
from ckptscope.rows import RunRows, Table
from ckptscope.sources.layers import classify, is_buffer


@dataclass(frozen=True)
class FrobeniusOptions(Options):
    min_entries: int = option(2, check=at_least(1), help="Skip matrices with fewer entries than this.")


class FrobeniusPerEntry(Analyzer):
    """Root-mean-square entry ‖W‖_F/√(rows·cols) of every matrix (an example plugin)."""

    name = "frobenius_per_entry"
    version = "0.1.0"
    Options = FrobeniusOptions
    unit = "tensors"
    tables = (Table("frobenius_entries",
                    {"tensor": "VARCHAR NOT NULL -- parameter name", "entries": "BIGINT NOT NULL -- rows·cols",
                     "sum_squares": "DOUBLE NOT NULL -- Σ w², in float64"},
                    key=("tensor",), doc="Per matrix: its number of entries and sum of squares."),)

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        out = self.new_rows("float64", f"torch-{torch.__version__}/cpu")
        names = [n for n, info in ctx.checkpoint.tensors.items()
                 if not is_buffer(n) and len(info.shape) == 2 and math.prod(info.shape) >= self.options.min_entries]
        ctx.progress.start(len(names))
        rows: dict[str, list] = {"tensor": [], "entries": [], "sum_squares": []}
        for name in names:
            w = ctx.checkpoint.read(name).to(torch.float64)
            sum_squares = float((w * w).sum())
            role = classify(name, ctx.family)
            out.add_metrics(name, role.layer, role.component, {"frobenius_per_entry": math.sqrt(sum_squares / w.numel())})
            for key, value in zip(rows, (name, w.numel(), sum_squares)):
                rows[key].append(value)
            ctx.progress.advance()
        out.tables["frobenius_entries"] = rows
        return out

    @classmethod
    def report_sections(cls, models: list[str]) -> list[ReportSection]:
        listed = ", ".join("'" + m.replace("'", "''") + "'" for m in models)
        sql = ("SELECT model || ' ' || tensor AS series, step AS x, sqrt(sum_squares / entries) AS y "
               f"FROM frobenius_entries WHERE model IN ({listed}) ORDER BY series, x")
        chart = LineChart("RMS entry of every matrix", "‖W‖_F/√(rows·cols) per matrix over training.", sql,
                          x_title="step", y_title="RMS entry")
        return [ReportSection("frobenius", "Frobenius norm per entry", "From the plugin's own table.", [chart])]
