"""Checkpoints of a suite on the Hugging Face Hub, fetched one step at a time.

`HubSource` is used like `LocalSource` (refs → open) plus two calls that keep a sweep over
hundreds of multi-GB checkpoints fast and within a few checkpoints of disk:
`prefetch(ref)` downloads the next step in a background thread while the current one is
analyzed, and `release(ref)` evicts a step's files from the HF cache once it is done.

Design choices, and why:
- Revisions are listed at run time (`list_repo_refs`); the catalog only interprets names.
- `open()` fetches `config.json` and ONE weight format (the suite's preference, safetensors
  first; shards with their index), never tokenizers, optimizer states or a second copy of the
  weights. It lists the revision with `model_info` and `get_paths_info` rather than
  `list_repo_tree`, because the latter retries inside huggingface_hub for ~23 s per call
  regardless of our retry policy; this way one policy (`retries`, `backoff`) bounds the wait.
- A revision is opened at the commit its branch points to when opened, so a branch that moves
  mid-download cannot mix files of two uploads.
- Every file is checked against the size the Hub listed: a mismatch is deleted and fetched
  again once, then reported; a truncated file is never analyzed.
- Free space is checked against the listed sizes before anything is written.
- Eviction deletes only this revision's files and never a blob that another snapshot, or a
  download in flight, still needs (Pythia's `config.json` is one blob shared by every branch).
- The token is never read here: huggingface_hub resolves `HF_TOKEN` on each request, so it
  cannot end up in ids, errors or the store. `HF_ENDPOINT` is read when the source is made.
- Each fetched revision's branch is recorded in the cache's `refs/` (as `hf download` does; files
  are fetched by commit, which records none), so a kept download can be found offline.

Offline (`HF_HUB_OFFLINE=1`, huggingface_hub's convention for machines without internet) the
source never makes a request: it lists the revisions the cache's `refs/` names for the repo,
keeps those whose weights are all in the snapshot, and checks each file is whole (a safetensors
file against its header, a `.bin` zip against its central directory) before analyzing it.
`--steps` selects from the same steps as online (the published grid, when the catalog knows it),
so the same command picks the same checkpoints on either side; selected steps that are not cached
are named in one warning. Offline implies `keep`: nothing is ever evicted, because nothing evicted
could be downloaded again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from ckptscope.errors import MissingRevision, SourceError
from ckptscope.sources.catalog import Suite, compress_steps, resolve, suggest
from ckptscope.sources.checkpoint import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, Checkpoint
from ckptscope.sources.local import CheckpointRef
from ckptscope.sources.steps import select_steps

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
TRANSPORT_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
FORMATS = {  # format -> (index, single file, predicate for its weight files)
    "safetensors": (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, lambda n: n.endswith(".safetensors")),
    "bin": (BIN_INDEX, BIN_SINGLE, lambda n: n.startswith("pytorch_model") and n.endswith(".bin")),
}


@dataclass(frozen=True)
class HubRef(CheckpointRef):
    """A checkpoint on the Hub, as listed. `revision` is `ORG/NAME@BRANCH`, which names it on its
    own (the store keeps it, and `open()` accepts any ref whose revision has that form). `path`
    stays None: the files' place in the HF cache depends on the commit the branch points to when
    `open()` runs, and the Checkpoint it returns carries it. `commit` is the one listed."""

    repo: str = ""
    branch: str = ""
    commit: str = ""


@dataclass
class _Held:
    """What this source put in the cache for one revision, so eviction knows what to delete and spare."""

    folder: Path
    commit: str
    files: dict[str, int] = field(default_factory=dict)  # filename -> listed size
    blobs: set[str] = field(default_factory=set)  # blob names (etags) the files will have
    reserved: int = 0  # bytes still to download, counted against free space


class _NotFound(Exception):
    """The Hub says the repo, revision or file does not exist (or is hidden from us)."""


class HubSource:
    """Checkpoints of one suite or repo on the Hugging Face Hub."""

    kind = "hub"

    def __init__(self, name_or_repo: str, *, revision_pattern: str | None = None, cache_dir: Path | str | None = None,
                 keep: bool = False, endpoint: str | None = None, retries: int = 3, backoff: float = 1.0,
                 min_free_bytes: int = 256 << 20) -> None:
        """Resolve the suite now (a bad name fails before any request); nothing is listed yet.

        `endpoint` defaults to HF_ENDPOINT, then huggingface_hub's; `cache_dir` to the HF cache.
        A request failing with 429/5xx/timeout/connection error is tried `retries` more times,
        `backoff` seconds apart and doubling (capped at 30 s), so a dead hub fails in bounded time.
        `min_free_bytes` must stay free on the cache filesystem after a download. Offline
        (huggingface_hub's HF_HUB_OFFLINE, read at its import) the cache is the only source and
        `keep` is forced on.
        """
        self.suite: Suite = resolve(name_or_repo, revision_pattern=revision_pattern)
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.keep = keep or self.offline
        self.retries = retries
        self.backoff = backoff
        self.min_free_bytes = min_free_bytes
        self._api = HfApi(endpoint=self.endpoint)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptscope-prefetch")
        self._fetches: dict[str, Future[Path]] = {}
        self._held: dict[str, _Held] = {}

    @property
    def id(self) -> str:
        return f"hub:{self.suite.repo_glob}"

    @property
    def default_name(self) -> str:
        return self.suite.name

    @property
    def host(self) -> str:
        """The endpoint without any credentials in it, for messages."""
        parts = urlsplit(self.endpoint)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return f"{parts.scheme}://{netloc}" if parts.scheme else self.endpoint

    def __repr__(self) -> str:
        return f"HubSource({self.suite.repo_glob!r}, endpoint={self.host!r})"

    # ---- listing -------------------------------------------------------------------------

    def refs(self) -> list[CheckpointRef]:
        """Every checkpoint the Hub lists now, sorted by step; raises when there is none.

        A revision without weights is kept (`open()` raises MissingRevision for it), so the
        pipeline can record it as missing instead of silently narrowing the grid.
        """
        if self.offline:
            return self._cached_refs()
        if self.suite.per_step_repos:
            return self._per_step_refs()
        repo = self.suite.repo
        try:
            listing = self._call(f"listing revisions of {repo}", self._api.list_repo_refs, repo)
        except _NotFound:
            raise SourceError(f"hub repo {repo} not found at {self.host} (private or gated repos need HF_TOKEN); "
                              f"{suggest(repo)}") from None
        names = {i.name: i.target_commit for i in (*listing.branches, *listing.tags)}
        found = self._by_step(repo, names)
        if not found:
            sample = ", ".join(sorted(names)[:5]) or "none"
            raise SourceError(f"{repo}: no revision names a step under {self.suite.naming()} (revisions: {sample}); "
                              "pass --revision-pattern REGEX with a (?P<step>\\d+) group")
        return [found[s] for s in sorted(found)]

    def _by_step(self, repo: str, names: dict[str, str]) -> dict[int, HubRef]:
        """The revisions (name -> commit) that name a step of the suite, by step; two commits claiming one step is an error."""
        found: dict[int, HubRef] = {}
        for name, commit in names.items():
            step = self.suite.step_of(name)
            if step is None:
                continue
            prior = found.get(step)
            if prior is not None and prior.commit != commit:
                raise SourceError(f"{repo}: revisions {prior.branch} and {name} both claim step {step}; "
                                  "choose one naming with --revision-pattern REGEX")
            if prior is None:
                found[step] = self._ref(step, repo, name, commit)
        return found

    def _per_step_refs(self) -> list[CheckpointRef]:
        """One repo per checkpoint: probe each repo of the known grid, keep those that exist."""
        def probe(step: int) -> HubRef | None:
            repo = self.suite.repo_for(step)
            try:
                listing = self._call(f"listing revisions of {repo}", self._api.list_repo_refs, repo)
            except _NotFound:
                return None
            main = next((b for b in listing.branches if b.name == "main"), None)
            return self._ref(step, repo, "main", main.target_commit) if main else None

        with ThreadPoolExecutor(max_workers=8) as pool:
            refs = [r for r in pool.map(probe, self.suite.steps) if r is not None]
        if not refs:
            raise SourceError(f"none of the {len(self.suite.steps)} repos {self.suite.repo_glob} exists at {self.host}")
        return sorted(refs, key=lambda r: r.step)

    def select(self, spec: str | None, available: list[int], *, max_steps: int | None = None) -> list[int]:
        """The steps of `available` that the step SPEC selects (`ckptscope.sources.steps`).

        Offline, `available` is what the cache holds, but SPEC is resolved against every step
        known to exist (the published grid, the cached steps and the numbers SPEC names), as
        online; the selected steps that are not cached are named in one warning, and the files
        of those that are get checked whole now, before anything is written. None cached is an error.
        """
        if not self.offline:
            return select_steps(spec, available, max_steps=max_steps)
        named = {int(term) for term in (spec or "").replace(" ", "").split(",") if term.isdigit()}
        wanted = select_steps(spec, sorted({*available, *(self.suite.steps or ()), *named}), max_steps=max_steps)
        cached = set(available)
        have = [s for s in wanted if s in cached]
        missing = [s for s in wanted if s not in cached]
        where = f"the HF cache at {self.cache_dir}"
        if not have:
            raise SourceError(f"HF_HUB_OFFLINE is set and none of the selected steps of {self.suite.repo_glob} "
                              f"({compress_steps(missing)}) is in {where} (cached: {compress_steps(sorted(cached))}); "
                              f"download them where there is internet, e.g. `{self.suite.download_command(missing[0])}`, then rerun")
        if missing:
            log.warning("HF_HUB_OFFLINE: %d selected step(s) of %s are not in %s, skipped: %s; download them where there "
                        "is internet, e.g. `%s`", len(missing), self.suite.repo_glob, where, compress_steps(missing),
                        self.suite.download_command(missing[0]))
        refs = {ref.step: ref for ref in self._cached_refs()}
        for step in have:
            self._cached_snapshot(refs[step])
        return have

    def _ref(self, step: int, repo: str, branch: str, commit: str) -> HubRef:
        return HubRef(step, f"{repo}@{branch}", None, repo=repo, branch=branch, commit=commit)

    # ---- offline: the HF cache only -------------------------------------------------------

    def _cached_refs(self) -> list[CheckpointRef]:
        """Every checkpoint whose weights the cache holds in full, sorted by step; raises when there is none.

        Revision names come from the repo folder's `refs/` (what `hf download --revision` and a
        fetch here write); huggingface_hub's `scan_cache_dir` would walk every repo in the cache.
        """
        if self.suite.per_step_repos:
            found = {}
            for step in self.suite.steps:
                commit = self._cached_names(self.suite.repo_for(step)).get("main")
                if commit is not None:
                    found[step] = self._ref(step, self.suite.repo_for(step), "main", commit)
        else:
            found = self._by_step(self.suite.repo, self._cached_names(self.suite.repo))
        found = {step: ref for step, ref in found.items() if self._cached_weights(ref) is not None}
        if not found:
            first = self.suite.steps[0] if self.suite.steps else 0
            raise SourceError(f"HF_HUB_OFFLINE is set and the HF cache at {self.cache_dir} holds no checkpoint of "
                              f"{self.suite.repo_glob}; download some where there is internet, e.g. "
                              f"`{self.suite.download_command(first)}`, then rerun (or unset HF_HUB_OFFLINE)")
        return [found[s] for s in sorted(found)]

    def _cached_names(self, repo: str) -> dict[str, str]:
        """Revision name -> commit, as the repo's cache folder records them (`refs/pr/1` is named `pr/1`)."""
        refs = self._folder(repo) / "refs"
        if not refs.is_dir():
            return {}
        return {p.relative_to(refs).as_posix(): p.read_text().strip() for p in sorted(refs.rglob("*")) if p.is_file()}

    def _cached_weights(self, ref: HubRef) -> dict[str, Path] | None:
        """The cached files `open()` would fetch for `ref` (config.json when cached, one complete weight
        format in the suite's preference), by name; None when no format is complete in the cache."""
        def cached(name: str) -> Path | None:
            path = try_to_load_from_cache(ref.repo, name, cache_dir=self.cache_dir, revision=ref.commit)
            return Path(path) if isinstance(path, str) else None

        for fmt in self.suite.prefer:
            index, single, _ = FORMATS[fmt]
            if (index_path := cached(index)) is not None:
                try:
                    shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise self._damaged(ref, index, "not a valid shard index") from None
                files = {index: index_path, **{shard: cached(shard) for shard in shards}}
            elif (single_path := cached(single)) is not None:
                files = {single: single_path}
            else:
                continue
            if all(files.values()):
                config = cached("config.json")
                return {**({"config.json": config} if config else {}), **files}
        return None

    def _cached_snapshot(self, ref: CheckpointRef) -> Path:
        """The snapshot directory of a cached checkpoint, its files checked whole."""
        if not isinstance(ref, HubRef) or not ref.commit:
            repo, branch = self._locate(ref)
            commit = self._cached_names(repo).get(branch)
            if commit is None:
                raise SourceError(f"HF_HUB_OFFLINE is set and {repo}@{branch} is not in the HF cache at {self.cache_dir}; "
                                  f"download it where there is internet (`hf download {repo} --revision {branch}`), then rerun")
            ref = self._ref(ref.step, repo, branch, commit)
        files = self._cached_weights(ref)
        if files is None:
            raise SourceError(f"HF_HUB_OFFLINE is set and the HF cache at {self.cache_dir} lacks weight files of {ref.revision}; "
                              f"download it where there is internet (`hf download {ref.repo} --revision {ref.branch}`), then rerun")
        for name, path in files.items():
            problem = _damage(path)
            if problem:
                raise self._damaged(ref, name, problem)
        return self._folder(ref.repo) / "snapshots" / ref.commit

    def _damaged(self, ref: HubRef, name: str, problem: str) -> SourceError:
        return SourceError(f"{ref.revision}: {name} in the HF cache at {self.cache_dir} is {problem}; it cannot be fetched "
                           f"again offline: run `hf download {ref.repo} --revision {ref.branch} --force-download` where there "
                           "is internet, then rerun")

    def tokens(self, step: int, revision: str) -> int | None:
        """Tokens seen at `step`, from the revision name or the suite's tokens per step."""
        _, sep, branch = revision.partition("@")
        return self.suite.tokens(step, revision if self.suite.per_step_repos or not sep else branch)

    # ---- opening, prefetching, releasing ---------------------------------------------------

    def open(self, ref: CheckpointRef) -> Checkpoint:
        """The checkpoint's files in the HF cache, downloaded now or by an earlier `prefetch` (offline: already there)."""
        if self.offline:
            return Checkpoint(self._cached_snapshot(ref), step=ref.step, revision=ref.revision)
        with self._lock:
            future = self._fetches.get(ref.revision)
        if future is None:
            try:
                path = self._fetch(ref)
            except BaseException:
                self._drop(ref.revision)
                raise
            future = Future()
            future.set_result(path)
            with self._lock:
                self._fetches[ref.revision] = future
        try:
            path = future.result()
        except BaseException:
            with self._lock:
                self._fetches.pop(ref.revision, None)
            raise
        return Checkpoint(path, step=ref.step, revision=ref.revision)

    def prefetch(self, ref: CheckpointRef) -> None:
        """Start downloading `ref` in the background; `open(ref)` waits for it and raises its errors."""
        with self._lock:
            if ref.revision not in self._fetches and not self.offline:
                self._fetches[ref.revision] = self._pool.submit(self._fetch_in_background, ref)

    def _fetch_in_background(self, ref: CheckpointRef) -> Path:
        try:
            return self._fetch(ref)
        except BaseException:
            self._drop(ref.revision)
            raise

    def release(self, ref: CheckpointRef) -> None:
        """Done with `ref`: evict the files this source fetched for it from the HF cache, unless `keep`.

        Waits for a prefetch of `ref` still running. Files that another revision shares, or that
        were in the cache but not fetched by this source, stay.
        """
        with self._lock:
            future = self._fetches.pop(ref.revision, None)
        if future is not None and not future.cancel():
            try:
                future.result()
            except Exception:  # a failed fetch already cleaned up; nothing to evict
                pass
        self._drop(ref.revision)

    def close(self) -> None:
        """Stop prefetching: pending downloads are dropped, a running one is allowed to finish."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> HubSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- downloading -----------------------------------------------------------------------

    def _locate(self, ref: CheckpointRef) -> tuple[str, str]:
        """(repo, branch) of a ref: a HubRef, an `ORG/NAME@BRANCH` revision, or a plain branch of the suite's repo."""
        if isinstance(ref, HubRef):
            return ref.repo, ref.branch
        repo, sep, branch = ref.revision.partition("@")
        if sep and "/" in repo:
            return repo, branch
        if self.suite.repo is not None:
            return self.suite.repo, ref.revision
        return self.suite.repo_for(ref.step), "main"

    def _fetch(self, ref: CheckpointRef) -> Path:
        """Download config + one weight format of `ref`, verified; returns the snapshot directory."""
        repo, branch = self._locate(ref)
        label = f"{repo}@{branch}"
        try:
            info = self._call(f"listing {label}", self._api.model_info, repo, revision=branch)
        except _NotFound:
            self._raise_vanished(repo, branch)
        commit = info.sha
        names = {s.rfilename for s in info.siblings or [] if "/" not in s.rfilename}
        fmt = next((f for f in self.suite.prefer if FORMATS[f][0] in names or FORMATS[f][1] in names), None)
        if fmt is None:
            raise MissingRevision(f"{label} holds no weights (no {', '.join(FORMATS[f][1] for f in self.suite.prefer)}); skipping it")
        index, single, is_weight = FORMATS[fmt]
        wanted = sorted(n for n in names if n == "config.json" or n == index or is_weight(n))
        try:
            listed = self._call(f"listing files of {label}", self._api.get_paths_info, repo, wanted, revision=commit)
        except _NotFound:
            self._raise_vanished(repo, branch)
        sizes = {f.path: (f.lfs.size if f.lfs else f.size) for f in listed}
        held = _Held(self._folder(repo), commit, blobs={f.lfs.sha256 if f.lfs else f.blob_id for f in listed})
        with self._lock:
            self._reserve(ref.revision, held, sum(size for name, size in sizes.items() if not self._cached(held, name, size)), label)
        try:
            snapshot = held.folder / "snapshots" / commit
            if index in names:
                self._download(held, repo, label, index, sizes)
                try:
                    shards = set(json.loads((snapshot / index).read_text())["weight_map"].values())
                except (ValueError, KeyError, TypeError):
                    raise MissingRevision(f"{label}: {index} is not a valid shard index; skipping it") from None
                missing = sorted(shards - names)
                if missing:
                    raise MissingRevision(f"{label}: shard(s) {', '.join(missing)} named in {index} are not on the hub; skipping it")
                files = sorted(shards)
            else:
                files = [single]
            for name in (["config.json"] if "config.json" in names else []) + files:
                self._download(held, repo, label, name, sizes)
            _record_ref(held.folder, branch, commit)
        finally:
            with self._lock:
                held.reserved = 0
        return snapshot

    def _download(self, held: _Held, repo: str, label: str, name: str, sizes: dict[str, int]) -> None:
        """Fetch one file into the cache and check it against the listed size; retry once on a mismatch."""
        if name not in sizes:
            raise SourceError(f"{label}: {name} is not in the hub's file listing; rerun to retry")
        expected = sizes[name]
        with self._lock:
            held.files[name] = expected
        for attempt in (1, 2):
            try:
                path = Path(self._call(f"downloading {label}/{name}", hf_hub_download, repo, name, revision=held.commit,
                                       cache_dir=self.cache_dir, endpoint=self.endpoint))
            except _NotFound:
                raise SourceError(f"{label}: {name} is listed but cannot be downloaded; rerun to retry") from None
            actual = path.stat().st_size if path.exists() else 0
            if actual == expected:
                return
            _discard(path)
            log.warning("%s/%s: got %d bytes, the hub lists %d; %s", label, name, actual, expected,
                        "downloading it again" if attempt == 1 else "giving up")
        raise SourceError(f"{label}: {name} downloaded as {actual} bytes but the hub lists {expected} "
                          "(truncated download or inconsistent hub); deleted it, rerun to retry")

    def _cached(self, held: _Held, name: str, size: int) -> bool:
        path = held.folder / "snapshots" / held.commit / name
        return path.exists() and path.stat().st_size == size

    def _reserve(self, key: str, held: _Held, need: int, label: str) -> None:
        """Register a revision's download, refusing before anything is written one that the cache
        filesystem cannot hold next to the downloads in flight. Caller holds the lock."""
        probe = self.cache_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        in_flight = sum(h.reserved for h in self._held.values())
        if need and free - in_flight - need < self.min_free_bytes:
            raise SourceError(f"not enough disk space in {self.cache_dir} for {label}: it needs {_size(need)} "
                              f"(+{_size(in_flight)} in flight, +{_size(self.min_free_bytes)} reserve) and {_size(free)} is free; "
                              "free space or point HF_HUB_CACHE at a larger disk")
        held.reserved = need
        self._held[key] = held

    def _raise_vanished(self, repo: str, branch: str) -> NoReturn:
        """The Hub refused a listed revision: MissingRevision when its branch is gone, else SourceError."""
        try:
            listing = self._call(f"listing revisions of {repo}", self._api.list_repo_refs, repo)
        except _NotFound:
            raise MissingRevision(f"{repo} no longer exists at {self.host}; skipping {repo}@{branch}") from None
        if branch not in {i.name for i in (*listing.branches, *listing.tags)}:
            raise MissingRevision(f"{repo}@{branch} no longer exists on the hub; skipping it")
        raise SourceError(f"{repo}@{branch} is listed but the hub refuses to describe it; rerun to retry")

    # ---- cache eviction --------------------------------------------------------------------

    def _folder(self, repo: str) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")

    def _drop(self, key: str) -> None:
        """Stop tracking a revision; its files leave the cache unless `keep`."""
        if self.keep:
            with self._lock:
                self._held.pop(key, None)
        else:
            self._evict(key)

    def _evict(self, key: str) -> None:
        """Delete the files this source fetched for one revision, sparing blobs still in use."""
        with self._lock:
            held = self._held.pop(key, None)
            if held is None:
                return
            snapshot = held.folder / "snapshots" / held.commit
            blobs: set[Path] = set()
            for name in held.files:
                pointer = snapshot / name
                if pointer.is_symlink():
                    blobs.add(Path(os.path.realpath(pointer)))
                pointer.unlink(missing_ok=True)
            spared = {Path(os.path.realpath(p)) for p in (held.folder / "snapshots").rglob("*") if p.is_symlink()}
            spared |= {held.folder / "blobs" / b for h in self._held.values() if h.folder == held.folder for b in h.blobs}
            for blob in blobs - spared:
                blob.unlink(missing_ok=True)
            _remove_empty(snapshot)
            if not snapshot.exists():
                for ref_file in (held.folder / "refs").rglob("*"):
                    if ref_file.is_file() and ref_file.read_text().strip() == held.commit:
                        ref_file.unlink()
            # The repo's folder goes too once empty, unless another revision of it is in flight.
            snapshots = held.folder / "snapshots"
            in_use = any(h.folder == held.folder for h in self._held.values())
            if not in_use and not any(snapshots.glob("*")) and not any((held.folder / "blobs").glob("*")):
                shutil.rmtree(held.folder, ignore_errors=True)
                shutil.rmtree(self.cache_dir / ".locks" / held.folder.name, ignore_errors=True)

    # ---- retries and errors ----------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run one Hub request with retries on transient failures; map failures to one-line errors."""
        delay, attempt = self.backoff, 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if _transient(exc) and attempt <= self.retries:
                    log.warning("%s: %s; retrying in %.2g s (%d/%d)", what, self._reason(exc), delay, attempt, self.retries)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                mapped = self._error(what, exc, attempt)
                if mapped is exc:
                    raise
                raise mapped from None

    def _error(self, what: str, exc: Exception, attempts: int) -> Exception:
        status = _status(exc)
        tried = f"after {attempts} attempt{'s' * (attempts > 1)}"
        if _in_chain(exc, TRANSPORT_ERRORS):
            return SourceError(f"hub at {self.host} unreachable: {self._reason(exc)} while {what} ({tried}); rerun to resume")
        if status == 429:
            return SourceError(f"hub at {self.host} rate-limited {what} {tried}; set HF_TOKEN for higher limits, or rerun later to resume")
        if status is not None and status >= 500:
            return SourceError(f"hub at {self.host} failed {what} (HTTP {status}) {tried}; rerun to resume")
        if isinstance(exc, GatedRepoError) or status == 403:
            return SourceError(f"{what}: the repo is gated or private; accept its terms on the Hub and set HF_TOKEN")
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)) or status in (401, 404):
            return _NotFound(str(exc))
        if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in _chain(exc)):
            return SourceError(f"{what}: disk full in {self.cache_dir}; free space or point HF_HUB_CACHE at a larger disk")
        return exc

    def _reason(self, exc: BaseException) -> str:
        """The root cause's first line, with any token masked."""
        root = _chain(exc)[-1]
        text = (str(root).strip().splitlines() or [type(root).__name__])[0][:200]
        token = get_token()
        return text.replace(token, "***") if token else text


