"""`build_report`: one self-contained HTML file with the figures of a training-dynamics paper.

The file must open offline and make no network request, so plotly.js is embedded in it. It is
embedded as is (4.8 MB), not compressed (1.9 MB as gzip + base64): browsers only inflate
asynchronously, and a page that draws after its load event prints and screenshots as empty frames
(headless `--print-to-pdf` and `--screenshot` do not wait). So `report.js` draws every chart
synchronously, from one JSON payload, while the page is parsed. Per-layer grids, the bulk of a
report, travel packed (see `_pack`) at 4 base64 characters a value.
Everything that comes from the store reaches the page either through Jinja's autoescaping or
inside that JSON, whose `<`, `>` and `&` are \\u-escaped so no model name can close the
`<script>` holding it.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import polars as pl
from markupsafe import Markup

from ckptscope.errors import CkptscopeError
from ckptscope.reports import queries as q
from ckptscope.store.db import Store

ANOMALY_ROWS = 200
SPECTRUM_STEPS = 5
SEED_BOOTSTRAP = 200  # Multi-Bootstrap resamples of a report's seed bands: quick, and seeded so the bands reproduce
SEED_LEVEL = 0.95


@dataclass
class Chart:
    """One figure: its text, the SQL it came from, and what report.js needs to draw it."""

    id: str
    title: str
    caption: str
    sql: list[str]
    spec: dict[str, Any]
    plots: int = 1
    choices: list[str] = field(default_factory=list)  # options of the chart's selector, in payload order
    choice_name: str = "component"  # what the selector chooses (its label)
    chosen: int = 0  # the option shown first


@dataclass
class Section:
    anchor: str
    title: str
    intro: str
    charts: list[Chart]


@dataclass
class Overview:
    """The tables at the top of the report (rows as dicts) and the queries behind them."""

    sql: dict[str, str]
    models: list[dict[str, Any]]
    summary: list[dict[str, Any]]  # anomalies by model and kind
    anomalies: list[dict[str, Any]]  # the first ANOMALY_ROWS anomalies
    checkpoints: Chart


@dataclass
class Contents:
    """What a report shows, read from the store in one go: the template's tables and report.js's charts."""

    store: str
    sel: q.Selection
    overview: Overview
    sections: list[Section]
    generated: str  # when it was read

    def charts(self) -> list[dict[str, Any]]:
        """report.js's payload: one spec per chart, in page order."""
        charts = [self.overview.checkpoints, *(c for s in self.sections for c in s.charts)]
        return [{"id": c.id, **c.spec} for c in charts]


def build_report(store: Path | str, output: Path | str, *, models: Sequence[str] | None = None,
                 metrics: Sequence[str] | None = None, components: Sequence[str] | None = None,
                 groups: Sequence[str] | None = None, seed_bootstrap: int = SEED_BOOTSTRAP, seed: int = 0) -> Path:
    """Write an offline HTML report of `store` to `output` and return its path.

    `models`, `metrics` and `components` narrow it down (default: every model, the
    `DEFAULT_METRICS` present, every component). `groups` chooses the seed groups shown (default:
    those with a selected model; the first is compared with each other one); their bands are
    Multi-Bootstrap intervals of `seed_bootstrap` resamples drawn with `seed`, exactly what
    `seeds.seed_intervals` returns for them. Unknown names and an empty store raise `CkptscopeError`.
    """
    output = Path(output)
    if seed_bootstrap < 0 or seed_bootstrap == 1:
        raise CkptscopeError(f"--seed-bootstrap {seed_bootstrap}: give 0 (no bands) or at least 2 resamples")
    with Store(store, read_only=True) as db:
        contents = read_contents(db, models, metrics, components, groups=groups, seed_bootstrap=seed_bootstrap, seed=seed)
    contents.store = str(store)  # as the user wrote it: the report's `ckptscope sql --store` hints show it
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_page(contents), encoding="utf-8")
    return output


def read_contents(db: Store, models: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                  components: Sequence[str] | None = None, *, groups: Sequence[str] | None = None,
                  seed_bootstrap: int = SEED_BOOTSTRAP, seed: int = 0) -> Contents:
    """Run every query of a report on an open store (filters and seed-group options as in `build_report`)."""
    builder = _Builder(db, q.select(db, models, metrics, components), groups, seed_bootstrap, seed)
    overview = builder.overview()
    return Contents(str(db.path), builder.sel, overview, builder.sections(),
                    datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))


def render_page(contents: Contents | None, *, live: dict[str, Any] | None = None, message: str = "") -> str:
    """The whole HTML page: a report, or with `live` ({"poll_ms", "version", "store"}) the dashboard of
    `ckptscope serve`, which polls for a new version and redraws (`contents` None: `message` instead)."""
    plotly_version, plotly_js = _plotly()
    context = _context(contents, message, (live or {}).get("store", ""))
    return _template().render(**context, live=live, ckptscope_version=version("ckptscope"), plotly_version=plotly_version,
                              css=Markup(_asset("report.css")), js=Markup(_asset("report.js")), plotly_js=Markup(plotly_js))


