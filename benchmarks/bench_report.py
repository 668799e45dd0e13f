"""Benchmark `build_report` on a suite-sized store: 5 models x 150 steps x 24 layers.

The store is synthesized through the real write path (`Store.write_checkpoint` with
`CheckpointRows` / `RunRows`, one transaction per checkpoint) with the row shapes the weight
analyzer writes for a 24-layer GPT-NeoX: every matrix component with its 30 statistics and two
spectra, and the vector statistics of norms and biases. Values are smooth functions of layer
and step plus noise, so charts look like charts; only the sizes matter here.

    python benchmarks/bench_report.py                  # synthesize into a temp dir, then time
    python benchmarks/bench_report.py --store s.duckdb  # reuse (or create) a store file
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from ckptscope.reports import build_report
from ckptscope.rows import CheckpointRows, ModelRow, RunRows
from ckptscope.store.db import Store

MODELS, LAYERS, SV = 5, 24, 64
STEPS = [0, *(2**k for k in range(10)), *np.linspace(1000, 143000, 139).astype(int).tolist()]
MATRIX = ["attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out"]
TENSOR = {"attn.qkv": "attention.query_key_value", "attn.o": "attention.dense", "mlp.in": "mlp.dense_h_to_4h",
          "mlp.out": "mlp.dense_4h_to_h"}
VECTORS = ["input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
           "post_attention_layernorm.bias", "attention.query_key_value.bias", "attention.dense.bias",
           "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias"]
BASE = ["frobenius_norm", "spectral_norm", "stable_rank", "effective_rank", "numerical_rank", "energy_rank_99"]
MATRIX_METRICS = [*BASE, "log_norm", "log_spectral_norm", "alpha", "alpha_weighted", "alpha_xmin", "alpha_ks_distance",
                  "alpha_sigma", "num_pl_spikes", *(f"delta_init_{m}" for m in BASE), "delta_init_relative",
                  *(f"delta_prev_{m}" for m in BASE), "delta_prev_relative", "final_cosine", "final_relative_distance"]
VECTOR_METRICS = ["l2_norm", "mean", "std", "max_abs"]


def synthetic_checkpoint(model: str, step: int, rng: np.random.Generator, *, layers: int = LAYERS,
                         last_step: int = STEPS[-1], spectra: bool = True) -> CheckpointRows:
    """One step of a `layers`-deep GPT-NeoX with the rows the weight analyzer writes (values synthetic)."""
    progress = math.log1p(step) / math.log1p(last_step)
    run = RunRows(analyzer="weights", version="1.0.0", parameters={"rtol": 1e-3}, dtype="float64", backend="synthetic")
    matrices = [("gpt_neox.embed_in.weight", None, "embed"), ("embed_out.weight", None, "unembed")]
    matrices += [(f"gpt_neox.layers.{layer}.{TENSOR.get(comp, TENSOR['attn.qkv'])}.weight", layer, comp)
                 for layer in range(layers) for comp in MATRIX]  # q/k/v are parts of the fused tensor
    vectors = [(f"gpt_neox.layers.{layer}.{name}", layer, "norm" if "norm" in name else "bias")
               for layer in range(layers) for name in VECTORS]
    depth = np.array([(layer or 0) / layers for _, layer, _ in matrices])[:, None]
    values = 5 + 20 * depth * progress + rng.normal(0, 0.3, (len(matrices), len(MATRIX_METRICS)))
    for (tensor, layer, comp), row in zip(matrices, values.tolist()):
        run.add_metrics(tensor, layer, comp, dict(zip(MATRIX_METRICS, row)))
        if spectra:
            sv = np.sort(rng.pareto(2 + 3 * (1 - progress), SV) + 0.05)[::-1]
            for kind in ("weight", "delta_init"):
                run.add_spectrum(tensor, layer, comp, kind, (512, 512), sv)
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
        for i in range(MODELS):
            model = f"synthetic-{i}"
            row = ModelRow(source=f"/synthetic/{model}", architecture="gpt_neox", num_layers=LAYERS,
                           num_parameters=160_000_000, tokens_per_step=2_097_152, config=None)
            for j, step in enumerate(STEPS):
                db.write_checkpoint(synthetic_checkpoint(model, step, rng), model=row if j == 0 else None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="store file to reuse or create (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "bench.duckdb"
        if not store.exists():
            seconds = synthesize(store)
            print(f"synthesized {MODELS} models x {len(STEPS)} steps x {LAYERS} layers in {seconds:.1f}s "
                  f"({store.stat().st_size / 1e6:.0f} MB store)")
        output = Path(tmp) / "report.html"
        for run in ("first", "second"):
            start = time.perf_counter()
            build_report(store, output)
            print(f"build_report ({run} run): {time.perf_counter() - start:.2f}s, report {output.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
