"""Cost of the subspace analyzer's singular vectors: the Gram route it uses against the alternatives.

Why: the analyzer needs the top-k singular subspaces of every matrix at three steps (current,
previous, final). This times, on one thread and on random fp16 matrices with Pythia's shapes,

* `gram+evr`: float64 Gram of the shorter side, `scipy.linalg.eigh(subset_by_index=top k+1,
  driver="evr")`, then the long side's basis by thin QR of W·V (what `top_subspaces` does);
* `gram+eigh`: the same Gram with torch's full `eigh` (all eigenvectors) instead;
* `svd`: a float64 thin SVD of the whole matrix (`torch.linalg.svd`, LAPACK gesdd);

per distinct shape (best of `--repeats`), and the per-step total of the analyzer: each matrix
three times (W_t, W_previous, W_final), fused QKV also as its q/k/v parts (whose Grams sum to the
fused one, so the fused matrix costs only its eigensolve and product).

    OMP_NUM_THREADS=1 python benchmarks/bench_subspace.py --model 160m
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy on one thread too, before they load

import torch

import ckptscope
from ckptscope.analyzers.spectral import gram
from ckptscope.analyzers.subspace import _long_times, _orth, top_subspaces
from timing import best

VOCAB = 50304
MODELS = {"160m": (768, 12), "410m": (1024, 24)}  # d_model, layers (MLP 4·d, fused QKV 3·d)


def shapes(model: str) -> dict[tuple[int, int], int]:
    """(rows, cols) oriented out × in -> how many matrices of that shape one step has."""
    d, layers = MODELS[model]
    return {(VOCAB, d): 2, (3 * d, d): layers, (d, d): layers, (4 * d, d): layers, (d, 4 * d): layers}


def gram_full_eigh(w: torch.Tensor, k: int) -> None:
    g = gram(w)
    _, vecs = torch.linalg.eigh(g)
    _orth(_long_times(w, vecs[:, -k:].flip(1).contiguous().numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="160m")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-svd-above", type=int, default=10**9, help="skip the SVD of matrices with more elements")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {date.today()} {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, "
          f"ckptscope {ckptscope.__version__}, pythia-{args.model} shapes, k = {args.k}")
    print("| shape (out × in) | count | gram+evr s | gram+eigh s | svd s | of which Gram s |\n| --- | --- | --- | --- | --- | --- |")
    d, _ = MODELS[args.model]
    times: dict[tuple[int, int], dict[str, float]] = {}
    for (rows, cols), count in shapes(args.model).items():
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).mul_(0.02).half()
        t = times[(rows, cols)] = {
            "gram+evr": best(lambda: top_subspaces(w, args.k), args.repeats),
            "gram+eigh": best(lambda: gram_full_eigh(w, args.k), args.repeats),
            "svd": best(lambda: torch.linalg.svd(w.to(torch.float64), full_matrices=False), 1)
            if rows * cols <= args.skip_svd_above else float("nan"),
            "gram": best(lambda: gram(w, mirror=False), args.repeats),
        }
        print(f"| {rows} × {cols} | {count} | {t['gram+evr']:.3f} | {t['gram+eigh']:.3f} | {t['svd']:.3f} | {t['gram']:.3f} |")
    print("\nper step: 3 bases per matrix (current, previous, final); a fused QKV matrix also as its three d × d parts,")
    print("whose Grams sum to the fused one (so the fused matrix costs its eigensolve and product only, except for svd):")
    part = times[(d, d)]
    for route in ("gram+evr", "gram+eigh", "svd"):
        total = 0.0
        for shape, count in shapes(args.model).items():
            one = times[shape][route]
            if shape == (3 * d, d):
                one += 3 * part[route] - (times[shape]["gram"] if route != "svd" else 0.0)
            total += 3 * count * one
        print(f"- {route}: {total:.1f} s")

if __name__ == "__main__":
    main()