def render_parts(contents: Contents | None, message: str = "") -> dict[str, Any]:
    """What a live page swaps in when the store changed: its nav and main HTML and the chart payload."""
    template = _template()
    context = template.new_context({**_context(contents, message, ""), "live": True})
    parts = {block: "".join(template.blocks[block](context)) for block in ("nav", "main")}
    return {**parts, "charts": contents.charts() if contents else [], "generated": contents.generated if contents else ""}


def _context(contents: Contents | None, message: str, store: str) -> dict[str, Any]:
    if contents is None:
        return {"store": store, "sel": None, "overview": None, "sections": [], "generated": "", "message": message,
                "anomaly_limit": ANOMALY_ROWS, "payload": Markup("[]")}
    return {"store": contents.store, "sel": contents.sel, "overview": contents.overview, "sections": contents.sections,
            "generated": contents.generated, "message": message, "anomaly_limit": ANOMALY_ROWS,
            "payload": Markup(_script_json(contents.charts()))}


class _Builder:
    """Runs the queries of each section and turns their results into charts."""

    def __init__(self, db: Store, sel: q.Selection, groups: Sequence[str] | None = None, seed_bootstrap: int = SEED_BOOTSTRAP,
                 seed: int = 0) -> None:
        self.db, self.sel = db, sel
        self.groups, self.nboot, self.seed = groups, seed_bootstrap, seed
        self._ids = 0

    def _chart(self, title: str, caption: str, sql: list[str], spec: dict[str, Any], **kw: Any) -> Chart:
        self._ids += 1
        return Chart(f"chart{self._ids}", title, caption, sql, spec, **kw)

    # -- overview ----------------------------------------------------------------------------
    def overview(self) -> Overview:
        sqls = {"models": q.models_sql(self.sel), "summary": q.anomaly_summary_sql(self.sel),
                "anomalies": q.anomalies_sql(self.sel, ANOMALY_ROWS), "checkpoints": q.checkpoints_sql(self.sel)}
        frames = {k: self.db.sql(v) for k, v in sqls.items()}
        series = [{"model": model, "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(),
                   "duplicate_of": g["duplicate_of"].to_list(), "anomalies": g["anomalies"].to_list(),
                   "status": g["status"].to_list()}
                  for (model,), g in frames["checkpoints"].partition_by("model", as_dict=True, maintain_order=True).items()]
        chart = self._chart("Checkpoints ingested", "One mark per checkpoint in the store; duplicates and steps with "
                            "anomalies are marked.", [sqls["checkpoints"]], {"type": "checkpoints", "series": series})
        return Overview(sqls, frames["models"].to_dicts(), frames["summary"].to_dicts(), frames["anomalies"].to_dicts(), chart)

    # -- sections ----------------------------------------------------------------------------
    def sections(self) -> list[Section]:
        out = [self._training_section()] if q.has_rows(self.db, "training_log", self.sel) else []
        out += [self._model_section(model) for model in self.sel.models]
        if len(self.sel.models) > 1 and self.sel.metrics:
            out.append(self._compare_section())
        if q.has_metric(self.db, self.sel, q.CKA_METRIC):
            out.append(self._convergence_section())
        if q.has_rows(self.db, "memorization_summary", self.sel):
            out.append(self._memorization_section())
        if q.has_rows(self.db, "memorization_profile", self.sel):
            out.append(self._profile_section())
        out.append(self._spectra_section())
        return out + self._seed_sections() + self._analyzer_sections()

    def _analyzer_sections(self) -> list[Section]:
        """Sections that the analyzers which ran on the selected models contribute (`report_sections`)."""
        from ckptscope.analyzers import registry  # loads analyzer modules: only when a report is built
        from ckptscope.analyzers.contract import HeatmapChart

        ran = self.db.sql(f"SELECT DISTINCT analyzer FROM runs WHERE {q.in_list('model', self.sel.models)} ORDER BY analyzer")
        out = []
        for name in ran["analyzer"].to_list():
            try:
                cls = registry.get(name)
            except CkptscopeError:  # rows of an analyzer no longer installed still show in the other sections
                continue
            for extra in cls.report_sections(self.sel.models):
                charts = [self._heatmap_chart(c) if isinstance(c, HeatmapChart) else self._line_chart(c) for c in extra.charts]
                out.append(Section(f"{name}-{extra.anchor}", extra.title, extra.intro, [c for c in charts if c is not None]))
        return out

    def _line_chart(self, chart: Any) -> Chart | None:
        """A `ckptscope.analyzers.contract.LineChart`, run and drawn."""
        df = self.db.sql(chart.sql)
        if not df.height:
            return None
        series = [{"name": str(name), "x": _floats(g["x"]), "y": _floats(g["y"])}
                  for (name,), g in df.partition_by("series", as_dict=True, maintain_order=True).items()]
        spec = {"type": "lines", "series": series, "x_title": chart.x_title, "y_title": chart.y_title, "log_x": chart.log_x}
        return self._chart(chart.title, chart.caption, [chart.sql], spec)

    def _training_section(self) -> Section:
        """Training loss and learning rate as the Trainer logged them (table `training_log`), on the step axis of the layer charts."""
        sql = f"""SELECT model, step, max(value) FILTER (metric = 'loss') AS loss,
       max(value) FILTER (metric = 'learning_rate') AS learning_rate,
       max(value) FILTER (metric = 'num_input_tokens_seen') AS tokens
FROM training_log
WHERE {q.in_list('model', self.sel.models)} AND metric IN ('loss', 'learning_rate', 'num_input_tokens_seen')
GROUP BY model, step
ORDER BY model, step"""
        df = self.db.sql(sql)
        series = [{"model": model, "steps": g["step"].to_list(), "tokens": _floats(g["tokens"]), "loss": _floats(g["loss"]),
                   "learning_rate": _floats(g["learning_rate"])}
                  for (model,), g in df.partition_by("model", as_dict=True, maintain_order=True).items()]
        chart = self._chart("Training loss and learning rate", "As logged by the Trainer (trainer_state.json's log_history), "
                            "one line per model.", [sql], {"type": "training", "series": series})
        intro = "The scalars a Hugging Face Trainer logged while training, from the `training_log` table."
        return Section("training", "Training log", intro, [chart])

    def _heatmap_chart(self, chart: Any) -> Chart | None:
        """A `ckptscope.analyzers.contract.HeatmapChart`, run and drawn: one x × y grid per facet."""
        df = self.db.sql(chart.sql).drop_nulls(["x", "y"])
        if not df.height:
            return None
        faceted = "facet" in df.columns
        if not faceted:
            df = df.with_columns(facet=pl.lit(""))
        facets = []
        for (facet,), g in df.partition_by("facet", as_dict=True, maintain_order=True).items():
            xs, ys = sorted(g["x"].unique().to_list()), sorted(g["y"].unique().to_list())
            col, row = {x: i for i, x in enumerate(xs)}, {y: i for i, y in enumerate(ys)}
            z: list[list[float | None]] = [[None] * len(xs) for _ in ys]
            for x, y, value in zip(g["x"].to_list(), g["y"].to_list(), _floats(g["z"])):
                z[row[y]][col[x]] = value
            facets.append({"name": str(facet), "x": xs, "y": ys, "z": z})
        spec = {"type": "heatmap", "facets": facets, "x_title": chart.x_title, "y_title": chart.y_title,
                "z_title": chart.z_title, "step_x": chart.step_x}
        return self._chart(chart.title, chart.caption, [chart.sql], spec, choices=[f["name"] for f in facets] if faceted else [],
                           choice_name=chart.facet_title)

    def _model_section(self, model: str) -> Section:
        charts = [c for metric in self.sel.metrics
                  for c in (self._layer_chart(model, metric, self.sel.components),
                            self._layerless_chart(model, metric, self.sel.components)) if c]
        intro = ("Each metric as a layer × step heatmap and as one line per layer, for the component chosen above "
                 "the charts; where a layer holds several tensors of one component (a norm's weight and bias), each "
                 "tensor is a choice of its own, named with the layer as *. Tensors without a layer (embeddings, "
                 "unembedding, final norm) follow, one line per tensor.")
        return Section(f"model-{self.sel.models.index(model)}", f"Layers over training: {model}", intro, charts)

    def _layer_chart(self, model: str, metric: str, components: Sequence[str] | None) -> Chart | None:
        sql = q.layer_grid_sql(model, metric, components, self.sel.heads)
        df = self.db.sql(sql)
        if not df.height:
            return None
        steps = df.group_by("step").agg(pl.col("tokens").first()).sort("step")
        patterns = df.group_by("component").agg(pl.col("pattern").unique().sort())
        by_component = dict(zip(patterns["component"], patterns["pattern"]))
        series = [(c, p) for c in q.ordered_components(list(by_component)) for p in by_component[c]]
        # A component is its own choice when each layer holds one tensor of it; else one choice per tensor pattern.
        labels = [c if len(by_component[c]) == 1 else f"{c}: {p}" for c, p in series]
        layers = sorted(df["layer"].unique().to_list())
        keyed = df.with_columns(series=pl.concat_str("component", "pattern", separator="\x00"))
        grid = _dense(keyed, {"series": [f"{c}\x00{p}" for c, p in series], "layer": layers, "step": steps["step"].to_list()})
        spec = {"type": "layers", "model": model, "metric": metric, "steps": steps["step"].to_list(),
                "tokens": steps["tokens"].to_list(), "layers": layers,
                "series": [{"component": c, "pattern": p} for c, p in series], "values": _pack(grid)}
        return self._chart(metric, f"{metric} of {model}: heatmap (layer × step) and one line per layer.",
                           [sql], spec, plots=2, choices=labels)

    def _layerless_chart(self, model: str, metric: str, components: Sequence[str] | None) -> Chart | None:
        sql = q.layerless_sql(model, metric, components, self.sel.heads)
        df = self.db.sql(sql)
        if not df.height:
            return None
        series = [{"component": comp, "tensor": tensor, "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(),
                   "values": _floats(g["value"])}
                  for (comp, tensor), g in df.partition_by("component", "tensor", as_dict=True, maintain_order=True).items()]
        return self._chart(f"{metric}: tensors without a layer", f"{metric} of {model} for each tensor outside the "
                           "layers (embeddings, unembedding, final norm), one line per tensor.", [sql],
                           {"type": "tensors", "model": model, "metric": metric, "series": series})

    def _compare_section(self) -> Section:
        charts = []
        for metric in self.sel.metrics:
            sql = q.compare_sql(self.sel.models, metric, self.sel.components, self.sel.heads)
            df = self.db.sql(sql)
            if not df.height:
                continue
            comps = q.ordered_components(df["component"].unique().to_list())
            series = []
            for (model,), g in df.partition_by("model", as_dict=True, maintain_order=True).items():
                steps = g.group_by("step").agg(pl.col("tokens").first(), pl.col("progress").first()).sort("step")
                spans = g.group_by("depth_bin").agg(pl.col("first_layer").min(), pl.col("last_layer").max())
                span = {r["depth_bin"]: [r["first_layer"], r["last_layer"]] for r in spans.iter_rows(named=True)}
                grid = _dense(g, {"component": comps, "depth_bin": list(range(q.DEPTH_BINS)), "step": steps["step"].to_list()})
                series.append({"model": model, "steps": steps["step"].to_list(), "tokens": steps["tokens"].to_list(),
                               "progress": _floats(steps["progress"]), "layers": [span.get(b) for b in range(q.DEPTH_BINS)],
                               "values": _pack(grid)})
            spec = {"type": "compare", "metric": metric, "components": comps, "bins": q.DEPTH_BINS, "series": series}
            charts.append(self._chart(metric, f"{metric}: one panel per quarter of relative depth, one line per model.",
                                      [sql], spec, choices=comps))
        intro = (f"Models of different depth and length on shared axes: layers are pooled into {q.DEPTH_BINS} bins of "
                 "relative depth (layer / number of layers) and averaged; the x axis is training progress "
                 "(step / last step ingested), from the `layer_metrics` view.")
        return Section("compare", "Comparison across models", intro, charts)

    def _convergence_section(self) -> Section:
        charts = [c for model in self.sel.models if (c := self._layer_chart(model, q.CKA_METRIC, None))]
        if q.has_rows(self.db, "stabilization", self.sel):
            sql = q.stabilization_sql(self.sel.models)
            df = self.db.sql(sql)
            series = [{"model": model, "component": comp, "layers": g["layer"].to_list(), "depth": _floats(g["relative_depth"]),
                       "steps": g["stabilization_step"].to_list(), "tokens": g["tokens"].to_list(),
                       "fraction": _floats(g["stabilization_fraction"])}
                      for (model, comp), g in df.partition_by("model", "component", as_dict=True, maintain_order=True).items()]
            charts.append(self._chart(
                "Stabilization step per layer",
                f"The first step after which CKA to the final checkpoint stays ≥ {q.CKA_STABLE} (the store's `stabilization` "
                "view), as a fraction of training (step / last step), against relative depth.", [sql],
                {"type": "stabilization", "series": series}))
        intro = f"CKA between each layer and the same layer of the final checkpoint (metric `{q.CKA_METRIC}`)."
        return Section("convergence", "Convergence", intro, charts)

    def _memorization_section(self) -> Section:
        sql = q.memorization_sql(self.sel.models)
        df = self.db.sql(sql)
        charts = []
        if df.height:
            series = [{"model": model, "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(),
                       "rate": _floats(g["memorized_rate"]), "score": _floats(g["mean_score"]), "sequences": g["sequences"].to_list()}
                      for (model,), g in df.partition_by("model", as_dict=True, maintain_order=True).items()]
            charts.append(self._chart("Memorized rate and mean score", "Fraction of probed sequences memorized, and their "
                                      "mean memorization score, per checkpoint.", [sql], {"type": "memorization", "series": series}))
        if q.has_metric(self.db, self.sel, q.LOGIT_LENS_METRIC):
            charts += [c for model in self.sel.models if (c := self._layer_chart(model, q.LOGIT_LENS_METRIC, None))]
        intro = ("From the `memorization_summary` view of the `memorization` table, and the logit-lens view per layer "
                 "(metric `memorization_logit_lens`).")
        return Section("memorization", "Memorization", intro, charts)

    def _profile_section(self) -> Section:
        """Per stored profile: the ATT(g, t) heatmap, the event-study curve and the summary aggregates."""
        charts = []
        for model, outcome, control in self.db.sql(q.profiles_sql(self.sel.models)).rows():
            name = f"{model}: {outcome}, {control} controls"
            cells_sql = q.profile_cells_sql(model, outcome, control)
            cells = self.db.sql(cells_sql)
            cohorts, steps = sorted(cells["cohort_step"].unique().to_list()), sorted(cells["step"].unique().to_list())
            at = {(r["cohort_step"], r["step"]): r for r in cells.iter_rows(named=True)}
            spec = {"type": "profile_cells", "cohorts": cohorts, "steps": steps,  # grids: row = cohort, column = step, null = no cell
                    **{k: [[_finite(at[g, t][k]) if (g, t) in at else None for t in steps] for g in cohorts]
                       for k in ("att", "ci_low", "ci_high", "n_treated", "n_control", "tokens")}}
            charts.append(self._chart(
                f"ATT(g, t): {name}", f"Change in {outcome} of the sequences first trained on in the interval ending at "
                "checkpoint g (rows), from the checkpoint before g to checkpoint t (columns), minus the same change of the "
                "controls. Blue: the outcome fell relative to the controls (for surprisal: memorisation); white: 0. "
                "Cells left of the diagonal (t < g) are pre-trend placebos.", [cells_sql], spec))
            persistent_sql = q.profile_summary_sql(model, outcome, control, "persistent")
            persistent = self.db.sql(persistent_sql)
            if persistent.height:
                charts.append(self._chart(
                    f"Event study: {name}", "ATT by event time e = t − g (steps), averaged over the cohorts observed at e "
                    "with weights ∝ cohort size, with its 95% interval: e = 0 is the instantaneous effect, later e show how "
                    "it persists or decays.", [persistent_sql], {"type": "profile_event", **self._summary_spec(persistent)}))
            summary_sql = q.profile_summary_sql(model, outcome, control)
            summary = self.db.sql(summary_sql)
            charts.append(self._chart(
                f"Summary: {name}", "Instantaneous (t = g), persistent (each event time) and residual (every cohort at the "
                "final checkpoint) ATT with 95% intervals.", [summary_sql], {"type": "profile_summary", **self._summary_spec(summary)}))
            for chart in charts[-3:]:
                chart.spec.update(model=model, outcome=outcome, control=control)
        intro = ("Difference-in-differences memorisation profiles (Lesci et al., ACL 2024) from the `memorization_profile` "
                 "table and the `memorization_profile_summary` aggregates that `ckptscope analyze profile` writes: how "
                 "training on a sequence changed the outcome on it, relative to sequences not (yet) trained on.")
        return Section("profile", "Memorisation profile", intro, charts)

    @staticmethod
    def _summary_spec(df: pl.DataFrame) -> dict[str, Any]:
        return {"kind": df["kind"].to_list(), "event_time": df["event_time"].to_list(), "at_step": df["at_step"].to_list(),
                **{k: _floats(df[k]) for k in ("att", "se", "ci_low", "ci_high")},
                "n_cohorts": df["n_cohorts"].to_list(), "n_treated": df["n_treated"].to_list()}

    def _spectra_section(self) -> Section:
        charts = [c for model in self.sel.models if (c := self._spectrum_chart(model))]
        intro = ("Density of the eigenvalues λ = σ² of one weight matrix, chosen above the chart (first shown: a middle "
                 f"layer), at several steps, in log-spaced bins ({q.BINS_PER_DECADE} per decade), with the fitted "
                 "power-law tail: density ∝ λ^−α above x_min (metrics `alpha`, `alpha_xmin`), scaled by the fraction "
                 "of eigenvalues in the tail (`num_pl_spikes`).")
        return Section("spectra", "Spectra", intro, charts)

    def _spectrum_chart(self, model: str) -> Chart | None:
        """Every matrix of `model` with a spectrum, at up to SPECTRUM_STEPS steps; the selector picks one."""
        heads = self.sel.heads
        candidates = self.db.sql(q.spectrum_candidates_sql(model, self.sel.components, heads))
        if not candidates.height:
            return None
        comps = self.sel.components
        steps = _spread(self.db.sql(q.spectrum_steps_sql(model, comps, heads))["step"].to_list(), SPECTRUM_STEPS)
        hist_sql, fit_sql = q.spectrum_sql(model, comps, steps, heads), q.spectrum_fit_sql(model, comps, steps)
        hist, fit = self.db.sql(hist_sql), self.db.sql(fit_sql)
        fits = {(r["tensor"], r["component"], r["step"]): r for r in fit.iter_rows(named=True)}
        mp_sql = q.spectrum_mp_sql(model, comps, steps)  # rows only where mp_fit ran (never before migration 0003)
        mp = self.db.sql(mp_sql) if heads else pl.DataFrame()
        mps = {(r["tensor"], r["component"], r["step"]): _mp_overlay(r) for r in mp.iter_rows(named=True)}
        per_matrix: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for (tensor, component, step), g in hist.partition_by("tensor", "component", "step", as_dict=True,
                                                               maintain_order=True).items():
            f = fits.get((tensor, component, step), {})
            per_matrix.setdefault((tensor, component), []).append({
                "step": step, "tokens": f.get("tokens"), "eigenvalue": _floats(g["eigenvalue"], 4),
                "density": _floats(g["density"], 4), "total": g["total"][0], "ev_max": g["ev_max"][0],
                "alpha": _finite(f.get("alpha")), "xmin": _finite(f.get("alpha_xmin")), "n_tail": _finite(f.get("num_pl_spikes")),
                "mp": mps.get((tensor, component, step))})
        rows = [r for r in candidates.iter_rows(named=True) if (r["tensor"], r["component"]) in per_matrix]
        matrices = [{"tensor": r["tensor"], "component": r["component"], "layer": r["layer"],
                     "steps": per_matrix[(r["tensor"], r["component"])]} for r in rows]
        picked = _pick_tensor(candidates)
        chosen = rows.index(picked) if picked in rows else 0
        spec = {"type": "spectrum", "model": model, "matrices": matrices}
        mp_caption = ("; dotted: the Marchenko–Pastur bulk fitted by `mp_fit`, with the eigenvalues above its edge "
                      "bulk_max (spikes) marked by triangles at the top") if mps else ""
        return self._chart(f"{model}: eigenvalue spectra",
                           f"Eigenvalue density of the chosen matrix at steps {', '.join(map(str, steps))}; "
                           f"dashed: fitted power-law tail{mp_caption}.", [hist_sql, fit_sql, *([mp_sql] if mps else [])], spec,
                           choices=[f"{r['tensor']} ({r['component']})" for r in rows], choice_name="matrix", chosen=chosen)


    # -- seed groups ---------------------------------------------------------------------------
    def _seed_sections(self) -> list[Section]:
        """Per seed group: each metric's mean over seeds with its Multi-Bootstrap band, cross-seed CKA and
        training phases; then the first group against each other one, with the interval of the difference."""
        groups = self._seed_groups()
        out = [self._seed_section(g, n) for g, n in groups.items()]
        names = list(groups)
        if len(names) > 1:
            charts = [c for other in names[1:] for metric in self.sel.metrics if (c := self._seed_diff_chart(names[0], other, metric))]
            intro = (f"The difference of the seed means, group − {names[0]}, per step, with its Multi-Bootstrap "
                     f"{SEED_LEVEL:.0%} interval ({self.nboot} resamples of each group's seeds, seed {self.seed}) and the "
                     "one-sided p-value on hover, as `ckptscope seeds --compare` gives them. An interval that excludes 0 "
                     "is a difference the seeds do not explain.")
            out.append(Section("seed-compare", f"Seed groups compared with {names[0]}", intro, charts))
        return out

    def _seed_groups(self) -> dict[str, int]:
        """Group -> number of seeds: those asked for, or those with a selected model."""
        from ckptscope.seeds import has_groups

        if not has_groups(self.db):
            if self.groups:
                raise CkptscopeError(f"--groups: the store {self.db.path} records no seed group; record one with "
                                     "`ckptscope ingest SOURCE --group GROUP --seed K`")
            return {}
        known = dict(self.db.sql("SELECT group_name, count(*) FROM models WHERE group_name IS NOT NULL GROUP BY 1 ORDER BY 1").rows())
        if self.groups:
            q._refuse_unknown(self.groups, list(known), "seed group(s)")
            return {g: known[g] for g in self.groups}
        return {g: n for g, n, *_ in self.db.sql(q.seed_groups_sql(self.sel.models)).rows()}

    def _seed_section(self, group: str, seeds: int) -> Section:
        charts = [c for metric in self.sel.metrics if (c := self._seed_band_chart(group, seeds, metric))]
        charts += [c for c in (self._seed_cka_chart(group), self._phases_chart(group)) if c is not None]
        intro = (f"The {seeds} seeds of group {group} (`models.group_name`), at the steps every seed has. Each metric: the "
                 f"mean over seeds, its Multi-Bootstrap {SEED_LEVEL:.0%} interval (Sellam et al. 2022: seeds resampled "
                 f"{self.nboot} times, seed {self.seed}) and each seed as a thin line; then the CKA between seeds "
                 "(`seed_similarity`, from `ckptscope analyze seeds`) and the training phases (`ckptscope phases`), where stored.")
        return Section(f"seeds-{group}", f"Seed group: {group}", intro, charts)

    def _seed_band_chart(self, group: str, seeds: int, metric: str) -> Chart | None:
        from ckptscope.seeds import seed_intervals

        nboot = self.nboot if seeds > 1 else 0
        try:
            df = seed_intervals(group, metric, store=self.db, nboot=nboot, seed=self.seed, level=SEED_LEVEL)
        except CkptscopeError:  # the group lacks this metric: other charts still show
            return None
        values_sql = q.seed_values_sql(group, metric)
        per_seed = self.db.sql(values_sql)
        if self.sel.components:
            df, per_seed = (f.filter(pl.col("component").is_in(self.sel.components)) for f in (df, per_seed))
        if not df.height:
            return None
        keys = ["layer", "component", "tensor", "head"]
        seeds_of = per_seed.partition_by(keys, as_dict=True, maintain_order=True)
        cells = []
        for key, g in sorted(df.partition_by(keys, as_dict=True, maintain_order=True).items(), key=lambda kv: _cell_order(kv[0])):
            g = g.sort("step")
            lines = [{"seed": seed, "model": model, "steps": part["step"].to_list(), "values": _floats(part["value"])}
                     for (seed, model), part in seeds_of.get(key, pl.DataFrame(schema=per_seed.schema))
                     .partition_by("seed", "model", as_dict=True, maintain_order=True).items()]
            cells.append({"label": _cell_label(*key), "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(),
                          "mean": _floats(g["mean"]), "std": _floats(g["std"]),
                          "low": _floats(g["low"]) if "low" in g.columns else None,
                          "high": _floats(g["high"]) if "high" in g.columns else None, "seeds": lines})
        spec = {"type": "seedband", "group": group, "metric": metric, "level": SEED_LEVEL, "nboot": nboot, "cells": cells}
        command = f"ckptscope seeds {group} --metric {metric} --bootstrap {nboot} --seed {self.seed}"
        caption = (f"{metric}: mean over the {seeds} seeds of {group} (thick), " +
                   (f"its {SEED_LEVEL:.0%} Multi-Bootstrap band (`{command}`)" if nboot else "no band (one seed, or --seed-bootstrap 0)")
                   + ", and each seed (thin; hover for its value).")
        return self._chart(f"{metric} across the seeds of {group}", caption, [values_sql], spec,
                           choices=[c["label"] for c in cells], choice_name="matrix")

    def _seed_diff_chart(self, group: str, other: str, metric: str) -> Chart | None:
        """compare − group for each matrix both have, one component at a time (a component with several tensors
        per layer, such as norms, cannot be matched across groups and is left out)."""
        from ckptscope.seeds import seed_intervals

        comps = self.db.sql("SELECT DISTINCT component FROM seed_metrics WHERE group_name = ? AND metric = ? ORDER BY 1",
                            [group, metric])["component"].to_list()
        frames = []
        for comp in q.ordered_components([c for c in comps if not self.sel.components or c in self.sel.components]):
            try:
                frames.append(seed_intervals(group, metric, store=self.db, component=comp, compare=other, nboot=self.nboot,
                                             seed=self.seed, level=SEED_LEVEL))
            except CkptscopeError:
                continue
        if not frames:
            return None
        keys = ["layer", "component", "tensor", "head"]
        cells = []
        for key, g in sorted(pl.concat(frames, how="diagonal_relaxed").partition_by(keys, as_dict=True, maintain_order=True).items(),
                             key=lambda kv: _cell_order(kv[0])):
            g = g.sort("step")
            cells.append({"label": _cell_label(*key), "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(),
                          "difference": _floats(g["difference"]), "mean": _floats(g["mean"]), "mean_compare": _floats(g["mean_compare"]),
                          **({k: _floats(g[k]) for k in ("low", "high", "p")} if "low" in g.columns else {})})
        spec = {"type": "seeddiff", "group": group, "compare": other, "metric": metric, "level": SEED_LEVEL, "cells": cells}
        command = f"ckptscope seeds {group} --compare {other} --metric {metric} --component C --bootstrap {self.nboot} --seed {self.seed}"
        return self._chart(f"{metric}: {other} − {group}", f"Difference of the seed means of {metric}, {other} − {group}, "
                           f"with its Multi-Bootstrap interval (`{command}`).", [q.seed_values_sql(group, metric),
                                                                              q.seed_values_sql(other, metric)],
                           spec, choices=[c["label"] for c in cells], choice_name="matrix")

    def _seed_cka_chart(self, group: str) -> Chart | None:
        if not _relation(self.db, "seed_similarity"):
            return None
        sql = q.seed_cka_sql(group)
        df = self.db.sql(sql)
        if not df.height:
            return None
        comps = q.ordered_components(df["component"].unique().to_list())
        series = [[{"layer": layer, "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(), "mean": _floats(g["mean"]),
                    "std": _floats(g["std"]), "n_pairs": g["n_pairs"].to_list()}
                   for (layer,), g in df.filter(pl.col("component") == comp).sort("layer", "step")
                   .partition_by("layer", as_dict=True, maintain_order=True).items()] for comp in comps]
        layers = sorted(df["layer"].drop_nulls().unique().to_list())
        spec = {"type": "seedcka", "group": group, "components": comps, "layers": layers, "series": series}
        return self._chart(f"Cross-seed CKA of {group}", "Linear CKA between the seeds' activations at the same step on the "
                           "probe, averaged over seed pairs (`cka_seed`), one line per layer; hover for its spread.", [sql],
                           spec, choices=comps, chosen=comps.index("resid") if "resid" in comps else 0)

    def _phases_chart(self, group: str) -> Chart | None:
        if not _relation(self.db, "training_phases"):
            return None
        sql = q.training_phases_sql(group)
        df = self.db.sql(sql)
        if not df.height:
            return None
        seeds = [{"seed": seed, "model": model, "steps": g["step"].to_list(), "tokens": g["tokens"].to_list(),
                  "state": g["state"].to_list(), "probability": _floats(g["probability"])}
                 for (seed, model), g in df.partition_by("seed", "model", as_dict=True, maintain_order=True).items()]
        spec = {"type": "phases", "group": group, "states": int(df["state"].max()) + 1, "seeds": seeds}
        return self._chart(f"Training phases of {group}", "The most probable HMM state of each seed's steps (`training_phases`, "
                           "from `ckptscope phases`), as coloured bands along the step axis; hover for the state's probability.",
                           [sql], spec)


