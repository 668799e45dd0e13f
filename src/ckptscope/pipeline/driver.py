"""Ingest: source → step tasks → executor → analyzers → rows → store.

`ingest()` validates everything it can before the store is touched (options, paths, step
selection, analyzer names, every selected local checkpoint's headers, shape agreement, the
parameters of earlier runs), so bad input leaves the store exactly as it was. Then an executor
analyzes the steps while this process, the driver, alone writes the store: each checkpoint's
rows land in one transaction as its result arrives, so an interrupted run resumes where it
stopped and never duplicates rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ckptscope.analyzers import registry
from ckptscope.analyzers.contract import AnalysisContext, Analyzer, SameStep
from ckptscope.errors import CkptscopeError, SourceError
from ckptscope.options import Options
from ckptscope.pipeline.executors import Executor, ExecutorSpec, StepsFailed, describe, is_fatal
from ckptscope.pipeline.plan import MAX_LISTED, plan, reconcile, roles
from ckptscope.pipeline.tasks import AnalyzerSpec, Checkpoints, StepResult, StepTask, tensor_rows
from ckptscope.rows import CheckpointRows, ModelRow
from ckptscope.seeds import check_membership, group_of
from ckptscope.sources.local import Source
from ckptscope.sources.refcache import RefCache
from ckptscope.sources.spec import SourceSpec
from ckptscope.sources.trainer_state import TrainerState
from ckptscope.store.db import Store, default_store_path

log = logging.getLogger(__name__)
REPORT_SCHEMA = {"step": pl.Int64, "status": pl.String, "duplicate_of": pl.Int64, "tensors": pl.Int64, "seconds": pl.Float64}
Selection = str | list[str] | tuple[str, ...] | Mapping[str, Mapping[str, Any] | Options] | None


def ingest(source: str | Path | SourceSpec, *, analyzers: Selection = None, executor: ExecutorSpec | str | None = None,
           store: Store | str | Path | None = None, force: bool = False, progress: bool = False,
           **options: Any) -> pl.DataFrame:
    """Analyze the checkpoints of a local run or a hub suite into the store; one row per step written.

    `source` is a path, a catalog name or a hub repo (or a built `SourceSpec`); `analyzers` a
    comma-separated string or list of names (default: `weights,mp_fit,circuits`, registry.DEFAULT), or a mapping name → options.
    `executor` (an `ExecutorSpec`, or its kind "local" | "ray") says where steps run, never what
    comes out. Every other keyword
    is an option declared by `SourceSpec` (`steps`, `name`, `tokens_per_step`, `cache_dir`, …),
    `ExecutorSpec` (`workers`, `device`, …) or a chosen analyzer (`rtol`, `probe`, …), routed by
    name; `ckptscope analyzers` lists them. Steps already analyzed are skipped unless `force`.
    Raises `CkptscopeError` on bad input, before anything is written; a step that fails on a
    worker is reported after the other steps are written (`StepsFailed`), and rerunning resumes.
    """
    spec, runner, chosen = resolve(source, analyzers, executor, options)
    others = counterparts(chosen, store)
    if spec.watch:
        from ckptscope.pipeline.watch import watch

        return watch(spec, chosen, runner, store=store, force=force, progress=progress, new_run=IngestRun, schema=REPORT_SCHEMA)
    return IngestRun(spec, chosen, runner, force=force, progress=progress, counterparts=others).run(store)


def analyze(model: str, analyzers: Selection, *, store: str | Path | None = None, steps: str | None = None,
            **options: Any) -> pl.DataFrame:
    """Run analyzers on a model already in the store, re-opening the source it was ingested from.

    Without `steps`, the steps already ingested for the model are analyzed. Other keywords are
    those of `ingest()`.
    """
    path = Path(store) if store is not None else default_store_path()
    with Store(path, read_only=True) as db:
        source = stored_source(db, model)
        done = db.sql("SELECT step FROM checkpoints WHERE model = ? AND status = 'ok' ORDER BY step", [model])["step"].to_list()
    return ingest(source, store=path, name=model, steps=steps or ",".join(map(str, done)), analyzers=analyzers, **options)


def stored_source(db: Store, model: str) -> str:
    """The SOURCE that re-opens a stored model's checkpoints (from `models.source`)."""
    row = db.model(model)
    if row is None:
        known = db.sql("SELECT model FROM models ORDER BY model")["model"].to_list()
        raise SourceError(f"model {model!r} is not in {db.path} (models: {', '.join(known) or 'none'}); ingest it first")
    source = row["source"].removeprefix("hub:")
    return model if "*" in source else source  # one repo per step: re-open through the catalog name


