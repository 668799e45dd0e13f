"""The added cost of each weight analyzer per Pythia-shaped step, next to the weight analyzer's own.

Why: the default analyzer set must stay within 25% of the weight analyzer's full step on CPU, and
docs/benchmarks.md quotes what each other analyzer adds. One random checkpoint run with pythia-160m's
or -410m's exact shapes (GPT-NeoX, vocab 50,304, fp16 safetensors) is written at steps 0 (first),
500 (previous), 1000 (analyzed) and 2000 (final), and then:

1. every analyzer class runs on step 1000 in one `AnalysisContext` (references first/previous/final
   open, `ctx.shared` passed on as the pipeline does, `weights` first so `mp_fit` reuses its
   spectra), reading included, timed one by one; `subspace` also on step 500 first, so that its
   step-1000 time is the steady state of a run (previous and final bases cached), and its step-500
   time the cold first step;
2. `ckptscope.ingest` runs each candidate default set on steps 500 and 1000 (0 and 2000 open as
   references) and the step-1000 time it reports is the full step (reading, analysis, store writes).

    python benchmarks/bench_analyzers.py --model 160m
    python benchmarks/bench_analyzers.py --model 410m --analyzers weights,mp_fit,sparsity,circuits --sets weights,weights+sparsity
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptscope
from ckptscope.analyzers import registry
from ckptscope.analyzers.contract import AnalysisContext, Analyzer
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family

SHAPES = {"160m": (768, 12, 12, 3072), "410m": (1024, 24, 16, 4096)}  # hidden, layers, heads, intermediate
STEPS = {"first": 0, "previous": 500, "current": 1000, "final": 2000}
ANALYZERS = ("weights", "mp_fit", "sparsity", "subspace", "circuits")
SETS = ("weights", "weights+sparsity", "weights+circuits", "weights+sparsity+circuits")


def build(size: str, root: Path) -> dict:
    """Random GPT-NeoX weights with Pythia's shapes, a random walk saved at the four STEPS; the config."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, inter = SHAPES[size]
    cfg = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                        vocab_size=50304, rotary_pct=0.25, tie_word_embeddings=False)
    torch.manual_seed(0)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in GPTNeoXForCausalLM(cfg).state_dict().items()}
    state["embed_out.weight"] = state.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(1)
    for step in sorted(STEPS.values()):
        d = root / f"step{step}"
        d.mkdir(parents=True)
        cfg.to_json_file(d / "config.json")
        scale = 0.01 * step / 1000
        save_file({k: (v.float() + scale * torch.randn(v.shape, generator=gen)).half() for k, v in state.items()},
                  str(d / "model.safetensors"))
    config = cfg.to_dict()
    config["architectures"] = ["GPTNeoXForCausalLM"]
    return config


def context(root: Path, config: dict, step: int, previous: int, shared: dict, analyzer: Analyzer) -> AnalysisContext:
    """The context the pipeline hands `analyzer` for `step`, with only its declared references."""
    ckpt = lambda s: Checkpoint(root / f"step{s}", step=s)  # noqa: E731
    refs = {"first": ckpt(STEPS["first"]), "previous": ckpt(previous), "final": ckpt(STEPS["final"])}
    keys = analyzer.references(analyzer.options)
    return AnalysisContext(checkpoint=ckpt(step), family=family(config), config=config,
                           references={k: refs[k] for k in keys}, shared=shared)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads): on a shared machine the CPU time is
    the cost; the wall time also counts waiting for cores that other jobs hold."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="160m")
    ap.add_argument("--analyzers", default=",".join(ANALYZERS), help="analyzers timed one by one (weights always runs first)")
    ap.add_argument("--sets", default=",".join(SETS), help="analyzer sets run through ckptscope.ingest, '+'-separated "
                    "(an empty string: none)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each set, alternating; the median is quoted")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    chosen = ["weights", *(a for a in args.analyzers.split(",") if a and a != "weights")]
    print(f"# {date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, ckptscope {ckptscope.__version__}, pythia-{args.model} shapes", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build(args.model, root)
        shared: dict = {}
        rows = []
        for name in chosen:
            analyzer = registry.get(name)()
            if name == "subspace":  # a cold first step, then step 1000 with step 500's and the final bases cached
                cold = timed(lambda: analyzer.analyze(context(root, config, STEPS["previous"], STEPS["first"], {}, analyzer)))
                rows.append(("subspace (first step of a run, no bases cached)", cold))
                print(f"{rows[-1][0]}: {cold[0]:.2f} s wall, {cold[1]:.2f} s CPU", flush=True)
            ctx = context(root, config, STEPS["current"], STEPS["previous"], shared, analyzer)
            label = {"mp_fit": "mp_fit (reusing weights' spectra)", "subspace": "subspace (later steps: bases cached)"}.get(name, name)
            rows.append((label, timed(lambda: analyzer.analyze(ctx))))
            print(f"{rows[-1][0]}: {rows[-1][1][0]:.2f} s wall, {rows[-1][1][1]:.2f} s CPU", flush=True)
        combos = [s for s in args.sets.split(",") if s]
        seconds: dict[str, list[float]] = {combo: [] for combo in combos}
        for _ in range(args.repeats):  # alternating, so a change of load touches every set alike
            for combo in combos:
                store = root / f"{combo}.duckdb"
                report = ckptscope.ingest(root, store=store, steps="500,1000", analyzers=combo.replace("+", ","), force=True)
                seconds[combo].append(report.filter(report["step"] == STEPS["current"])["seconds"].item())
                print(f"ingest {combo}: {seconds[combo][-1]:.2f} s", flush=True)
        full = [(combo.replace("+", ", "), statistics.median(t), t) for combo, t in seconds.items()]
    base = rows[0][1][1]
    print("\n| analyzer | wall s per step | CPU s per step | CPU × weights |\n| --- | --- | --- | --- |")
    for label, (wall, cpu) in rows:
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {cpu / base:.2f} |")
    if full:
        print(f"\n| analyzer set (ckptscope.ingest) | full step s (median of {args.repeats}) | runs s | vs {full[0][0]} |"
              "\n| --- | --- | --- | --- |")
        for label, median, runs in full:
            print(f"| {label} | {median:.2f} | {', '.join(f'{t:.2f}' for t in runs)} | {100 * (median / full[0][1] - 1):+.0f}% |")


if __name__ == "__main__":
    main()
