"""Peak RSS of `ckptscope.ingest` on multi-GB sharded checkpoints, safetensors and PyTorch `.bin`.

Why: the weight analyzer promises memory bounded by the largest tensor (plus a fixed ~500 MB
for Python, torch, polars and DuckDB), not by the checkpoint's size. This checks that on a
checkpoint of about 4 GB in both sharded layouts HF uses, and again on a smaller one with the
same largest tensor, so growth with checkpoint size would show.

How: a GPT-NeoX run with Pythia-1b's shapes (hidden 2048, 8 heads, intermediate 8192, vocab
50304) in float32 is written shard by shard with random values, one shard's tensors in memory
at a time, as a single-step run directory (`step1000/`) under a temporary directory. Each
(layers, format) case is then analyzed by the weight analyzer in a fresh subprocess that prints
its own `ru_maxrss`, and deleted before the next is written (about 4 GB of free disk needed).
Run: `python benchmarks/bench_memory.py [--layers 8,16] [--formats safetensors,bin] [--shards-gb 1]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptscope

HIDDEN, HEADS, INTER, VOCAB = 2048, 8, 8192, 50304
BASE_RSS_MB = 500  # the allowance for the interpreter and libraries
MEASURE = ("import ckptscope, resource, sys; ckptscope.ingest(sys.argv[1], store=sys.argv[2], analyzers='weights'); "
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of GPTNeoXForCausalLM with Pythia-1b's dimensions and `layers` layers."""
    out = {"gpt_neox.embed_in.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = out[f"{p}{norm}.bias"] = (HIDDEN,)
        for name, rows, cols in (("attention.query_key_value", 3 * HIDDEN, HIDDEN), ("attention.dense", HIDDEN, HIDDEN),
                                 ("mlp.dense_h_to_4h", INTER, HIDDEN), ("mlp.dense_4h_to_h", HIDDEN, INTER)):
            out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = (rows, cols), (rows,)
    out["gpt_neox.final_layer_norm.weight"] = out["gpt_neox.final_layer_norm.bias"] = (HIDDEN,)
    out["embed_out.weight"] = (VOCAB, HIDDEN)
    return out


def write(path: Path, layers: int, fmt: str, shard_bytes: int) -> None:
    """One sharded float32 checkpoint with random values, generated, saved and freed shard by shard."""
    from transformers import GPTNeoXConfig

    path.mkdir(parents=True)
    GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=INTER,
                  vocab_size=VOCAB, rotary_pct=0.25, tie_word_embeddings=False,
                  architectures=["GPTNeoXForCausalLM"]).to_json_file(path / "config.json")
    groups, size = [[]], 0
    for name, shape in shapes(layers).items():
        nbytes = 4 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}"
        part = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in group}
        if fmt == "safetensors":
            save_file(part, str(path / fname), metadata={"format": "pt"})
        else:
            torch.save(part, path / fname)
        total += sum(v.numel() * 4 for v in part.values())
        weight_map.update({name: fname for name in part})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def measure(run: Path, store: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of a fresh interpreter ingesting `run`."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, str(run), str(store)], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="8,16", help="comma-separated layer counts (16 is Pythia-1b, ~4 GB in float32)")
    ap.add_argument("--formats", default="safetensors,bin")
    ap.add_argument("--shards-gb", type=float, default=1.0, help="approximate shard size")
    args = ap.parse_args()
    print(f"# `python {' '.join(sys.argv)}`")
    print(f"# {date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, ckptscope {ckptscope.__version__}")
    largest_mb = 4 * VOCAB * HIDDEN / 1e6
    rows = []
    for layers in map(int, args.layers.split(",")):
        for fmt in args.formats.split(","):
            with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                need = 4 * sum(torch.Size(s).numel() for s in shapes(layers).values()) * 1.1
                if shutil.disk_usage(tmp).free < need:
                    sys.exit(f"need {need / 1e9:.1f} GB free under /tmp for {layers} layers")
                run = Path(tmp) / "run"
                write(run / "step1000", layers, fmt, int(args.shards_gb * 1e9))
                disk_gb = sum(f.stat().st_size for f in (run / "step1000").iterdir()) / 1e9
                shards = sum(1 for f in (run / "step1000").iterdir() if f.suffix in (".safetensors", ".bin"))
                rss, wall = measure(run, Path(tmp) / "bench.duckdb")
                rows.append((fmt, layers, shards, disk_gb, rss, wall))
    print("| format | layers | shards | size on disk GB | largest tensor MB | peak RSS MB | (RSS - 500 MB) / largest | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fmt, layers, shards, disk_gb, rss, wall in rows:
        print(f"| {fmt} | {layers} | {shards} | {disk_gb:.2f} | {largest_mb:.0f} | {rss:.0f} | "
              f"{(rss - BASE_RSS_MB) / largest_mb:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
