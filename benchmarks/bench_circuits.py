"""Cost of the circuits analyzer per Pythia-shaped step, and of forming the products it avoids.

Why: README quotes the added cost of `circuits` next to the weight analyzer's. This writes one
checkpoint with pythia-160m's or -410m's attention shapes (random fp16 fused QKV and dense
weights only, as only those are read), runs the analyzer on it on one thread (reading included),
and times, for one head, the d_model × d_model product plus its SVD that the QR core replaces.

    OMP_NUM_THREADS=1 python benchmarks/bench_circuits.py --model 160m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch
from safetensors.torch import save_file

import ckptscope
from ckptscope.analyzers.circuits import CircuitsAnalyzer
from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family

MODELS = {"160m": (768, 12, 12), "410m": (1024, 24, 16)}  # d_model, layers, heads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="160m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, layers, heads = MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"gpt_neox.layers.{i}.attention.query_key_value.weight"] = (0.02 * torch.randn(3 * d, d, generator=gen)).half()
        state[f"gpt_neox.layers.{i}.attention.dense.weight"] = (0.02 * torch.randn(d, d, generator=gen)).half()
    config = {"model_type": "gpt_neox", "hidden_size": d, "num_attention_heads": heads, "num_hidden_layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        ckpt = Checkpoint(tmp, step=0)
        ctx = AnalysisContext(checkpoint=ckpt, family=family(config), config=config)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            rows = CircuitsAnalyzer().analyze(ctx)
            times.append(time.perf_counter() - t)
    d_head = d // heads
    a, b = torch.randn(d, d_head, dtype=torch.float64), torch.randn(d_head, d, dtype=torch.float64)
    t = time.perf_counter()
    torch.linalg.svdvals(a @ b)
    dense = time.perf_counter() - t
    print(f"# {date.today()} {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, "
          f"ckptscope {ckptscope.__version__}, pythia-{args.model} shapes ({layers} layers × {heads} heads)")
    print(f"circuits per step: {min(times):.2f} s (best of {args.repeats}), {len(rows.spectra['sv'])} circuits")
    print(f"one head's d_model² product + svdvals instead: {dense:.3f} s (× {2 * layers * heads} circuits = "
          f"{dense * 2 * layers * heads:.0f} s)")


if __name__ == "__main__":
    main()
