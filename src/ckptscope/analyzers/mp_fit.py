"""WeightWatcher parity beyond alpha: its Marchenko–Pastur (MP) fit, matrix entropy, Schatten-alpha
norm and randomization distance, under the column names WeightWatcher prints.

Everything is computed from the eigenvalues λ = σ² of WᵀW (float64), reused from the `weights`
analyzer (`ctx.shared[("sv", tensor, component)]`) when it ran on the same step, else from one
float64 Gram eigensolve here. The MP fit follows WeightWatcher 0.7.7's `mp_fit` /
`RMT_Util.fit_density_with_range` step for step (formulas in README, "Weight analyzers beyond
`weights`"), with one change that leaves the result alone: WeightWatcher refits its kernel density
estimate (KDE) of the spectrum for every trial σ (about 230 times per matrix) although it does not
depend on σ; here it is computed once, exactly, from prefix sums, and the brute-force grid is
evaluated as one array operation. Only `rand_distance` needs a second eigensolve (of the matrix
with its entries permuted), so it is off by default.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize

from ckptscope.analyzers.contract import AnalysisContext, Analyzer
from ckptscope.analyzers.spectral import CHUNK_ELEMENTS, fit_power_law, singular_values
from ckptscope.options import Options, at_least, option
from ckptscope.rows import RunRows
from ckptscope.sources.layers import classify, is_buffer, orient

ENTROPY_EPSILON = 1e-10  # WW's EPSILON on a host without CUDA (it switches to 6e-5 when torch sees CUDA)
KDE_BANDWIDTH = 0.1  # WW's bw for the linear-kernel KDE of the rescaled spectrum
KDE_POINTS = 1000  # WW evaluates the KDE on linspace(0, max + 0.5, 1000)
KDE_THRESH = 0.01  # grid points whose KDE is below this are left out of the residual
PENALTY = 1000.0  # WW's residual for every point when the MP bulk misses the KDE peak
GRAM_RESOLUTION = 4 * math.sqrt(np.finfo(np.float64).eps)  # × √m σ_max: smallest σ a Gram eigensolve resolves
MP_METRICS = ("sigma_mp", "bulk_max", "bulk_min", "mp_softrank", "num_spikes")


@dataclass(frozen=True)
class MPFitOptions(Options):
    rand_distance: bool = option(False, help="Also store rand_distance: a second eigensolve per matrix, of its entries "
                                             "permuted (seeded by mp_fit's seed and the tensor name, so reruns agree).")
    seed: int = option(0, help="Seed of the entry permutation behind rand_distance.", check=at_least(0))
    min_evals: int = option(10, help="Skip matrices whose shorter side is below this (WeightWatcher's min_evals).",
                            check=at_least(1))
    max_evals: int = option(15000, help="Skip matrices whose shorter side exceeds this (WeightWatcher's max_evals).",
                            check=at_least(1))
    max_n: int = option(50000, help="Skip matrices whose longer side exceeds this (WeightWatcher's max_N; it "
                                    "skips Pythia's 50,304-row embeddings).", check=at_least(1))


# -- the math, on eigenvalues --------------------------------------------------------------------

def matrix_entropy(evals: np.ndarray, n: int) -> float:
    """WeightWatcher's `entropy`: −Σ p ln p / ln(R + ε), p = λ/Σλ + ε, over all eigenvalues.

    R = #{σ > σ_max · n · eps64} (its `matrix_rank`, n = longer side), ε = ENTROPY_EPSILON.
    NaN when Σλ = 0 (WW logs an error and reports garbage there).
    """
    lam = np.asarray(evals, dtype=np.float64)
    total = float(lam.sum())
    if total <= 0:
        return math.nan
    sv = np.sqrt(lam)
    rank = np.count_nonzero(sv > sv.max() * n * np.finfo(np.float64).eps) + ENTROPY_EPSILON
    p = lam / total + ENTROPY_EPSILON
    return float(-np.sum(p * np.log(p)) / np.log(rank))


def log_alpha_norm(evals: np.ndarray, alpha: float) -> float:
    """log10 Σ λ^α over all eigenvalues (WW's Schatten-α "norm"); NaN without a fit."""
    if not math.isfinite(alpha):
        return math.nan
    total = float(np.sum(np.power(np.asarray(evals, dtype=np.float64), alpha)))
    return math.log10(total) if total > 0 else math.nan


def linear_kde(samples: np.ndarray, x: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density of a linear (triangular) kernel KDE, (1/(n h)) Σ max(0, 1 − |x − s|/h), at points x.

    The same estimate as scikit-learn's `KernelDensity(kernel="linear")` (whose norm in 1-D is 1/h),
    in O((n + len(x)) log n) from prefix sums of the sorted samples instead of a tree query.
    """
    s = np.sort(np.asarray(samples, dtype=np.float64))
    csum = np.concatenate(([0.0], np.cumsum(s)))
    lo = np.searchsorted(s, x - bandwidth, side="right")  # first sample > x − h
    mid = np.searchsorted(s, x, side="right")  # first sample > x
    hi = np.searchsorted(s, x + bandwidth, side="left")  # first sample ≥ x + h
    left_n, right_n = mid - lo, hi - mid
    left_sum, right_sum = csum[mid] - csum[lo], csum[hi] - csum[mid]
    # Σ_{x−h<s≤x} (1 − (x − s)/h) + Σ_{x<s<x+h} (1 − (s − x)/h); samples exactly h away weigh 0 either way.
    total = left_n - (left_n * x - left_sum) / bandwidth + right_n - (right_sum - right_n * x) / bandwidth
    return np.maximum(total, 0.0) / (s.size * bandwidth)


@dataclass(frozen=True)
class MPFit:
    """WeightWatcher's MP fit of one spectrum (bulk edges in original units, the rest rescaled)."""

    sigma_mp: float
    bulk_max: float
    bulk_min: float
    mp_softrank: float
    num_spikes: int
    w_scale: float


def _mp_objective(sigmas: np.ndarray, x: np.ndarray, density: np.ndarray, q: float, peak: float,
                  n_bad: int) -> np.ndarray:
    """Σ residual² of the MP (or, for Q = 1, quarter-circle) density against the KDE, per trial σ.

    `x`/`density` are the KDE points above KDE_THRESH; the n_bad others contribute zero residuals
    (appended after the real ones, in WW's order, so the float sums agree). A bulk [a, b] with
    b < peak, b > max x or a > peak costs PENALTY at every kept point.
    """
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if q == 1:
            model = np.nan_to_num(np.sqrt(4.0 - x * x) / (np.pi * s * s))
            resid = model - density
        else:
            a = (s * (1.0 - math.sqrt(1.0 / q))) ** 2
            b = (s * (1.0 + math.sqrt(1.0 / q))) ** 2
            model = np.nan_to_num(np.sqrt((b - x) * (x - a)) / (2.0 * np.pi * s * s * x / q))
            resid = model - density
            bad = ((b < peak) | (b > x.max()) | (a > peak))[:, 0]
            resid[bad] = PENALTY
    full = np.zeros((s.shape[0], x.size + n_bad))
    full[:, : x.size] = resid
    return np.sum(full**2, axis=1)


def mp_fit(evals: np.ndarray, n: int, m: int) -> MPFit | None:
    """WeightWatcher 0.7.7's MP fit (`mp_fit=True`) of the eigenvalues of an n × m matrix (n ≥ m).

    1. Rescale λ̃ = λ·k/Σλ (k = number of eigenvalues, W_scale² = k/Σλ), so mean λ̃ = 1.
    2. Q = n/m; fit ρ_MP(x; σ, Q) (Q = 1: the quarter circle on √λ̃) to a linear-kernel KDE
       (bandwidth 0.1) of the spectrum on linspace(0, max + 0.5, 1000), points with KDE ≤ 0.01
       left out: brute force over σ ∈ [0.05, 2)·σ₀ in steps of 0.01·σ₀, σ₀ = √λ̃_max/(1 + Q^−½),
       then Nelder–Mead polish from the best grid point (scipy's `fmin`, as `optimize.brute` does).
    3. bulk_max/min = (σ(1 ± Q^−½))², num_spikes = #{λ̃ > bulk_max + √TW},
       TW = Q^−½ bulk_max^⅔ m^−⅔; mp_softrank = bulk_max/λ̃_max; bulk edges returned ÷ W_scale².

    None where WW's fit fails (it then reports −1 everywhere): a zero spectrum, or no KDE point above 0.01.
    """
    lam = np.sort(np.asarray(evals, dtype=np.float64))
    total = float(lam.sum())
    if lam.size == 0 or total <= 0:
        return None
    scale2 = lam.size / total  # W_scale²
    rescaled = lam * scale2
    q = n / m
    lam_max = float(rescaled.max())
    sigma0 = math.sqrt(lam_max) / (1.0 + 1.0 / math.sqrt(q))
    to_fit = np.sqrt(rescaled) if q == 1 else rescaled
    grid_x = np.linspace(0.0, float(to_fit.max()) + 0.5, KDE_POINTS)
    density = linear_kde(to_fit, grid_x, KDE_BANDWIDTH)
    keep = density > KDE_THRESH
    x, dens = grid_x[keep], density[keep]
    if x.size == 0:
        return None
    n_bad = int(np.count_nonzero(density < KDE_THRESH))
    peak = float(x[np.argmax(dens)])
    args = (x, dens, q, peak, n_bad)
    grid = np.mgrid[slice(0.05 * sigma0, 2.0 * sigma0, 0.01 * sigma0)]  # the grid optimize.brute builds
    start = grid[int(np.argmin(_mp_objective(grid, *args)))]
    polished = optimize.fmin(lambda p: float(_mp_objective(p, *args)[0]), start, full_output=True, disp=False)
    sigma = float(np.asarray(polished[0]).ravel()[0])
    bulk_max = (sigma * (1.0 + 1.0 / math.sqrt(q))) ** 2
    bulk_min = (sigma * (1.0 - 1.0 / math.sqrt(q))) ** 2
    tw = bulk_max ** (2.0 / 3.0) * m ** (-2.0 / 3.0) / math.sqrt(q)
    spikes = int(np.count_nonzero(rescaled > bulk_max + math.sqrt(tw)))
    return MPFit(sigma, bulk_max / scale2, bulk_min / scale2, bulk_max / lam_max, spikes, math.sqrt(scale2))


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """√((KL(p‖m) + KL(q‖m))/2) in nats, m = (p + q)/2, each vector normalised to sum 1 (0·ln 0 = 0)."""
    p = np.asarray(p, dtype=np.float64) / np.sum(p)
    q = np.asarray(q, dtype=np.float64) / np.sum(q)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def permuted(w: torch.Tensor, seed: int | list[int]) -> torch.Tensor:
    """w with its entries in a uniformly random order (seeded), same shape and dtype.

    The raw bits are shuffled as integers (numpy's Fisher–Yates, in place on one copy), so the
    stored values move unchanged, memory is one copy of the tensor and bf16 needs no detour.
    """
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[w.element_size()]
    flat = w.detach().cpu().contiguous().reshape(-1)
    bits = flat.view({np.int16: torch.int16, np.int32: torch.int32, np.int64: torch.int64}[ints]).numpy().copy()
    np.random.default_rng(seed).shuffle(bits)
    return torch.from_numpy(bits).view(w.dtype).reshape(w.shape)


# -- the analyzer --------------------------------------------------------------------------------

class MPFitAnalyzer(Analyzer):
    """WeightWatcher's MP fit, matrix entropy, log alpha norm and rand_distance of every weight matrix."""

    name = "mp_fit"
    version = "1.0.0"
    Options = MPFitOptions
    unit = "tensors"
    after = ("weights",)  # its singular values, when it ran on this step, save the eigensolve

    def matrices(self, ctx: AnalysisContext) -> list[str]:
        """The tensors WeightWatcher would analyze: 2-D float weights within its size filters.

        Linear, Conv1D and Embedding weights alike (WW analyzes all three; norms and biases are 1-D).
        A fused QKV matrix is analyzed whole, as WW sees the one Linear layer holding it.
        """
        o = self.options
        out = []
        for name, info in ctx.checkpoint.tensors.items():
            if is_buffer(name) or len(info.shape) != 2 or not info.dtype.startswith(("float", "bfloat")):
                continue
            small, big = min(info.shape), max(info.shape)
            if o.min_evals <= small <= o.max_evals and big <= o.max_n:
                out.append(name)
        return out

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        out = self.new_rows("float64", f"torch-{torch.__version__}/{ctx.device}", entropy_epsilon=ENTROPY_EPSILON,
                            kde_bandwidth=KDE_BANDWIDTH)
        names = self.matrices(ctx)
        ctx.progress.start(len(names))
        for name in names:
            role = classify(name, ctx.family)
            values = self.metrics(ctx, name, role.component, out)
            if values:
                out.add_metrics(name, role.layer, role.component, values, tier="exact")
            ctx.progress.advance()
        return out

    def metrics(self, ctx: AnalysisContext, name: str, component: str, out: RunRows) -> dict[str, float]:
        """All metrics of one matrix; {} (with an anomaly) when it holds NaN/Inf."""
        shape = ctx.checkpoint.tensors[name].shape
        n, m = max(shape), min(shape)
        sv = ctx.shared.get(("sv", name, component))
        w = None
        if sv is None or self.options.rand_distance:
            w = orient(name, ctx.family, ctx.checkpoint.read(name))
            if not _finite(w):
                out.anomalies.append((name, "non_finite", "NaN or Inf values; mp_fit skipped this matrix"))
                return {}
            if sv is None:
                sv = singular_values(w.to(ctx.device))
        sv = np.asarray(sv, dtype=np.float64)
        if sv.size and sv.min() < GRAM_RESOLUTION * math.sqrt(m) * sv.max():
            # A Gram eigensolve leaves a zero σ at ~1e-8 σ_max, above WW's rank tolerance σ_max·n·eps
            # (matrix_entropy's R): only an SVD tells a rank-deficient matrix's zeros apart.
            w = orient(name, ctx.family, ctx.checkpoint.read(name)) if w is None else w
            sv = torch.linalg.svdvals(w.to(ctx.device, torch.float64)).cpu().numpy()
        evals = np.sort(sv**2)
        values: dict[str, float] = {"matrix_entropy": matrix_entropy(evals, n),
                                    "log_alpha_norm": log_alpha_norm(evals, fit_power_law(evals).alpha)}
        fit = mp_fit(evals, n, m)
        if fit is not None:
            values.update({key: float(getattr(fit, key)) for key in MP_METRICS})
        if w is not None and self.options.rand_distance:
            rand = singular_values(permuted(w, [self.options.seed, zlib.crc32(name.encode())]).to(ctx.device))
            values["rand_distance"] = jensen_shannon_distance(evals, np.sort(rand**2))
        return {k: v for k, v in values.items() if math.isfinite(v)}


def _finite(w: torch.Tensor) -> bool:
    """isfinite in chunks (on the whole tensor it allocates a bool copy of it)."""
    flat = w.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + CHUNK_ELEMENTS]).all()) for i in range(0, flat.numel(), CHUNK_ELEMENTS))