def counterparts(analyzers: list[Analyzer], store: Store | str | Path | None) -> dict[SameStep, SourceSpec]:
    """The source of each other model that analyzers declared as a `SameStep` reference, read from
    the store (read-only, before anything is written): a model not in the store is a one-line error."""
    wanted = sorted({r for a in analyzers for r in a.references(a.options) if isinstance(r, SameStep)}, key=lambda r: r.model)
    if not wanted:
        return {}
    path = store.path if isinstance(store, Store) else Path(store) if store is not None else default_store_path()
    if not path.exists():
        raise SourceError(f"--reference-model {wanted[0].model}: the store {path} does not exist yet; ingest that model first")
    with (nullcontext(store) if isinstance(store, Store) else Store(path, read_only=True)) as db:
        return {ref: SourceSpec.build(source=stored_source(db, ref.model), name=ref.model) for ref in wanted}


def resolve(source: str | Path | SourceSpec, analyzers: Selection, executor: ExecutorSpec | str | None,
            options: Mapping[str, Any]) -> tuple[SourceSpec, ExecutorSpec, list[Analyzer]]:
    """Route flat options to the source, the executor and the chosen analyzers by their declared names.

    An option no one declares, or one that only an analyzer not chosen declares, is an error:
    silently ignoring `--probe` without `--analyzers convergence` would hide a mistake.
    """
    remaining = dict(options)
    if isinstance(executor, str):
        remaining["executor"], executor = executor, None
    if isinstance(source, SourceSpec):
        _not_beside("the source", SourceSpec.names() - {"source"}, remaining)
        spec = source
    else:
        text = str(Path(source).expanduser().absolute()) if isinstance(source, Path) else str(source)
        spec = SourceSpec.build({k: remaining.pop(k) for k in SourceSpec.names() - {"source"} if k in remaining}, source=text)
    if executor is not None:
        _not_beside("the executor", ExecutorSpec.names(), remaining)
    runner = executor or ExecutorSpec.build({k: remaining.pop(k) for k in ExecutorSpec.names() if k in remaining})
    per_analyzer = dict(analyzers) if isinstance(analyzers, Mapping) else {}
    names = registry.names(list(per_analyzer) if per_analyzer else analyzers)
    built = {n for n in names if isinstance(per_analyzer.get(n), Options)}
    # A flat option reaches every analyzer built here that declares it; it is an error only where
    # no such analyzer takes it and a built object would silently ignore it.
    flat_takers = set().union(*(registry.get(n).Options.names() for n in names if n not in built))
    chosen = []
    for name in names:
        cls = registry.get(name)
        given = per_analyzer.get(name) or {}
        if name in built:
            _not_beside(f"analyzer {name}", cls.Options.names() - flat_takers, remaining)
        else:
            given = {**{k: v for k, v in remaining.items() if k in cls.Options.names()}, **given}
        chosen.append(registry.build(name, given))
    taken = set().union(*(type(a.options).names() for a in chosen))
    stray = sorted(set(remaining) - taken)
    if stray:
        owners = {k: sorted(n for n, f in registry.discover().items() if f.cls and k in f.cls.Options.names()) for k in stray}
        first = stray[0]
        hint = (f"it is an option of analyzer {', '.join(owners[first])}: add it to --analyzers" if owners[first]
                else "no analyzer, source or executor declares it (`ckptscope analyzers` lists the options)")
        raise CkptscopeError(f"--{first.replace('_', '-')}: {hint}")
    return spec, runner, registry.ordered(chosen)


def _not_beside(what: str, names: set[str], flat: Mapping[str, Any]) -> None:
    """A flat option for something given as a built object would be ignored: say so instead."""
    clash = sorted(names & set(flat))
    if clash:
        raise CkptscopeError(f"{clash[0]}={flat[clash[0]]!r}: {what} is given as a built object; set {clash[0]} in it "
                             "instead of beside it")


