"""The unit of work every executor runs: `StepWorker.run(StepTask) -> StepResult`.

A task opens one step and the reference checkpoints its analyzers declare (first, previous,
final, numbered steps, or the same step of another model's source), checks that they share one architecture and runs the analyzers.
The reference-picking rules live here once, so results are identical whichever executor ran
the step. A worker keeps its opened source, analyzers and reference checkpoints between steps,
so the first and final checkpoints are opened (or downloaded) once per process, not per step.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ckptscope.analyzers.contract import ROLES, AnalysisContext, Analyzer, Progress, SameStep
from ckptscope.analyzers.registry import build
from ckptscope.errors import MissingRevision, SourceError
from ckptscope.options import Options
from ckptscope.rows import RunRows
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify, family, is_buffer
from ckptscope.sources.local import CheckpointRef, Source
from ckptscope.sources.spec import SourceSpec
from ckptscope.sources.trainer_state import TrainerState, read_trainer_state


class ArchitectureMismatch(SourceError):
    """Checkpoints of one model with different tensor shapes: the run stops, whichever worker found it."""


@dataclass(frozen=True)
class Architecture:
    """A model's tensor shapes and config, as read from one of its checkpoints (`step`); tied
    copies are left out, so a parameter is counted once."""

    step: int
    shapes: dict[str, tuple[int, ...]]
    config: dict | None
    family: str

    @classmethod
    def of(cls, ckpt: Checkpoint) -> Architecture:
        shapes = {name: info.shape for name, info in ckpt.tensors.items() if not is_buffer(name)}
        if not shapes:
            raise SourceError(f"{ckpt.path}: the checkpoint holds no tensors; re-save it")
        return cls(ckpt.step, shapes, ckpt.config, family(ckpt.config))

    def check(self, other: Architecture) -> None:
        """Raise ArchitectureMismatch when `other` has a tensor of another shape."""
        for name, shape in other.shapes.items():
            if self.shapes.get(name, shape) != shape:
                raise ArchitectureMismatch(
                    f"step {other.step}: tensor {name} has shape {list(shape)}, other steps have {list(self.shapes[name])}; "
                    "a model's checkpoints must share one architecture (ingest it under another --name)")


class Checkpoints:
    """Checkpoints opened through the source: the ones still needed stay, the rest are released.

    Holding only the current step and its references (plus a prefetched next) bounds memory
    and, for hub sources, disk, however many steps a sweep covers.
    """

    def __init__(self, source: Source, refs: dict[int, CheckpointRef]) -> None:
        self.source, self.refs, self.open = source, refs, {}

    def get(self, step: int | None) -> Checkpoint | None:
        if step is None:
            return None
        if step not in self.open:
            self.open[step] = self.source.open(self.refs[step])
        return self.open[step]

    def keep_only(self, steps: set[int]) -> None:
        for step in [s for s in self.open if s not in steps]:
            del self.open[step]
            self.source.release(self.refs[step])


class Counterparts:
    """The same step of other models' sources (`SameStep` references): each source opened once per
    process (hub sources with a private download cache, as `SourceSpec.for_worker` makes), and only
    the current step's checkpoint held, so a sweep over many steps holds one checkpoint per other model."""

    def __init__(self) -> None:
        self.sources: dict[SourceSpec, tuple[Source, Path | None, dict[int, CheckpointRef]]] = {}
        self.held: dict[SourceSpec, tuple[int, Checkpoint]] = {}

    def get(self, spec: SourceSpec, step: int) -> Checkpoint | None:
        """The checkpoint of `step` in `spec`'s source; None when the source has no weights for it."""
        if spec not in self.sources:
            src, private = spec.for_worker()
            self.sources[spec] = (src, private, {ref.step: ref for ref in src.refs()})
        src, _, refs = self.sources[spec]
        held = self.held.get(spec)
        if held is not None and held[0] == step:
            return held[1]
        if held is not None:
            del self.held[spec]
            src.release(refs[held[0]])
        if step not in refs:
            return None
        try:
            ckpt = src.open(refs[step])
        except MissingRevision:
            return None
        self.held[spec] = (step, ckpt)
        return ckpt

    def close(self) -> None:
        for spec, (step, _) in list(self.held.items()):
            self.sources[spec][0].release(self.sources[spec][2][step])
        self.held.clear()
        for src, private, _ in self.sources.values():
            src.close()
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)
        self.sources.clear()


