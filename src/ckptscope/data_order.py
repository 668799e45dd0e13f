"""Training data order: which sequences each optimizer step trained on, as a corpus file.

Pythia's pre-shuffled Pile (and any GPT-NeoX/Megatron run whose training sequences were written in
training order) is a Megatron `MMapIndexedDataset`: `PREFIX.idx` (header, item sizes, byte
pointers, document index) and `PREFIX.bin` (the items' token ids, concatenated, no header). Item
i is the i-th training sequence, so with B sequences per optimizer step the update that turns
checkpoint s into s+1 trains on items [s·B, (s+1)·B): item i is first seen by checkpoint
⌊i/B⌋ + 1 (EleutherAI's `eval_memorization.py` scores items 0…1024c−1 as seen by `step{c}`).

Both files are opened as memory maps and only the selected items are touched, so the time and
memory of `corpus_from_data` grow with the corpus it writes, not with the dataset (Pythia's holds
~300 billion tokens).

`write_indexed_dataset` writes the same layout, so a run trained from it (the embedded demo suite,
`scripts/make_demo_suite.py`) ships its own data order and can be profiled like Pythia.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from ckptscope.errors import CkptscopeError

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"  # the older "cached"/"lazy" IndexedDataset, a different layout
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, items N, doc_idx length D: 34 bytes
# Integer dtype codes shared by gpt-neox, Megatron and Pythia's reader. Codes 6 and 7 are float
# types whose meaning differs between versions (6 is float32 in gpt-neox HEAD, float64 in the
# Pythia-era branch and in Megatron-core); token ids are never floats, so they are refused.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
ROW_GROUP_TOKENS = 1 << 24  # tokens buffered per Parquet row group (~64 MB as int32)
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
HELDOUT_STREAM = 0  # random stream of the held-out sample; train steps (>= 1) use their step number


class DataOrderError(CkptscopeError):
    """A training-order dataset that is missing, malformed or asked for what it does not hold."""


@dataclass
class IndexedDataset:
    """A memory-mapped `MMapIndexedDataset`: item i is `sizes[i]` tokens at byte `pointers[i]` of `.bin`."""

    prefix: Path
    dtype: np.dtype
    sizes: np.ndarray  # int32[N], memory-mapped from .idx
    pointers: np.ndarray  # int64[N] byte offsets into .bin, memory-mapped
    data: np.ndarray  # the .bin bytes, memory-mapped

    @classmethod
    def open(cls, prefix: Path | str, what: str = "PREFIX") -> IndexedDataset:
        """Validate the header and map both files; `what` names the argument in error messages."""
        prefix = Path(prefix)
        if prefix.suffix in (".bin", ".idx"):  # accept either file's name, as gpt-neox's reader does
            prefix = prefix.with_suffix("")
        idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
        for path in (idx, bin_):
            if not path.is_file():
                raise DataOrderError(f"{what} {prefix}: {path} does not exist; an MMapIndexedDataset is PREFIX.idx plus PREFIX.bin")
        with open(idx, "rb") as fh:
            head = fh.read(HEADER.size)
        if head.startswith(LEGACY_MAGIC):
            raise DataOrderError(f"{what} {idx}: legacy cached IndexedDataset (magic TNTIDX), not an MMapIndexedDataset; "
                                 "convert it with gpt-neox's preprocess_data.py --dataset-impl mmap")
        if len(head) < HEADER.size or not head.startswith(MAGIC):
            raise DataOrderError(f"{what} {idx}: not an MMapIndexedDataset index (wrong magic {head[:9]!r}, expected {MAGIC!r})")
        _, version, code, n, d = HEADER.unpack(head)
        if version != 1:
            raise DataOrderError(f"{what} {idx}: index version {version}; only version 1 is supported")
        if code not in DTYPES:
            raise DataOrderError(f"{what} {idx}: dtype code {code} is not an integer token type "
                                 f"(expected one of {sorted(DTYPES)}: uint8, int8, int16, int32, int64, uint16)")
        need = HEADER.size + 12 * n + 8 * d
        if idx.stat().st_size < need:
            raise DataOrderError(f"{what} {idx}: truncated index ({idx.stat().st_size} bytes; its header promises {need})")
        if n == 0:
            raise DataOrderError(f"{what} {prefix}: the dataset holds no items")
        sizes = np.memmap(idx, dtype="<i4", mode="r", offset=HEADER.size, shape=(n,))
        pointers = np.memmap(idx, dtype="<i8", mode="r", offset=HEADER.size + 4 * n, shape=(n,))
        dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        end = int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize  # the last item ends the file
        have = bin_.stat().st_size
        if have < end:
            raise DataOrderError(f"{what} {bin_}: truncated data file ({have} bytes; the index needs {end}); "
                                 "was the download or unsharding interrupted?")
        return cls(prefix, dtype, sizes, pointers, np.memmap(bin_, dtype=np.uint8, mode="r"))

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, indices: np.ndarray, seq_len: int, what: str = "PREFIX") -> np.ndarray:
        """Items `indices` as a (len(indices), seq_len) array in the file's dtype; each must hold seq_len tokens."""
        sizes = np.asarray(self.sizes[indices])
        bad = np.flatnonzero(sizes != seq_len)
        if bad.size:
            i = int(indices[bad[0]])
            raise DataOrderError(f"{what} {self.prefix}: item {i} holds {int(sizes[bad[0]])} tokens, not --seq-len {seq_len}; "
                                 "a training-order dataset holds one fixed-length sequence per item (Pythia: 2049)")
        starts = np.asarray(self.pointers[indices])
        width = seq_len * self.dtype.itemsize
        if starts.size and (starts.min() < 0 or starts.max() + width > len(self.data)):
            raise DataOrderError(f"{what} {self.prefix}: the index points past the end of the .bin file; the files do not belong together")
        out = np.empty((len(indices), seq_len), dtype=self.dtype)
        for row, start in enumerate(starts):
            out[row] = self.data[start : start + width].view(self.dtype)  # one read per item, never the whole file
        return out


