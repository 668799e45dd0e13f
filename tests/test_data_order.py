"""`corpus from-data` on data orders this test writes with its own MMapIndexedDataset writer
(from the documented byte layout, not ckptscope's reader): the corpus rows equal the planted
order exactly, samples are reproducible, held-out rows are marked, and every malformed input is
one line on stderr with exit status 1."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ckptscope.analyzers.corpus import load_corpus
from ckptscope.cli import main
from ckptscope.data_order import corpus_from_data

B, L, STEPS = 8, 9, 7  # sequences per step, tokens per sequence, complete batches
CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.uint8): 1}


def write_dataset(prefix: Path, items: list[np.ndarray], dtype=np.uint16, *, magic: bytes = b"MMIDIDX\x00\x00",
                  version: int = 1, code: int | None = None) -> Path:
    """PREFIX.bin (items concatenated, no header) and PREFIX.idx: 9-byte magic, <Q version, <B dtype
    code, <Q N, <Q D, int32 sizes[N], int64 byte pointers[N], int64 doc_idx[D] (little-endian)."""
    dtype = np.dtype(dtype)
    blob = b"".join(np.asarray(item, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes() for item in items)
    prefix.with_name(prefix.name + ".bin").write_bytes(blob)
    sizes = [len(item) for item in items]
    pointers = [dtype.itemsize * sum(sizes[:i]) for i in range(len(items))]
    doc_idx = list(range(len(items) + 1))  # one document per item: [0, 1, ..., N]
    head = magic + struct.pack("<Q", version) + struct.pack("<B", CODES[dtype] if code is None else code)
    head += struct.pack("<Q", len(items)) + struct.pack("<Q", len(doc_idx))
    body = struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
    prefix.with_name(prefix.name + ".idx").write_bytes(head + body + struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    return prefix


@pytest.fixture
def planted(tmp_path) -> tuple[Path, np.ndarray, Path, np.ndarray]:
    """A training order of 7 full batches plus 3 sequences of an incomplete one, and a held-out set."""
    rng = np.random.default_rng(11)
    order = rng.integers(0, 60000, (STEPS * B + 3, L))
    held = rng.integers(0, 2**31 - 1, (20, L))
    return write_dataset(tmp_path / "train", list(order)), order, write_dataset(tmp_path / "val", list(held), np.int32), held


def rows(df: pl.DataFrame) -> list[tuple]:
    return list(zip(df["id"], df["tokens"].to_list(), df["first_seen_step"], df["split"]))


def test_every_complete_batch_in_planted_order(planted, tmp_path):
    prefix, order, _, _ = planted
    df = corpus_from_data(prefix, tmp_path / "c.parquet", batch_size=B, seq_len=L)
    n = STEPS * B  # the incomplete last batch was never a training step
    assert rows(df) == [(f"train:{i}", order[i].tolist(), i // B + 1, "train") for i in range(n)]
    assert pl.read_parquet(tmp_path / "c.parquet").equals(df)
    corpus = load_corpus(tmp_path / "c.parquet")  # the analyzers' loader reads it as written
    assert corpus.ids == [f"train:{i}" for i in range(n)] and corpus.split == ["train"] * n
    assert corpus.first_seen_step == [i // B + 1 for i in range(n)]
    assert all(np.array_equal(r, order[i]) for i, r in enumerate(corpus.rows))


def test_sampling_is_seeded_per_step(planted, tmp_path):
    prefix, order, _, _ = planted
    a = corpus_from_data(prefix, tmp_path / "a.parquet", batch_size=B, seq_len=L, steps="2:6:2", per_step=3, seed=5)
    again = corpus_from_data(prefix, tmp_path / "b.parquet", batch_size=B, seq_len=L, steps="2:6:2", per_step=3, seed=5)
    other = corpus_from_data(prefix, tmp_path / "c.parquet", batch_size=B, seq_len=L, steps="2:6:2", per_step=3, seed=6)
    alone = corpus_from_data(prefix, tmp_path / "d.parquet", batch_size=B, seq_len=L, steps="4:4", per_step=3, seed=5)
    assert a.equals(again) and not a.equals(other)
    assert a.filter(pl.col("first_seen_step") == 4).equals(alone)  # a step's sample ignores the other steps chosen
    assert a["first_seen_step"].to_list() == [2] * 3 + [4] * 3 + [6] * 3
    for rid, tokens, step, _ in rows(a):
        i = int(rid.removeprefix("train:"))
        assert (step - 1) * B <= i < step * B and tokens == order[i].tolist()
    assert a["id"].n_unique() == 9
    full = corpus_from_data(prefix, tmp_path / "e.parquet", batch_size=B, seq_len=L, steps="3", per_step=B + 5)
    assert full["id"].to_list() == [f"train:{i}" for i in range(2 * B, 3 * B)]  # K >= B keeps the whole batch


def test_heldout_rows(planted, tmp_path):
    prefix, order, val, held = planted
    df = corpus_from_data(prefix, tmp_path / "c.parquet", batch_size=B, seq_len=L, steps="1:1", heldout=val, heldout_count=5)
    train, out = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "heldout")
    assert train.height == B and out.height == 5 and out["first_seen_step"].null_count() == 5
    for rid, tokens, _, _ in rows(out):
        assert rid.startswith("heldout:") and tokens == held[int(rid.removeprefix("heldout:"))].tolist()
    assert out["id"].n_unique() == 5
    corpus = load_corpus(tmp_path / "c.parquet")
    assert corpus.split[-5:] == ["heldout"] * 5 and corpus.first_seen_step[-5:] == [None] * 5


def test_cli_writes_the_corpus(planted, tmp_path):
    prefix, order, val, _ = planted
    res = CliRunner().invoke(main, ["corpus", "from-data", str(prefix) + ".bin", "-o", str(tmp_path / "c.parquet"),
                                    "--batch-size", str(B), "--seq-len", str(L), "--steps", "1:7:3", "--per-step", "2",
                                    "--heldout", str(val), "--heldout-count", "4"])
    assert res.exit_code == 0, res.output
    assert "wrote 10 sequences" in res.output and "6 train from 3 step(s), 4 held out" in res.output
    df = pl.read_parquet(tmp_path / "c.parquet")
    assert df["first_seen_step"].to_list() == [1, 1, 4, 4, 7, 7, None, None, None, None]


def broken(tmp_path: Path, order: np.ndarray) -> dict[str, tuple[list[str], str]]:
    """Malformed inputs (CLI arguments after PREFIX) and what their one-line error must say."""
    good = str(tmp_path / "train")
    cases: dict[str, tuple[list[str], str]] = {}
    only_bin = write_dataset(tmp_path / "nobin", list(order))
    (tmp_path / "nobin.idx").unlink()
    cases["missing idx"] = ([str(only_bin)], "nobin.idx does not exist")
    cases["wrong magic"] = ([str(write_dataset(tmp_path / "magic", list(order), magic=b"NOTANIDX\x00"))], "wrong magic")
    cases["legacy"] = ([str(write_dataset(tmp_path / "legacy", list(order), magic=b"TNTIDX\x00\x00\x00"))], "legacy cached")
    cases["version"] = ([str(write_dataset(tmp_path / "v2", list(order), version=2))], "index version 2")
    cases["float dtype"] = ([str(write_dataset(tmp_path / "float", list(order), code=6))], "dtype code 6")
    short = write_dataset(tmp_path / "short", list(order))
    data = (tmp_path / "short.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-3])
    cases["truncated bin"] = ([str(short)], "truncated data file")
    cut = write_dataset(tmp_path / "cut", list(order))
    (tmp_path / "cut.idx").write_bytes((tmp_path / "cut.idx").read_bytes()[:60])
    cases["truncated idx"] = ([str(cut)], "truncated index")
    ragged = write_dataset(tmp_path / "ragged", [t[: L - (i == 3)] for i, t in enumerate(order)])
    cases["item length"] = ([str(ragged)], "item 3 holds 8 tokens, not --seq-len 9")
    cases["step past end"] = ([good, "--steps", "5:8"], "step 8 is past the end")
    cases["bad steps"] = ([good, "--steps", "6:2"], "1 <= A <= B")
    cases["steps text"] = ([good, "--steps", "last"], "use A:B[:S]")
    cases["K < 1"] = ([good, "--per-step", "0"], "--per-step 0: must be at least 1")
    cases["heldout alone"] = ([good, "--heldout", good], "go together")
    cases["heldout too many"] = ([good, "--heldout", good, "--heldout-count", "999"], "holds only 59 items")
    cases["not parquet"] = ([good, "-o", str(tmp_path / "c.jsonl")], "name it *.parquet")
    return cases


def test_bad_input_is_one_line_and_writes_nothing(planted, tmp_path):
    _, order, _, _ = planted
    for name, (args, fragment) in broken(tmp_path, order).items():
        out = tmp_path / "out.parquet"
        if "-o" not in args:
            args = [*args, "-o", str(out)]
        res = CliRunner().invoke(main, ["corpus", "from-data", *args, "--batch-size", str(B), "--seq-len", str(L)])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), (name, res.output)
        assert fragment in lines[0], (name, lines[0])
        assert not out.exists() and not list(tmp_path.glob("*.partial")), name


@pytest.mark.parametrize("dtype,top", [(None, 65_499), (None, 65_500), (np.uint8, 255), (np.int64, 2**40)])
def test_write_indexed_dataset_matches_the_documented_layout(tmp_path, dtype, top):
    """ckptscope's writer (used by scripts/make_demo_suite.py) gives the same bytes as this file's own
    writer, picks uint16 below 65,500 and int32 from there (gpt-neox's rule), and reads back."""
    from ckptscope.data_order import DataOrderError, IndexedDataset, write_indexed_dataset

    rng = np.random.default_rng(5)
    items = [rng.integers(0, top + 1, n) for n in (5, 1, 9, 3)]
    items[0][0] = top
    expected = np.dtype(dtype) if dtype is not None else np.dtype(np.uint16 if top < 65_500 else np.int32)
    write_indexed_dataset(tmp_path / "ours", items, dtype)
    write_dataset(tmp_path / "ref", items, expected)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    data = IndexedDataset.open(tmp_path / "ours")
    assert data.dtype == expected and data.sizes.tolist() == [5, 1, 9, 3]
    assert data.read(np.array([2]), 9)[0].tolist() == items[2].tolist()
    with pytest.raises(DataOrderError, match="do not fit uint8"):
        write_indexed_dataset(tmp_path / "bad", [np.array([0, 256])], np.uint8)


def test_demo_suite_ships_the_order_it_trained_in():
    """The embedded suite's data order as documented in docs/demo.md: batch k of 8 is items [8(k-1), 8k);
    once-seen batches hold sequences found nowhere else in the order, every other batch ends with canary
    k mod 8, and no held-out sequence was trained on."""
    import ckptscope
    from ckptscope.data_order import IndexedDataset

    suite = Path(ckptscope.__file__).parent / "demo_suite"
    meta = json.loads((suite / "suite.json").read_text())["data_order"]
    b, length = meta["batch_size"], meta["seq_len"]
    data, held = IndexedDataset.open(suite / meta["train"]), IndexedDataset.open(suite / meta["heldout"])
    assert len(data) == meta["train_sequences"] == 2000 * b and len(held) == meta["heldout_sequences"]
    order = data.read(np.arange(len(data)), length).reshape(-1, b, length)
    canaries = [json.loads(line)["tokens"] for line in (suite / "canaries.jsonl").read_text().splitlines()]
    lo, hi, every = map(int, meta["profile"]["steps"].split(":"))
    once = set(range(lo, hi + 1, every))
    rows = lambda steps: [tuple(r) for s in steps for r in order[s - 1].tolist()]  # noqa: E731
    for step in set(range(1, len(order) + 1)) - once:
        assert order[step - 1, -1].tolist() == canaries[step % len(canaries)]
    once_rows, other_rows = rows(sorted(once)), set(rows(set(range(1, len(order) + 1)) - once))
    assert len(set(once_rows)) == len(once_rows) == len(once) * b and not set(once_rows) & other_rows
    assert not {tuple(r) for r in held.read(np.arange(len(held)), length).tolist()} & (other_rows | set(once_rows))