@dataclass(frozen=True)
class AnalyzerSpec:
    """The chosen analyzers by name with their built options: all a worker needs to build the same ones."""

    chosen: tuple[tuple[str, Options], ...]

    @classmethod
    def of(cls, analyzers: list[Analyzer]) -> AnalyzerSpec:
        return cls(tuple((a.name, a.options) for a in analyzers))

    def build(self) -> list[Analyzer]:
        return [build(name, options) for name, options in self.chosen]


@dataclass(frozen=True)
class StepTask:
    """One step to analyze, described completely enough for any process to do it.

    `candidates` are the references the driver knows of (the steps stored or being ingested that
    the source holds), ascending, the step among them; first, previous and final are picked from
    them by the rules in `StepWorker.run`. `pinned` are the numbered reference steps analyzers
    declared. `architecture` is the model's, once the driver knows it.
    """

    source: SourceSpec
    analyzers: AnalyzerSpec
    step: int
    candidates: tuple[CheckpointRef, ...]
    architecture: Architecture | None
    pinned: tuple[CheckpointRef, ...] = ()
    device: str = "cpu"
    threads: int | None = None  # torch threads of the worker process; None leaves them
    prefetch: CheckpointRef | None = None  # the step this process analyzes next (in-process runs)
    counterparts: tuple[tuple[SameStep, SourceSpec], ...] = ()  # SameStep references, resolved by the driver to sources
    skip: frozenset[str] = frozenset()  # analyzers (run names) whose rows for this step are stored already
    stored_hash: str | None = None  # the step's content_hash in the store, when `skip` is not empty


def still_to_run(analyzers: list[Analyzer], done: frozenset[str]) -> list[Analyzer]:
    """The analyzers that run on a step: those whose rows for it (`done`, run names) are not stored."""
    return [a for a in analyzers if a.run_name not in done]


@dataclass
class StepResult:
    """What a worker sends back for one step; `content_hash` is None when the step has no weights."""

    step: int
    revision: str | None = None
    source: str | None = None  # the label stored in `checkpoints.source`
    content_hash: str | None = None
    tensors: dict[str, list] = field(default_factory=dict)
    runs: list[RunRows] = field(default_factory=list)
    missing: list[tuple[int, str, str]] = field(default_factory=list)  # (step, revision, why) of revisions without weights
    architecture: Architecture | None = None  # read by the worker when the task carried none
    trainer_state: TrainerState | None = None  # the checkpoint's trainer_state.json, when it has one
    n_tensors: int = 0
    seconds: float = 0.0


