"""Throughput of the activation analyzers: token positions per second for CKA (convergence) and
sequences per second for memorization (32-token prompt, 32 greedy tokens, loss, logit lens).

Models: `demo` is the embedded demo suite (GPT-NeoX, hidden 64, 4 layers; its probe for CKA and
its canaries + probe as the memorization corpus); when the suite is absent, a random model of
the same shape stands in. `70m`/`160m` are random GPT-NeoX models with Pythia's shapes saved
as fp16 safetensors, run on random token sequences. Each analyzer is timed on a non-final step
and the median of repeated calls is reported: the reference step's statistics are cached by then
and the model is loaded (the first call, which includes both, is shown in parentheses).

Run: `python benchmarks/bench_activations.py [--models demo,70m] [--device cpu,cuda] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.convergence import ConvergenceAnalyzer
from ckptscope.analyzers.memorization import MemorizationAnalyzer
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family

DEMO = Path(__file__).resolve().parents[1] / "src" / "ckptscope" / "demo_suite"
SHAPES = {  # hidden, layers, heads, intermediate, vocab
    "demo": (64, 4, 4, 256, 512),
    "70m": (512, 6, 8, 2048, 50304),
    "160m": (768, 12, 12, 3072, 50304),
}


def random_run(size: str, root: Path) -> tuple[Path, int]:
    """Steps 0 and 1000 of a random GPT-NeoX with the given shape, as fp16 checkpoints; returns (root, vocab)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, inter, vocab = SHAPES[size]
    cfg = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                        vocab_size=vocab, rotary_pct=0.25, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    for step in (0, 1000):
        GPTNeoXForCausalLM(cfg).half().save_pretrained(root / f"step{step}")
    return root, vocab


def write_jsonl(path: Path, rows: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "tokens": r}) + "\n" for i, r in enumerate(rows)))
    return path


def inputs(name: str, tmp: Path, sequences: int, length: int) -> tuple[Path, int, int, Path, Path]:
    """(run root, step to time, final step, probe file, corpus file)."""
    tmp.mkdir(parents=True)
    if name == "demo" and (DEMO / "step0").is_dir():
        steps = sorted(int(p.name[4:]) for p in DEMO.glob("step*"))
        corpus = [json.loads(line)["tokens"] for f in ("canaries.jsonl", "probe.jsonl") for line in (DEMO / f).read_text().splitlines()]
        return DEMO, steps[len(steps) // 2], steps[-1], DEMO / "probe.jsonl", write_jsonl(tmp / "corpus.jsonl", corpus)
    root, vocab = random_run(name, tmp / name)
    rng = np.random.default_rng(0)
    probe = write_jsonl(tmp / "probe.jsonl", rng.integers(0, vocab, (sequences, length)).tolist())
    corpus = write_jsonl(tmp / "corpus.jsonl", rng.integers(0, vocab, (sequences, 64)).tolist())
    return root, 0, 1000, probe, corpus


def context(root: Path, step: int, final: int, device: str) -> AnalysisContext:
    ckpt = Checkpoint(root / f"step{step}", step=step)
    return AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config, device=device,
                           references={"final": Checkpoint(root / f"step{final}", step=final)})


def timed(fn, repeats: int):
    """(first call in s, median of `repeats` further calls in s, the first call's result)."""
    def once():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    first, result = once()
    return first, statistics.median(once()[0] for _ in range(repeats)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", help="comma-separated torch devices, e.g. cpu,cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=64, help="random models: probe/corpus sequences")
    parser.add_argument("--length", type=int, default=512, help="random models: probe sequence length")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 avoids spin-wait stalls on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print("| model | device | CKA positions | CKA positions/s (first call) | memorization sequences | sequences/s (first call) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            root, step, final, probe, corpus = inputs(name, Path(tmp) / name, args.sequences, args.length)
            for device in args.device.split(","):
                ctx = context(root, step, final, device)
                conv = ConvergenceAnalyzer.of(probe=probe, batch_size=args.batch_size)
                mem = MemorizationAnalyzer.of(corpus=corpus, batch_size=args.batch_size)
                first_c, steady_c, rows = timed(lambda: conv.analyze(ctx), args.repeats)  # noqa: B023
                first_m, steady_m, mem_rows = timed(lambda: mem.analyze(ctx), args.repeats)  # noqa: B023
                positions, n = rows.parameters["positions"], mem_rows.parameters["sequences"]
                print(f"| {name}{'' if root != DEMO else ' (demo suite)'} | {device} | {positions} | "
                      f"{positions / steady_c:,.0f} ({positions / first_c:,.0f}) | {n} | {n / steady_m:,.1f} ({n / first_m:,.1f}) |")


if __name__ == "__main__":
    main()
