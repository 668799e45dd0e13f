"""The single-core kernels under the exact tier, and the alternatives measured against them.

Why: docs/benchmarks.md explains the exact tier's speed (and the full-step target it misses) by these
figures: a float64 eigensolve per matrix, which no other eigensolver here beats; Gram products of
which only the lower triangle is computed; float64 chunks small enough (16 MB) to come from the
heap rather than a fresh mmap, whose page faults cost more than the fp16 -> float64 conversion;
the power-law fit's exhaustive x_min scan against the bounded search it uses.
This prints them, best of `--repeats`, on one thread.

    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy on one thread too, before they load

import numpy as np
import scipy.linalg
import torch

import ckptscope
from ckptscope.analyzers import spectral
from ckptscope.analyzers.spectral import add_gram_, fit_power_law
from timing import best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    r = args.repeats
    print(f"# {date.today()} {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, "
          f"ckptscope {ckptscope.__version__}")
    print("| kernel | size | seconds |\n| --- | --- | --- |")
    for n in (512, 768, 1024, 2048):
        a = np.random.default_rng(0).standard_normal((2 * n, n))
        g = a.T @ a
        gt = torch.from_numpy(g)
        print(f"| eigvalsh float64, torch | {n}² | {best(lambda: torch.linalg.eigvalsh(gt), r):.4f} |")
        print(f"| eigvalsh float64, numpy | {n}² | {best(lambda: np.linalg.eigvalsh(g), r):.4f} |")
        for driver in ("ev", "evd", "evr"):
            print(f"| eigvalsh float64, scipy {driver} | {n}² | "
                  f"{best(lambda: scipy.linalg.eigvalsh(g, driver=driver, check_finite=False), r):.4f} |")
    for rows in (1024, 4096):
        x = torch.randn(rows, 1024, dtype=torch.float64)
        g = torch.zeros(1024, 1024, dtype=torch.float64)
        print(f"| Gram XᵀX, full GEMM | {rows}×1024 | {best(lambda: g.addmm_(x.T, x), r):.4f} |")
        print(f"| Gram XᵀX, lower triangle (add_gram_) | {rows}×1024 | {best(lambda: add_gram_(g, x), r):.4f} |")
    for n in (768, 1024, 3072):  # heavy-tailed (Student t, 3 dof) spectra, as trained layers have
        w = np.random.default_rng(0).standard_t(3, size=(2 * n, n))
        ev = np.linalg.eigvalsh(w.T @ w / n)
        x = np.sort(ev[ev > spectral.EVALS_THRESH])
        print(f"| power-law fit, every x_min candidate in full | {n} eigenvalues | "
              f"{best(lambda: spectral._candidate_fits(x, bias=0), r):.4f} |")
        print(f"| power-law fit, bounded search (fit_power_law) | {n} eigenvalues | {best(lambda: fit_power_law(ev), r):.4f} |")
    g = torch.randn(1024, 1024, dtype=torch.float64)
    print(f"| mirror lower triangle | 1024² | {best(lambda: g.tril() + g.tril(-1).T, r):.4f} |")
    for rows in (2048, 4096, 8192):  # 16, 32, 64 MB in float64
        w = torch.randn(rows, 1024).half()
        out = torch.empty(rows, 1024, dtype=torch.float64)
        mb = rows * 1024 * 8 >> 20
        print(f"| fp16 → float64, new tensor | {mb} MB | {best(lambda: w.to(torch.float64), r):.4f} |")
        print(f"| fp16 → float64, into a buffer | {mb} MB | {best(lambda: out.copy_(w), r):.4f} |")


if __name__ == "__main__":
    main()