class Reporter(Protocol):
    """Progress of the analyzers on a step, for the driver's bars (in-process runs only)."""

    def start(self, step: int, analyzer: str, unit: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class StepWorker:
    """The per-step work, with what a process keeps between steps: the source, the analyzers, the
    open checkpoints (references stay open across steps) and the revisions found missing."""

    def __init__(self, source: Source, analyzers: list[Analyzer]) -> None:
        self.source, self.analyzers = source, analyzers
        self.ckpts = Checkpoints(source, {})
        self.others = Counterparts()
        self.missing: dict[int, tuple[str, str]] = {}  # step -> (revision, why)

    def run(self, task: StepTask, reporter: Reporter | None = None) -> StepResult:
        """Analyze `task.step` against first = the first openable candidate before it, previous =
        the nearest openable one before it, final = the last openable one after it, and the
        pinned steps; only the references some analyzer declared are opened.

        A candidate without weights (MissingRevision) is skipped and reported, never fatal.
        """
        started = time.perf_counter()
        running = still_to_run(self.analyzers, task.skip)
        roles = {r for a in running for r in a.references(a.options) if r in ROLES}  # only the references they use
        self.ckpts.refs.update((ref.step, ref) for ref in (*task.candidates, *task.pinned))
        steps = [ref.step for ref in task.candidates if ref.step not in self.missing]
        arch, result = task.architecture, StepResult(task.step)

        def pick(candidates: list[int]) -> Checkpoint | None:
            nonlocal arch
            for step in candidates:
                try:
                    ckpt = self.ckpts.get(step)
                except MissingRevision as exc:
                    self.missing[step] = (self.ckpts.refs[step].revision, str(exc))
                    if step in steps:  # a pinned reference need not be a candidate
                        steps.remove(step)
                    continue
                found = Architecture.of(ckpt)
                if arch is None:
                    arch = result.architecture = found
                else:
                    arch.check(found)
                return ckpt
            return None

        try:
            if task.step not in steps:  # found missing by an earlier task of this process
                return result
            idx = steps.index(task.step)
            wanted = {task.step, *(ref.step for ref in task.pinned)}
            wanted |= {steps[0]} if "first" in roles else set()
            wanted |= {steps[idx - 1] if idx else task.step} if "previous" in roles else set()
            wanted |= {steps[-1]} if "final" in roles else set()
            self.ckpts.keep_only(wanted)
            if task.prefetch is not None:
                self.source.prefetch(task.prefetch)
            refs: dict[str | int, Checkpoint | None] = {}
            if "first" in roles:
                refs["first"] = pick(steps[:idx])
            ckpt = pick([task.step])
            if ckpt is None:
                return result
            for key, spec in task.counterparts:
                refs[key] = self.others.get(spec, task.step)
            idx = steps.index(task.step)
            if "previous" in roles:
                refs["previous"] = pick(steps[idx - 1 :: -1] if idx else [])
            if "final" in roles:
                refs["final"] = pick(steps[: idx : -1])
            for ref in task.pinned:
                refs[ref.step] = None if ref.step == task.step else pick([ref.step])
                if ref.step != task.step and refs[ref.step] is None:
                    raise SourceError(f"reference step {ref.step} has no weights in the source; choose another --reference-step")
            result.revision, result.content_hash = ckpt.revision, ckpt.content_hash()
            if task.skip and task.stored_hash not in (None, result.content_hash):
                raise SourceError(f"step {task.step} changed since analyzer(s) {', '.join(sorted(task.skip))} analyzed it "
                                  "(its weight files hash differently); add --force to recompute it with every analyzer")
            result.source = str(ckpt.path) if self.source.kind == "local" else self.source.id
            result.tensors = tensor_rows(ckpt, arch.family)
            result.n_tensors = len(result.tensors["tensor"])
            result.trainer_state = read_trainer_state(ckpt.path)
            shared: dict = {}
            for a in running:
                progress = Progress() if reporter is None else Progress(
                    lambda total, a=a: reporter.start(task.step, a.name, a.unit, total), reporter.advance)
                keys = a.references(a.options)
                ctx = AnalysisContext(checkpoint=ckpt, family=arch.family, config=arch.config, device=task.device,
                                      references={k: refs.get(k) for k in keys}, progress=progress, shared=shared)
                result.runs.append(a.analyze(ctx))
            result.seconds = round(time.perf_counter() - started, 3)
            return result
        finally:  # every revision found without weights goes back, so the driver records it once
            result.missing = [(s, *self.missing[s]) for s in (ref.step for ref in task.candidates) if s in self.missing]

    def release(self) -> None:
        """Release every open checkpoint (hub downloads are evicted unless kept) and other models' sources."""
        self.ckpts.keep_only(set())
        self.others.close()


def tensor_rows(ckpt: Checkpoint | None, fam: str) -> dict[str, list]:
    """The `tensors` rows of a checkpoint (none for a missing one); buffers are skipped.

    Every stored name gets a row; a tied copy's `tied_to` names the tensor analyzed for it."""
    cols: dict[str, list] = {k: [] for k in ("tensor", "layer", "component", "shape", "dtype", "tied_to")}
    for name, info in (ckpt.stored.items() if ckpt is not None else ()):
        if is_buffer(name):
            continue
        role = classify(name, fam)
        for key, value in zip(cols, (name, role.layer, role.component, list(info.shape), info.dtype, ckpt.ties.get(name))):
            cols[key].append(value)
    return cols


# -- worker processes -----------------------------------------------------------------------

_worker: tuple[tuple[SourceSpec, AnalyzerSpec], StepWorker, object] | None = None


def run_step(task: StepTask) -> StepResult:
    """One step in a pool or cluster worker process, rows returned as Arrow.

    The process keeps its `StepWorker` for the next task of the same source and analyzers.
    """
    import torch

    global _worker
    key = (task.source, task.analyzers)
    if _worker is None or _worker[0] != key:
        close_worker()
        src, private = task.source.for_worker()
        _worker = (key, StepWorker(src, task.analyzers.build()), private)
    if task.threads is not None and torch.get_num_threads() != task.threads:
        torch.set_num_threads(task.threads)
    result = _worker[1].run(task)
    result.runs = [run.to_arrow() for run in result.runs]
    return result


def close_worker() -> None:
    """Release what this process holds for its last run: checkpoints, the source, a private cache."""
    global _worker
    if _worker is None:
        return
    _, worker, private = _worker
    _worker = None
    worker.release()
    worker.source.close()
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)

