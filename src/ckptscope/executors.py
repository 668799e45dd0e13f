"""Where the per-step work runs: in this process, in a local process pool, or on a Ray cluster.

Every executor runs the same unit of work: `StepWorker.run(StepTask) -> StepResult` opens one
step and its reference checkpoints (first, previous, final), checks that they share one
architecture and runs the analyzers. Only the driver writes the store, one transaction per
result as results arrive, so a step that fails on a worker costs that step alone and a rerun
resumes. Results are identical whichever executor computed them: the reference-picking rules
live here once, and rows travel as Arrow (`RunRows.to_arrow`).

Pool and cluster workers are long-lived processes: each keeps its opened source, analyzers and
reference checkpoints between steps (`run_step`), so the first and final checkpoints are opened
(or downloaded) once per process, not once per step.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import importlib.util
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch

from ckptscope.analyzers.base import AnalysisContext, Analyzer
from ckptscope.analyzers.registry import build_analyzers
from ckptscope.errors import CkptscopeError, MissingRevision, SourceError
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify, family, is_buffer
from ckptscope.sources.local import CheckpointRef, Source
from ckptscope.store.db import RunRows

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'ckptscope[ray]'"


class ArchitectureMismatch(SourceError):
    """Checkpoints of one model with different tensor shapes: the run stops, whichever worker found it."""


class StepsFailed(SourceError):
    """Some steps failed on their workers; every other step was written, and a rerun resumes."""


@dataclass(frozen=True)
class Architecture:
    """A model's tensor shapes and config, as read from one of its checkpoints (`step`)."""

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

    Holding only {first, previous, current, final} (plus a prefetched next) bounds memory and,
    for hub sources, disk, however many steps a sweep covers.
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


@dataclass(frozen=True)
class SourceSpec:
    """The arguments of `open_source`: enough for a worker process to open the driver's source."""

    source: str
    steps: str | None = None
    revision_pattern: str | None = None
    keep: bool = False
    cache_dir: str | None = None

    def open(self) -> tuple[Source, Path | None]:
        """The source, and the private download cache made for this process (None if shared).

        Processes sharing one HF cache would evict each other's files mid-read, so without
        `keep` each worker downloads into a directory of its own, deleted when it exits.
        """
        from ckptscope.pipeline import open_source  # the driver's module, which imports this one

        args = {"steps": self.steps, "revision_pattern": self.revision_pattern, "keep": self.keep, "cache_dir": self.cache_dir}
        src = open_source(self.source, **args)
        if src.kind != "hub" or src.keep:  # a hub source keeps when asked to, and always offline
            return src, None
        base = Path(src.cache_dir)
        src.close()
        base.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix="ckptscope-worker-", dir=base))
        return open_source(self.source, **{**args, "cache_dir": private}), private


@dataclass(frozen=True)
class AnalyzerSpec:
    """Analyzer names and the options `build_analyzers` takes (paths absolute, for other working directories)."""

    names: tuple[str, ...]
    options: tuple[tuple[str, Any], ...]

    def build(self) -> list[Analyzer]:
        return build_analyzers(list(self.names), **dict(self.options))


@dataclass(frozen=True)
class StepTask:
    """One step to analyze, described completely enough for any process to do it.

    `candidates` are the references the driver knows of (the steps stored or being ingested that
    the source holds), ascending, the step among them; first, previous and final are picked from
    them by the rules in `StepWorker.run`. `architecture` is the model's, once the driver knows it.
    """

    source: SourceSpec
    analyzers: AnalyzerSpec
    step: int
    candidates: tuple[CheckpointRef, ...]
    architecture: Architecture | None
    device: str = "cpu"
    threads: int | None = None  # torch threads of the worker process; None leaves them
    prefetch: CheckpointRef | None = None  # the step this process analyzes next (in-process runs)


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
    n_tensors: int = 0
    seconds: float = 0.0


