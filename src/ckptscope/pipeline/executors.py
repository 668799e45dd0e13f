"""Where the per-step work runs: in this process, in a local process pool, or on a Ray cluster.

Executors only run tasks: every one runs the same unit of work (`ckptscope.pipeline.tasks`),
and only the driver writes the store, one transaction per result as results arrive, so a step
that fails on a worker costs that step alone and a rerun resumes. Rows travel as Arrow
(`RunRows.to_arrow`). Pool and cluster workers are long-lived processes that keep their opened
source, analyzers and reference checkpoints between steps (`tasks.run_step`).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import importlib.util
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import torch

from ckptscope.analyzers.contract import Analyzer
from ckptscope.errors import CkptscopeError, SourceError
from ckptscope.options import Options, at_least, option
from ckptscope.pipeline.tasks import ArchitectureMismatch, Reporter, StepResult, StepTask, StepWorker, close_worker, run_step
from ckptscope.sources.local import Source

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'ckptscope[ray]'"


class StepsFailed(SourceError):
    """Some steps failed on their workers; every other step was written, and a rerun resumes."""


@dataclass(frozen=True)
class ExecutorSpec(Options):
    """Where the steps are analyzed; never what comes out."""

    owner = "ingest"
    executor: str = option("local", choices=EXECUTORS,
                           help="local: processes on this machine; ray: a Ray cluster (pip install 'ckptscope[ray]').")
    workers: int | None = option(None, check=at_least(1), help="Steps analyzed at once: processes (local) or Ray actors "
                                 "[default: 1 for local, the cluster's CPUs / --threads for ray].")
    threads: int | None = option(None, check=at_least(1), help="Torch threads per worker [default: CPUs / --workers for "
                                 "local processes, 1 for ray, unchanged for one local worker].")
    ray_address: str | None = option(None, help="Ray cluster to join, e.g. 10.0.0.5:6379 or ray://head:10001 "
                                     "[default: $RAY_ADDRESS, else a local Ray instance].")
    device: str = option("cpu", help="Torch device for the analyzers' work: cpu or cuda.")

    def validate(self) -> None:
        if self.ray_address is not None and self.executor != "ray":
            raise CkptscopeError("--ray-address is for --executor ray")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise CkptscopeError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise CkptscopeError(f"--device {self.device!r} is not a torch device; use cpu or cuda") from None
        if kind not in ("cpu", "cuda"):
            raise CkptscopeError(f"--device {self.device}: only cpu and cuda are supported")
        # On Ray the cluster's GPUs count, checked on joining; here this machine must have one.
        if self.executor == "local" and kind == "cuda" and not torch.cuda.is_available():
            raise CkptscopeError(f"--device {self.device}: no CUDA GPU is available to this torch build; use --device cpu")

    def make(self, source: Source, analyzers: list[Analyzer]) -> Executor:
        """The executor; `source` and `analyzers` are the driver's, used as they are when steps run in this process."""
        if self.executor == "ray":
            return RayExecutor(self.ray_address, self.workers, self.threads, self.device)
        if (self.workers or 1) == 1:
            return InProcess(source, analyzers, self.threads)
        return LocalPool(self.workers, self.threads)


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

    def run(self, tasks: Iterable[StepTask], reporter: Reporter) -> Iterator[Outcome]:
        """Each task with its result or exception, in the order they finish; `tasks` is pulled
        only when there is room, so each task is built from what the driver knows by then.
        `reporter` sees the analyzers' progress where the steps run in this process."""


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

    def run(self, tasks: Iterable[StepTask], reporter: Reporter) -> Iterator[Outcome]:
        for task in tasks:
            try:
                outcome: StepResult | BaseException = self.worker.run(task, reporter)
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

    def run(self, tasks: Iterable[StepTask], reporter: Reporter) -> Iterator[Outcome]:
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

    def run(self, tasks: Iterable[StepTask], reporter: Reporter) -> Iterator[Outcome]:
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
