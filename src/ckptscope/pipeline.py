"""Ingest: source → checkpoints → analyzers → rows → store.

`ingest()` validates everything it can before the store is touched (paths, step selection,
analyzer names, every selected checkpoint's headers, shape agreement across steps), so bad
input leaves the store exactly as it was. Then it walks the steps in order, one checkpoint
at a time; each checkpoint's rows land in one transaction, so an interrupted run resumes
where it stopped and never duplicates rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ckptscope.analyzers.base import AnalysisContext, Analyzer
from ckptscope.analyzers.registry import build_analyzers
from ckptscope.analyzers.weights import FINAL_METRICS, WeightAnalyzer
from ckptscope.errors import SourceError
from ckptscope.ingest.checkpoint import Checkpoint
from ckptscope.ingest.layers import classify, family, is_buffer
from ckptscope.ingest.local import CheckpointRef, LocalSource, parse_explicit_steps
from ckptscope.ingest.steps import select_steps
from ckptscope.store.db import CheckpointRows, ModelRow, Store, default_store_path


REPORT_SCHEMA = {"step": pl.Int64, "status": pl.String, "duplicate_of": pl.Int64, "tensors": pl.Int64, "seconds": pl.Float64}


@dataclass
class Plan:
    """What an ingest will do, decided before anything is written."""

    model: str
    source: LocalSource
    refs: dict[int, CheckpointRef]  # every selected step
    todo: list[int]
    config: dict | None
    family: str
    shapes: dict[str, tuple[int, ...]]


def _num_layers(config: dict | None, shapes: dict[str, tuple[int, ...]], fam: str) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config and isinstance(config.get(key), int):
            return config[key]
    layers = [r.layer for r in (classify(n, fam) for n in shapes) if r.layer is not None]
    return max(layers) + 1 if layers else None


def _validate(ckpts: list[Checkpoint]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint readable and of one architecture; returns the shared shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    first_step = ckpts[0].step
    for ckpt in ckpts:
        current = {name: info.shape for name, info in ckpt.tensors.items() if not is_buffer(name)}
        if not current:
            raise SourceError(f"{ckpt.path}: the checkpoint holds no tensors; re-save it")
        for name, shape in current.items():
            if shapes.get(name, shape) != shape:
                raise SourceError(
                    f"step {ckpt.step}: tensor {name} has shape {list(shape)} but step {first_step} has {list(shapes[name])}; "
                    "a model's checkpoints must share one architecture (ingest it under another --name)"
                )
        shapes.update(current)
        ckpt.close()
    return shapes


def plan_ingest(source: str | Path, *, name: str | None, steps: str | None, max_steps: int | None,
                analyzers: list[Analyzer]) -> Plan:
    """Resolve the source and steps and validate every selected checkpoint; reads no store."""
    explicit = parse_explicit_steps(steps)
    src = LocalSource(source, explicit)
    available = {ref.step: ref for ref in src.refs()}
    selected = select_steps(None if explicit else steps, list(available), max_steps=max_steps)
    if any(isinstance(a, WeightAnalyzer) for a in analyzers):
        # Deltas and convergence are taken against the first and last checkpoints.
        selected = sorted({*selected, min(available), max(available)})
    refs = {s: available[s] for s in selected}
    ckpts = [src.open(refs[s]) for s in selected]
    shapes = _validate(ckpts)
    config = next((c.config for c in ckpts if c.config), None)
    return Plan(name or src.default_name, src, refs, list(selected), config, family(config), shapes)


def reconcile(plan: Plan, store: Store, analyzers: list[Analyzer], *, force: bool) -> None:
    """Check the plan against what the store already holds and drop steps already done."""
    stored = store.sql("SELECT tensor, shape FROM tensors WHERE model = ? AND step = (SELECT min(step) FROM tensors WHERE model = ?)",
                       [plan.model, plan.model])
    stored_shapes = {row["tensor"]: tuple(row["shape"]) for row in stored.iter_rows(named=True)}
    for name, shape in plan.shapes.items():
        if name in stored_shapes and stored_shapes[name] != shape:
            raise SourceError(
                f"tensor {name} has shape {list(shape)} but model {plan.model!r} in the store has {list(stored_shapes[name])}; "
                "ingest this run under another --name"
            )
    if not force:
        done = set.intersection(*(store.steps_done(plan.model, a.name) for a in analyzers))
        plan.todo = [s for s in plan.todo if s not in done]


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        yield bar


def ingest(source: str | Path, *, store: Store | str | Path | None = None, name: str | None = None,
           steps: str | None = None, max_steps: int | None = None, analyzers: str | list[str] | None = "weights",
           force: bool = False, tokens_per_step: int | None = None, device: str = "cpu",
           rtol: float = 1e-3, progress: bool = False) -> pl.DataFrame:
    """Analyze the checkpoints of a local run into the store; returns one row per step written.

    `steps` is a selection SPEC (see `ckptscope.ingest.steps`) or explicit `STEP=PATH` pairs.
    Steps already analyzed are skipped unless `force`. Raises `CkptscopeError` on bad input,
    before anything is written.
    """
    chosen = build_analyzers(analyzers, rtol=rtol)
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise SourceError("--tokens-per-step must be a positive number of tokens")
    plan = plan_ingest(source, name=name, steps=steps, max_steps=max_steps, analyzers=chosen)
    if isinstance(store, Store):
        reconcile(plan, store, chosen, force=force)
        return _execute(plan, store, chosen, tokens_per_step=tokens_per_step, device=device, progress=progress)
    path = Path(store) if store is not None else default_store_path()
    if path.exists():  # look read-only first: a mistake found here must not touch the file
        with Store(path, read_only=True) as ro:
            reconcile(plan, ro, chosen, force=force)
        if not plan.todo:
            return _execute(plan, None, chosen, tokens_per_step=tokens_per_step, device=device, progress=progress)
    with Store(path) as db:
        reconcile(plan, db, chosen, force=force)
        return _execute(plan, db, chosen, tokens_per_step=tokens_per_step, device=device, progress=progress)


def _execute(plan: Plan, db: Store | None, analyzers: list[Analyzer], *, tokens_per_step: int | None,
             device: str, progress: bool) -> pl.DataFrame:
    if db is None or not plan.todo:
        return pl.DataFrame(schema=REPORT_SCHEMA)
    prior = db.model(plan.model)
    if tokens_per_step is None and prior:
        tokens_per_step = prior["tokens_per_step"]
    num_parameters = sum(_numel(s) for s in plan.shapes.values())
    model_row = ModelRow(source=plan.source.id, architecture=plan.family, num_layers=_num_layers(plan.config, plan.shapes, plan.family),
                         num_parameters=num_parameters, tokens_per_step=tokens_per_step, config=plan.config)
    stored = db.checkpoints(plan.model).filter(pl.col("status") == "ok")
    known_paths = {row["step"]: Path(row["source"]) for row in stored.iter_rows(named=True)}
    known_paths.update({s: ref.path for s, ref in plan.refs.items()})
    hashes = {row["content_hash"]: row["step"] for row in stored.iter_rows(named=True) if row["content_hash"]}
    all_steps = sorted(known_paths)
    opened: dict[int, Checkpoint] = {}

    def checkpoint(step: int | None) -> Checkpoint | None:
        if step is None:
            return None
        if step not in opened:
            path = known_paths[step]
            if not path.is_dir():
                raise SourceError(f"reference step {step} was ingested from {path}, which no longer exists; restore it or re-ingest with --force")
            opened[step] = Checkpoint(path, step=step, revision=plan.refs[step].revision if step in plan.refs else path.name)
        return opened[step]

    report = []
    with _progress(progress) as bar:
        steps_task = bar.add_task(f"[bold]{plan.model}[/] checkpoints", total=len(plan.todo))
        tensor_task = bar.add_task("tensors", total=0, visible=False)
        for step in plan.todo:
            started = time.perf_counter()
            idx = all_steps.index(step)
            ckpt = checkpoint(step)
            digest = ckpt.content_hash()
            duplicate_of = hashes.get(digest) if hashes.get(digest) != step else None
            hashes.setdefault(digest, step)
            n_tensors = sum(1 for n in ckpt.tensors if not is_buffer(n))
            bar.reset(tensor_task, total=n_tensors * len(analyzers), visible=progress, description=f"step {step}")
            ctx = AnalysisContext(
                checkpoint=ckpt, family=plan.family, config=plan.config, device=device,
                first=checkpoint(all_steps[0]) if idx > 0 else None,
                previous=checkpoint(all_steps[idx - 1]) if idx > 0 else None,
                final=checkpoint(all_steps[-1]) if step != all_steps[-1] else None,
                on_tensor=lambda _name: bar.advance(tensor_task),
            )
            runs = [a.analyze(ctx) for a in analyzers]
            rows = CheckpointRows(
                model=plan.model, step=step, tokens=step * tokens_per_step if tokens_per_step else None,
                revision=ckpt.revision, source=str(ckpt.path), content_hash=digest,
                tensors=_tensor_rows(ckpt, plan.family), runs=runs, duplicate_of=duplicate_of,
            )
            db.write_checkpoint(rows, replace=True, model=model_row)
            model_row = None
            report.append({"step": step, "status": "duplicate" if duplicate_of is not None else "ok",
                           "duplicate_of": duplicate_of, "tensors": n_tensors, "seconds": round(time.perf_counter() - started, 3)})
            bar.advance(steps_task)
            for s in [s for s in opened if s not in (all_steps[0], all_steps[-1], step)]:
                opened.pop(s).close()
        _refresh_final(plan, db, analyzers, all_steps, checkpoint, bar)
    return pl.DataFrame(report, schema=REPORT_SCHEMA)


def _refresh_final(plan: Plan, db: Store, analyzers: list[Analyzer], all_steps: list[int], checkpoint, bar: Progress) -> None:
    """Recompute `final_*` rows of steps whose stored final reference is no longer the last step."""
    weights = next((a for a in analyzers if isinstance(a, WeightAnalyzer)), None)
    if weights is None:
        return
    final = all_steps[-1]
    stale = [s for s, p in sorted(db.run_parameters(plan.model, weights.name).items()) if p.get("final_step") != final]
    if not stale:
        return
    task = bar.add_task(f"re-basing {len(stale)} steps on final step {final}", total=len(stale))
    for step in stale:
        ctx = AnalysisContext(checkpoint=checkpoint(step), family=plan.family, config=plan.config,
                              final=checkpoint(final) if step != final else None)
        params = db.run_parameters(plan.model, weights.name)[step]
        params["final_step"] = final
        db.replace_metrics(plan.model, step, weights.name, list(FINAL_METRICS), weights.refresh_final(ctx), params)
        bar.advance(task)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_rows(ckpt: Checkpoint, fam: str) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("tensor", "layer", "component", "shape", "dtype")}
    for name, info in ckpt.tensors.items():
        if is_buffer(name):
            continue
        role = classify(name, fam)
        for key, value in zip(cols, (name, role.layer, role.component, list(info.shape), info.dtype)):
            cols[key].append(value)
    return cols