class StepWorker:
    """The per-step work, with what a process keeps between steps: the source, the analyzers, the
    open checkpoints (first and final stay open across steps) and the revisions found missing."""

    def __init__(self, source: Source, analyzers: list[Analyzer]) -> None:
        self.source, self.analyzers = source, analyzers
        self.ckpts = Checkpoints(source, {})
        self.missing: dict[int, tuple[str, str]] = {}  # step -> (revision, why)

    def run(self, task: StepTask, *, on_start: Callable[[int, int], None] | None = None,
            on_tensor: Callable[[str], None] | None = None) -> StepResult:
        """Analyze `task.step` against first = the first openable candidate before it, previous =
        the nearest openable one before it, final = the last openable one after it.

        A candidate without weights (MissingRevision) is skipped and reported, never fatal.
        `on_start(step, units)` and `on_tensor(name)` drive progress bars.
        """
        started = time.perf_counter()
        self.ckpts.refs.update((ref.step, ref) for ref in task.candidates)
        steps = [ref.step for ref in task.candidates if ref.step not in self.missing]
        arch, result = task.architecture, StepResult(task.step)

        def pick(candidates: list[int]) -> Checkpoint | None:
            nonlocal arch
            for step in candidates:
                try:
                    ckpt = self.ckpts.get(step)
                except MissingRevision as exc:
                    self.missing[step] = (self.ckpts.refs[step].revision, str(exc))
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
            self.ckpts.keep_only({steps[0], steps[idx - 1] if idx else task.step, task.step, steps[-1]})
            if task.prefetch is not None:
                self.source.prefetch(task.prefetch)
            first = pick(steps[:idx])
            ckpt = pick([task.step])
            if ckpt is None:
                return result
            idx = steps.index(task.step)
            previous = pick(steps[idx - 1 :: -1] if idx else [])
            final = pick(steps[: idx : -1])
            result.revision, result.content_hash = ckpt.revision, ckpt.content_hash()
            result.source = str(ckpt.path) if self.source.kind == "local" else self.source.id
            result.tensors = tensor_rows(ckpt, arch.family)
            result.n_tensors = len(result.tensors["tensor"])
            if on_start is not None:
                on_start(task.step, result.n_tensors * len(self.analyzers))
            ctx = AnalysisContext(checkpoint=ckpt, family=arch.family, config=arch.config, device=task.device,
                                  first=first, previous=previous, final=final)
            if on_tensor is not None:
                ctx.on_tensor = on_tensor
            result.runs = [a.analyze(ctx) for a in self.analyzers]
            result.seconds = round(time.perf_counter() - started, 3)
            return result
        finally:  # every revision found without weights goes back, so the driver records it once
            result.missing = [(s, *self.missing[s]) for s in (ref.step for ref in task.candidates) if s in self.missing]

    def release(self) -> None:
        """Release every open checkpoint (hub downloads are evicted unless kept)."""
        self.ckpts.keep_only(set())


def tensor_rows(ckpt: Checkpoint | None, fam: str) -> dict[str, list]:
    """The `tensors` rows of a checkpoint (none for a missing one); buffers are skipped."""
    cols: dict[str, list] = {k: [] for k in ("tensor", "layer", "component", "shape", "dtype")}
    for name, info in (ckpt.tensors.items() if ckpt is not None else ()):
        if is_buffer(name):
            continue
        role = classify(name, fam)
        for key, value in zip(cols, (name, role.layer, role.component, list(info.shape), info.dtype)):
            cols[key].append(value)
    return cols


# -- worker processes -----------------------------------------------------------------------

_worker: tuple[tuple[SourceSpec, AnalyzerSpec], StepWorker, Path | None] | None = None


def run_step(task: StepTask) -> StepResult:
    """One step in a pool or cluster worker process, rows returned as Arrow.

    The process keeps its `StepWorker` for the next task of the same source and analyzers.
    """
    global _worker
    key = (task.source, task.analyzers)
    if _worker is None or _worker[0] != key:
        close_worker()
        src, private = task.source.open()
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


def _init_pool_process() -> None:
    """Ctrl-C reaches every process of the terminal's group: an idle pool process ignores it (the
    driver shuts the pool down), and on the way out it releases what it holds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit.register(close_worker)


def _run_step_interruptibly(task: StepTask) -> StepResult:
    """`run_step` in a pool process, where Ctrl-C stops a running step at once."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_step(task)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class _RayWorker:
    """A Ray actor running steps; an actor rather than plain tasks so that it can be told to
    release its checkpoints (and hub downloads) when the run ends."""

    def run(self, task: StepTask) -> StepResult:
        return run_step(task)

    def close(self) -> None:
        close_worker()


# -- executors --------------------------------------------------------------------------------

Outcome = tuple[StepTask, "StepResult | BaseException"]


