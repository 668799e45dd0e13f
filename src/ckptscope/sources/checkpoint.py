"""One checkpoint on disk, read one tensor at a time.

A checkpoint is a directory holding `config.json` and the weights in exactly one format:
single or sharded safetensors (`model.safetensors`, or shards listed by
`model.safetensors.index.json`), or single or sharded PyTorch pickles (`pytorch_model.bin`,
or `pytorch_model.bin.index.json`). When both formats are present, safetensors wins and the
`.bin` files are never opened.

Memory stays near the size of one tensor: safetensors are read with a seek and one
`readinto` of exactly that tensor's bytes into the tensor itself (no mmap, no second copy),
and `.bin` files are mapped with `torch.load(weights_only=True, mmap=True)` afresh for each
read, so only the tensor asked for is paged in and its pages go when the map is dropped. `weights_only=True` means a pickle that needs arbitrary objects is
refused, never executed.

Tied weights (GPT-2's `lm_head.weight`, one tensor with `transformer.wte.weight`) are one
parameter stored under two names. `Checkpoint.tensors` holds each parameter once; the other
names are in `Checkpoint.ties`, so they are neither counted nor analyzed twice. A tie is
certain in a `.bin` file, where both names point at one storage; safetensors cannot share
storage (and `save_pretrained` drops the copy), so there an output embedding is tied to an
input embedding when the config does not untie them (`tie_word_embeddings`) and their bytes
are equal.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ckptscope.errors import SourceError
from ckptscope.sources.layers import classify, family

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# A damaged file: advice that fits a local run (re-save or copy) and a download alike.
AGAIN = "copy, download or save it again"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float16"
    file: Path
    offset: int = 0  # safetensors: byte offset of the data in the file
    nbytes: int = 0


def weight_files(path: Path) -> tuple[str, list[Path]]:
    """The weight format of a checkpoint directory and its files, in name order.

    Raises SourceError when the directory holds no weights or an index names a missing shard.
    """
    for fmt, single, index in (
        ("safetensors", SAFETENSORS_SINGLE, SAFETENSORS_INDEX),
        ("bin", BIN_SINGLE, BIN_INDEX),
    ):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise SourceError(f"{path / index}: not a valid shard index ({exc}); {AGAIN}") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SourceError(f"{path}: shard(s) {', '.join(missing)} listed in {index} are missing; copy, download or save the checkpoint again")
            return fmt, files
        if (path / single).is_file():
            return fmt, [path / single]
    # Trainer directories also hold training_args.bin, optimizer.pt…: only weight files count.
    others = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if others:
        fmt = "safetensors" if others[0].suffix == ".safetensors" else "bin"
        return fmt, others
    raise SourceError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found; point SOURCE at a directory of checkpoints")


def _read_safetensors_header(file: Path) -> list[TensorInfo]:
    """Parse and validate a safetensors header: a truncated or corrupt file fails here, before any analysis."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SourceError(f"{file}: truncated safetensors file ({size} bytes); {AGAIN}")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            raise SourceError(f"{file}: corrupt safetensors header (claims {header_len} bytes, file has {size}); {AGAIN}")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError:
            raise SourceError(f"{file}: corrupt safetensors header (not JSON); {AGAIN}") from None
    if not isinstance(header, dict):
        raise SourceError(f"{file}: corrupt safetensors header (not a JSON object); {AGAIN}")
    data_start = 8 + header_len
    infos = []
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            start, stop = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{file}: corrupt safetensors entry for {name!r}; {AGAIN}") from None
        numel = 1
        for s in shape:
            numel *= s
        if stop - start != numel * dtype.itemsize:
            raise SourceError(f"{file}: tensor {name!r} has {stop - start} bytes for shape {shape}; the file is corrupt")
        end = max(end, stop)
        infos.append(TensorInfo(name, shape, str(dtype).removeprefix("torch."), file, data_start + start, stop - start))
    if data_start + end > size:
        raise SourceError(f"{file}: truncated safetensors file ({size} bytes, header needs {data_start + end}); {AGAIN}")
    return infos


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """Memory-map a PyTorch checkpoint without executing arbitrary pickled code."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            # Legacy (pre-zip) serialization cannot be memory-mapped; it loads whole.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(
            f"{file}: refused, it needs arbitrary unpickling ({first[:160]}); "
            "re-save the weights as a plain state dict or safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SourceError(f"{file}: cannot read PyTorch checkpoint ({str(exc).splitlines()[0][:160]}); {AGAIN}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{file}: not a state dict of tensors; save model.state_dict() or use safetensors")
    return state


def _shared_storage(state: dict[str, torch.Tensor], fam: str) -> dict[str, str]:
    """Tensors of one pickle that are the same view of the same storage: tied name -> the name kept.

    The kept name is the first stored, unless only a later one is not an output embedding
    (`wte` holds GPT-2's tied weights, not `lm_head`)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel():  # empty tensors may all sit at address 0
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            groups.setdefault(key, []).append(name)
    ties = {}
    for names in (g for g in groups.values() if len(g) > 1):
        kept = next((n for n in names if classify(n, fam).component != "unembed"), names[0])
        ties.update((n, kept) for n in names if n != kept)
    return ties


def _same_bytes(a: TensorInfo, b: TensorInfo, chunk: int = 1 << 20) -> bool:
    """Whether two stored tensors hold equal bytes; safetensors entries stop at the first differing chunk."""
    if a.file.suffix != ".safetensors" or b.file.suffix != ".safetensors":  # .bin: both mapped, compared whole
        x, y = _load_bin(a.file)[a.name], _load_bin(b.file)[b.name]
        return torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))
    if a.nbytes != b.nbytes:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        left = a.nbytes
        while left:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


