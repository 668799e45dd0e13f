"""`ckptscope serve` under load while an ingest writes the store it serves.

Why: the server must answer many clients without locking out the ingest: it opens the store
read-only per request, in windows that leave the writer gaps (docs/serve.md).

How: a GPT-NeoX run (`--layers` x `--hidden`, random-walk weights, safetensors) is written to
disk once. A "training run" then receives its checkpoints one at a time (a directory copy) and
each is ingested with the `weights` analyzer as it lands, as `ingest --watch` does; the writer
retries every 20 ms while the server holds the file. This runs twice on copies of one starting
store: alone, then beside `ckptscope serve` (a subprocess) with `--clients` threads, each on its
own keep-alive connection, sending requests back to back for `--seconds`:
45% GET /api/state (what the dashboard polls), 20% /api/models, 20% one fixed /api/sql query,
10% an /api/sql query no other request asks (never answered from the cache), 5% /api/dashboard.
Reported: requests/s, p50/p99 latency per endpoint, errors (anything but 200), the ingest's time
with and without load, and whether both ingests stored the same rows.

    python benchmarks/bench_serve.py                    # 32 clients, 30 s
    python benchmarks/bench_serve.py --clients 8 --seconds 10 --steps 6
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path

import torch

import ckptscope
from ckptscope.errors import StoreError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runs import trajectory, write_run  # noqa: E402

FIXED_SQL = ("SELECT step, layer, avg(value) AS stable_rank FROM metrics WHERE metric = 'stable_rank' "
             "GROUP BY step, layer ORDER BY step, layer")
MIX = [("state", 45), ("models", 20), ("sql", 20), ("sql-uncached", 10), ("dashboard", 5)]


def make_run(base: Path, steps: list[int], layers: int, hidden: int) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, intermediate_size=4 * hidden,
                           vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
    state = {k: v.detach().clone().contiguous() for k, v in GPTNeoXForCausalLM(config).state_dict().items()}
    if "lm_head.weight" in state:
        state["embed_out.weight"] = state.pop("lm_head.weight")
    cfg = config.to_dict()
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    return write_run(base / "all", trajectory(state, steps, seed=1), cfg)


def ingest_as_they_land(source: Path, run: Path, store: Path, names: list[str]) -> tuple[float, float]:
    """Copy each checkpoint into `run` and ingest it: (seconds in all, of which waiting for the server to let go)."""
    start, waited = time.perf_counter(), 0.0
    for name in names:
        shutil.copytree(source / name, run / name)
        while True:
            attempt = time.perf_counter()
            try:
                ckptscope.ingest(run, store=store, name="bench", tokens_per_step=2_097_152, analyzers="weights")
                break
            except StoreError as exc:
                if "is locked" not in str(exc):
                    raise
                time.sleep(0.02)
                waited += time.perf_counter() - attempt
    return time.perf_counter() - start, waited


def write(source: Path, run: Path, store: Path, names: list[str]) -> tuple[float, float]:
    """`ingest_as_they_land` in its own process, so the clients' threads do not slow it down here."""
    done = subprocess.run([sys.executable, __file__, "--write", str(source), str(run), str(store), *names],
                          capture_output=True, text=True, check=True)
    total, waited = map(float, done.stdout.split()[-2:])
    return total, waited


def client(host: str, port: int, stop: threading.Event, seed: int, out: dict[str, list[float]], errors: list[str]) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    con = http.client.HTTPConnection(host, port, timeout=60)
    n = 0
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        n += 1
        path = {"state": "/api/state", "models": "/api/models", "dashboard": "/api/dashboard",
                "sql": "/api/sql?" + urllib.parse.urlencode({"q": FIXED_SQL}),
                "sql-uncached": "/api/sql?" + urllib.parse.urlencode(
                    {"q": f"SELECT count(*) + {seed * 10**6 + n} AS n FROM metrics WHERE metric = 'alpha'"})}[kind]
        start = time.perf_counter()
        try:
            con.request("GET", path)
            response = con.getresponse()
            body = response.read()
            if response.status != 200:
                errors.append(f"{kind}: {response.status} {body[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{kind}: {exc!r}")
            con.close()
            con = http.client.HTTPConnection(host, port, timeout=60)
            continue
        out[kind].append(time.perf_counter() - start)
    con.close()


