"""The plugin's own test: its values against a direct float64 computation on real checkpoints."""

import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import ckptscope
from ckptscope_frobenius import FrobeniusPerEntry

DEMO = Path(ckptscope.__file__).parent / "demo_suite"


def test_values_match_a_direct_computation(tmp_path):
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(DEMO, store=store, name="demo", steps="0,2000", analyzers="frobenius_per_entry")
    with ckptscope.Store(store, read_only=True) as db:
        got = {(s, t): v for s, t, v in db.sql("SELECT step, tensor, value FROM metrics").rows()}
        table = db.sql("SELECT step, tensor, entries, sum_squares FROM frobenius_entries").rows()
    for step in (0, 2000):
        weights = load_file(DEMO / f"step{step}" / "model.safetensors")
        for name, w in weights.items():
            if w.ndim == 2:
                w64 = w.astype(np.float64)
                assert got[(step, name)] == pytest.approx(math.sqrt((w64 ** 2).sum() / w64.size), rel=1e-12)
    assert len(table) == len(got) and all(e > 0 and s > 0 for _, _, e, s in table)
    assert FrobeniusPerEntry.name == "frobenius_per_entry"