class Executor(Protocol):
    """Runs step tasks; entered before the store is opened for writing (a cluster that cannot be
    reached is reported with the store untouched), left when the run ends however it ends."""

    window: int  # most steps in flight at once
    threads: int | None
    prefetches: bool  # analyzes the tasks in order in one process, so the next step can be fetched early

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, tasks: Iterable[StepTask], *, on_start: Callable[[int, int], None],
            on_tensor: Callable[[str], None]) -> Iterator[Outcome]:
        """Each task with its result or exception, in the order they finish; `tasks` is pulled
        only when there is room, so each task is built from what the driver knows by then."""


class InProcess:
    """Steps one after another in this process: the default, with per-tensor progress."""

    window = 1
    prefetches = True

    def __init__(self, source: Source, analyzers: list[Analyzer], threads: int | None) -> None:
        self.worker = StepWorker(source, analyzers)
        self.threads = threads
        self._saved_threads = 0

    def __enter__(self) -> InProcess:
        self._saved_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.release()
        torch.set_num_threads(self._saved_threads)

    def run(self, tasks: Iterable[StepTask], *, on_start: Callable[[int, int], None],
            on_tensor: Callable[[str], None]) -> Iterator[Outcome]:
        for task in tasks:
            try:
                outcome: StepResult | BaseException = self.worker.run(task, on_start=on_start, on_tensor=on_tensor)
            except Exception as exc:
                outcome = exc
            yield task, outcome


def _bounded(tasks: Iterable[StepTask], window: int, submit: Callable[[StepTask], Any],
             wait: Callable[[list[Any]], list[tuple[Any, StepResult | BaseException]]],
             cancel: Callable[[list[Any]], None]) -> Iterator[Outcome]:
    """Keep at most `window` tasks in flight, so memory and disk stay bounded on both sides."""
    pending: dict[Any, StepTask] = {}
    queue = iter(tasks)
    try:
        while True:
            for task in islice(queue, window - len(pending)):
                pending[submit(task)] = task
            if not pending:
                return
            for handle, outcome in wait(list(pending)):
                yield pending.pop(handle), outcome
    finally:
        if pending:
            cancel(list(pending))


class LocalPool:
    """Steps in `workers` processes on this machine (spawned: torch is not fork-safe)."""

    prefetches = False

    def __init__(self, workers: int, threads: int | None) -> None:
        self.workers = workers
        self.window = 2 * workers
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // workers)
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalPool:
        self._pool = self._new_pool()
        return self

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_pool_process)

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, tasks: Iterable[StepTask], **_: object) -> Iterator[Outcome]:
        def submit(task: StepTask) -> cf.Future:
            try:
                return self._pool.submit(_run_step_interruptibly, task)
            except BrokenProcessPool:  # a process died and took the pool with it: the steps it held failed, go on
                self._pool.shutdown(wait=False)
                self._pool = self._new_pool()
                return self._pool.submit(_run_step_interruptibly, task)

        def wait(futures: list[cf.Future]) -> list[tuple[cf.Future, StepResult | BaseException]]:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            return [(f, _lost(f.exception()) or f.result()) for f in done]

        yield from _bounded(tasks, self.window, submit, wait, lambda futures: [f.cancel() for f in futures])


class WorkerLost(Exception):
    """A worker process ended while it held steps."""


def _lost(exc: BaseException | None) -> BaseException | None:
    if isinstance(exc, BrokenProcessPool):
        return WorkerLost("a worker process died (killed for memory? a script that runs ingest with several workers "
                          "needs an `if __name__ == '__main__':` guard)")
    return exc


