"""Every analyzer on a CUDA device stores what it stores on the CPU (skipped without a GPU).

The demo suite is ingested twice through the real `ckptscope.ingest`, once with `device="cpu"` and
once with `device="cuda"`, with every built-in analyzer; the two stores must hold the same rows and,
row by row, the same values: weight statistics are float64 on both devices, so they agree to
rounding (1e-9 relative); activation statistics run the model in float32, where kernels differ,
so they agree to 1e-4 (losses and entropies; greedy tokens could flip at a near-tie, so the
memorization score is left out). Integer counts (ranks, spikes) must be equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptscope
from ckptscope.store.db import Store

DEMO = Path(ckptscope.__file__).parent / "demo_suite"
ANALYZERS = "weights,mp_fit,sparsity,subspace,circuits,convergence,memorization,sequence_stats"
FLOAT32 = {"convergence", "memorization", "sequence_stats"}  # activations: float32 forward passes
COUNTS = {"numerical_rank", "num_spikes"}
GREEDY = {"memorization_logit_lens"}  # fractions of greedy tokens: a near-tie may flip on another device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def stored(tmp_path: Path, device: str) -> dict[tuple, float]:
    """(analyzer or table, step, tensor or sequence, component, head, metric or column) -> value."""
    store = tmp_path / f"{device}.duckdb"
    ckptscope.ingest(DEMO, store=store, name="demo", steps="0,16,512,1000,2000", analyzers=ANALYZERS, device=device,
                     probe=DEMO / "probe.jsonl", corpus=DEMO / "canaries.jsonl")
    with Store(store, read_only=True) as db:
        rows = db.sql("SELECT analyzer, step, tensor, component, head, metric, value FROM metrics")
        seq = db.sql("SELECT step, sequence_id, sup_seq, entr_seq FROM sequence_stats")
        mem = db.sql("SELECT step, sequence_id, loss FROM memorization")
    # fused QKV: one tensor, three components; circuits: one tensor, one row per head
    got = {(r["analyzer"], r["step"], r["tensor"], r["component"], r["head"], r["metric"]): r["value"]
           for r in rows.iter_rows(named=True) if r["metric"] not in GREEDY}
    for table, frame in (("sequence_stats", seq), ("memorization", mem)):
        for r in frame.iter_rows(named=True):
            for column in frame.columns[2:]:
                got[(table, r["step"], r["sequence_id"], None, None, column)] = float(r[column])
    return got


def test_every_analyzer_stores_the_same_values_on_cuda_as_on_cpu(tmp_path):
    cpu, cuda = stored(tmp_path, "cpu"), stored(tmp_path, "cuda")
    assert set(cuda) == set(cpu) and len(cpu) > 1000
    assert {key[0] for key in cpu} >= set(ANALYZERS.split(","))
    worst: dict[str, tuple[float, tuple]] = {}
    for key, want in cpu.items():
        analyzer, have = key[0], cuda[key]
        if want is None or have is None or want != want or have != have:  # None/NaN: must be so on both
            assert (want is None or want != want) == (have is None or have != have), key
            continue
        if key[5] in COUNTS:
            assert have == want, key
            continue
        err = abs(have - want) / max(abs(want), 1e-6)  # near zero, an absolute difference of 1e-6·tol
        if err > worst.get(analyzer, (-1.0, ()))[0]:
            worst[analyzer] = (err, key)
    print("largest relative difference per analyzer:", worst)
    for analyzer, (err, key) in worst.items():
        assert err <= (1e-4 if analyzer in FLOAT32 else 1e-9), (analyzer, err, key)
