"""Local training runs: a directory holding one checkpoint directory per step.

Recognised step directory names (case-insensitive): `checkpoint-500` (HF Trainer),
`step500`, `step-500`, `step_500`, `global_step500`, `ckpt_500`, `iter_500`, and names that
contain such a token, e.g. `step500-tokens1B`. A run laid out differently is named explicitly:
`--steps 0=init,1000=runs/a/mid` (paths relative to SOURCE). A SOURCE that is itself one
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


def parse_explicit_steps(spec: str | None) -> dict[int, str] | None:
    """`0=init,1000=mid` → {0: "init", 1000: "mid"}; None when the spec is a plain selection."""
    if not spec or "=" not in spec:
        return None
    mapping: dict[int, str] = {}
    for term in spec.split(","):
        step, sep, rel = term.partition("=")
        try:
            mapping[int(step)] = rel
        except ValueError:
            raise SourceError(f"bad --steps term {term!r}; name checkpoints as STEP=PATH, e.g. 0=init,1000=mid") from None
        if not sep or not rel:
            raise SourceError(f"bad --steps term {term!r}; name checkpoints as STEP=PATH, e.g. 0=init,1000=mid")
    return mapping


class LocalSource:
    """Checkpoints of one run found under a local directory."""

    kind = "local"

    def __init__(self, root: Path | str, explicit: dict[int, str] | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.exists():
            raise SourceError(f"{root}: no such file or directory; give the directory that holds the run's checkpoints")
        if not self.root.is_dir():
            raise SourceError(f"{root}: not a directory; give the directory that holds the run's checkpoints")
        self.explicit = explicit

    @property
    def id(self) -> str:
        return str(self.root)

    @property
    def default_name(self) -> str:
        return self.root.name

    def refs(self) -> list[CheckpointRef]:
        """Every step this source holds, sorted; raises when there is none."""
        if self.explicit is not None:
            refs = []
            for step, rel in sorted(self.explicit.items()):
                path = (self.root / rel).resolve()
                if not path.is_dir():
                    raise SourceError(f"--steps {step}={rel}: {path} is not a directory")
                refs.append(CheckpointRef(step, rel, path))
            return refs
        found: dict[int, CheckpointRef] = {}
        for child in sorted(self.root.iterdir()):
            step = step_from_name(child.name) if child.is_dir() else None
            if step is None:
                continue
            if step in found:
                raise SourceError(f"{self.root}: both {found[step].revision} and {child.name} claim step {step}; name checkpoints explicitly with --steps STEP=PATH")
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