def _status(exc: BaseException) -> int | None:
    for err in _chain(exc):
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            return err.response.status_code
    return None


def _transient(exc: BaseException) -> bool:
    return _in_chain(exc, TRANSPORT_ERRORS) or _status(exc) in TRANSIENT_STATUS


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _in_chain(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    return any(isinstance(e, kinds) for e in _chain(exc))


def _record_ref(folder: Path, branch: str, commit: str) -> None:
    """Write `refs/BRANCH` = commit in a repo's cache folder, the way huggingface_hub does on a download by branch."""
    ref = folder / "refs" / branch
    if not ref.is_file() or ref.read_text().strip() != commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


def _damage(path: Path) -> str | None:
    """What is wrong with a cached file ("truncated (N bytes, …)"), or None when it is whole.

    The cache keeps no sizes, so each file is checked against what it says of itself: a
    safetensors header gives the end of the last tensor, a `.bin` (zip) its central directory at
    the very end, a JSON file must parse. A legacy (pre-zip) `.bin` cannot be checked cheaply.
    """
    size = path.stat().st_size
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return f"truncated ({size} bytes)"
                header_len = int.from_bytes(head, "little")
                header = json.loads(fh.read(min(header_len, size)))
            end = max((int(m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"), default=0)
            need = 8 + header_len + end
            return f"truncated ({size} bytes, its header needs {need})" if size < need else None
        if path.suffix == ".bin":
            with open(path, "rb") as fh:
                is_zip = fh.read(4) == b"PK\x03\x04"
            if is_zip:
                zipfile.ZipFile(path).close()
            return None
        if path.suffix == ".json":
            json.loads(path.read_text())
        return None
    except (ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile, UnicodeDecodeError):
        return f"truncated or corrupt ({size} bytes)"


def _discard(path: Path) -> None:
    """Delete a cached file and the blob behind it, so the next download starts clean."""
    blob = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _remove_empty(directory: Path) -> None:
    """Remove a directory tree's empty directories, bottom-up, the directory itself included."""
    if not directory.is_dir():
        return
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(directory.iterdir()):
        directory.rmdir()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
