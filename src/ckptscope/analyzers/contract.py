"""The analyzer contract: what an analyzer declares, and what it is handed.

An analyzer is one module holding one `Analyzer` subclass that declares, in one place:

* `name` and `version` (stored in `runs.analyzer` / `runs.version`);
* `Options`, a frozen dataclass of `ckptscope.options.option` fields: CLI flags, Python keyword
  arguments, validation and the provenance in `runs.parameters` all derive from it;
* `references(options)`, the reference checkpoints each step is measured against: any of
  `"first"`, `"previous"`, `"final"`, explicit step numbers and `SameStep(model)` (the same
  step of another model in the store); the executor opens and caches them, whichever executor
  runs the step;
* `tables`, the tables it writes besides `metric_values`/`spectra` (`ckptscope.rows.Table`),
  created by the store on first use;
* `unit`, what its progress bar counts (tensors, batches, sequences);
* `after`, analyzers whose intermediate results (`ctx.shared`) it reuses when they run too;
* `final_metrics` and `refresh_final(ctx)`, when some rows are measured against the final step;
* optionally `report_sections(models)`, charts (`LineChart`, `HeatmapChart`) it adds to the HTML report.

`analyze(ctx)` turns one checkpoint into `RunRows`. Built-in analyzers are the `Analyzer`
subclasses defined in the modules of `ckptscope.analyzers`; other packages add theirs through
the `ckptscope.analyzers` entry-point group (see `ckptscope.analyzers.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ckptscope.errors import CkptscopeError
from ckptscope.options import NoOptions, Options
from ckptscope.rows import RunRows, Table
from ckptscope.sources.checkpoint import Checkpoint

ROLES = ("first", "previous", "final")  # reference roles resolved per step; an int names a step


@dataclass(frozen=True)
class SameStep:
    """A reference: the checkpoint at the step being analyzed, in another model of the store
    (another seed of a group, say), for measures between models rather than along training.

    Why the executor, not the analyzer, opens it: the pipeline already owns everything a
    checkpoint needs besides its path: resolving a stored model to its source (`models.source`,
    before the store is opened for writing), hub downloads and their eviction, a private
    download cache per worker process, and releasing what is open when a run ends however it
    ends. An analyzer opening `SourceSpec(...).open()` itself would duplicate all of that, with
    no hook to release it. So an analyzer declares `SameStep(model)` like any other reference and
    reads `ctx.reference(SameStep(model))`: the checkpoint, or None when the other model's
    source has no such step (the analyzer then records an anomaly and skips the step).
    """

    model: str

    def __str__(self) -> str:
        return f"the same step of model {self.model}"


class Progress:
    """The progress of one analyzer on one step: `start(total)` once the total is known, `advance()` per unit."""

    def __init__(self, on_start: Callable[[int], None] | None = None, on_advance: Callable[[int], None] | None = None) -> None:
        self._start, self._advance = on_start, on_advance

    def start(self, total: int) -> None:
        if self._start is not None:
            self._start(total)

    def advance(self, n: int = 1) -> None:
        if self._advance is not None:
            self._advance(n)


@dataclass
class AnalysisContext:
    """One checkpoint to analyze, with the references the analyzer declared.

    `references` maps each declared role (and step number) to its checkpoint, or to None when
    the checkpoint *is* that reference or has none (like `previous` of the first step); they
    are read tensor by tensor, never whole.
    """

    checkpoint: Checkpoint
    family: str
    config: dict | None
    references: dict[str | int | SameStep, Checkpoint | None] = field(default_factory=dict)
    device: str = "cpu"
    progress: Progress = field(default_factory=Progress)
    shared: dict[Any, Any] = field(default_factory=dict)  # intermediate results one analyzer leaves for the next, this step

    @property
    def first(self) -> Checkpoint | None:
        return self.references.get("first")

    @property
    def previous(self) -> Checkpoint | None:
        return self.references.get("previous")

    @property
    def final(self) -> Checkpoint | None:
        return self.references.get("final")

    def reference(self, key: str | int | SameStep) -> Checkpoint | None:
        """The checkpoint of a declared role, step or `SameStep`; None when it is this checkpoint (or has none)."""
        if key not in self.references:
            raise CkptscopeError(f"reference {key} is not open while step {self.checkpoint.step} is analyzed: "
                                 "the analyzer must declare it in references()")
        return self.references[key]


@dataclass(frozen=True)
class LineChart:
    """A chart an analyzer adds to the report: `sql` returns columns `series` (a line's name), `x`
    and `y`, ordered by series and x; the report runs it, draws one line per series and shows the SQL."""

    title: str
    caption: str
    sql: str
    x_title: str = "step"
    y_title: str = ""
    log_x: bool = False


@dataclass(frozen=True)
class HeatmapChart:
    """A heatmap an analyzer adds to the report: `sql` returns columns `x`, `y` and `z` (one cell
    each) and, optionally, `facet`: one heatmap per facet value, offered in a selector labelled
    `facet_title`, in the order the facets first appear in the result (so the SQL's ORDER BY sets
    the selector's order, and the first facet is shown first). Cells without a row stay empty.

    `step_x`: x is a training step, drawn at log10(step + 1) and labelled with the step, as the
    report's other step axes (step 0 keeps its place); otherwise x is drawn as is.
    """

    title: str
    caption: str
    sql: str
    x_title: str = "step"
    y_title: str = ""
    z_title: str = ""
    facet_title: str = "facet"
    step_x: bool = True


@dataclass(frozen=True)
class ReportSection:
    """A report section of an analyzer's charts."""

    anchor: str
    title: str
    intro: str
    charts: list[LineChart | HeatmapChart] = field(default_factory=list)


class Analyzer:
    """Base class of every analyzer: subclasses set the class attributes and `analyze`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    tables: ClassVar[tuple[Table, ...]] = ()
    unit: ClassVar[str] = "tensors"
    after: ClassVar[tuple[str, ...]] = ()  # analyzers that, when chosen too, run first on each step (to reuse `ctx.shared`)
    final_metrics: ClassVar[tuple[str, ...]] = ()  # metrics measured against "final": re-based by `refresh_final`

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Name the analyzer in its options' error messages ("analyzer weights needs --probe …")
        unless its Options class says otherwise."""
        super().__init_subclass__(**kwargs)
        if cls.name and cls.Options is not NoOptions and "owner" not in vars(cls.Options):
            cls.Options.owner = f"analyzer {cls.name}"

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else self.Options.build()

    @classmethod
    def of(cls, **options: Any) -> Analyzer:
        """The analyzer with these options, checked: `ConvergenceAnalyzer.of(probe="probe.jsonl")`."""
        return cls(cls.Options.build(options))

    @classmethod
    def references(cls, options: Options) -> tuple[str | int | SameStep, ...]:
        """Reference roles (`ROLES`), step numbers and `SameStep`s this analyzer needs with these options."""
        return ()

    @property
    def run_name(self) -> str:
        """The `runs.analyzer` of this analyzer's rows: its name, unless some option makes a series
        of its own that must not replace the default one (`convergence` against another model is
        `convergence:OTHER`, one series per other model). Steps done, changed parameters and
        replaced rows are all judged per run name."""
        return self.name

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring: what `ckptscope analyzers` and `--help` show."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def parameters(self) -> dict[str, Any]:
        """Provenance for `runs.parameters`: the options; analyzers add what else decides their output."""
        return self.options.provenance()

    def new_rows(self, dtype: str, backend: str, **extra: Any) -> RunRows:
        """An empty result for one step, carrying this analyzer's provenance (plus `extra` parameters)."""
        return RunRows(self.run_name, self.version, {**self.parameters(), **extra}, dtype, backend)

    def check(self, config: dict | None) -> None:
        """Check the options against the model (its `config.json`) before the store is opened, e.g.
        that a probe's token ids fit the vocabulary; raise a one-line `CkptscopeError`. Sources
        whose checkpoints are only known once downloaded get the same checks in `analyze`."""

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        """Rows for one checkpoint."""
        raise NotImplementedError

    def refresh_final(self, ctx: AnalysisContext) -> RunRows:
        """Only the `final_metrics` rows of a step, against a later final step (`ctx.final`).

        While a run grows, "final" is the last step ingested so far; when a later one arrives the
        pipeline calls this for the earlier steps that still exist, instead of re-analyzing them.
        """
        raise NotImplementedError

    @classmethod
    def report_sections(cls, models: list[str]) -> list[ReportSection]:
        """Sections this analyzer adds to the HTML report of `models`: line charts and heatmaps
        defined by SQL over the store; none by default."""
        return []
