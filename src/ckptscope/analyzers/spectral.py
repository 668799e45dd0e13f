"""Spectral metrics of weight matrices: singular values, rank/norm summaries and
WeightWatcher-compatible heavy-tail (power-law) metrics.

Pure math, no I/O. Everything is computed in float64: checkpoints are stored in
fp16/bf16/fp32, and rank-type metrics of small differences (W_t - W_0) or of
ill-conditioned matrices are meaningless at storage precision.

Singular values come from the eigenvalues of the Gram matrix of the smaller
side (M x M for an N x M matrix, N >= M). That is cheaper than an SVD of the
full matrix, streams over the long side in chunks so a large fp16 matrix is
never copied to float64 whole, and runs on whatever device the tensor lives on.
The price is accuracy for the tiniest singular values: an eigenvalue error of
~eps * sigma_1**2 becomes an absolute singular-value error of ~sqrt(eps) * sigma_1
(about 1e-8 * sigma_1), far below every tolerance used by the metrics here.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.analyzers.parallel import one_blas_thread

__all__ = [
    "PowerLawFit",
    "fit_power_law",
    "add_gram_",
    "gram",
    "heavy_tail_metrics",
    "rank_norm_metrics",
    "singular_values",
    "singular_values_from_gram",
    "vector_metrics",
]

# WeightWatcher constants (weightwatcher 0.7.7: constants.py and WW_powerlaw.py).
EVALS_THRESH = 1e-5  # eigenvalues <= this are dropped before the power-law fit
_SMALL_N_CUTOFF = 20  # fewer kept eigenvalues than this -> WW's "small N" fit
_SMALL_N_MIN_TAIL = 8  # small-N fit: smallest tail considered for x_min
_SMALL_N_DEGENERATE = 1e-12  # small-N fit: tails with sum(log(x/xmin)) <= this are skipped

# Upper bound on the number of float64 cells in one (candidates x tail) block of
# the power-law fit: ~1M cells = 8 MB per temporary, a few temporaries alive.
_FIT_BLOCK_CELLS = 1 << 20
# The large-sample fit bounds every candidate's KS distance from every _KS_STRIDE-th column first,
# then takes exact rows _KS_BATCH at a time (see _best_candidate).
_KS_STRIDE = 16
_KS_BATCH = 16


GRAM_BLOCK = 256  # below this side the Gram update is one GEMM
# float64 elements per chunk of a pass over a matrix: 16 MB. glibc serves blocks up to 32 MB from
# its heap, reused without page faults; a larger temporary is a fresh mmap every time, and its
# page faults cost 3-5x the fp16 -> float64 conversion itself (benchmarks/bench_kernels.py).
# Gram updates also ran fastest at 1-4K rows per chunk.
CHUNK_ELEMENTS = 1 << 21


def add_gram_(g: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Add blockᵀ·block to the *lower triangle* of g (in place); the strict upper triangle is left partial.

    A Gram matrix is symmetric and the eigensolver reads one triangle, so computing both halves
    wastes work. Splitting the columns in halves A | B gives the blocks AᵀA, BᵀB (recursively) and
    BᵀA, skipping AᵀB: two levels do 5/8 of a full GEMM's flops (measured 25-30% faster on CPU).
    scipy's BLAS `dsyrk` (half the flops) was 1.6-1.8x faster alone at 1024 and 3072 columns, but
    a pythia-160m step took 30% longer with it: its OpenBLAS threads fight torch's in the
    analyzers' worker threads.
    """
    n = block.shape[1]
    if n <= GRAM_BLOCK:
        g.addmm_(block.T, block)
        return g
    h = n // 2
    add_gram_(g[:h, :h], block[:, :h])
    add_gram_(g[h:, h:], block[:, h:])
    g[h:, :h].addmm_(block[:, h:].T, block[:, :h])
    return g


