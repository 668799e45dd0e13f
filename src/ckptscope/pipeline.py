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
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ckptscope.analyzers.base import AnalysisContext, Analyzer
from ckptscope.analyzers.registry import build_analyzers
from ckptscope.analyzers.weights import FINAL_METRICS, WeightAnalyzer
from ckptscope.errors import MissingRevision, SourceError
from ckptscope.ingest.checkpoint import Checkpoint
from ckptscope.ingest.layers import classify, family, is_buffer
from ckptscope.ingest.local import CheckpointRef, LocalSource, Source, parse_explicit_steps
from ckptscope.ingest.steps import select_steps
from ckptscope.store.db import CheckpointRows, ModelRow, Store, default_store_path


REPORT_SCHEMA = {"step": pl.Int64, "status": pl.String, "duplicate_of": pl.Int64, "tensors": pl.Int64, "seconds": pl.Float64}


@dataclass
class Plan:
    """What an ingest will do, decided before anything is written."""

    model: str
    source: Source
    available: dict[int, CheckpointRef]  # every step the source holds
    todo: list[int]  # selected steps still to analyze, ascending
    config: dict | None
    family: str
    shapes: dict[str, tuple[int, ...]]  # of the first checkpoint; remote sources fill it on first open
    stored_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stale_final: bool = False  # stored final_* rows point at an older final step

    def adopt(self, ckpt: Checkpoint) -> None:
        """Check a checkpoint against the run's architecture (taking it as the run's, if first)."""
        current = {name: info.shape for name, info in ckpt.tensors.items() if not is_buffer(name)}
        if not current:
            raise SourceError(f"{ckpt.path}: the checkpoint holds no tensors; re-save it")
        if not self.shapes:
            _check_against_store(self, current)
            self.shapes, self.config = current, ckpt.config
            self.family = family(ckpt.config)
            return
        for name, shape in current.items():
            if self.shapes.get(name, shape) != shape:
                raise SourceError(f"step {ckpt.step}: tensor {name} has shape {list(shape)}, other steps have "
                                  f"{list(self.shapes[name])}; a model's checkpoints must share one architecture "
                                  "(ingest it under another --name)")


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
    from ckptscope.ingest.hub import HubSource  # loads huggingface_hub only for hub sources

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
    plan = Plan(name or src.default_name, src, available, list(selected), None, "unknown", {})
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
    _check_against_store(plan, plan.shapes)
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
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        yield bar