class _Bars:
    """The run's progress: one bar over checkpoints, one over the current analyzer's units."""

    def __init__(self, bar: Progress, model: str, total: int) -> None:
        self.bar = bar
        self.steps = bar.add_task(f"{model} checkpoints", total=total)
        self.work = bar.add_task("", total=0, visible=False)

    def start(self, step: int, analyzer: str, unit: str, total: int) -> None:
        self.bar.reset(self.work, total=total, visible=True, description=f"step {step} {analyzer} ({unit})")

    def advance(self, n: int) -> None:
        self.bar.advance(self.work, n)

    def step_done(self) -> None:
        self.bar.advance(self.steps)
        self.bar.update(self.work, visible=False)

    def waiting(self, message: str | None) -> None:
        """The store is held by a reader: say so on the checkpoints line until it is free."""
        base = self.bar.tasks[self.steps].fields.setdefault("base", self.bar.tasks[self.steps].description)
        self.bar.update(self.steps, description=f"{base} ({message})" if message else base)


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    # markup=False: model names like `gpt[lr=3e-3]` are shown as they are
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        yield bar


class IngestRun:
    """One ingest: plan the steps, hand them to the executor, write each result as it arrives.

    Steps may finish out of order; revisions found without weights are recorded once; at the
    end, rows measured against an older final step are re-based.
    """

    def __init__(self, spec: SourceSpec, analyzers: list[Analyzer], executor: ExecutorSpec, *, force: bool = False,
                 progress: bool = False, counterparts: dict[SameStep, SourceSpec] | None = None) -> None:
        self.spec, self.analyzers, self.executor = spec, analyzers, executor
        self.counterparts = tuple((counterparts or {}).items())  # SameStep references -> their models' sources
        self.force, self.progress = force, progress
        self.tables = [(a.name, t) for a in analyzers for t in a.tables]
        self.report: list[dict] = []
        self.cache: RefCache | None = None

    def run(self, store: Store | str | Path | None, source: Source | None = None) -> pl.DataFrame:
        """Ingest the spec's source (or `source`, already open: --watch passes the complete checkpoints of the moment)."""
        src = source or self.spec.open()
        try:
            if src.kind == "local":  # checkpoints named in earlier ingests of this model (--steps STEP=PATH)
                src.remember(_step_paths(store, self.spec.name or src.default_name))
            self.plan = plan(src, name=self.spec.name, steps=self.spec.steps, max_steps=self.spec.max_steps,
                             analyzers=self.analyzers)
            runner = self.executor.make(src, self.analyzers)
            # The executor starts before the store is written: a cluster that cannot be reached leaves it untouched.
            # With nothing to analyze it does not start at all (re-basing final_* rows runs here).
            path = store.path if isinstance(store, Store) else Path(store) if store is not None else default_store_path()
            # Local checkpoints can be deleted (save_total_limit): keep the references later steps need.
            needs = roles(self.analyzers) & {"first", "previous"}
            self.cache = RefCache(path, self.plan.model) if src.kind == "local" and needs else None
            if isinstance(store, Store):
                self._reconcile(store)
                with runner if self.plan.todo else nullcontext():
                    return self._execute(store, runner)
            if path.exists():  # look read-only first: a mistake found here must not touch the file
                with Store(path, read_only=True) as ro:
                    self._reconcile(ro)
                if not self.plan.todo and not self.plan.stale_final and self.plan.retokenize is None and self.regroup is None:
                    return pl.DataFrame(schema=REPORT_SCHEMA)
            with runner if self.plan.todo else nullcontext(), Store(path) as db:
                self._reconcile(db)
                return self._execute(db, runner)
        finally:
            if source is None:
                src.close()

    def _reconcile(self, db: Store) -> None:
        reconcile(self.plan, db, self.analyzers, force=self.force, tokens_per_step=self.spec.tokens_per_step, cache=self.cache)
        self.group = group_of(self.spec, self.plan.source)
        self.regroup = check_membership(db, self.plan.model, *self.group)

    # -- the run -------------------------------------------------------------------------------
    def _execute(self, db: Store, runner: Executor) -> pl.DataFrame:
        p = self.plan
        if p.retokenize is not None:
            db.set_tokens_per_step(p.model, p.retokenize, only_missing=p.fill_tokens)
        if self.regroup is not None and db.model(p.model) is not None:  # a model already stored joins a group
            db.set_group(p.model, *self.regroup)
        if not (p.todo or p.stale_final):
            return pl.DataFrame(schema=REPORT_SCHEMA)
        self.db = db
        prior = db.model(p.model)
        self.tokens_per_step = self.spec.tokens_per_step or (prior["tokens_per_step"] if prior else None)
        self.registered = False
        stored_ok = set(db.sql("SELECT step FROM checkpoints WHERE model = ? AND status = 'ok'", [p.model])["step"].to_list())
        # References are the steps in the store or being ingested that the source or the reference cache still holds.
        self.all_steps = sorted(set(p.todo) | (stored_ok & (set(p.available) | set(p.cached))))
        self.stored_ok = stored_ok
        self.committed = set(stored_ok)
        self.seen_missing: set[int] = set()
        self.unrecorded: dict[int, tuple[str, str]] = {}  # missing revisions waiting for the architecture (the model row needs it)
        failures: dict[int, BaseException] = {}
        spec = AnalyzerSpec.of(self.analyzers)
        source_spec = self.spec.resolved(p.source)
        ckpts = Checkpoints(p.source, p.available)  # for re-basing, done here
        try:
            with _progress(self.progress) as bar:
                bars = _Bars(bar, p.model, len(p.todo))
                db.on_wait = bars.waiting

                def tasks() -> Iterator[StepTask]:
                    for i, step in enumerate(p.todo):
                        if self.in_a_row >= runner.window:  # every step in flight failed: the source or the cluster is down
                            return
                        if step not in self.all_steps:  # found missing while it served as a reference
                            bars.step_done()
                            continue
                        following = p.todo[i + 1] if runner.prefetches and i + 1 < len(p.todo) else None
                        yield StepTask(source_spec, spec, step, tuple(p.ref(s) for s in self.all_steps), p.arch,
                                       pinned=tuple(p.available[s] for s in p.pinned), device=self.executor.device,
                                       threads=runner.threads, counterparts=self.counterparts, skip=p.done.get(step, frozenset()),
                                       stored_hash=p.hashes.get(step) if p.done.get(step) else None,
                                       prefetch=p.available[following] if following is not None else None)

                self.in_a_row = 0  # failures since the last step that came back
                with closing(runner.run(tasks(), bars)) as outcomes:
                    for task, outcome in outcomes:
                        bars.step_done()
                        if isinstance(outcome, StepResult):
                            self.in_a_row = 0
                            self._store(outcome)
                        elif is_fatal(outcome):
                            raise outcome
                        else:
                            if not isinstance(outcome, CkptscopeError):  # a crash or a bug: keep its traceback
                                log.warning("step %d failed", task.step, exc_info=outcome)
                            failures[task.step] = outcome
                            self.in_a_row += 1
                if failures:
                    written = {row["step"] for row in self.report}
                    not_started = sum(1 for s in p.todo if s in self.all_steps and s not in written and s not in failures)
                    raise _failed(failures, not_started) from next(iter(failures.values()))
                if self.all_steps:
                    self._refresh_final(ckpts, bar)
        finally:  # hub downloads and memory maps are released however the run ends
            ckpts.keep_only(set())
            db.on_wait = None
        self._warn_no_init()
        duplicates = dict(db.sql("SELECT step, duplicate_of FROM checkpoints WHERE model = ?", [p.model]).rows())
        for row in self.report:
            if duplicates.get(row["step"]) is not None:
                row.update(status="duplicate", duplicate_of=duplicates[row["step"]])
        return pl.DataFrame(self.report, schema=REPORT_SCHEMA).sort("step")

    def _tokens(self, step: int, state: TrainerState | None = None) -> int | None:
        """Tokens seen at a step: the source's count, else step x --tokens-per-step, else the Trainer's count."""
        known = self.plan.source.tokens(step, self.plan.available[step].revision)
        if known is not None:
            return known
        if self.tokens_per_step:
            return step * self.tokens_per_step
        return state.tokens if state is not None else None

    def _warn_no_init(self) -> None:
        """One line when deltas from the first step are not deltas from initialization (a Trainer never saves step 0)."""
        first = self.db.sql("SELECT min(step) FROM checkpoints WHERE model = ? AND status = 'ok'", [self.plan.model]).item()
        if first and "first" in roles(self.analyzers):
            log.warning("model %r: delta_init is measured from step %d, not from initialization; "
                        "add the initial weights with --steps 0=PATH,all", self.plan.model, first)

    def _write(self, rows: CheckpointRows) -> None:
        arch = self.plan.arch
        model = None if self.registered else ModelRow(
            source=self.plan.source.id, architecture=arch.family, num_layers=self.plan.num_layers(),
            num_parameters=sum(_numel(s) for s in arch.shapes.values()), tokens_per_step=self.tokens_per_step, config=arch.config,
            group_name=self.group[0], seed=self.group[1])
        self.db.write_checkpoint(rows, replace=True, model=model, tables=self.tables)
        self.registered = True

    def _store(self, result: StepResult) -> None:
        p = self.plan
        if result.architecture is not None:
            p.accept(result.architecture)
        for step, revision, why in result.missing:
            if step not in self.seen_missing:
                self.seen_missing.add(step)
                self.all_steps.remove(step)
                if step not in self.stored_ok:
                    self.unrecorded[step] = (revision, why)
        for step in sorted(self.unrecorded) if p.arch is not None else ():
            revision, why = self.unrecorded.pop(step)
            self._write(CheckpointRows(model=p.model, step=step, tokens=self._tokens(step), revision=revision, source=p.source.id,
                                       content_hash=None, tensors=tensor_rows(None, p.arch.family), runs=[], status="missing",
                                       anomaly=("missing_revision", why)))
            self.report.append({"step": step, "status": "missing", "duplicate_of": None, "tensors": 0, "seconds": 0.0})
        if result.content_hash is not None:
            self._cache(result)
            state = result.trainer_state
            self._write(CheckpointRows(model=p.model, step=result.step, tokens=self._tokens(result.step, state),
                                       revision=result.revision, source=result.source, content_hash=result.content_hash,
                                       tensors=result.tensors, runs=result.runs, training_log=state.log if state else None,
                                       step_path=getattr(p.source, "named", {}).get(result.step)))
            self.report.append({"step": result.step, "status": "ok", "duplicate_of": None, "tensors": result.n_tensors,
                                "seconds": result.seconds})
            self.committed.add(result.step)
            if self.cache is not None:
                self.cache.keep_only({min(self.all_steps), max(self.committed)})

    def _cache(self, result: StepResult) -> None:
        """Copy a step that new steps will be measured against (the first, the latest) to the reference
        cache before its rows commit, so a committed reference is never only in a source that may delete it."""
        step = result.step
        if self.cache is not None and (step == min(self.all_steps) or step > max(self.committed, default=-1)):
            try:
                self.cache.put(self.plan.source.open(self.plan.available[step]), result.content_hash)
            except (OSError, SourceError) as exc:  # deleted since it was analyzed: a later step needing it says so clearly
                log.warning("step %d not copied to the reference cache: %s", step, exc)

    def _refresh_final(self, ckpts: Checkpoints, bar: Progress) -> None:
        """Recompute the `final_metrics` rows of steps whose stored final reference is no longer the last step."""
        final = self.all_steps[-1]
        for analyzer in (a for a in self.analyzers if a.final_metrics):
            runs = self.db.runs_of(self.plan.model, analyzer.run_name)
            stale = [s for s in sorted(runs) if runs[s][1].get("final_step") != final and s in self.plan.available]
            if not stale:
                continue
            task = bar.add_task(f"re-basing {len(stale)} steps of {analyzer.name} on final step {final}", total=len(stale))
            for step in stale:
                ckpts.keep_only({self.all_steps[0], step, final})
                try:
                    ckpt = ckpts.get(step)
                except SourceError:  # deleted since the plan (a trainer's save_total_limit): it keeps its final step
                    bar.advance(task)
                    continue
                self.plan.adopt(ckpt)  # a re-basing-only run opens nothing else first
                ctx = AnalysisContext(checkpoint=ckpt, family=self.plan.arch.family, config=self.plan.arch.config,
                                      references={"final": ckpts.get(final) if step != final else None})
                self.db.replace_metrics(self.plan.model, step, analyzer.run_name, list(analyzer.final_metrics),
                                        analyzer.refresh_final(ctx), {**runs[step][1], "final_step": final})
                bar.advance(task)


def _failed(failures: dict[int, BaseException], not_started: int) -> StepsFailed:
    """One line naming the failed steps and why; the other steps are in the store."""
    n = len(failures)
    listed = "; ".join(f"step {step}: {describe(exc)}" for step, exc in sorted(failures.items())[:MAX_LISTED])
    more = f"; {n - MAX_LISTED} more" if n > MAX_LISTED else ""
    stopped = f"; {not_started} step{'s' * (not_started > 1)} not started after that" if not_started else ""
    return StepsFailed(f"{n} step{'s' * (n > 1)} failed and {'were' if n > 1 else 'was'} not written ({listed}{more}){stopped}; "
                       "the steps that completed are saved: run the same command again to resume")


def _step_paths(store: Store | str | Path | None, model: str) -> dict[int, str]:
    """The checkpoints of `model` named with STEP=PATH in earlier ingests (none in a new store)."""
    if isinstance(store, Store):
        return store.step_paths(model)
    path = Path(store) if store is not None else default_store_path()
    if not path.exists():
        return {}
    with Store(path, read_only=True) as db:
        return db.step_paths(model)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