def write_indexed_dataset(prefix: Path | str, items: np.ndarray | list[np.ndarray], dtype: type | None = None) -> Path:
    """Write `items` (1-D integer arrays, or the rows of a 2-D array) as `PREFIX.idx` + `PREFIX.bin`.

    The layout `IndexedDataset.open` reads (version 1; one document per item, as packed training
    sequences are). `dtype` defaults to uint16 when every id is below 65,500 and int32 otherwise,
    the rule of gpt-neox's builder. Returns the prefix.
    """
    prefix = Path(prefix)
    arrays = [np.asarray(item) for item in items]
    if not arrays or any(a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) for a in arrays):
        raise DataOrderError(f"{prefix}: items must be one or more 1-D arrays of integer token ids")
    top = max(int(a.max()) if a.size else 0 for a in arrays)
    low = min(int(a.min()) if a.size else 0 for a in arrays)
    out_type = np.dtype(dtype if dtype is not None else (np.uint16 if top < 65_500 else np.int32))
    if out_type not in CODES:
        raise DataOrderError(f"{prefix}: dtype {out_type} is not one of the integer token types {sorted(map(str, CODES))}")
    info = np.iinfo(out_type)
    if low < info.min or top > info.max:
        raise DataOrderError(f"{prefix}: token ids {low}..{top} do not fit {out_type}")
    sizes = np.array([a.size for a in arrays], dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * out_type.itemsize
    doc_idx = np.arange(len(arrays) + 1, dtype="<i8")  # document j is item j
    with open(prefix.with_name(prefix.name + ".bin"), "wb") as fh:
        for a in arrays:
            fh.write(a.astype(out_type.newbyteorder("<"), copy=False).tobytes())
    with open(prefix.with_name(prefix.name + ".idx"), "wb") as fh:
        fh.write(HEADER.pack(MAGIC, 1, CODES[out_type], len(arrays), len(doc_idx)))
        fh.write(sizes.tobytes() + pointers.astype("<i8").tobytes() + doc_idx.tobytes())
    return prefix


def first_seen_step(index: int | np.ndarray, batch_size: int) -> int | np.ndarray:
    """The first checkpoint step that has trained on item `index`: ⌊index / B⌋ + 1."""
    return index // batch_size + 1


def parse_steps(spec: str | None, last: int) -> range:
    """`A:B[:S]` (inclusive, as `--steps` everywhere) or one step `N`, within 1…last; None means all."""
    if spec is None or spec.strip() in ("", "all"):
        return range(1, last + 1)
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*(?::\s*(\d+)\s*)?)?", spec)
    if not m:
        raise DataOrderError(f"--steps {spec!r}: use A:B[:S] (first-seen steps A to B inclusive, every S-th), e.g. 1:143000:1000")
    lo = int(m[1])
    hi = int(m[2]) if m[2] is not None else lo
    stride = int(m[3]) if m[3] is not None else 1
    if lo < 1 or hi < lo or stride < 1:
        raise DataOrderError(f"--steps {spec!r}: needs 1 <= A <= B and S >= 1 (step 1 is the first step that trained on data)")
    if hi > last:
        raise DataOrderError(f"--steps {spec!r}: step {hi} is past the end of the data order, "
                             f"which holds {last} complete batches (steps 1..{last})")
    return range(lo, hi + 1, stride)


def _sample(rng_stream: int, seed: int, population: int, k: int | None) -> np.ndarray:
    """Sorted offsets of k of `population` items, drawn from the stream (seed, rng_stream); all when k covers it."""
    if k is None or k >= population:
        return np.arange(population, dtype=np.int64)
    rng = np.random.default_rng([seed, rng_stream])  # one stream per step: a step's sample ignores the other steps chosen
    return np.sort(rng.choice(population, size=k, replace=False)).astype(np.int64)