def ingest(source: str | Path, *, store: Store | str | Path | None = None, name: str | None = None,
           steps: str | None = None, max_steps: int | None = None, analyzers: str | list[str] | None = "weights",
           force: bool = False, tokens_per_step: int | None = None, device: str = "cpu",
           rtol: float = 1e-3, revision_pattern: str | None = None, keep: bool = False,
           cache_dir: Path | str | None = None, probe: Path | str | None = None, corpus: Path | str | None = None,
           reference_step: str | int = "final", batch_size: int = 16, prompt_len: int = 32, continuation_len: int = 32,
           progress: bool = False) -> pl.DataFrame:
    """Analyze the checkpoints of a local run or a hub suite into the store; one row per step written.

    `steps` is a selection SPEC (see `ckptscope.ingest.steps`) or explicit `STEP=PATH` pairs.
    Steps already analyzed are skipped unless `force`. Raises `CkptscopeError` on bad input,
    before anything is written. Hub downloads are evicted after use unless `keep`. `probe`
    feeds the `convergence` analyzer, `corpus` the `memorization` analyzer.
    """
    _check_device(device)
    chosen = build_analyzers(analyzers, rtol=rtol, probe=probe, corpus=corpus, reference_step=reference_step,
                             batch_size=batch_size, prompt_len=prompt_len, continuation_len=continuation_len)
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise SourceError("--tokens-per-step must be a positive number of tokens")
    src = open_source(source, steps=steps, revision_pattern=revision_pattern, keep=keep, cache_dir=cache_dir)
    try:
        plan = plan_ingest(src, name=name, steps=steps, max_steps=max_steps, analyzers=chosen)
        return _run(plan, store, chosen, force=force, tokens_per_step=tokens_per_step, device=device, progress=progress)
    finally:
        src.close()


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SourceError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SourceError(f"--device {device}: no CUDA GPU is available to this torch build; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise SourceError(f"--device {device}: only cpu and cuda are supported")


def _run(plan: Plan, store: Store | str | Path | None, chosen: list[Analyzer], *, force: bool,
         tokens_per_step: int | None, device: str, progress: bool) -> pl.DataFrame:
    if isinstance(store, Store):
        reconcile(plan, store, chosen, force=force)
        return _execute(plan, store, chosen, tokens_per_step=tokens_per_step, device=device, progress=progress)
    path = Path(store) if store is not None else default_store_path()
    if path.exists():  # look read-only first: a mistake found here must not touch the file
        with Store(path, read_only=True) as ro:
            reconcile(plan, ro, chosen, force=force)
        if not plan.todo and not plan.stale_final:
            return _execute(plan, None, chosen, tokens_per_step=tokens_per_step, device=device, progress=progress)
    with Store(path) as db:
        reconcile(plan, db, chosen, force=force)
        return _execute(plan, db, chosen, tokens_per_step=tokens_per_step, device=device, progress=progress)


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


class _Checkpoints:
    """Checkpoints opened through the source: the ones still needed stay, the rest are released.

    Holding only {first, previous, current, final, next} bounds memory and, for hub sources,
    disk, however many steps a sweep covers.
    """

    def __init__(self, source: Source, refs: dict[int, CheckpointRef]) -> None:
        self.source, self.refs, self.open = source, refs, {}

    def get(self, step: int | None) -> Checkpoint | None:
        if step is None:
            return None
        if step not in self.open:
            self.open[step] = self.source.open(self.refs[step])
        return self.open[step]

    def prefetch(self, step: int) -> None:
        self.source.prefetch(self.refs[step])

    def keep_only(self, steps: set[int]) -> None:
        for step in [s for s in self.open if s not in steps]:
            del self.open[step]
            self.source.release(self.refs[step])


def _execute(plan: Plan, db: Store | None, analyzers: list[Analyzer], *, tokens_per_step: int | None,
             device: str, progress: bool) -> pl.DataFrame:
    if db is None or not (plan.todo or plan.stale_final):
        return pl.DataFrame(schema=REPORT_SCHEMA)
    prior = db.model(plan.model)
    if tokens_per_step is None and prior:
        tokens_per_step = prior["tokens_per_step"]
    stored = db.checkpoints(plan.model).filter(pl.col("status") == "ok")
    stored_ok = set(stored["step"].to_list())
    hashes: dict[str, set[int]] = {}
    for row in stored.iter_rows(named=True):
        if row["content_hash"]:
            hashes.setdefault(row["content_hash"], set()).add(row["step"])
    # References are the steps in the store or being ingested that the source still holds.
    all_steps = sorted(set(plan.todo) | (stored_ok & set(plan.available)))
    ckpts = _Checkpoints(plan.source, plan.available)
    registered = False
    report: list[dict] = []

    def tokens(step: int) -> int | None:
        known = plan.source.tokens(step, plan.available[step].revision)
        return known if known is not None else (step * tokens_per_step if tokens_per_step else None)

    def write(rows: CheckpointRows) -> None:
        nonlocal registered
        model = None if registered else ModelRow(
            source=plan.source.id, architecture=plan.family, num_layers=_num_layers(plan.config, plan.shapes, plan.family),
            num_parameters=sum(_numel(s) for s in plan.shapes.values()), tokens_per_step=tokens_per_step, config=plan.config)
        db.write_checkpoint(rows, replace=True, model=model)
        registered = True

    def pick(candidates: list[int]) -> Checkpoint | None:
        """The first candidate the source can open; revisions without weights are recorded and dropped."""
        for step in candidates:
            try:
                ckpt = ckpts.get(step)
            except MissingRevision as exc:
                all_steps.remove(step)
                if step not in stored_ok and plan.shapes:
                    write(CheckpointRows(model=plan.model, step=step, tokens=tokens(step), revision=plan.available[step].revision,
                                         source=plan.source.id, content_hash=None, tensors=_tensor_rows(None, plan.family),
                                         runs=[], status="missing", anomaly=("missing_revision", str(exc))))
                    report.append({"step": step, "status": "missing", "duplicate_of": None, "tensors": 0, "seconds": 0.0})
                continue
            plan.adopt(ckpt)
            return ckpt
        return None

    try:
        with _progress(progress) as bar:
            steps_task = bar.add_task(f"[bold]{plan.model}[/] checkpoints", total=len(plan.todo))
            tensor_task = bar.add_task("tensors", total=0, visible=False)
            for i, step in enumerate(plan.todo):
                bar.advance(steps_task)
                if step not in all_steps:  # found missing while it served as a reference
                    continue
                started = time.perf_counter()
                idx = all_steps.index(step)
                ckpts.keep_only({all_steps[0], all_steps[idx - 1] if idx else step, step, all_steps[-1]})
                if i + 1 < len(plan.todo):
                    ckpts.prefetch(plan.todo[i + 1])
                first = pick(all_steps[:idx])
                ckpt = pick([step])
                if ckpt is None:
                    continue
                idx = all_steps.index(step)
                previous = pick(all_steps[idx - 1 :: -1] if idx else [])
                final = pick(all_steps[: idx : -1])
                digest = ckpt.content_hash()
                same = hashes.setdefault(digest, set())
                duplicate_of = min((s for s in same if s < step), default=None)  # always the earliest identical step
                same.add(step)
                n_tensors = sum(1 for n in ckpt.tensors if not is_buffer(n))
                bar.reset(tensor_task, total=n_tensors * len(analyzers), visible=progress, description=f"step {step}")
                ctx = AnalysisContext(checkpoint=ckpt, family=plan.family, config=plan.config, device=device,
                                      first=first, previous=previous, final=final,
                                      on_tensor=lambda _name: bar.advance(tensor_task))
                runs = [a.analyze(ctx) for a in analyzers]
                write(CheckpointRows(
                    model=plan.model, step=step, tokens=tokens(step), revision=ckpt.revision,
                    source=str(ckpt.path) if plan.source.kind == "local" else plan.source.id, content_hash=digest,
                    tensors=_tensor_rows(ckpt, plan.family), runs=runs, duplicate_of=duplicate_of,
                ))
                report.append({"step": step, "status": "duplicate" if duplicate_of is not None else "ok",
                               "duplicate_of": duplicate_of, "tensors": n_tensors, "seconds": round(time.perf_counter() - started, 3)})
            if all_steps:
                _refresh_final(plan, db, analyzers, all_steps, ckpts, bar)
    finally:  # hub downloads and memory maps are released however the run ends
        ckpts.keep_only(set())
    return pl.DataFrame(report, schema=REPORT_SCHEMA).sort("step")


def _refresh_final(plan: Plan, db: Store, analyzers: list[Analyzer], all_steps: list[int], ckpts: _Checkpoints,
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
        ctx = AnalysisContext(checkpoint=ckpt, family=plan.family, config=plan.config,
                              final=ckpts.get(final) if step != final else None)
        db.replace_metrics(plan.model, step, weights.name, list(FINAL_METRICS), weights.refresh_final(ctx),
                           {**params[step], "final_step": final})
        bar.advance(task)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_rows(ckpt: Checkpoint | None, fam: str) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("tensor", "layer", "component", "shape", "dtype")}
    for name, info in (ckpt.tensors.items() if ckpt is not None else ()):
        if is_buffer(name):
            continue
        role = classify(name, fam)
        for key, value in zip(cols, (name, role.layer, role.component, list(info.shape), info.dtype)):
            cols[key].append(value)
    return cols
