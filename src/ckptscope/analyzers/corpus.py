"""Probe and corpus files: the token sequences the activation analyzers run a model on.

Accepted formats (chosen by suffix):

* JSON Lines (`.jsonl`, `.json`): one object per line with `id` and either `tokens` (a list of
  token ids) or `text`, plus optional `first_seen_step` and `split` (`train`/`heldout`, as
  `ckptscope corpus from-data` writes);
* Parquet (`.parquet`): the same columns;
* NumPy (`.npy`): a 2-D integer array, one sequence per row, ids are row numbers (the layout of
  Pythia's `batch_viewer.py` output).

The file is parsed and hashed when an analyzer is built, so a bad file fails before any store
is touched; `text` rows are tokenized later, once, with the checkpoint's own tokenizer, because
only then is it known which tokenizer that is.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ckptscope.errors import CkptscopeError
from ckptscope.options import file_digest

if TYPE_CHECKING:
    import pyarrow as pa

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


@dataclass
class Sequences:
    """Token sequences with their ids; `first_seen_step` and `split` are None where the file does not say."""

    ids: list[str]
    tokens: list[np.ndarray]  # 1-D integer arrays (int64, or memory-mapped rows of a .npy file)
    first_seen_step: list[int | None]
    split: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: list[int]) -> Sequences:
        return Sequences([self.ids[i] for i in keep], [self.tokens[i] for i in keep], [self.first_seen_step[i] for i in keep],
                         [self.split[i] for i in keep])


@dataclass
class Corpus:
    """A parsed probe/corpus file; rows holding `text` stay strings until `sequences()` tokenizes them."""

    path: Path
    sha256: str
    ids: list[str]
    rows: list[np.ndarray | str]
    first_seen_step: list[int | None]
    split: list[str | None]
    _tokenized: Sequences | None = field(default=None, repr=False)

    def check_vocab(self, config: dict | None) -> None:
        """Token-id rows against the vocabulary a model config declares (text rows are tokenized later)."""
        vocab = (config or {}).get("vocab_size")
        if isinstance(vocab, int):
            rows = [i for i, row in enumerate(self.rows) if not isinstance(row, str)]
            check_vocab(Sequences([self.ids[i] for i in rows], [self.rows[i] for i in rows], [None] * len(rows), [None] * len(rows)),
                        vocab, self.path)

    def sequences(self, tokenizer_dirs: list[Path]) -> Sequences:
        """Token ids of every row; text is tokenized with the first tokenizer found in `tokenizer_dirs`."""
        if self._tokenized is None:
            texts = [i for i, row in enumerate(self.rows) if isinstance(row, str)]
            tokens = list(self.rows)
            if texts:
                tokenizer = load_tokenizer(tokenizer_dirs, self.path)
                encoded = tokenizer([self.rows[i] for i in texts])["input_ids"]
                for i, ids in zip(texts, encoded):
                    tokens[i] = np.asarray(ids, dtype=np.int64)
            self._tokenized = Sequences(self.ids, tokens, self.first_seen_step, self.split)
        return self._tokenized




def load_corpus(path: Path | str, what: str = "corpus") -> Corpus:
    """Parse a probe/corpus file; `what` names the option in error messages ("probe", "corpus")."""
    path = Path(path)
    if not path.is_file():
        raise CkptscopeError(f"--{what} {path}: no such file; give a .jsonl, .parquet or .npy file of token sequences")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            ids, rows, seen, split = _read_jsonl(path, what)
        elif suffix == ".parquet":
            ids, rows, seen, split = _read_parquet(path, what)
        elif suffix == ".npy":
            ids, rows, seen, split = _read_npy(path, what)
        else:
            raise CkptscopeError(f"--{what} {path}: unknown format {suffix or '(no suffix)'}; use .jsonl, .parquet or .npy")
    except CkptscopeError:
        raise
    except (OSError, ValueError) as exc:  # unreadable, truncated or not the format its suffix says
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CkptscopeError(f"--{what} {path}: cannot read it ({first})") from None
    if not ids:
        raise CkptscopeError(f"--{what} {path}: the file holds no sequences")
    if len(set(ids)) < len(ids):  # results are keyed by id: a repeated one would collide only at the store
        repeated = next(i for i, n in Counter(ids).items() if n > 1)
        raise CkptscopeError(f"--{what} {path}: the id {repeated!r} is used by more than one sequence; give each "
                             "sequence its own `id`")
    return Corpus(path, file_digest(path), ids, rows, seen, split)


def _token_array(value: object, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CkptscopeError(f"{where}: `tokens` must be a list of integer token ids")
    return arr.astype(np.int64, copy=False)


def _row(record: dict, index: int, where: str) -> tuple[str, np.ndarray | str, int | None, str | None]:
    """One record as (id, tokens or text, first_seen_step, split); the id defaults to the row number."""
    rid = record.get("id")
    rid = str(index) if rid is None else str(rid)
    if record.get("tokens") is not None:
        value: np.ndarray | str = _token_array(record["tokens"], where)
    elif isinstance(record.get("text"), str):
        value = record["text"]
    else:
        raise CkptscopeError(f"{where}: needs a `tokens` list or a `text` string")
    seen = record.get("first_seen_step")
    if seen is not None and (isinstance(seen, bool) or not isinstance(seen, (int, np.integer))):
        raise CkptscopeError(f"{where}: `first_seen_step` must be an integer step")
    split = record.get("split")
    if split is not None and not isinstance(split, str):
        raise CkptscopeError(f"{where}: `split` must be a string such as train or heldout")
    return rid, value, None if seen is None else int(seen), split


def _read_jsonl(path: Path, what: str) -> tuple[list, list, list, list]:
    ids, rows, seen, splits = [], [], [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"--{what} {path} line {lineno}"
            try:
                record = json.loads(line)
            except ValueError:
                raise CkptscopeError(f"{where}: not valid JSON") from None
            if not isinstance(record, dict):
                raise CkptscopeError(f"{where}: expected a JSON object with `id` and `tokens` or `text`")
            rid, value, first, split = _row(record, len(ids), where)
            ids.append(rid)
            rows.append(value)
            seen.append(first)
            splits.append(split)
    return ids, rows, seen, splits


def _read_parquet(path: Path, what: str) -> tuple[list, list, list, list]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "tokens" not in table.column_names and "text" not in table.column_names:
        raise CkptscopeError(f"--{what} {path}: needs a `tokens` or `text` column (has {', '.join(table.column_names)})")
    tokens = _token_rows(table)
    columns = {name: table[name].to_pylist() for name in ("id", "tokens", "text", "first_seen_step", "split")
               if name in table.column_names and not (name == "tokens" and tokens is not None)}
    ids, rows, seen, splits = [], [], [], []
    for i in range(table.num_rows):
        record = {name: values[i] for name, values in columns.items()}
        if tokens is not None:
            record["tokens"] = tokens[i]
        rid, value, first, split = _row(record, i, f"--{what} {path} row {i}")
        ids.append(rid)
        rows.append(value)
        seen.append(first)
        splits.append(split)
    return ids, rows, seen, splits


def _token_rows(table: pa.Table) -> list[np.ndarray] | None:
    """A `tokens` column of integer lists without nulls as one int64 array sliced per row: a
    corpus of millions of tokens is read without a Python int per token (None: not that shape)."""
    import pyarrow as pa

    if "tokens" not in table.column_names:
        return None
    col = table["tokens"].combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not pa.types.is_integer(col.type.value_type):
        return None
    if col.null_count or col.values.null_count:
        return None
    flat = col.values.to_numpy().astype(np.int64)  # a copy: Arrow's buffer is read-only, torch wants writable
    offsets = col.offsets.to_numpy()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _read_npy(path: Path, what: str) -> tuple[list, list, list, list]:
    data = np.load(path, mmap_mode="r", allow_pickle=False)
    if data.ndim != 2 or data.dtype.kind not in "iu":
        raise CkptscopeError(f"--{what} {path}: expected a 2-D integer array of token ids, got {data.ndim}-D {data.dtype}")
    rows = list(data)  # views into the memory map: rows are read when used, not all at once
    return [str(i) for i in range(len(rows))], rows, [None] * len(rows), [None] * len(rows)


def load_tokenizer(dirs: list[Path], corpus: Path):
    """The checkpoint's tokenizer; a clear error when none of `dirs` holds one."""
    from transformers import AutoTokenizer

    for d in dirs:
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(str(d))
            except (OSError, ValueError) as exc:
                raise CkptscopeError(f"{d}: cannot load its tokenizer ({str(exc).splitlines()[0][:160]})") from None
    raise CkptscopeError(
        f"{corpus} has `text` rows but the checkpoint has no tokenizer (looked in {', '.join(map(str, dirs))}); "
        "give `tokens` instead, or put the tokenizer files next to the checkpoints"
    )


def require_length(seqs: Sequences, length: int, path: Path) -> tuple[Sequences, int]:
    """Sequences of at least `length` tokens and how many were shorter; an error if none remain."""
    keep = [i for i, t in enumerate(seqs.tokens) if len(t) >= length]
    if not keep:
        raise CkptscopeError(f"{path}: all {len(seqs)} sequences are shorter than {length} tokens; nothing to analyze")
    return seqs.subset(keep), len(seqs) - len(keep)


def check_vocab(seqs: Sequences, vocab_size: int, path: Path) -> None:
    """Token ids must index the model's embedding; an out-of-range id would crash or silently wrap."""
    for rid, tokens in zip(seqs.ids, seqs.tokens):
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
            raise CkptscopeError(f"{path}: sequence {rid!r} has token id {bad}, outside the model's vocabulary of {vocab_size}; "
                                 "was it tokenized for another model?")
