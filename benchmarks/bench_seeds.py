"""Benchmark `ckptscope seeds`: 10 seeds x 154 steps x 24 layers x 30 metrics, written through Store.write_checkpoint.

Each checkpoint holds 24 layers x 5 components x 6 metrics = 720 metric rows (30 metric series per
layer), 1540 checkpoints in all (1.1 M rows). Times `seed_intervals` for one metric (154 x 24 x 5 =
18,480 cells) without the bootstrap, with 1000 resamples, and with a second group to compare.

    PYTHONPATH=src python3 benchmarks/bench_seeds.py [--store /tmp/bench_seeds.duckdb]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ckptscope.rows import CheckpointRows, ModelRow, RunRows
from ckptscope.seeds import seed_intervals
from ckptscope.store.db import Store

STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(1000, 143001, 1000))
COMPONENTS = ("attn.qkv", "attn.o", "mlp.in", "mlp.out", "ln")
METRICS = tuple(f"metric_{i}" for i in range(6))


def build(path: Path, groups: tuple[str, ...] = ("a", "b"), seeds: int = 10, layers: int = 24) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    empty = {"tensor": [], "layer": [], "component": [], "shape": [], "dtype": []}
    with Store(path) as db:
        for group in groups:
            for k in range(seeds):
                model = ModelRow("synthetic", "unknown", layers, None, 2_097_152, None, group_name=group, seed=k)
                for step in STEPS:
                    run = RunRows("weights", "1", {}, "float64", "numpy")
                    values = rng.normal(size=(layers, len(COMPONENTS), len(METRICS)))
                    for layer in range(layers):
                        for c, comp in enumerate(COMPONENTS):
                            run.add_metrics(f"layers.{layer}.{comp}", layer, comp, dict(zip(METRICS, values[layer, c])))
                    db.write_checkpoint(CheckpointRows(f"{group}{k}", step, step * 2_097_152, f"step{step}", "synthetic", None,
                                                       empty, [run.to_arrow()]), model=model)
                    model = None
    return time.perf_counter() - t


def timed(label: str, **kw) -> None:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        df = seed_intervals("a", "metric_0", **kw)
        best = min(best, time.perf_counter() - t)
    print(f"{label:<48} {best:7.3f} s  ({df.height:,} rows)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=Path("/tmp/bench_seeds.duckdb"))
    store = parser.parse_args().store
    if not store.exists():
        print(f"built {store} (2 groups x 10 seeds x {len(STEPS)} steps x 720 rows) in {build(store):.0f} s")
    with Store(store, read_only=True) as db:
        t = time.perf_counter()
        n = db.sql("SELECT count(*) FROM seed_metrics WHERE group_name = 'a' AND metric = 'metric_0'").item()
        print(f"{'seed_metrics view, one metric':<48} {time.perf_counter() - t:7.3f} s  ({n:,} rows)")
    timed("seeds a --metric metric_0 --bootstrap 0", store=store, nboot=0)
    timed("seeds a --metric metric_0 (1000 resamples)", store=store, nboot=1000)
    timed("seeds a --compare b (1000 resamples)", store=store, nboot=1000, compare="b")
    timed("seeds a --component mlp.in (1000 resamples)", store=store, nboot=1000, component="mlp.in")


if __name__ == "__main__":
    main()
