"""The reference cache: copies of the checkpoints later steps are measured against.

A trainer with `save_total_limit` deletes old checkpoints, the first one included, while
`delta_init_*` and `delta_prev_*` of every new step need the first step and the previous one.
So an ingest of a local run keeps a byte-identical copy of those two beside the store:

    <store>.refs/<model, %-quoted>/step<N>/   config.json, the weight files (and shard index), ref.json

i.e. at most two checkpoints' weight files per model (the first step and the latest one
stored). A cached step is a plain checkpoint directory, opened like any other. It is used only
while the store still holds that step with the same content hash (`ref.json`), so a cache left
from a deleted store or another run of the same name is never mistaken for this one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

from ckptscope.sources.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, Checkpoint
from ckptscope.sources.local import CheckpointRef


def cache_dir(store: Path, model: str) -> Path:
    """Where the references of `model` in `store` are kept."""
    return Path(f"{Path(store).resolve()}.refs") / quote(model, safe="")


class RefCache:
    """The cached references of one model: `refs()` to use them, `put()` / `keep_only()` to maintain them."""

    def __init__(self, store: Path, model: str) -> None:
        self.dir = cache_dir(store, model)

    def refs(self, stored: dict[int, str | None]) -> dict[int, CheckpointRef]:
        """Cached steps that the store holds (step -> content hash) with the hash they were cached with."""
        found = {}
        for entry in sorted(self.dir.glob("step*")) if self.dir.is_dir() else ():
            try:
                meta = json.loads((entry / "ref.json").read_text())
            except (OSError, ValueError):  # a copy cut short: ref.json is written last
                continue
            if stored.get(meta["step"]) == meta["content_hash"]:
                found[meta["step"]] = CheckpointRef(meta["step"], meta["revision"], entry)
        return found

    def put(self, ckpt: Checkpoint, content_hash: str) -> None:
        """Copy the checkpoint's config and weight files; visible only once complete (renamed into place)."""
        final = self.dir / f"step{ckpt.step}"
        if (final / "ref.json").is_file() and json.loads((final / "ref.json").read_text())["content_hash"] == content_hash:
            return
        partial = self.dir / f".partial-step{ckpt.step}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            extras = [ckpt.path / name for name in ("config.json", SAFETENSORS_INDEX, BIN_INDEX) if (ckpt.path / name).is_file()]
            for file in (*ckpt.files, *extras):
                shutil.copyfile(file, partial / file.name)
            (partial / "ref.json").write_text(json.dumps({"step": ckpt.step, "revision": ckpt.revision,
                                                          "content_hash": content_hash, "source": str(ckpt.path)}))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)

    def keep_only(self, steps: set[int]) -> None:
        """Delete every cached step not in `steps`."""
        for entry in self.dir.glob("step*") if self.dir.is_dir() else ():
            if entry.name.removeprefix("step") not in {str(s) for s in steps}:
                shutil.rmtree(entry, ignore_errors=True)

    def remove(self) -> None:
        """Delete the model's cache (and the `.refs` directory once empty)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()
        except OSError:
            pass