def _relation(db: Store, name: str) -> bool:
    """Whether a table or view exists (stores made by older versions may lack it)."""
    return bool(db.sql("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).item())


def _cell_order(key: tuple) -> tuple:
    """Matrices without a layer first, then by layer, component (q.COMPONENT_ORDER), tensor and head."""
    layer, component, tensor, head = key
    rank = q.COMPONENT_ORDER.index(component) if component in q.COMPONENT_ORDER else len(q.COMPONENT_ORDER)
    return (layer is not None, layer if layer is not None else -1, rank, component, tensor, head if head is not None else -1)


def _cell_label(layer: int | None, component: str, tensor: str, head: int | None) -> str:
    return f"{tensor} ({component})" + (f" head {head}" if head is not None else "")


def _mp_overlay(row: dict[str, Any]) -> dict[str, Any] | None:
    """What report.js needs to draw the MP bulk of one matrix and step, in the chart's units (λ = σ²).

    mp_fit fits σ_mp to the spectrum rescaled to mean 1 (λ̃ = λ·W², W² = number of eigenvalues / Σλ)
    and stores bulk_min/bulk_max back in λ units, so the bulk drawn is ρ_MP(λ; σ² = σ_mp²/W², Q):
    its edges (σ(1 ∓ Q^−½))² are the stored bulk_min/bulk_max, and being a probability density
    it is on the same scale as the histogram's (eigenvalues per unit λ / their number).
    """
    values = [_finite(row[k]) for k in ("sigma_mp", "w_scale2", "q", "bulk_min", "bulk_max")]
    if any(v is None for v in values) or not values[1] > 0:
        return None
    sigma_mp, w_scale2, q_ratio, bulk_min, bulk_max = values
    return {"sigma2": sigma_mp**2 / w_scale2, "q": q_ratio, "sigma_mp": sigma_mp, "bulk_min": bulk_min, "bulk_max": bulk_max,
            "num_spikes": row["num_spikes"], "above": row["above"], "spikes": _floats(pl.Series(row["spikes"] or [], dtype=pl.Float64), 6)}


def _pick_tensor(candidates: pl.DataFrame) -> dict[str, Any]:
    """A representative matrix: the first component in q.COMPONENT_ORDER, at the middle layer (any, if none has a layer)."""
    layered = candidates.filter(pl.col("layer").is_not_null())
    if not layered.height:
        return candidates.row(0, named=True)
    component = q.ordered_components(layered["component"].unique().to_list())[0]
    rows = layered.filter(pl.col("component") == component)
    layers = sorted(rows["layer"].unique().to_list())
    layer = layers[len(layers) // 2]
    return rows.filter(pl.col("layer") == layer).sort("steps", "tensor", descending=[True, False]).row(0, named=True)


def _spread(steps: list[int], k: int) -> list[int]:
    """At most k steps, evenly spaced in log(step + 1), always keeping the first and last."""
    if len(steps) <= k:
        return steps
    logs = np.log1p(np.asarray(steps, dtype=float))
    targets = np.linspace(logs[0], logs[-1], k)
    return sorted({steps[int(np.abs(logs - t).argmin())] for t in targets})


def _dense(df: pl.DataFrame, axes: dict[str, list]) -> np.ndarray:
    """The `value` column as a float32 array over `axes` (key -> ordered values), NaN where absent."""
    index = df.select(pl.col(k).replace_strict(v, list(range(len(v))), return_dtype=pl.Int64) for k, v in axes.items())
    grid = np.full([len(v) for v in axes.values()], np.nan, dtype=np.float32)
    grid[tuple(index[k].to_numpy() for k in axes)] = df["value"].to_numpy()
    return grid


def _pack(grid: np.ndarray) -> str:
    """float32 values rounded to 16 significant bits (about 5 digits), as base64 of 3 bytes each.

    Each value's lowest mantissa byte is dropped and the three kept bytes are stored as planes
    (byte 1 of every value, then byte 2, then byte 3); report.js restores little-endian float32
    with a zero low byte. NaN (a missing value) survives. Not gzip-compressed (which would halve
    it): the browser can only inflate asynchronously, and charts must be drawn synchronously.
    """
    bits = grid.astype("<f4").view("<u4").astype(np.uint64)
    rounded = ((bits + 0x80) & 0xFFFFFF00).astype("<u4")
    planes = np.ascontiguousarray(rounded.view(np.uint8).reshape(-1, 4)[:, 1:].T)
    return base64.b64encode(planes.tobytes()).decode("ascii")


def _floats(series: pl.Series, digits: int | None = None) -> list[float | None]:
    """JSON-ready values: NaN and infinities become null (JSON has no NaN).

    `digits` rounds to that many significant digits, for bulky data drawn at screen resolution
    (the spectra of every matrix): a quarter of the JSON of full float64 text.
    """
    values = [_finite(v) for v in series.to_list()]
    return values if digits is None else [v if v is None else float(f"{v:.{digits}g}") for v in values]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script>: `</script>` or `<!--` in store text cannot end the element."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _asset(name: str) -> str:
    return files("ckptscope.reports").joinpath("templates", name).read_text(encoding="utf-8")


@functools.cache
def _plotly() -> tuple[str, str]:
    r"""The version of plotly.min.js in the installed plotly package, and its text, safe inside <script>.

    `</script` would end the element and `<!--` would change how the parser reads the rest; in
    JavaScript `<\/` and `<\!` mean the same as `</` and `<!` inside the strings and regexes where they can occur.
    """
    js = files("plotly").joinpath("package_data", "plotly.min.js").read_text(encoding="utf-8")
    found = re.search(r"plotly\.js v([\w.-]+)", js[:500])
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.I).replace("<!--", "<\\!--")
    return (found[1] if found else "?"), js


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("ckptscope.reports", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["human"] = _human
    return env.get_template("report.html.j2")


def _human(n: int | float | None) -> str:
    """1234567 -> 1.23M: parameter and token counts at a glance."""
    if n is None:
        return "–"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"
