"""Query latency of a suite-sized store: the whole Pythia suite, >= 10 million metric rows.

Why: `ckptscope sql`, reports and notebooks read the long `metric_values` table through the
`metrics` and `layer_metrics` views; a store holding every Pythia model at every step must still
answer a typical question in well under a second.

How: the store is synthesized through the real write path (`Store.write_checkpoint` with
`CheckpointRows` / `RunRows`, one transaction per checkpoint) with the row shapes of
benchmarks/bench_report.py (the weight analyzer's 30 statistics per matrix component, QKV split,
4 per norm/bias vector), for the 8 Pythia sizes at their real depths, standard and deduped
(16 models), x Pythia's 154 steps: 13.7M rows in `metric_values`. Spectra are left out; no query here
reads them. Each query then runs in a fresh read-only connection: the first run is reported as
"cold" (new connection, though the OS page cache may hold the file), then the median of
`--repeats` more. The last row runs `ckptscope sql` as a subprocess, interpreter start included.

    python benchmarks/bench_store.py                  # synthesize into a temp dir, then time
    python benchmarks/bench_store.py --store s.duckdb  # reuse (or create) a store file
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
from bench_report import synthetic_checkpoint

import ckptscope
from ckptscope.rows import ModelRow
from ckptscope.store.db import Store

DEPTHS = {"70m": 6, "160m": 12, "410m": 24, "1b": 16, "1.4b": 24, "2.8b": 32, "6.9b": 32, "12b": 36}
STEPS = [0, *(2**k for k in range(10)), *range(1000, 143001, 1000)]  # Pythia's 154 revisions
MODELS = {f"pythia-{size}{suffix}": layers for size, layers in DEPTHS.items() for suffix in ("", "-deduped")}
QUERIES = {
    "1. one metric, one model (metrics)":
        "SELECT step, layer, value FROM metrics WHERE model = 'pythia-12b' AND component = 'attn.qkv' "
        "AND metric = 'stable_rank' ORDER BY step, layer",
    "2. cross-model at relative depth (layer_metrics)":
        "SELECT model, round(relative_depth * 4) / 4 AS depth, round(progress * 10) / 10 AS progress, avg(value) AS alpha "
        "FROM layer_metrics WHERE component = 'mlp.out' AND metric = 'alpha' GROUP BY ALL ORDER BY ALL",
    "3. per-step aggregate (metrics)":
        "SELECT model, step, median(value) AS delta_init_relative FROM metrics WHERE metric = 'delta_init_relative' "
        "GROUP BY model, step ORDER BY model, step",
}


def synthesize(path: Path) -> float:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with Store(path) as db:
        for model, layers in MODELS.items():
            row = ModelRow(source=f"/synthetic/{model}", architecture="gpt_neox", num_layers=layers, num_parameters=None,
                           tokens_per_step=2_097_152, config=None)
            for j, step in enumerate(STEPS):
                rows = synthetic_checkpoint(model, step, rng, layers=layers, last_step=STEPS[-1], spectra=False)
                db.write_checkpoint(rows, model=row if j == 0 else None)
    return time.perf_counter() - start


def time_query(store: Path, query: str, repeats: int) -> tuple[float, float, int]:
    """(cold seconds, median warm seconds, result rows) through `Store.sql` on a fresh connection."""
    with Store(store, read_only=True) as db:
        start = time.perf_counter()
        rows = db.sql(query).height
        cold = time.perf_counter() - start
        warm = []
        for _ in range(repeats):
            start = time.perf_counter()
            db.sql(query)
            warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm), rows


def time_cli(store: Path, query: str, repeats: int) -> tuple[float, float, int]:
    """The same for `ckptscope sql --format csv` as a subprocess, stdout captured."""
    cmd = [shutil.which("ckptscope") or "ckptscope", "sql", "--store", str(store), "--format", "csv", query]
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs.append(time.perf_counter() - start)
    return runs[0], statistics.median(runs[1:]), out.count("\n") - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="store file to reuse or create (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"# {date.today()} `{' '.join(sys.argv)}`\n# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, duckdb {duckdb.__version__}, ckptscope {ckptscope.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "bench.duckdb"
        if not store.exists():
            print(f"synthesized in {synthesize(store):.0f}s")
        with Store(store, read_only=True) as db:
            n = db.sql("SELECT count(*) AS n FROM metric_values")["n"].item()
        print(f"store: {len(MODELS)} models x {len(STEPS)} steps, {n / 1e6:.1f}M metric rows, {store.stat().st_size / 1e6:.0f} MB\n")
        print("| query | result rows | cold s | median warm s |\n| --- | --- | --- | --- |")
        results = [(name, *time_query(store, q, args.repeats)) for name, q in QUERIES.items()]
        results.append(("4. `ckptscope sql` subprocess, query 1", *time_cli(store, QUERIES["1. one metric, one model (metrics)"],
                                                                               args.repeats)))
        for name, cold, warm, rows in results:
            print(f"| {name} | {rows} | {cold:.3f} | {warm:.3f} |")


if __name__ == "__main__":
    main()