def gram(w: torch.Tensor, *, chunk: int | None = None, mirror: bool = True) -> torch.Tensor:
    """float64 Gram matrix of the smaller side of a 2-D tensor.

    Returns WᵀW (cols x cols) if rows >= cols, else WWᵀ (rows x rows), on w's device.
    Its eigenvalues are the squared singular values of w. The long dimension is
    processed `chunk` slices at a time (default: CHUNK_ELEMENTS / small side) and only one
    slice is upcast to float64, so peak extra memory is one float64 chunk plus the (small side)² result.
    With `mirror=False` only the lower triangle is valid, which is all an eigensolve reads
    (mirroring a 1024² matrix took 70% as long as its 1024-row Gram product).
    """
    if w.ndim != 2:
        raise ValueError(f"gram() needs a 2-D tensor, got shape {tuple(w.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    w = w.detach()
    rows, cols = w.shape
    tall = rows >= cols
    side, length = (cols, rows) if tall else (rows, cols)
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(side, 1))
    g = torch.zeros((side, side), dtype=torch.float64, device=w.device)
    for start in range(0, length, chunk):
        # block is (chunk x side) either way, so blockᵀ·block accumulates the Gram.
        part = w[start : start + chunk] if tall else w[:, start : start + chunk].T
        add_gram_(g, part.to(torch.float64))
    return g.tril() + g.tril(-1).T if mirror else g


def singular_values_from_gram(g: torch.Tensor) -> np.ndarray:
    """Singular values (float64 numpy, descending) from a Gram matrix; only its lower triangle is read.

    Rounding can make the smallest eigenvalues of a PSD Gram matrix slightly
    negative; they are clipped to 0 before the square root. On CPU the eigensolve
    runs on one thread (see `parallel.one_blas_thread`).
    """
    g = g.to(torch.float64)
    with one_blas_thread() if g.device.type == "cpu" else nullcontext():
        evals = torch.linalg.eigvalsh(g, UPLO="L").cpu().numpy()  # ascending
    return np.ascontiguousarray(np.sqrt(np.clip(evals, 0.0, None))[::-1])


def singular_values(w: torch.Tensor) -> np.ndarray:
    """Singular values of a 2-D tensor (length min(rows, cols), float64, descending)."""
    return singular_values_from_gram(gram(w, mirror=False))


def _descending(sv: np.ndarray) -> np.ndarray:
    """float64 copy sorted descending, so callers need not guarantee the order."""
    return np.sort(np.asarray(sv, dtype=np.float64).ravel())[::-1]


def rank_norm_metrics(sv: np.ndarray, *, rtol: float = 1e-3) -> dict[str, float]:
    """Norm and rank summaries of a matrix from its singular values.

    - frobenius_norm  sqrt(Σσ²)
    - spectral_norm   σ₁
    - stable_rank     Σσ²/σ₁²                      (WeightWatcher's `stable_rank`)
    - effective_rank  exp(-Σ pᵢ ln pᵢ), pᵢ = σᵢ/Σσ  (Roy & Vetterli 2007; σ = 0
                      terms are dropped, i.e. 0·ln 0 = 0)
    - numerical_rank  #{σᵢ > rtol·σ₁}  (relative tolerance: storage dtypes like
                      fp16/bf16 make an eps-based tolerance call everything full rank)
    - energy_rank_99  fewest leading σ whose Σσ² is ≥ 99% of the total

    For an all-zero (or empty) matrix, e.g. the delta of two identical
    checkpoints, norms and both counting ranks are 0 while stable_rank and
    effective_rank are NaN: both are ratios with a zero denominator (σ₁ = 0,
    Σσ = 0), and no value would be right for every downstream use.
    """
    s = _descending(sv)
    sigma1 = float(s[0]) if s.size else 0.0
    energy = np.cumsum(s * s)
    total = float(energy[-1]) if s.size else 0.0
    if sigma1 == 0.0:
        return {
            "frobenius_norm": 0.0,
            "spectral_norm": 0.0,
            "stable_rank": math.nan,
            "effective_rank": math.nan,
            "numerical_rank": 0.0,
            "energy_rank_99": 0.0,
        }
    positive = s[s > 0]
    p = positive / positive.sum()
    entropy = float(-np.sum(p * np.log(p)))
    # cumsum's last entry *is* the total, so the search always succeeds.
    energy_rank = int(np.searchsorted(energy, 0.99 * total, side="left")) + 1
    return {
        "frobenius_norm": math.sqrt(total),
        "spectral_norm": sigma1,
        "stable_rank": total / sigma1**2,
        "effective_rank": math.exp(entropy),
        "numerical_rank": float(np.count_nonzero(s > rtol * sigma1)),
        "energy_rank_99": float(energy_rank),
    }


