"""The `fast` spectrum tier against `exact` on Pythia's real matrix shapes: time and error.

Why: `--spectrum exact` eigensolves the float64 Gram matrix of every matrix, O(n·m² + m³); for
pythia-6.9b and -12b (smaller side 4096 and 5120) that is most of a step. `--spectrum fast`
(analyzers/fast_spectrum.py) gets the spectral norm, stable rank, top-32 singular values and an
estimated effective rank from a few hundred matrix-vector products. This prints what it saves and
what it costs in accuracy, against the exact tier on the same fp16 matrix.

Matrices are random with the real shapes, stored as fp16 like Pythia's checkpoints, in two
families: `init` (Gaussian, std 0.02: a Marchenko-Pastur bulk, the hardest case for Lanczos,
since the top of the spectrum has tiny gaps) and `trained` (the same plus a rank-64 update with
power-law singular values, the heavy-tailed shape of trained layers).

    python benchmarks/bench_tiers.py                        # every shape
    python benchmarks/bench_tiers.py --shapes 410m.mlp_in,1.4b.mlp_in
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import numpy as np
import torch

import ckptscope
from ckptscope.analyzers.fast_spectrum import fast_spectrum
from ckptscope.analyzers.spectral import rank_norm_metrics, singular_values

SHAPES = {  # (rows, cols) of Pythia matrices
    "410m.mlp_in": (4096, 1024),
    "1.4b.mlp_in": (8192, 2048),
    "6.9b.mlp_in": (16384, 4096),
    "12b.qkv": (15360, 5120),
    "12b.mlp_in": (20480, 5120),
}
K = 32


def matrix(shape: tuple[int, int], family: str) -> torch.Tensor:
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    w = 0.02 * torch.randn(rows, cols, generator=gen)
    if family == "trained":
        rank = 64
        u = torch.randn(rows, rank, generator=gen) / rows**0.5
        v = torch.randn(cols, rank, generator=gen) / cols**0.5
        w += (u * (4.0 * torch.arange(1, rank + 1) ** -1.0)) @ v.T
    return w.half()


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--families", default="init,trained")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where both tiers run (cpu, cuda)")
    args = ap.parse_args()
    print(f"# {date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, ckptscope {ckptscope.__version__}, device {args.device}")
    print("| matrix | family | shape | exact s | fast s | speed-up | products | spectral norm rel. err | "
          "stable rank rel. err | top-32 max err / σ₁ | effective rank rel. err (est. rse) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes.split(","):
        for family in args.families.split(","):
            w = matrix(SHAPES[name], family).to(args.device)
            t_exact, sv = timed(lambda: singular_values(w), args.repeats)  # both return host arrays: timings include the sync
            exact = rank_norm_metrics(sv)
            t_fast, fs = timed(lambda: fast_spectrum(w, k=K), args.repeats)

            def rel(key: str) -> float:
                return abs(fs.metrics[key] - exact[key]) / abs(exact[key])

            top = np.max(np.abs(fs.top_sv - sv[: fs.top_sv.size])) / sv[0] if fs.top_sv.size else float("nan")
            print(f"| {name} | {family} | {w.shape[0]}×{w.shape[1]} | {t_exact:.2f} | {t_fast:.2f} | {t_exact / t_fast:.1f}x | "
                  f"{fs.products} | {rel('spectral_norm'):.1e} | {rel('stable_rank'):.1e} | "
                  f"{top:.1e} ({fs.top_sv.size}/{K}) | {rel('effective_rank'):.1e} ({fs.effective_rank_rse:.1e}) |", flush=True)


if __name__ == "__main__":
    main()
