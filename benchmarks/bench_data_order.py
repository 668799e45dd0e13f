"""Throughput and memory of `corpus from-data`, and throughput of the `sequence_stats` analyzer.

Data order: synthetic uint16 `MMapIndexedDataset`s of 2049-token items (Pythia's layout) of two
sizes (default 2.5e7 and 2.0e8 tokens) are written in slices by this script. Each run of
`corpus_from_data` happens in a fresh process, whose peak RSS (ru_maxrss) is reported next to that
of a process that only imports the same modules:

* `sampled`: K = 64 of the 1024 sequences of 10 steps spread over the whole dataset, the same
  640-sequence corpus from either size, so any growth of the peak RSS with the dataset shows;
* `all`: every sequence of every complete batch (the corpus then grows with the dataset).

The page cache is warm (the files were just written); a cold read of the sampled items costs one
random read each.

sequence_stats: random GPT-NeoX models with Pythia-70m and -160m shapes saved as fp16
safetensors (computed in float32 on CPU), random 2049-token sequences, `--batch-size 4`; the
median of repeated `analyze` calls after a first one that also loads the model, in wall time and
in this process's CPU time (with one torch thread, CPU time is what the work costs on one core even
when other processes share the machine).

Run: `python benchmarks/bench_data_order.py [--sizes 2.5e7,2e8] [--models 70m,160m] [--sequences 8]
[--threads 1] [--device cpu]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ, BATCH = 2049, 1024
SHAPES = {"70m": (512, 6, 8, 2048), "160m": (768, 12, 12, 3072)}  # hidden, layers, heads, intermediate; vocab 50304
VOCAB = 50304


def write_dataset(prefix: Path, tokens: float, seed: int = 0) -> int:
    """A uint16 MMapIndexedDataset of ⌈tokens / 2049⌉ items, written in slices; returns the item count."""
    n = int(np.ceil(tokens / SEQ))
    rng = np.random.default_rng(seed)
    with open(prefix.with_suffix(".bin"), "wb") as fh:
        for start in range(0, n, 4096):
            fh.write(rng.integers(0, VOCAB, (min(4096, n - start), SEQ), dtype=np.uint16).tobytes())
    with open(prefix.with_suffix(".idx"), "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + np.array([1], "<u8").tobytes() + bytes([8]) + np.array([n, n + 1], "<u8").tobytes())
        fh.write(np.full(n, SEQ, "<i4").tobytes())
        fh.write((np.arange(n, dtype="<i8") * SEQ * 2).tobytes())
        fh.write(np.arange(n + 1, dtype="<i8").tobytes())
    return n


CHILD = """
import json, resource, sys, time
import numpy, polars, pyarrow, pyarrow.parquet
from ckptscope.data_order import corpus_from_data
args = json.loads(sys.argv[1])
t = time.perf_counter()
df = corpus_from_data(**args) if args else None
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "rows": 0 if df is None else df.height, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(args: dict) -> dict:
    """Run corpus_from_data(**args) (or only the imports, for {}) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_data_order(sizes: list[float], tmp: Path) -> list[dict]:
    base = child({})["rss_mb"]
    rows = []
    for tokens in sizes:
        prefix = tmp / f"data{tokens:.0e}"
        t = time.perf_counter()
        n = write_dataset(prefix, tokens)
        written = time.perf_counter() - t
        steps = n // BATCH
        stride = max(1, (steps - 1) // 9)  # 10 steps spread over the data (fewer when it holds fewer)
        sampled = {"steps": f"1:{min(steps, 1 + 9 * stride)}:{stride}", "per_step": 64}
        for mode, extra in (("sampled", sampled), ("all", {})):
            out = tmp / f"corpus-{mode}.parquet"
            r = child({"prefix": str(prefix), "output": str(out), **extra})
            rows.append({"dataset tokens": f"{n * SEQ:.3g}", "bin GB": round(n * SEQ * 2 / 1e9, 2), "mode": mode,
                         "sequences": r["rows"], "wall s": round(r["wall"], 2), "sequences/s": round(r["rows"] / r["wall"]),
                         "Mtokens/s": round(r["rows"] * SEQ / r["wall"] / 1e6, 1), "peak RSS MB": round(r["rss_mb"]),
                         "RSS - imports MB": round(r["rss_mb"] - base), "corpus MB": round(out.stat().st_size / 1e6, 1),
                         "write dataset s": round(written, 1)})
            out.unlink()
        prefix.with_suffix(".bin").unlink()
        prefix.with_suffix(".idx").unlink()
    print(f"(imports alone: {base:.0f} MB peak RSS)")
    return rows


def bench_sequence_stats(models: list[str], sequences: int, repeats: int, device: str, tmp: Path) -> list[dict]:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from ckptscope.analyzers.contract import AnalysisContext
    from ckptscope.analyzers.sequence_stats import SequenceStatsAnalyzer, SequenceStatsOptions
    from ckptscope.sources.checkpoint import Checkpoint
    from ckptscope.sources.layers import family

    rows = []
    rng = np.random.default_rng(0)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "tokens": rng.integers(0, VOCAB, SEQ).tolist()}) + "\n"
                              for i in range(sequences)))
    for name in models:
        hidden, layers, heads, inter = SHAPES[name]
        cfg = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                            vocab_size=VOCAB, rotary_pct=0.25, tie_word_embeddings=False, max_position_embeddings=2048)
        torch.manual_seed(0)
        path = tmp / name / "step0"
        GPTNeoXForCausalLM(cfg).half().save_pretrained(path)
        ckpt = Checkpoint(path, step=0)
        ctx = AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config, device=device)
        analyzer = SequenceStatsAnalyzer(SequenceStatsOptions.build(corpus=corpus, batch_size=4))
        t = time.perf_counter()
        analyzer.analyze(ctx)
        first = time.perf_counter() - t
        walls, cpus = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            analyzer.analyze(ctx)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        rows.append({"model": f"pythia-{name} shape", "device": device, "threads": torch.get_num_threads(), "seq len": SEQ,
                     "sequences": sequences, "batch": 4, "median wall s": round(wall, 2), "median CPU s": round(cpu, 2),
                     "first call wall s": round(first, 2), "sequences/s (wall)": round(sequences / wall, 3),
                     "sequences per CPU s": round(sequences / cpu, 3), "predicted tokens/s (wall)": round(sequences * (SEQ - 1) / wall)})
    return rows


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2.5e7,2e8", help="Dataset sizes in tokens (comma-separated); empty to skip.")
    parser.add_argument("--models", default="70m,160m", help="sequence_stats model shapes; empty to skip.")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads for sequence_stats.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.sizes:
            print(table(bench_data_order([float(s) for s in args.sizes.split(",")], Path(tmp))))
        if args.models:
            import torch

            torch.set_num_threads(args.threads)
            print(table(bench_sequence_stats(args.models.split(","), args.sequences, args.repeats, args.device, Path(tmp))))


if __name__ == "__main__":
    main()