def corpus_from_data(prefix: Path | str, output: Path | str, batch_size: int = 1024, seq_len: int = 2049,
                     steps: str | None = None, per_step: int | None = None, seed: int = 0,
                     heldout: Path | str | None = None, heldout_count: int = 0) -> pl.DataFrame:
    """Write the training sequences of the selected steps (and held-out controls) as a Parquet corpus.

    `steps` selects first-seen steps (`A:B[:S]`, default all complete batches); `per_step` K
    samples K of each step's `batch_size` sequences (all when K >= batch_size), with the stream
    (seed, step) so one step's sample does not depend on which other steps are selected.
    `heldout` names a second dataset of never-trained sequences, of which `heldout_count` are
    sampled with the stream (seed, 0). Returns the corpus as written: `id` (`train:<index>` or
    `heldout:<index>`), `tokens`, `first_seen_step` (NULL for held-out rows) and `split`.
    """
    output = Path(output)
    for name, value, low in (("--batch-size", batch_size, 1), ("--seq-len", seq_len, 2), ("--seed", seed, 0)):
        if value < low:
            raise DataOrderError(f"{name} {value}: must be at least {low}")
    if per_step is not None and per_step < 1:
        raise DataOrderError(f"--per-step {per_step}: must be at least 1 (omit it to keep every sequence of each step)")
    if (heldout is None) != (heldout_count == 0):
        raise DataOrderError("--heldout PREFIX2 and --heldout-count N (N >= 1) go together")
    if heldout_count < 0:
        raise DataOrderError(f"--heldout-count {heldout_count}: must be at least 1")
    if output.suffix.lower() != ".parquet":
        raise DataOrderError(f"-o {output}: the corpus is written as Parquet; name it *.parquet")
    if not output.parent.is_dir():
        raise DataOrderError(f"-o {output}: directory {output.parent} does not exist")

    data = IndexedDataset.open(prefix, "PREFIX")
    last = len(data) // batch_size
    if last == 0:
        raise DataOrderError(f"PREFIX {data.prefix}: {len(data)} items are fewer than one batch of --batch-size {batch_size}")
    chosen = parse_steps(steps, last)
    held = None
    if heldout is not None:
        held = IndexedDataset.open(heldout, "--heldout")
        if heldout_count > len(held):
            raise DataOrderError(f"--heldout-count {heldout_count}: {held.prefix} holds only {len(held)} items")

    # int32 holds every token id but int64's; polars builds the rows (pyarrow.array would import pandas, seconds per run)
    token_type = pl.Int64 if data.dtype.itemsize == 8 or (held is not None and held.dtype.itemsize == 8) else pl.Int32
    tmp = output.with_name(output.name + ".partial")  # renamed at the end: an interrupted run leaves no corpus behind
    groups: list[pl.DataFrame] = []
    writer = None
    try:
        for group in _row_groups(_parts(data, held, chosen, batch_size, seq_len, per_step, seed, heldout_count, token_type),
                                 seq_len):
            table = group.to_arrow()
            # zstd without a dictionary for the tokens: twice as fast to write as the default, ~20% larger files
            writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd", use_dictionary=["split"])
            writer.write_table(table)
            groups.append(group)
        writer.close()
        tmp.replace(output)
    finally:
        if writer is not None and writer.is_open:
            writer.close()
        tmp.unlink(missing_ok=True)
    return pl.concat(groups, rechunk=False)


def _parts(data: IndexedDataset, held: IndexedDataset | None, chosen: range, batch_size: int, seq_len: int,
           per_step: int | None, seed: int, heldout_count: int, token_type: type[pl.DataType]) -> Iterator[pl.DataFrame]:
    """Corpus rows one step at a time, then the held-out sample in slices of at most one batch."""
    for step in chosen:
        index = (step - 1) * batch_size + _sample(step, seed, batch_size, per_step)  # the items whose first_seen_step is step
        yield _rows(data, index, seq_len, "train", first_seen_step(index, batch_size), token_type, "PREFIX")
    if held is not None:
        index = _sample(HELDOUT_STREAM, seed, len(held), heldout_count)
        for start in range(0, len(index), batch_size):
            yield _rows(held, index[start : start + batch_size], seq_len, "heldout", None, token_type, "--heldout")


def _row_groups(parts: Iterator[pl.DataFrame], seq_len: int) -> Iterator[pl.DataFrame]:
    """Parts merged into Parquet row groups of about ROW_GROUP_TOKENS tokens (memory per group stays bounded)."""
    pending: list[pl.DataFrame] = []
    for part in parts:
        pending.append(part)
        if sum(t.height for t in pending) * seq_len >= ROW_GROUP_TOKENS:
            yield pl.concat(pending)
            pending = []
    if pending:
        yield pl.concat(pending)


def _rows(data: IndexedDataset, index: np.ndarray, seq_len: int, split: str, seen: np.ndarray | None,
          token_type: type[pl.DataType], what: str) -> pl.DataFrame:
    """Corpus rows for items `index` of one dataset: ids, token lists, first-seen step and split."""
    tokens = data.read(index, seq_len, what).astype(np.int64 if token_type == pl.Int64 else np.int32, copy=False)
    return pl.DataFrame({
        "id": [f"{split}:{i}" for i in index.tolist()],
        "tokens": pl.Series(tokens).cast(pl.List(token_type)),
        "first_seen_step": pl.Series(seen if seen is not None else [None] * len(index), dtype=pl.Int64),
        "split": [split] * len(index),
    })
