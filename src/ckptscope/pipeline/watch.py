"""`ingest --watch`: follow a local training run, analyzing each checkpoint once it is completely written.

Each time new complete checkpoints appear, one ordinary ingest pass runs over the checkpoints
present at that moment (steps already stored are skipped, as on any rerun), so every guarantee
of `ingest` holds per pass: one transaction per checkpoint, resume after a kill, `final_*`
re-based onto the latest step while the earlier steps' checkpoints exist. A checkpoint counts
as complete when its weight files are whole (`is_complete`) and its files' sizes and mtimes
stayed unchanged for one `--watch-interval`; `tmp-checkpoint-N` directories (the Trainer's
staging name) are ignored. The writer lock is held for the whole watch, so no other ingest
slips in between passes, while the store itself is opened only per transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import os
import time
from pathlib import Path

import polars as pl
from rich.console import Console

from ckptscope import display
from ckptscope.analyzers.contract import Analyzer
from ckptscope.errors import CkptscopeError, SourceError
from ckptscope.pipeline.executors import ExecutorSpec
from ckptscope.sources.checkpoint import is_complete
from ckptscope.sources.local import CheckpointRef, LocalSource
from ckptscope.sources.spec import SourceSpec
from ckptscope.store.db import Store, WriterLock, default_store_path


class Snapshot(LocalSource):
    """A local run as it is now: only the checkpoints that are complete and were stable at the last look."""

    def __init__(self, root: Path | str, refs: list[CheckpointRef]) -> None:
        super().__init__(root)
        self._refs = refs

    def refs(self) -> list[CheckpointRef]:
        return [r for r in self._refs if r.path.is_dir()]  # the trainer may have deleted one since the look


class Follower:
    """Which checkpoints of a run are ready: complete, and unchanged since the previous look."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.last: dict[int, tuple] = {}  # step -> the files' (name, size, mtime) at the previous look
        self.changed = False  # whether the last look saw a checkpoint appear or a file change (a save in progress)

    def ready(self) -> list[CheckpointRef]:
        try:
            refs = [r for r in LocalSource(self.root).refs() if not r.revision.lower().startswith("tmp")]
        except SourceError:  # no checkpoint yet: wait for the first
            refs = []
        ready, seen = [], {}
        for ref in refs:
            try:
                files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(ref.path) if e.is_file()))
            except OSError:  # deleted while we looked
                continue
            seen[ref.step] = files
            if self.last.get(ref.step) == files and is_complete(ref.path):
                ready.append(ref)
        self.changed = any(files != self.last.get(step) for step, files in seen.items())
        self.last = seen
        return ready


def watch(spec: SourceSpec, analyzers: list[Analyzer], executor: ExecutorSpec, *, store: Store | str | Path | None,
          force: bool, progress: bool, new_run: Callable[..., Any], schema: dict) -> pl.DataFrame:
    """Ingest SOURCE's checkpoints as they appear until Ctrl-C or `idle_exit` seconds without a new one.

    `new_run` builds the driver's `IngestRun` and `schema` is its report's: passed in by the driver,
    which calls this, so the two modules do not import each other.
    """
    if spec.steps is not None or spec.max_steps is not None:
        raise CkptscopeError("--watch analyzes every checkpoint of the run as it appears: leave out --steps and --max")
    if not spec.is_local():
        raise CkptscopeError(f"--watch follows a local run directory; {spec.source} is not one (hub suites are ingested without --watch)")
    root = LocalSource(spec.source).root  # a directory that does not exist is an error now, not a wait
    path = store.path if isinstance(store, Store) else Path(store) if store is not None else default_store_path()
    console = Console(stderr=True)
    say = (lambda text: display.line(console, text)) if progress else (lambda text: None)
    follower, reports, done = Follower(root), [], set()
    lock = WriterLock.acquire(path) if path.parent.exists() and os.access(path.resolve().parent, os.W_OK) else None
    last_new = time.monotonic()
    say(f"watching {root} for checkpoints" + (f" (stops after {spec.idle_exit:g} s without a new one)" if spec.idle_exit else
                                              " (Ctrl-C stops)"))
    try:
        while True:
            ready = follower.ready()
            new = [r for r in ready if r.step not in done]
            if new:
                run = new_run(spec, analyzers, executor, force=force and not done, progress=progress)
                reports.append(run.run(store, source=Snapshot(root, ready)))
                done |= {r.step for r in ready}
                say(f"{len(done)} checkpoint{'s' * (len(done) != 1)} of {root.name} analyzed (latest: step {max(done)}); watching")
            if new or follower.changed:  # idle means: nothing analyzed and nothing being saved
                last_new = time.monotonic()
            elif spec.idle_exit is not None and time.monotonic() - last_new >= spec.idle_exit:
                say(f"no new checkpoint for {spec.idle_exit:g} s: done")
                break
            time.sleep(spec.watch_interval)
    except KeyboardInterrupt:
        say("stopped: every checkpoint analyzed so far is in the store")
    finally:
        if lock is not None:
            lock.release()
    reports = [r for r in reports if r.height]
    return pl.concat(reports).sort("step") if reports else pl.DataFrame(schema=schema)
