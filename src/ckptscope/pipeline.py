"""Ingest: source → checkpoints → analyzers → rows → store.

`ingest()` validates everything it can before the store is touched (paths, step selection,
analyzer names, executor options, every selected checkpoint's headers, shape agreement across
steps), so bad input leaves the store exactly as it was. Then an executor (`ckptscope.executors`:
this process, a local process pool or a Ray cluster) analyzes the steps while this process, the
driver, alone writes the store: each checkpoint's rows land in one transaction as its result
arrives, so an interrupted run resumes where it stopped and never duplicates rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import polars as pl
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ckptscope.analyzers.base import AnalysisContext, Analyzer
from ckptscope.analyzers.registry import build_analyzers
from ckptscope.analyzers.weights import FINAL_METRICS, WeightAnalyzer
from ckptscope.errors import CkptscopeError, SourceError
from ckptscope.executors import (AnalyzerSpec, Architecture, Checkpoints, Executor, SourceSpec, StepResult, StepsFailed,
                                 StepTask, check_options, describe, is_fatal, make_executor, tensor_rows)
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify
from ckptscope.sources.local import CheckpointRef, LocalSource, Source, parse_explicit_steps
from ckptscope.sources.steps import select_steps
from ckptscope.store.db import CheckpointRows, ModelRow, Store, default_store_path

log = logging.getLogger(__name__)
REPORT_SCHEMA = {"step": pl.Int64, "status": pl.String, "duplicate_of": pl.Int64, "tensors": pl.Int64, "seconds": pl.Float64}
MAX_LISTED = 5  # failed steps named in the error; the rest are counted


@dataclass
class Plan:
    """What an ingest will do, decided before anything is written."""

    model: str
    source: Source
    available: dict[int, CheckpointRef]  # every step the source holds
    todo: list[int]  # selected steps still to analyze, ascending
    arch: Architecture | None = None  # of the first checkpoint; remote sources fill it on first open
    stored_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stale_final: bool = False  # stored final_* rows point at an older final step

    def adopt(self, ckpt: Checkpoint) -> None:
        """Check a checkpoint against the run's architecture (taking it as the run's, if first)."""
        self.accept(Architecture.of(ckpt))

    def accept(self, arch: Architecture) -> None:
        """`adopt` for an architecture read elsewhere (by a worker)."""
        if self.arch is None:
            _check_against_store(self, arch.shapes)
            self.arch = arch
        else:
            self.arch.check(arch)


def _num_layers(config: dict | None, shapes: dict[str, tuple[int, ...]], fam: str) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config and isinstance(config.get(key), int):
            return config[key]
    layers = [r.layer for r in (classify(n, fam) for n in shapes) if r.layer is not None]
    return max(layers) + 1 if layers else None


def open_source(source: str | Path, *, steps: str | None = None, revision_pattern: str | None = None,
                keep: bool = False, cache_dir: Path | str | None = None) -> Source:
    """A local run directory, or a suite or repo on the hub (`pythia-160m`, `allenai/OLMo-1B-hf`).

    SOURCE is local when it exists, is a Path, starts with `/`, `.` or `~`, has more than one
    `/`, or `--steps` names directories; anything else is looked up in the catalog / on the hub.
    """
    explicit = parse_explicit_steps(steps)
    text = str(source)
    if (explicit is not None or isinstance(source, Path) or Path(text).expanduser().exists()
            or text.startswith(("/", ".", "~")) or text.count("/") > 1):
        return LocalSource(text, explicit)
    from ckptscope.sources.hub import HubSource  # loads huggingface_hub only for hub sources

    return HubSource(text, revision_pattern=revision_pattern, keep=keep, cache_dir=Path(cache_dir) if cache_dir else None)


def plan_ingest(src: Source, *, name: str | None, steps: str | None, max_steps: int | None,
                analyzers: list[Analyzer]) -> Plan:
    """Resolve the steps; validate every selected local checkpoint up front (reads no store).

    Remote checkpoints are validated as they arrive: checking them first would mean
    downloading the whole sweep before analyzing any of it.
    """
    available = {ref.step: ref for ref in src.refs()}
    explicit = getattr(src, "explicit", None)
    selected = select_steps(None if explicit else steps, list(available), max_steps=max_steps)
    if any(getattr(a, "uses_references", True) for a in analyzers):
        # Deltas and convergence are taken against the first and last checkpoints.
        selected = sorted({*selected, min(available), max(available)})
    plan = Plan(name or src.default_name, src, available, list(selected))
    if src.kind == "local":
        for step in selected:
            plan.adopt(src.open(available[step]))
    return plan


def _check_against_store(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if plan.stored_shapes.get(name, shape) != shape:
            raise SourceError(
                f"tensor {name} has shape {list(shape)} but model {plan.model!r} in the store has {list(plan.stored_shapes[name])}; "
                "ingest this run under another --name"
            )


def reconcile(plan: Plan, store: Store, analyzers: list[Analyzer], *, force: bool) -> None:
    """Check the plan against what the store already holds and drop steps already done."""
    stored = store.sql("SELECT tensor, shape FROM tensors WHERE model = ? AND step = (SELECT min(step) FROM tensors WHERE model = ?)",
                       [plan.model, plan.model])
    plan.stored_shapes = {row["tensor"]: tuple(row["shape"]) for row in stored.iter_rows(named=True)}
    if plan.arch is not None:
        _check_against_store(plan, plan.arch.shapes)
    if not force:
        done = set.intersection(*(store.steps_done(plan.model, a.name) for a in analyzers))
        plan.todo = [s for s in plan.todo if s not in done]
    stored_ok = set(store.sql("SELECT step FROM checkpoints WHERE model = ? AND status = 'ok'", [plan.model])["step"].to_list())
    every = stored_ok | set(plan.todo)
    if every and any(getattr(a, "uses_references", True) for a in analyzers):
        for role, step in (("first", min(every)), ("last", max(every))):
            if step not in plan.available:
                raise SourceError(
                    f"step {step}, the {role} step of model {plan.model!r} in the store, is no longer in the source; "
                    "deltas and distances are taken against it: restore it, or ingest into another --name"
                )
    weights = next((a for a in analyzers if isinstance(a, WeightAnalyzer)), None)
    if weights is not None and stored_ok:  # an interrupted re-basing is finished by the next run
        final = max(every)
        plan.stale_final = any(p.get("final_step") != final for s, p in store.run_parameters(plan.model, weights.name).items()
                               if s in stored_ok)


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        yield bar


def ingest(source: str | Path, *, store: Store | str | Path | None = None, name: str | None = None,
           steps: str | None = None, max_steps: int | None = None, analyzers: str | list[str] | None = "weights",
           force: bool = False, tokens_per_step: int | None = None, device: str = "cpu",
           rtol: float = 1e-3, spectrum: str = "exact", exact_max_side: int = 4096,
           revision_pattern: str | None = None, keep: bool = False,
           cache_dir: Path | str | None = None, probe: Path | str | None = None, corpus: Path | str | None = None,
           reference_step: str | int = "final", batch_size: int = 16, prompt_len: int = 32, continuation_len: int = 32,
           executor: str = "local", workers: int | None = None, threads: int | None = None, ray_address: str | None = None,
           progress: bool = False) -> pl.DataFrame:
    """Analyze the checkpoints of a local run or a hub suite into the store; one row per step written.

    `steps` is a selection SPEC (see `ckptscope.sources.steps`) or explicit `STEP=PATH` pairs.
    Steps already analyzed are skipped unless `force`. Raises `CkptscopeError` on bad input,
    before anything is written. Hub downloads are evicted after use unless `keep`. `probe`
    feeds the `convergence` analyzer, `corpus` the `memorization` analyzer; `spectrum` and
    `exact_max_side` pick how the `weights` analyzer obtains singular values.

    `executor` says where steps are analyzed, never what comes out: "local" with `workers`
    processes (default 1: this process), or "ray" on the cluster at `ray_address` (default: a
    local instance, or the cluster `ray.init` already joined) with `workers` actors (default: as
    many as the cluster's CPUs hold). `threads` is the torch threads of each. A step that fails
    on a worker is reported after the other steps are written (`StepsFailed`); rerunning resumes.
    """
    check_options(executor, workers, threads, ray_address)
    _check_device(device, here=executor == "local")
    options = dict(rtol=rtol, spectrum=spectrum, exact_max_side=exact_max_side, probe=probe, corpus=corpus,
                   reference_step=reference_step, batch_size=batch_size, prompt_len=prompt_len, continuation_len=continuation_len)
    chosen = build_analyzers(analyzers, **options)
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise SourceError("--tokens-per-step must be a positive number of tokens")
    src = open_source(source, steps=steps, revision_pattern=revision_pattern, keep=keep, cache_dir=cache_dir)
    try:
        plan = plan_ingest(src, name=name, steps=steps, max_steps=max_steps, analyzers=chosen)
        runner = make_executor(executor, workers=workers, threads=threads, ray_address=ray_address, device=device,
                               source=src, analyzers=chosen)
        # What a worker needs to open the same source and build the same analyzers, in any working directory.
        source_spec = SourceSpec(src.id if src.kind == "local" else str(source), steps, revision_pattern, keep, _absolute(cache_dir))
        paths = {"probe": _absolute(probe), "corpus": _absolute(corpus)}
        analyzer_spec = AnalyzerSpec(tuple(a.name for a in chosen), tuple(sorted({**options, **paths}.items())))
        new_task = partial(StepTask, source_spec, analyzer_spec, device=device, threads=runner.threads)
        return _run(plan, store, chosen, force=force, tokens_per_step=tokens_per_step, progress=progress,
                    runner=runner, new_task=new_task)
    finally:
        src.close()


def _absolute(path: Path | str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path is not None else None


def _check_device(device: str, *, here: bool) -> None:
    """`here`: the steps run on this machine, so it must have the GPU (a Ray cluster is checked on joining)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SourceError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if here and kind == "cuda" and not torch.cuda.is_available():
        raise SourceError(f"--device {device}: no CUDA GPU is available to this torch build; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise SourceError(f"--device {device}: only cpu and cuda are supported")


def _run(plan: Plan, store: Store | str | Path | None, chosen: list[Analyzer], *, force: bool,
         tokens_per_step: int | None, progress: bool, runner: Executor, new_task: Callable[..., StepTask]) -> pl.DataFrame:
    def execute(db: Store) -> pl.DataFrame:
        return _execute(plan, db, chosen, tokens_per_step=tokens_per_step, progress=progress, runner=runner, new_task=new_task)

    # The executor starts before the store is written: a cluster that cannot be reached leaves it untouched.
    # With nothing to analyze it does not start at all (re-basing final_* rows runs here).
    if isinstance(store, Store):
        reconcile(plan, store, chosen, force=force)
        with runner if plan.todo else nullcontext():
            return execute(store)
    path = Path(store) if store is not None else default_store_path()
    if path.exists():  # look read-only first: a mistake found here must not touch the file
        with Store(path, read_only=True) as ro:
            reconcile(plan, ro, chosen, force=force)
        if not plan.todo and not plan.stale_final:
            return pl.DataFrame(schema=REPORT_SCHEMA)
    with runner if plan.todo else nullcontext(), Store(path) as db:
        reconcile(plan, db, chosen, force=force)
        return execute(db)


def analyze(model: str, analyzers: str, *, store: str | Path | None = None, steps: str | None = None,
            **options) -> pl.DataFrame:
    """Run analyzers on a model already in the store, re-opening the source it was ingested from.

    Without `steps`, the steps already ingested for the model are analyzed. Options are those of
    `ingest()` (`probe`, `corpus`, `device`, `batch_size`, `force`, ...).
    """
    path = Path(store) if store is not None else default_store_path()
    with Store(path, read_only=True) as db:
        row = db.model(model)
        if row is None:
            known = db.sql("SELECT model FROM models ORDER BY model")["model"].to_list()
            raise SourceError(f"model {model!r} is not in {path} (models: {', '.join(known) or 'none'}); ingest it first")
        done = db.sql("SELECT step FROM checkpoints WHERE model = ? AND status = 'ok' ORDER BY step", [model])["step"].to_list()
    source = row["source"].removeprefix("hub:")
    if "*" in source:  # one repo per step: re-open through the catalog name
        source = model
    return ingest(source, store=path, name=model, steps=steps or ",".join(map(str, done)), analyzers=analyzers, **options)


def _execute(plan: Plan, db: Store, analyzers: list[Analyzer], *, tokens_per_step: int | None, progress: bool,
             runner: Executor, new_task: Callable[..., StepTask]) -> pl.DataFrame:
    """Hand the steps to the executor and write each result as it arrives (steps may finish out
    of order); then re-base `final_*` rows. Revisions found without weights are recorded once."""
    if not (plan.todo or plan.stale_final):
        return pl.DataFrame(schema=REPORT_SCHEMA)
    prior = db.model(plan.model)
    if tokens_per_step is None and prior:
        tokens_per_step = prior["tokens_per_step"]
    stored_ok = set(db.sql("SELECT step FROM checkpoints WHERE model = ? AND status = 'ok'", [plan.model])["step"].to_list())
    # References are the steps in the store or being ingested that the source still holds.
    all_steps = sorted(set(plan.todo) | (stored_ok & set(plan.available)))
    registered = False
    report: list[dict] = []
    seen_missing: set[int] = set()
    unrecorded: dict[int, tuple[str, str]] = {}  # missing revisions waiting for the architecture (the model row needs it)
    failures: dict[int, BaseException] = {}
    in_a_row = 0  # failures since the last step that came back

    def tokens(step: int) -> int | None:
        known = plan.source.tokens(step, plan.available[step].revision)
        return known if known is not None else (step * tokens_per_step if tokens_per_step else None)

    def write(rows: CheckpointRows) -> None:
        nonlocal registered
        arch = plan.arch
        model = None if registered else ModelRow(
            source=plan.source.id, architecture=arch.family, num_layers=_num_layers(arch.config, arch.shapes, arch.family),
            num_parameters=sum(_numel(s) for s in arch.shapes.values()), tokens_per_step=tokens_per_step, config=arch.config)
        db.write_checkpoint(rows, replace=True, model=model)
        registered = True

    def store_result(result: StepResult) -> None:
        if result.architecture is not None:
            plan.accept(result.architecture)
        for step, revision, why in result.missing:
            if step not in seen_missing:
                seen_missing.add(step)
                all_steps.remove(step)
                if step not in stored_ok:
                    unrecorded[step] = (revision, why)
        for step in sorted(unrecorded) if plan.arch is not None else ():
            revision, why = unrecorded.pop(step)
            write(CheckpointRows(model=plan.model, step=step, tokens=tokens(step), revision=revision, source=plan.source.id,
                                 content_hash=None, tensors=tensor_rows(None, plan.arch.family), runs=[], status="missing",
                                 anomaly=("missing_revision", why)))
            report.append({"step": step, "status": "missing", "duplicate_of": None, "tensors": 0, "seconds": 0.0})
        if result.content_hash is not None:
            write(CheckpointRows(model=plan.model, step=result.step, tokens=tokens(result.step), revision=result.revision,
                                 source=result.source, content_hash=result.content_hash, tensors=result.tensors, runs=result.runs))
            report.append({"step": result.step, "status": "ok", "duplicate_of": None, "tensors": result.n_tensors,
                           "seconds": result.seconds})

    ckpts = Checkpoints(plan.source, plan.available)  # for re-basing, done here
    try:
        with _progress(progress) as bar:
            steps_task = bar.add_task(f"{plan.model} checkpoints", total=len(plan.todo))
            tensor_task = bar.add_task("tensors", total=0, visible=False)

            def tasks() -> Iterator[StepTask]:
                for i, step in enumerate(plan.todo):
                    if in_a_row >= runner.window:  # every step in flight failed: the source or the cluster is down
                        return
                    if step not in all_steps:  # found missing while it served as a reference
                        bar.advance(steps_task)
                        continue
                    following = plan.todo[i + 1] if runner.prefetches and i + 1 < len(plan.todo) else None
                    yield new_task(step=step, candidates=tuple(plan.available[s] for s in all_steps), architecture=plan.arch,
                                   prefetch=plan.available[following] if following is not None else None)

            def on_start(step: int, units: int) -> None:
                bar.reset(tensor_task, total=units, visible=progress, description=f"step {step}")

            with closing(runner.run(tasks(), on_start=on_start, on_tensor=lambda _name: bar.advance(tensor_task))) as outcomes:
                for task, outcome in outcomes:
                    bar.advance(steps_task)
                    if isinstance(outcome, StepResult):
                        in_a_row = 0
                        store_result(outcome)
                    elif is_fatal(outcome):
                        raise outcome
                    else:
                        if not isinstance(outcome, CkptscopeError):  # a crash or a bug: keep its traceback
                            log.warning("step %d failed", task.step, exc_info=outcome)
                        failures[task.step] = outcome
                        in_a_row += 1
            bar.update(tensor_task, visible=False)  # the last step's tensor bar would stay behind, stale
            if failures:
                written = {row["step"] for row in report}
                not_started = sum(1 for s in plan.todo if s in all_steps and s not in written and s not in failures)
                raise _failed(failures, not_started) from next(iter(failures.values()))
            if all_steps:
                _refresh_final(plan, db, analyzers, all_steps, ckpts, bar)
    finally:  # hub downloads and memory maps are released however the run ends
        ckpts.keep_only(set())
    duplicates = dict(db.sql("SELECT step, duplicate_of FROM checkpoints WHERE model = ?", [plan.model]).rows())
    for row in report:
        if duplicates.get(row["step"]) is not None:
            row.update(status="duplicate", duplicate_of=duplicates[row["step"]])
    return pl.DataFrame(report, schema=REPORT_SCHEMA).sort("step")


def _failed(failures: dict[int, BaseException], not_started: int) -> StepsFailed:
    """One line naming the failed steps and why; the other steps are in the store."""
    n = len(failures)
    listed = "; ".join(f"step {step}: {describe(exc)}" for step, exc in sorted(failures.items())[:MAX_LISTED])
    more = f"; {n - MAX_LISTED} more" if n > MAX_LISTED else ""
    stopped = f"; {not_started} step{'s' * (not_started > 1)} not started after that" if not_started else ""
    return StepsFailed(f"{n} step{'s' * (n > 1)} failed and {'were' if n > 1 else 'was'} not written ({listed}{more}){stopped}; "
                       "the steps that completed are saved: run the same command again to resume")


def _refresh_final(plan: Plan, db: Store, analyzers: list[Analyzer], all_steps: list[int], ckpts: Checkpoints,
                   bar: Progress) -> None:
    """Recompute `final_*` rows of steps whose stored final reference is no longer the last step."""
    weights = next((a for a in analyzers if isinstance(a, WeightAnalyzer)), None)
    if weights is None:
        return
    final = all_steps[-1]
    params = db.run_parameters(plan.model, weights.name)
    stale = [s for s in sorted(params) if params[s].get("final_step") != final and s in plan.available]
    if not stale:
        return
    task = bar.add_task(f"re-basing {len(stale)} steps on final step {final}", total=len(stale))
    for step in stale:
        ckpts.keep_only({all_steps[0], step, final})
        ckpt = ckpts.get(step)
        plan.adopt(ckpt)  # a re-basing-only run opens nothing else first
        ctx = AnalysisContext(checkpoint=ckpt, family=plan.arch.family, config=plan.arch.config,
                              final=ckpts.get(final) if step != final else None)
        db.replace_metrics(plan.model, step, weights.name, list(FINAL_METRICS), weights.refresh_final(ctx),
                           {**params[step], "final_step": final})
        bar.advance(task)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
