"""Local training runs: a directory holding one checkpoint directory per step.

Recognised step directory names (case-insensitive): `checkpoint-500` (HF Trainer),
`step500`, `step-500`, `step_500`, `global_step500`, `ckpt_500`, `iter_500`, and names that
contain such a token, e.g. `step500-tokens1B`. Other checkpoints are named explicitly: `--steps 0=init,1000=runs/a/mid`
(paths relative to SOURCE). Named checkpoints join the ones found (`--steps 0=../init,all`
adds the initialization a Trainer never saves), and the store remembers them, so a later
ingest of the model finds them without being told again. A SOURCE that is itself one
checkpoint is ingested as a single step, numbered from `trainer_state.json` when present.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ckptscope.errors import SourceError
from ckptscope.sources.checkpoint import Checkpoint, weight_files

STEP_NAME = re.compile(r"(?:^|[-_])(?:checkpoint|global_step|step|ckpt|iter)[-_]?(\d+)(?:$|[-_])", re.IGNORECASE)


def step_from_name(name: str) -> int | None:
    """The step number in a checkpoint directory or revision name, or None."""
    match = STEP_NAME.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointRef:
    """A step that a source can open, before anything is read."""

    step: int
    revision: str
    path: Path | None = None  # local sources; remote ones resolve the revision when opened


class Source(Protocol):
    """Where checkpoints come from: a local run directory or a hub repository."""

    kind: str

    @property
    def id(self) -> str: ...

    @property
    def default_name(self) -> str: ...

    def refs(self) -> list[CheckpointRef]:
        """Every step the source holds, sorted by step."""

    def open(self, ref: CheckpointRef) -> Checkpoint:
        """Make the checkpoint readable (downloading it if remote)."""

    def prefetch(self, ref: CheckpointRef) -> None:
        """Start fetching a checkpoint that will be opened next."""

    def release(self, ref: CheckpointRef) -> None:
        """The checkpoint is no longer needed: free what holding it costs."""

    def tokens(self, step: int, revision: str) -> int | None:
        """Tokens seen at a step when the source knows them, else None."""

    def close(self) -> None:
        """Stop background work (prefetches) and free what is held."""


def parse_explicit_steps(spec: str | None) -> dict[int, str]:
    """The STEP=PATH terms of a --steps spec: `0=init,1000=mid,log` → {0: "init", 1000: "mid"}.

    The other terms (`log` here) select among the steps found; `select_steps` reads them."""
    mapping: dict[int, str] = {}
    for term in (spec or "").split(","):
        if "=" not in term:
            continue
        step, _, rel = term.strip().partition("=")
        try:
            mapping[int(step)] = rel
        except ValueError:
            raise SourceError(f"bad --steps term {term!r}; name checkpoints as STEP=PATH, e.g. 0=init,1000=mid") from None
        if not rel:
            raise SourceError(f"bad --steps term {term!r}; name checkpoints as STEP=PATH, e.g. 0=init,1000=mid")
    return mapping


class LocalSource:
    """Checkpoints of one run found under a local directory."""

    kind = "local"

    def __init__(self, root: Path | str, explicit: dict[int, str] | None = None) -> None:
        """`explicit`: checkpoints named with --steps STEP=PATH, besides those found under `root`."""
        self.root = Path(root).expanduser().resolve()
        if not self.root.exists():
            raise SourceError(f"{root}: no such file or directory; give the directory that holds the run's checkpoints")
        if not self.root.is_dir():
            raise SourceError(f"{root}: not a directory; give the directory that holds the run's checkpoints")
        self.explicit = explicit or {}
        self.remembered: dict[int, str] = {}  # named in earlier ingests of the model (the store's step_paths)

    @property
    def id(self) -> str:
        return str(self.root)

    @property
    def default_name(self) -> str:
        return self.root.name

    def remember(self, paths: dict[int, str]) -> None:
        """Checkpoints named in earlier ingests: they join the source unless named anew or gone."""
        self.remembered = dict(paths)

    @property
    def named(self) -> dict[int, str]:
        """Steps named with STEP=PATH, now or in an earlier ingest: step -> PATH as given."""
        return {**self.remembered, **self.explicit}

    def refs(self) -> list[CheckpointRef]:
        """Every step this source holds, sorted: the named checkpoints and those found by
        directory name (a named step wins over a directory claiming it); raises when there is none."""
        found: dict[int, CheckpointRef] = {}
        for step, rel in sorted(self.named.items()):
            path = (self.root / rel).resolve()
            if path.is_dir():
                found[step] = CheckpointRef(step, rel, path)
            elif step in self.explicit:
                raise SourceError(f"--steps {step}={rel}: {path} is not a directory")
            # a remembered checkpoint that is gone: reconcile() says so if the model needs it
        named = {ref.path for ref in found.values()}
        claimed: dict[int, str] = {}
        for child in sorted(self.root.iterdir()):
            step = step_from_name(child.name) if child.is_dir() else None
            if step is None or step in self.named or child.resolve() in named:
                continue
            if step in claimed:
                raise SourceError(f"{self.root}: both {claimed[step]} and {child.name} claim step {step}; name checkpoints explicitly with --steps STEP=PATH")
            claimed[step] = child.name
            found[step] = CheckpointRef(step, child.name, child)
        if found:
            return [found[s] for s in sorted(found)]
        if self._is_checkpoint(self.root):
            return [CheckpointRef(self._single_step(), self.root.name, self.root)]
        raise SourceError(
            f"{self.root}: no checkpoints found (expected subdirectories like checkpoint-500/ or step500/ "
            "holding weights); name them with --steps STEP=PATH"
        )

    @staticmethod
    def _is_checkpoint(path: Path) -> bool:
        try:
            weight_files(path)
        except SourceError:
            return False
        return True

    def _single_step(self) -> int:
        state = self.root / "trainer_state.json"
        if state.is_file():
            try:
                return int(json.loads(state.read_text())["global_step"])
            except (ValueError, KeyError, TypeError):
                pass
        return step_from_name(self.root.name) or 0

    def open(self, ref: CheckpointRef) -> Checkpoint:
        return Checkpoint(ref.path, step=ref.step, revision=ref.revision)

    def prefetch(self, ref: CheckpointRef) -> None:
        """Local files need no fetching."""

    def release(self, ref: CheckpointRef) -> None:
        """Local files are the user's: never deleted."""

    def tokens(self, step: int, revision: str) -> int | None:
        return None

    def close(self) -> None:
        """Nothing is held between calls."""