class Checkpoint:
    """The weights of one training step, opened lazily and read tensor by tensor."""

    def __init__(self, path: Path | str, *, step: int, revision: str | None = None) -> None:
        self.path = Path(path)
        self.step = step
        self.revision = revision if revision is not None else self.path.name
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: checkpoint directory does not exist")
        self.format, self.files = weight_files(self.path)

    @cached_property
    def config(self) -> dict | None:
        """The HF `config.json`, or None for a run that has none."""
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return None
        try:
            return json.loads(cfg.read_text())
        except ValueError:
            raise SourceError(f"{cfg}: not valid JSON; fix or remove it") from None

    @cached_property
    def _index(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Every stored tensor by name (headers only; validates the files on the way), and the ties."""
        infos: dict[str, TensorInfo] = {}
        ties: dict[str, str] = {}
        for file in self.files:
            if self.format == "safetensors":
                found = _read_safetensors_header(file)
            else:
                state = _load_bin(file)
                found = [TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), file) for n, t in state.items()]
                ties.update(_shared_storage(state, family(self.config)))
            for info in found:
                infos[info.name] = info
        ties.update(self._equal_embeddings(infos, ties))
        return infos, ties

    @property
    def stored(self) -> dict[str, TensorInfo]:
        """Every tensor in the files, tied names included."""
        return self._index[0]

    @cached_property
    def ties(self) -> dict[str, str]:
        """Names stored as a copy of another tensor (tied weights) -> the name that holds them."""
        return self._index[1]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every parameter once, by name: the stored tensors less the tied copies."""
        return {name: info for name, info in self.stored.items() if name not in self.ties}

    def _equal_embeddings(self, infos: dict[str, TensorInfo], found: dict[str, str]) -> dict[str, str]:
        """Output embeddings stored as a copy of an input embedding: in safetensors, or in another
        shard of a `.bin` checkpoint than the one holding the input embedding (see the module docstring)."""
        if (self.config or {}).get("tie_word_embeddings") is False:
            return {}
        fam = family(self.config)
        roles = {name: classify(name, fam).component for name in infos}
        ties = {}
        for out in (n for n, c in roles.items() if c == "unembed" and n not in found):
            for emb in (n for n, c in roles.items() if c == "embed"):
                a, b = infos[out], infos[emb]
                if (a.shape, a.dtype) == (b.shape, b.dtype) and _same_bytes(a, b):
                    ties[out] = emb
                    break
        return ties

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory in its stored dtype."""
        info = self.tensors[self.ties.get(name, name)]
        if self.format == "bin":
            # A fresh map per read: the pages of this tensor are released when the map is dropped,
            # instead of accumulating in RSS for the whole checkpoint.
            return _load_bin(info.file)[name].clone()
        out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        if info.nbytes:  # read straight into the tensor: no second copy of its bytes
            with open(info.file, "rb") as fh:
                fh.seek(info.offset)
                got = fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            if got != info.nbytes:
                raise SourceError(f"{info.file}: truncated while reading {name!r}; {AGAIN}")
        return out

    def content_hash(self) -> str:
        """sha256 over the weight files' bytes in name order: equal hashes mean byte-identical weights."""
        digest = hashlib.sha256()
        for file in self.files:
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"Checkpoint(step={self.step}, path={str(self.path)!r}, format={self.format!r})"


def is_complete(path: Path) -> bool:
    """Whether a checkpoint directory's weights are whole: a trainer may still be writing it.

    Every safetensors file has a valid header and exactly the size it declares; a shard index
    is valid JSON and every shard it names is present and whole; a `.bin` (a zip) ends with its
    central directory. (That the files also stay unchanged for a while is the watcher's check.)
    """
    import zipfile

    try:
        fmt, files = weight_files(path)
        for file in files:
            if fmt == "safetensors":
                infos = _read_safetensors_header(file)
                with open(file, "rb") as fh:
                    data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
                end = max((i.offset + i.nbytes for i in infos), default=data_start)
                if file.stat().st_size != end:  # a file still growing past its header, or padded: not final
                    return False
            elif not zipfile.is_zipfile(file):
                return False
    except (SourceError, OSError, struct.error):
        return False
    return True