class RayExecutor:
    """Steps on a Ray cluster: one actor per worker, asking for `threads` CPUs (and a GPU for cuda).

    `address` None starts a local Ray instance (or joins the one `RAY_ADDRESS` names), unless this
    process is already connected to Ray (`ray.init` called by the caller): then that connection is used.
    """

    prefetches = False

    def __init__(self, address: str | None, workers: int | None, threads: int | None, device: str) -> None:
        self.address, self.workers, self.device = address, workers, device
        self.threads = threads if threads is not None else 1  # Ray's own default task size
        self.window = 0  # known once the cluster is
        self._started = False
        self._actors: list[Any] = []

    def __enter__(self) -> RayExecutor:
        import ray

        if ray.is_initialized():
            if self.address is not None:
                raise CkptscopeError("--ray-address: this process is already connected to Ray; "
                                     "leave the address out to use that connection")
        else:
            # "local", not None: None would join whatever cluster `ray start` last left on this machine.
            address = self.address or os.environ.get("RAY_ADDRESS") or "local"
            _probe(address)
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise CkptscopeError(f"cannot start or join Ray{f' at {self.address}' if self.address else ''}: "
                                     f"{describe(exc)}; check --ray-address") from None
            self._started = True
        try:
            self._start_actors(ray)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_actors(self, ray: Any) -> None:
        cuda = torch.device(self.device).type == "cuda"
        capacity = ray.cluster_resources()
        if cuda and capacity.get("GPU", 0) < 1:
            raise CkptscopeError("--device cuda: the Ray cluster has no GPU; use --device cpu or add GPU nodes")
        workers = self.workers or max(1, int(capacity.get("GPU", 0) if cuda else capacity.get("CPU", 1) // self.threads))
        # A restarted actor serves the next steps; the steps it held when it died are reported failed.
        actor = ray.remote(num_cpus=self.threads, num_gpus=1 if cuda else 0, max_restarts=3)(_RayWorker)
        self._actors = [actor.remote() for _ in range(workers)]
        self.window = 2 * workers

    def __exit__(self, *exc: object) -> None:
        import ray

        if exc and exc[0] is None and self._actors:  # a clean end: actors release their downloads first
            try:
                ray.get([a.close.remote() for a in self._actors])
            except ray.exceptions.RayError as err:  # the steps are written; only a cleanup is lost
                log.warning("a Ray worker could not release its checkpoints: %s", describe(err))
        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._started:
            ray.shutdown()
            self._started = False

    def run(self, tasks: Iterable[StepTask], **_: object) -> Iterator[Outcome]:
        import ray
        from ray.exceptions import RayTaskError

        load = [0] * len(self._actors)  # tasks queued on each actor
        actor_of: dict[Any, int] = {}

        def submit(task: StepTask) -> Any:
            i = load.index(min(load))
            load[i] += 1
            ref = self._actors[i].run.remote(task)
            actor_of[ref] = i
            return ref

        def wait(refs: list[Any]) -> list[tuple[Any, StepResult | BaseException]]:
            ready, _ = ray.wait(refs, num_returns=1)
            out = []
            for ref in ready:
                load[actor_of.pop(ref)] -= 1
                try:
                    out.append((ref, ray.get(ref)))
                except RayTaskError as exc:  # the step's own exception, as raised on the worker
                    out.append((ref, exc.cause if isinstance(exc.cause, BaseException) else exc))
                except ray.exceptions.RayError as exc:  # the worker died
                    out.append((ref, exc))
            return out

        # Steps still queued when the run stops go with their actors, which `__exit__` kills.
        yield from _bounded(tasks, self.window, submit, wait, lambda refs: None)


def _probe(address: str) -> None:
    """Fail fast on an address nothing listens at: `ray.init` would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # none (a local instance), "auto", "local": Ray resolves and reports those itself
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise CkptscopeError(f"Ray cluster {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                             "start it (`ray start --head`) or fix --ray-address / $RAY_ADDRESS") from None


def check_options(executor: str, workers: int | None, threads: int | None, ray_address: str | None) -> None:
    """Reject bad executor options before anything is opened."""
    if executor not in EXECUTORS:
        raise CkptscopeError(f"--executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise CkptscopeError(f"--workers {workers}: give at least 1")
    if threads is not None and threads < 1:
        raise CkptscopeError(f"--threads {threads}: give at least 1")
    if ray_address is not None and executor != "ray":
        raise CkptscopeError("--ray-address is for --executor ray")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise CkptscopeError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")


def make_executor(executor: str, *, workers: int | None, threads: int | None, ray_address: str | None, device: str,
                  source: Source, analyzers: list[Analyzer]) -> Executor:
    """The executor for these options (checked by `check_options`); `source` and `analyzers` are
    the driver's, used as they are when the steps run in this process."""
    if executor == "ray":
        return RayExecutor(ray_address, workers, threads, device)
    if (workers or 1) == 1:
        return InProcess(source, analyzers, threads)
    return LocalPool(workers, threads)


def is_fatal(exc: BaseException) -> bool:
    """Errors every step would repeat stop the run: a user mistake (analyzer options, a probe that
    does not fit the model) or checkpoints of another architecture. Source errors (a corrupt file,
    a failed download) and crashes belong to their step alone."""
    return isinstance(exc, CkptscopeError) and (isinstance(exc, ArchitectureMismatch) or not isinstance(exc, SourceError))


def describe(exc: BaseException) -> str:
    """One line saying what went wrong; the type is named unless it is one of ours."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, CkptscopeError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"
