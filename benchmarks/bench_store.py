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
from bench_report import MATRIX, MATRIX_METRICS, TENSOR, VECTOR_METRICS, VECTORS

import ckptscope
from ckptscope.store.db import CheckpointRows, ModelRow, RunRows, Store

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


def _checkpoint(model: str, layers: int, step: int, rng: np.random.Generator) -> CheckpointRows:
    """One step of a `layers`-deep GPT-NeoX as the weight analyzer writes it (no spectra)."""
    progress = np.log1p(step) / np.log1p(STEPS[-1])
    run = RunRows(analyzer="weights", version="1.0.0", parameters={"rtol": 1e-3}, dtype="float64", backend="synthetic")
    matrices = [("gpt_neox.embed_in.weight", None, "embed"), ("embed_out.weight", None, "unembed")]
    matrices += [(f"gpt_neox.layers.{layer}.{TENSOR.get(comp, TENSOR['attn.qkv'])}.weight", layer, comp)
                 for layer in range(layers) for comp in MATRIX]
    vectors = [(f"gpt_neox.layers.{layer}.{name}", layer, "norm" if "norm" in name else "bias")
               for layer in range(layers) for name in VECTORS]
    depth = np.array([(layer or 0) / layers for _, layer, _ in matrices])[:, None]
    values = 5 + 20 * depth * progress + rng.normal(0, 0.3, (len(matrices), len(MATRIX_METRICS)))
    for (tensor, layer, comp), row in zip(matrices, values.tolist()):
        run.add_metrics(tensor, layer, comp, dict(zip(MATRIX_METRICS, row)))
    for (tensor, layer, comp), row in zip(vectors, rng.normal(1, 0.1, (len(vectors), len(VECTOR_METRICS))).tolist()):
        run.add_metrics(tensor, layer, comp, dict(zip(VECTOR_METRICS, row)))
    stored = [m for m in matrices if m[2] not in ("attn.q", "attn.k", "attn.v")] + vectors
    tensors = {"tensor": [t for t, _, _ in stored], "layer": [la for _, la, _ in stored], "component": [c for _, _, c in stored],
               "shape": [[512] if c in ("norm", "bias") else [512, 512] for _, _, c in stored], "dtype": ["float16"] * len(stored)}
    return CheckpointRows(model=model, step=step, tokens=step * 2_097_152, revision=f"step{step}", source=f"/synthetic/{model}",
                          content_hash=f"{model}-{step}", tensors=tensors, runs=[run])


def synthesize(path: Path) -> float:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with Store(path) as db:
        for model, layers in MODELS.items():
            row = ModelRow(source=f"/synthetic/{model}", architecture="gpt_neox", num_layers=layers, num_parameters=None,
                           tokens_per_step=2_097_152, config=None)
            for j, step in enumerate(STEPS):
                db.write_checkpoint(_checkpoint(model, layers, step, rng), model=row if j == 0 else None)
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