def rows(store: Path) -> list[tuple]:
    with ckptscope.Store(store, read_only=True) as db:
        return db.sql("SELECT step, tensor, component, metric, value FROM metrics ORDER BY ALL").rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=12, help="checkpoints ingested during the load (after 2 already stored)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--write", nargs="+", help=argparse.SUPPRESS)  # internal: SOURCE RUN STORE NAME...
    args = parser.parse_args()
    if args.write:
        source, run, store, *names = args.write
        print(*ingest_as_they_land(Path(source), Path(run), Path(store), names))
        return

    steps = [0, *(100 * 2**k for k in range(args.steps + 1))]
    names = [f"step{s}" for s in steps]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        source = make_run(base, steps, args.layers, args.hidden)
        start_store = base / "start.duckdb"
        (base / "run0").mkdir()
        for name in names[:2]:
            shutil.copytree(source / name, base / "run0" / name)
        ckptscope.ingest(base / "run0", store=start_store, name="bench", tokens_per_step=2_097_152, analyzers="weights")

        def fresh(tag: str) -> tuple[Path, Path]:
            run, store = base / f"run-{tag}", base / f"{tag}.duckdb"
            shutil.copytree(base / "run0", run)
            shutil.copy(start_store, store)
            return run, store

        run, alone_store = fresh("alone")
        alone, _ = write(source, run, alone_store, names[2:])

        run, store = fresh("load")
        proc = subprocess.Popen([sys.executable, "-m", "ckptscope.cli", "serve", "--store", str(store), "--port", "0"],
                                stdout=subprocess.PIPE, text=True)
        url = urllib.parse.urlsplit(proc.stdout.readline().split(" at ")[1].split()[0])
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(url.hostname, url.port, stop, i, latencies, errors))
                   for i in range(args.clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        ingest_done: dict[str, tuple[float, float]] = {}
        writer = threading.Thread(target=lambda: ingest_done.setdefault("s", write(source, run, store, names[2:])))
        writer.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        writer.join()
        proc.terminate()
        proc.wait(10)
        same = rows(store) == rows(alone_store)

    total = sum(len(v) for v in latencies.values())
    everything = sorted(x for v in latencies.values() for x in v)
    print(f"# bench_serve: {args.clients} clients x {args.seconds:g} s on 127.0.0.1 during an ingest of {len(names) - 2} "
          f"checkpoints ({args.layers} layers x {args.hidden} hidden GPT-NeoX, weights analyzer); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| endpoint | requests | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for kind, _ in MIX:
        v = sorted(latencies[kind])
        if v:
            print(f"| {kind} | {len(v)} | {1000 * statistics.median(v):.1f} | {1000 * v[int(0.99 * (len(v) - 1))]:.1f} |")
    print(f"| all | {total} | {1000 * statistics.median(everything):.1f} | {1000 * everything[int(0.99 * (total - 1))]:.1f} |")
    print(f"requests/s: {total / elapsed:.0f}; errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    loaded, waited = ingest_done["s"]
    print(f"ingest: {alone:.1f} s alone, {loaded:.1f} s under load ({loaded / alone:.2f}x), of which {waited:.1f} s waiting "
          f"for the server to let go of the store; same rows stored: {same}")
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, "requests": total, "rps": total / elapsed,
                      "errors": len(errors), "ingest_alone_s": alone, "ingest_load_s": loaded, "ingest_waited_s": waited,
                      "same_rows": same}))


if __name__ == "__main__":
    main()
