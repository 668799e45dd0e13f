"""`SourceSpec`: the one way to open a source, declared once for the CLI, the API and workers.

A spec is plain data (picklable), so a worker process opens the driver's source by calling
`spec.open()` with nothing else shared.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ckptscope.errors import CkptscopeError
from ckptscope.options import Options, at_least, option
from ckptscope.sources.local import LocalSource, Source, parse_explicit_steps


@dataclass(frozen=True)
class SourceSpec(Options):
    """Where checkpoints come from and which of them to take."""

    owner = "ingest"
    source: str = option(help="A local run directory, a catalog suite (pythia-160m) or a hub repo (EleutherAI/pythia-160m).")
    name: str | None = option(None, help="Model name in the store [default: SOURCE's directory or repo name].")
    steps: str | None = option(None, help="Steps: all, first, last, log, 0,1000,5000, 0:143000:1000, and STEP=PATH pairs "
                               "naming checkpoints (0=../init,all adds the initialization to a Trainer run).")
    max_steps: int | None = option(None, help="At most N steps, spread evenly in log-step.", flag="--max", check=at_least(1))
    tokens_per_step: int | None = option(None, help="Tokens seen per optimizer step, to fill `tokens`.", check=at_least(1))
    revision_pattern: str | None = option(None, help="Hub: regex with a (?P<step>...) group mapping revision names to steps.")
    keep: bool = option(False, help="Hub: keep downloaded checkpoints in the HF cache instead of evicting them.")
    cache_dir: Path | None = option(None, help="Hub: download cache [default: the HF cache].")
    watch: bool = option(False, help="Keep following a local run: analyze each new checkpoint once it is completely written.")
    idle_exit: float | None = option(None, help="With --watch: stop (exit 0) when no new checkpoint appeared for SECONDS.",
                                     check=at_least(0), metavar="SECONDS")
    watch_interval: float = option(2.0, help="With --watch: seconds between looks at the run; a new checkpoint's files "
                                   "must stay unchanged this long.", check=at_least(0.05), metavar="SECONDS")
    group: str | None = option(None, help="Record the model as a seed replicate in this group (with --seed) "
                                          "[default: the catalog's group for seed suites].")
    seed: int | None = option(None, help="The model's seed within --group.", check=at_least(0))

    def validate(self) -> None:
        """A group member needs its seed and a seed needs its group; `ckptscope seeds` pairs them."""
        if (self.group is None) != (self.seed is None):
            given, missing = ("--group", "--seed K") if self.group is not None else ("--seed", "--group GROUP")
            raise CkptscopeError(f"{given} needs {missing}: a model is seed K of a group of replicates")
        if self.group is not None and not self.group.strip():
            raise CkptscopeError("--group is empty; give the name of the group of seed replicates")

    def is_local(self) -> bool:
        """SOURCE is local when it exists, starts with `/`, `.` or `~`, has more than one `/`, or
        `steps` names directories (STEP=PATH); anything else is looked up in the catalog / on the hub."""
        text = self.source
        return (bool(parse_explicit_steps(self.steps)) or Path(text).expanduser().exists()
                or text.startswith(("/", ".", "~")) or text.count("/") > 1)

    def open(self) -> Source:
        """The source (hub sources load huggingface_hub only when opened)."""
        if self.is_local():
            return LocalSource(self.source, parse_explicit_steps(self.steps))
        from ckptscope.sources.hub import HubSource

        return HubSource(self.source, revision_pattern=self.revision_pattern, keep=self.keep, cache_dir=self.cache_dir)

    def for_worker(self) -> tuple[Source, Path | None]:
        """The source opened in a worker process, and the private download cache made for it (None if shared).

        Processes sharing one HF cache would evict each other's files mid-read, so without
        `keep` each worker downloads into a directory of its own, deleted when it exits.
        """
        src = self.open()
        if src.kind != "hub" or src.keep:  # a hub source keeps when asked to, and always offline
            return src, None
        base = Path(src.cache_dir)
        src.close()
        base.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix="ckptscope-worker-", dir=base))
        return replace(self, cache_dir=private).open(), private

    def resolved(self, src: Source) -> SourceSpec:
        """The spec a worker needs in any working directory: a local source by its absolute path."""
        return replace(self, source=src.id) if src.kind == "local" else self