@dataclass(frozen=True)
class PowerLawFit:
    """Result of the power-law fit of an eigenvalue tail, p(λ) ∝ λ^-alpha for λ ≥ xmin.

    ks_distance is the KS distance D of the chosen fit, sigma the standard error
    (alpha - 1)/sqrt(n_tail), num_pl_spikes the number of eigenvalues ≥ xmin.
    A fit that cannot be made (fewer than 2 usable eigenvalues, or all equal in a
    small sample) has NaN floats and num_pl_spikes = 0.
    """

    alpha: float
    xmin: float
    ks_distance: float
    sigma: float
    num_pl_spikes: int


_NAN_FIT = PowerLawFit(math.nan, math.nan, math.nan, math.nan, 0)


def _tail_sums(x: np.ndarray, logs: np.ndarray) -> np.ndarray:
    """s_i = Σ_{j≥i} ln(x_j/x_i) for every x_min candidate i < len(x) - 1, in row blocks."""
    size, count = x.size, x.size - 1
    sums = np.empty(count)
    rows_per_block = max(1, _FIT_BLOCK_CELLS // size)
    for a in range(0, count, rows_per_block):
        b = min(a + rows_per_block, count)
        # ln(x_j/x_i) clipped at 0: x is sorted, so only the j < i cells are clipped
        # (ties give 0 either way) and the row sum is exactly the tail sum.
        logratio = logs[None, a:] - logs[a:b, None]
        np.maximum(logratio, 0.0, out=logratio)
        sums[a:b] = logratio.sum(axis=1)
    return sums


def _mle(x: np.ndarray, bias: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ln x, tail sizes n_i, tail sums s_i and MLE alpha_i = 1 + (n_i - bias)/s_i of every x_min candidate."""
    logs = np.log(x)
    tails = (x.size - np.arange(x.size - 1)).astype(np.float64)
    sums = _tail_sums(x, logs)
    with np.errstate(divide="ignore"):
        alphas = 1.0 + (tails - bias) / sums  # s = 0 (all-tied tail) -> alpha = inf
    return logs, tails, sums, alphas


def _ks_distances(logs: np.ndarray, rows: np.ndarray, alphas: np.ndarray, tails: np.ndarray,
                  columns: np.ndarray) -> np.ndarray:
    """max over `columns` (indices j, ascending) of |1 - (x_j/x_i)^(1-alpha_i) - max(j-i, 0)/n_i| for
    each candidate i in `rows`, with ln(x_j/x_i) clipped at 0; every column gives the same cell value
    whichever subset it is in.

    Columns j < i contribute 0 (the clipping makes the fitted CDF 0 there, as the empirical one); the empirical
    CDF is 0, 1/n, ..., (n-1)/n as in WeightWatcher.
    """
    logratio = logs[None, columns] - logs[rows, None]
    np.maximum(logratio, 0.0, out=logratio)
    alpha = alphas[rows]
    # pow(1, -inf) = 1 but 0·(-inf) = NaN in exp-space: stand in -max for -inf.
    exponent = np.where(np.isfinite(alpha), 1.0 - alpha, -np.finfo(np.float64).max)
    with np.errstate(over="ignore"):
        np.multiply(logratio, exponent[:, None], out=logratio)
    fitted_cdf = np.exp(logratio, out=logratio)  # (x_j/x_i)^(1-alpha); 1 where j < i
    np.subtract(1.0, fitted_cdf, out=fitted_cdf)
    # Whole numbers are exact in float64, so this equals the integer form, in fewer passes.
    empirical = columns[None, :].astype(np.float64) - rows[:, None]
    np.maximum(empirical, 0.0, out=empirical)
    empirical /= tails[rows, None]
    fitted_cdf -= empirical
    return np.abs(fitted_cdf, out=fitted_cdf).max(axis=1)


def _candidate_fits(x: np.ndarray, *, bias: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLE alpha, KS distance D and tail sum for every x_min candidate x[i], i < len(x) - 1.

    x is sorted ascending and positive. For candidate i with tail n = len(x) - i:
    s = Σ_{j≥i} ln(x_j/x_i), alpha = 1 + (n - bias)/s and
    D = max_{j≥i} |1 - (x_j/x_i)^(1-alpha) - (j-i)/n|. O(len(x)²) work, in row blocks
    of at most _FIT_BLOCK_CELLS cells, restricted to columns j ≥ the block's first row.
    """
    logs, tails, sums, alphas = _mle(x, bias)
    count = x.size - 1
    dists = np.empty(count)
    rows_per_block = max(1, _FIT_BLOCK_CELLS // x.size)
    for a in range(0, count, rows_per_block):
        b = min(a + rows_per_block, count)
        dists[a:b] = _ks_distances(logs, np.arange(a, b), alphas, tails, np.arange(a, x.size))
    # alpha > 1 always holds here (s >= 0), so WW's "D = 1 if alpha <= 1" never fires.
    return alphas, dists, sums


def _best_candidate(x: np.ndarray) -> tuple[int, float, float]:
    """(i, alpha_i, D_i) of the x_min candidate with the smallest KS distance D (the first on ties),
    for the large-sample fit (bias 0): the same answer, to the bit, as argmin over
    `_candidate_fits`, at a fraction of its cost.

    D_i is a maximum over the tail's columns, so its maximum over every `_KS_STRIDE`-th column is
    a lower bound L_i ≤ D_i, computed from the very same cell values. Candidates are then taken in
    ascending L_i and their exact D_i computed, `_KS_BATCH` at a time, until the next L_i exceeds
    the best exact D found: every candidate left has D_i ≥ L_i > that, so none can win. Typically
    a few dozen of 768 candidates need their exact row (checked against the full computation on
    random heavy-tailed, Gaussian and low-rank spectra in tests/test_spectral.py).
    """
    logs, tails, _, alphas = _mle(x, 0)
    count = x.size - 1
    sampled = np.arange(0, x.size, _KS_STRIDE)
    rows_per_block = max(1, _FIT_BLOCK_CELLS // sampled.size)
    bounds = np.concatenate([_ks_distances(logs, np.arange(a, min(a + rows_per_block, count)), alphas, tails, sampled)
                             for a in range(0, count, rows_per_block)])
    order = np.argsort(bounds, kind="stable")
    best, best_d = -1, math.inf
    for k in range(0, count, _KS_BATCH):
        rows = order[k : k + _KS_BATCH]
        if bounds[rows[0]] > best_d + 1e-12:  # bounds reuse the exact cells: the margin is only extra safety
            break
        exact = _ks_distances(logs, rows, alphas, tails, np.arange(int(rows.min()), x.size))
        for i, d in zip(rows.tolist(), exact.tolist()):
            if d < best_d or (d == best_d and i < best):
                best, best_d = i, d
    if best < 0:  # no finite D (an infinite eigenvalue): the full scan's answer, np.argmin's first NaN
        _, dists, _ = _candidate_fits(x, bias=0)
        best = int(np.argmin(dists))
        best_d = float(dists[best])
    return best, float(alphas[best]), best_d


def fit_power_law(evals: np.ndarray, *, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit a power law to the eigenvalue tail exactly as WeightWatcher 0.7.7 does by default.

    Default WW settings: pl_package='ww' (class WWFit), xmax=None, fix_fingers=False.
    Eigenvalues λ > thresh are kept and sorted ascending; every λ_i except the
    largest is an x_min candidate. Two regimes, as in WWFit:

    - n ≥ 20 kept eigenvalues: continuous MLE alpha_i = 1 + n_i/Σ_{j≥i} ln(λ_j/λ_i)
      (n_i = tail size) and the x_min with the smallest KS distance D wins
      (first index on ties, i.e. the smallest x_min).
    - n < 20 ("small N"): bias-corrected alpha_i = 1 + (n_i - 1)/Σ ln(λ_j/λ_i);
      only tails with n_i ≥ 8 and Σ ln(...) > 1e-12 qualify (WW gives the others
      D = 1), and again the smallest D wins. WWFit.fit_powerlaw_smallN also picks
      a winner by J = D - 0.868/sqrt(n_i), but WWFit.__init__ then overrides it
      with argmin D, so J has no effect in 0.7.7 and is not reproduced. With no
      qualifying tail the whole sample (i = 0) is fitted.

    sigma = (alpha - 1)/sqrt(n_i). Deviations from WW, all in degenerate cases:
    fewer than 2 eigenvalues or an all-equal small sample return a NaN fit (WW
    raises, or returns the placeholder alpha = 0, D = 1); in the small-N fallback
    WW reports a stale sigma of -1/sqrt(n), here it is (alpha - 1)/sqrt(n).
    A large sample whose top eigenvalues are all tied can give alpha = inf, as in WW.
    """
    data = np.asarray(evals, dtype=np.float64).ravel()
    x = np.sort(data[data > thresh])
    if x.size < 2:
        return _NAN_FIT
    tails = x.size - np.arange(x.size - 1)
    if x.size >= _SMALL_N_CUTOFF:
        best, alpha, dist = _best_candidate(x)
    else:
        alphas, dists, sums = _candidate_fits(x, bias=1)
        ok = (tails >= _SMALL_N_MIN_TAIL) & (sums > _SMALL_N_DEGENERATE)
        if ok.any():
            best = int(np.argmin(np.where(ok, dists, np.inf)))
        elif sums[0] > _SMALL_N_DEGENERATE:
            best = 0
        else:
            return _NAN_FIT
        alpha, dist = float(alphas[best]), float(dists[best])
    xmin = float(x[best])
    # Count with >= so eigenvalues tied with x_min below index `best` are included (as WW).
    spikes = int(x.size - np.searchsorted(x, xmin, side="left"))
    return PowerLawFit(
        alpha=alpha,
        xmin=xmin,
        ks_distance=dist,
        sigma=(alpha - 1.0) / math.sqrt(tails[best]),
        num_pl_spikes=spikes,
    )


def heavy_tail_metrics(sv: np.ndarray) -> dict[str, float]:
    """WeightWatcher's per-layer shape/scale metrics from singular values.

    On the eigenvalues λ = σ² of WᵀW, un-normalised (WW's default analyze() does
    not divide by N; its `normalize` option is gone and glorot_fix is off), so
    scale matters, including for the absolute fit threshold λ > 1e-5:
    log_norm = log10 Σλ (= log10 ‖W‖_F²), log_spectral_norm = log10 λ_max,
    alpha from fit_power_law, alpha_weighted = alpha·log10 λ_max, plus the fit's
    alpha_xmin, alpha_ks_distance, alpha_sigma and num_pl_spikes.
    An all-zero matrix gives log norms of -inf (log10 0) and a NaN fit.
    """
    lam = _descending(sv) ** 2
    total = float(lam.sum())
    lam_max = float(lam[0]) if lam.size else 0.0
    log_norm = math.log10(total) if total > 0 else -math.inf
    log_spectral_norm = math.log10(lam_max) if lam_max > 0 else -math.inf
    fit = fit_power_law(lam)
    return {
        "log_norm": log_norm,
        "log_spectral_norm": log_spectral_norm,
        "alpha": fit.alpha,
        "alpha_weighted": fit.alpha * log_spectral_norm if not math.isnan(fit.alpha) else math.nan,
        "alpha_xmin": fit.xmin,
        "alpha_ks_distance": fit.ks_distance,
        "alpha_sigma": fit.sigma,
        "num_pl_spikes": float(fit.num_pl_spikes),
    }


def vector_metrics(v: torch.Tensor) -> dict[str, float]:
    """Summaries of a 1-D parameter (bias, norm scale) in float64.

    std is the population standard deviation (ddof=0): the vector is the whole
    parameter, not a sample. Tensors of other shapes are treated as their
    flattened elements. An empty tensor gives 0 norms and NaN mean/std.
    """
    x = v.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        return {"l2_norm": 0.0, "mean": math.nan, "std": math.nan, "max_abs": 0.0}
    return {
        "l2_norm": float(torch.linalg.vector_norm(x)),
        "mean": float(x.mean()),
        "std": float(x.std(correction=0)),
        "max_abs": float(x.abs().max()),
    }
