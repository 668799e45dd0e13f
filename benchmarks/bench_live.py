"""The cost of live reading: ingest time with and without a concurrent reader, and query latency during an ingest.

Why: the writer opens the store for each checkpoint's transaction instead of once per ingest,
so readers (`ckptscope sql`, notebooks, reports) can work while it runs. This measures what
that costs the ingest, and how long a reader's query takes while the writer commits.

How: two workloads, each ingested into a fresh store twice: alone, and with a reader in
another process that every 100 ms opens the store read-only (a `Store` object kept for the
whole run, which connects per query) and runs a typical query (`stable_rank` of every layer
at every step so far, from the `metrics` view). Workloads: the embedded demo suite (19 steps
of a small GPT-NeoX) and two steps (0, 1000) of a GPT-NeoX with Pythia-160m's shapes
(12 layers, hidden 768, vocab 50304; float16 random weights, step 1000 = step 0 + noise).
Also: the cost of one writer connection (open + close on the finished store), paid once per
checkpoint transaction, and of a copy into the reference cache.

    python benchmarks/bench_live.py            # all workloads
    python benchmarks/bench_live.py --only demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.resources import files
from pathlib import Path

import duckdb
import torch
from safetensors.torch import save_file

import ckptscope
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.refcache import RefCache

HIDDEN, HEADS, INTER, VOCAB, LAYERS = 768, 12, 3072, 50304, 12
QUERY = "SELECT step, layer, value FROM metrics WHERE metric = 'stable_rank' AND component = 'attn.qkv' ORDER BY step, layer"
READER = """
import json, sys, time
from pathlib import Path
import ckptscope
store, stop, out, query = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
db, lat, errors = None, [], []
while not stop.exists():
    t = time.perf_counter()
    try:
        if db is None:
            db = ckptscope.Store(store, read_only=True) if store.exists() else None
        if db is not None:
            db.sql(query)
            lat.append(time.perf_counter() - t)
    except ckptscope.CkptscopeError as exc:
        errors.append(str(exc))
    time.sleep(0.1)
json.dump({"latencies": lat, "errors": errors}, open(out, "w"))
"""


def pythia160m_run(root: Path) -> Path:
    """Steps 0 and 1000 of a GPT-NeoX with Pythia-160m's shapes."""
    from transformers import GPTNeoXConfig

    gen = torch.Generator().manual_seed(0)
    state = {"gpt_neox.embed_in.weight": (VOCAB, HIDDEN), "embed_out.weight": (VOCAB, HIDDEN),
             "gpt_neox.final_layer_norm.weight": (HIDDEN,), "gpt_neox.final_layer_norm.bias": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}{norm}.weight"] = state[f"{p}{norm}.bias"] = (HIDDEN,)
        for name, rows, cols in (("attention.query_key_value", 3 * HIDDEN, HIDDEN), ("attention.dense", HIDDEN, HIDDEN),
                                 ("mlp.dense_h_to_4h", INTER, HIDDEN), ("mlp.dense_4h_to_h", HIDDEN, INTER)):
            state[f"{p}{name}.weight"], state[f"{p}{name}.bias"] = (rows, cols), (rows,)
    weights = {k: torch.randn(s, generator=gen) * 0.02 for k, s in state.items()}
    for step in (0, 1000):
        path = root / f"step{step}"
        path.mkdir(parents=True)
        GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
                      vocab_size=VOCAB, rotary_pct=0.25, tie_word_embeddings=False,
                      architectures=["GPTNeoXForCausalLM"]).to_json_file(path / "config.json")
        save_file({k: v.half() for k, v in weights.items()}, str(path / "model.safetensors"))
        weights = {k: v + 0.002 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    return root


def ingest_once(run: Path, store: Path, name: str, with_reader: bool, work: Path) -> dict:
    """Wall time of one ingest (in this process), and the reader's latencies if one ran."""
    reader = None
    if with_reader:
        stop, out = work / "stop", work / "reader.json"
        stop.unlink(missing_ok=True)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(store), str(stop), str(out), QUERY])
        time.sleep(3)  # the reader's interpreter is up and polling (for the store to appear) before the ingest starts
    t = time.perf_counter()
    with ckptscope.Store(store) as db:
        report = ckptscope.ingest(run, store=db, name=name, analyzers="weights")
    wall = time.perf_counter() - t
    result = {"wall": wall, "steps": report.height, "waited": db.lock_wait_s}
    if reader is not None:
        stop.touch()
        reader.wait(timeout=120)
        got = json.loads(out.read_text())
        lat = sorted(got["latencies"])
        result.update(queries=len(lat), errors=len(got["errors"]), p50=statistics.median(lat) if lat else None,
                      p99=lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None, max=lat[-1] if lat else None)
    return result


def writer_connection_cost(store: Path, repeats: int = 20) -> float:
    """Median seconds to open and close the store for writing: paid once per checkpoint transaction."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        duckdb.connect(str(store), config={"storage_compatibility_version": "v1.1.0"}).close()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["demo", "pythia-160m"], default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    workloads = {"demo": Path(str(files("ckptscope") / "demo_suite"))}
    if args.only != "demo":
        workloads["pythia-160m"] = pythia160m_run(work / "p160m")
    if args.only:
        workloads = {args.only: workloads[args.only]}
    print(f"{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"torch {torch.__version__} · duckdb {duckdb.__version__}")
    print("| workload | steps | reader every 100 ms | ingest s | writer waited s | reader queries | failed | query p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    stores = {}
    for name, run in workloads.items():
        for with_reader in (False, True):
            store = work / f"{name}-{with_reader}.duckdb"
            r = ingest_once(run, store, name, with_reader, work)
            stores[name] = store
            lat = (f"{r['queries']} | {r['errors']} | {r['p50'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} | {r['max'] * 1e3:.0f}"
                   if with_reader else "— | — | — | — | —")
            print(f"| {name} | {r['steps']} | {'yes' if with_reader else 'no'} | {r['wall']:.1f} | {r['waited']:.1f} | {lat} |", flush=True)
    for name, store in stores.items():
        cost = writer_connection_cost(store)
        run = workloads[name]
        last = max(run.glob("step*"), key=lambda p: int(p.name[4:]))
        cache = RefCache(work / "copy.duckdb", name)
        t = time.perf_counter()
        cache.put(Checkpoint(last, step=int(last.name[4:])), "x")
        copy = time.perf_counter() - t
        size = sum(f.stat().st_size for f in cache.dir.rglob("*") if f.is_file()) / 1e6
        print(f"{name}: writer open+close {cost * 1e3:.0f} ms per checkpoint transaction "
              f"(store {store.stat().st_size / 1e6:.1f} MB); reference-cache copy of one step {copy:.2f} s ({size:.0f} MB)")


if __name__ == "__main__":
    main()
