"""The `fast` spectrum tier: rank and norm metrics of large matrices without an eigensolve.

Pure math, no I/O. The exact tier (spectral.py) builds the float64 Gram matrix of the smaller
side and eigensolves it: n·m² + O(m³) work for an n x m matrix (m ≤ n), all of it spent even when
only σ₁ and a few summaries are wanted. Here W is only ever applied to blocks of vectors:

- ‖W‖_F is exact: a float64 sum of squares, one chunk of rows at a time.
- The top singular values come from randomized block Lanczos with full reorthogonalisation on
  G = WᵀW (the smaller side), applied as Wᵀ(W X): the Gram matrix is never formed. Blocks, because
  a CPU matmul streams W from memory once per product either way: on a 20480 x 5120 matrix a
  64-column product costs as much as about five single ones.
- effective_rank needs Σσ and Σσ ln σ over *all* singular values: traces of two functions of G.
  They are estimated by stochastic Lanczos quadrature from the same Krylov basis: the first block
  is Rademacher probes X, and the Ritz pairs give block Gauss quadrature for tr(Xᵀ f(G) X). Ritz
  pairs whose vectors have converged (the top of the spectrum, where Hutchinson's estimator is
  noisiest) are deflated: they contribute f(σ) exactly, only the rest is estimated.

Precision. Products run in float32 on a float32 working copy (float64 when W is float64); a
float64 copy of a large matrix is never made. float32 products cannot resolve eigenvalues of G
below ~eps₃₂·σ₁² (σ below ~3e-4·σ₁), which is where the tail of a low-rank delta lives, so:
the projected matrix is T = (WQ)ᵀ(WQ), from the kept blocks W·Qⱼ with the inner products
accumulated in float64 (coefficients of Wᵀ(WQ) would carry errors of order eps₃₂·σ₁²), which puts
the Ritz values within ~eps₃₂·σ₁ of the singular values instead of √eps₃₂·σ₁; and the very first
product, whose probes still contain the dominant directions at full weight, is done in float64
(chunked) so that rounding of the top does not swamp the tail in the Krylov basis.
On CUDA, TF32 is switched off for the products.

Error bounds. The constants below are what tests/test_tiers.py asserts on Pythia's shapes
(smaller side 512 and 768, and a 50304-row embedding) for Gaussian init, planted power-law
spectra and low-rank fp16 deltas. effective_rank is the only statistical metric: its error comes
from the `block` probes (FastSpectrum.effective_rank_rse estimates it) and from slow quadrature
convergence near σ = 0 on square matrices, and shrinks as the smaller side grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.analyzers.parallel import one_blas_thread
from ckptscope.analyzers.spectral import CHUNK_ELEMENTS, rank_norm_metrics, singular_values

__all__ = [
    "EFFECTIVE_RANK_RTOL",
    "SPECTRAL_NORM_RTOL",
    "STABLE_RANK_RTOL",
    "TOP_K_RTOL",
    "FastSpectrum",
    "fast_spectrum",
]

SPECTRAL_NORM_RTOL = 1e-6  # |σ̂₁ - σ₁| / σ₁
STABLE_RANK_RTOL = 2 * SPECTRAL_NORM_RTOL  # ‖W‖_F is exact: only σ₁² contributes
TOP_K_RTOL = 1e-5  # |σ̂ᵢ - σᵢ| / σ₁ for every value in top_sv
EFFECTIVE_RANK_RTOL = 2e-2  # |r̂ - r| / r

MIN_FAST_SIDE = 256  # up to this smaller side the exact tier is used: milliseconds, and exact
_SAFETY = 4.0  # numerical_rank / energy_rank_99 need this margin over the error estimates
_SETTLED = 1e-4  # the effective-rank estimate counts as settled below this relative change
_CHECK_GROWTH = 1.25  # Ritz pairs are computed when the basis has grown by this factor
_ANGLE = 1e-2  # deflate only Ritz pairs whose vectors have converged to this angle (see _iterate)


@dataclass(frozen=True)
class FastSpectrum:
    """Result of `fast_spectrum`.

    top_sv: the leading singular values (float64 numpy, descending, at most k): the leading run
    of values whose error estimate is at most tol·σ₁; all k unless the budget ran out first
    (a Gaussian-like bulk with m in the thousands can leave it short, or empty).
    metrics: the keys of spectral.rank_norm_metrics that could be determined, with the same
    meanings; numerical_rank and energy_rank_99 are absent unless top_sv settles them.
    effective_rank_rse: jackknife estimate (over the probes) of effective_rank's relative
    standard error; 0 when exact.
    products: how many vectors WᵀW was applied to, the cost unit (0 when exact).
    exact: True when the exact tier computed everything.
    """

    top_sv: np.ndarray
    metrics: dict[str, float]
    effective_rank_rse: float
    products: int
    exact: bool


def fast_spectrum(w: torch.Tensor, *, k: int = 32, rtol: float = 1e-3, seed: int = 0,
                  minus: torch.Tensor | None = None, block: int = 64, max_products: int = 1024,
                  tol: float = 1e-5) -> FastSpectrum:
    """Norm and rank metrics of a 2-D tensor, or of w - minus, by matrix-free Krylov methods.

    k: leading singular values wanted (they also decide numerical_rank and energy_rank_99).
    rtol: numerical_rank's tolerance, as in spectral.rank_norm_metrics. seed: the Rademacher
    probes; a seed gives bit-identical results on one machine. block: vectors per product (at
    most the smaller side / 16, so that the basis can grow 16 blocks deep: depth, not width, is
    what makes σ₁ converge), also the number of probes for effective_rank. max_products: the
    budget, in vectors multiplied by WᵀW; iteration stops earlier once the top k values have error
    estimates below tol·σ₁ and the effective-rank estimate has settled. The *_RTOL constants
    hold for the defaults.

    `minus` (same shape) analyzes W - R, e.g. the delta to a reference checkpoint. The difference
    is formed once, chunk by chunk, into the float32 working copy that is made anyway: no extra
    memory and no extra work per product, where applying W and R separately inside the operator
    would double every product. ‖W - R‖_F is summed in float64 from the stored values, so it is
    exact however small the difference.

    Runs on w's device, for fp16/bf16/fp32/fp64 and either orientation (wide matrices use WWᵀ).
    The exact tier (spectral.singular_values + rank_norm_metrics, exact=True) is used when
    k ≥ the smaller side or the smaller side is at most MIN_FAST_SIDE. An all-zero matrix gives
    the exact tier's values: norms and counting ranks 0, stable and effective rank NaN. Non-finite
    values raise ValueError.

    Cost: about products x 4·n·m float32 flops plus, per block, float64 work of order
    (n + m) x basis size x block. Extra memory: the float32 working copy (none when W is float32
    or float64 and `minus` is None) and max_products x (n + 2m) float64 for the basis and the
    kept products.
    """
    if w.ndim != 2:
        raise ValueError(f"fast_spectrum() needs a 2-D tensor, got shape {tuple(w.shape)}")
    if minus is not None and minus.shape != w.shape:
        raise ValueError(f"minus has shape {tuple(minus.shape)}, w has {tuple(w.shape)}")
    if k < 1 or block < 1:
        raise ValueError(f"k and block must be >= 1, got k={k}, block={block}")
    side = min(w.shape)
    if side <= max(k, MIN_FAST_SIDE):
        return _exact(w, minus, k, rtol)
    a, frob_sq = _working_copy(w, minus)
    if not math.isfinite(frob_sq):
        raise ValueError("fast_spectrum() needs finite values")
    if frob_sq == 0.0:
        return FastSpectrum(np.zeros(k), rank_norm_metrics(np.zeros(1), rtol=rtol), 0.0, 0, False)

    # At least 16 blocks fit in the space: depth, not width, is what makes σ₁ converge.
    lanczos = _BlockLanczos(a, block=min(block, side // 16), max_products=max_products, seed=seed)
    top, err, erank, rse = _iterate(lanczos, k=min(k, lanczos.capacity), tol=tol)
    sigma1 = float(top[0])
    # Ritz residuals measure Krylov convergence, not rounding: products in the working dtype
    # leave every value uncertain by ~eps·σ₁ however converged (float32: 1.2e-7·σ₁).
    err = np.maximum(err, torch.finfo(a.dtype).eps * sigma1)
    metrics = {
        "frobenius_norm": math.sqrt(frob_sq),
        "spectral_norm": sigma1,
        "stable_rank": frob_sq / sigma1**2,
        "effective_rank": erank,
    }
    # The ranks use every value with its error estimate; top_sv only the leading run within tol.
    if (n := _numerical_rank(top, err, rtol)) is not None:
        metrics["numerical_rank"] = float(n)
    if (n := _energy_rank(top, err, frob_sq)) is not None:
        metrics["energy_rank_99"] = float(n)
    within = err <= tol * sigma1
    count = top.size if within.all() else int(np.argmin(within))
    return FastSpectrum(top[:count].copy(), metrics, rse, lanczos.dim, False)


def _exact(w: torch.Tensor, minus: torch.Tensor | None, k: int, rtol: float) -> FastSpectrum:
    """The exact tier, for matrices too small for the Krylov method to pay off."""
    m = w if minus is None else w.to(torch.float64) - minus.to(device=w.device, dtype=torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("fast_spectrum() needs finite values")
    sv = singular_values(m)
    return FastSpectrum(sv[:k].copy(), rank_norm_metrics(sv, rtol=rtol), 0.0, 0, True)


def _working_copy(w: torch.Tensor, minus: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(A, ‖W - minus‖_F²): A holds W - minus in the product dtype, oriented tall (wide W: a view).

    One pass over the stored rows: each chunk is upcast to float64 once, for the exact sum of
    squares and the difference, then written into the float32 (float64) working copy.
    A float32/float64 W without `minus` is used in place.
    """
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.detach()
    in_place = minus is None and w.dtype == work
    out = w if in_place else torch.empty(w.shape, dtype=work, device=w.device)
    rows = max(1, CHUNK_ELEMENTS // max(w.shape[1], 1))
    frob_sq = 0.0
    for s in range(0, w.shape[0], rows):
        part = w[s : s + rows].to(torch.float64)
        if minus is not None:
            part -= minus[s : s + rows].detach().to(device=w.device, dtype=torch.float64)
        flat = part.reshape(-1)
        frob_sq += float(torch.dot(flat, flat))
        if not in_place:
            out[s : s + rows] = part
    return (out if w.shape[0] >= w.shape[1] else out.T), frob_sq


@dataclass
class _Ritz:
    """Ritz values θ (descending) of G on the current basis, their residual norms ‖Gu - θu‖,
    and quadrature weights (x_cᵀu_j)² for every probe c (rows) and Ritz vector u_j (columns)."""

    theta: np.ndarray
    residual: np.ndarray
    weights: np.ndarray


class _BlockLanczos:
    """Block Lanczos with full reorthogonalisation on G = AᵀA, from Rademacher probes.

    Each new block is orthogonalised twice against the whole basis (classical Gram-Schmidt
    twice, as matmuls). T = QᵀGQ is accumulated from the kept products Pⱼ = A·Qⱼ as PᵀP in
    float64, which is accurate to eps₃₂·σ₁ in σ where coefficients from Aᵀ(AQ) would not be.
    """

    def __init__(self, a: torch.Tensor, *, block: int, max_products: int, seed: int) -> None:
        self.a, self.block = a, block
        long, m = a.shape
        self.capacity = block * max(1, min(max_products // block, m // block - 1))
        self.gen = torch.Generator().manual_seed(seed)
        f64 = {"dtype": torch.float64, "device": a.device}
        with one_blas_thread():
            q0, self.r0 = torch.linalg.qr(self._rademacher(m, block))
        self.basis = torch.empty((m, self.capacity + block), **f64)
        self.basis[:, :block] = q0
        self.images = torch.empty((long, self.capacity), **f64)  # A·Q, kept for T, never recomputed
        self.t = torch.zeros((self.capacity, self.capacity), **f64)
        self.coupling = torch.zeros((block, block), **f64)  # B in G·Q_last = ... + Q_next·B
        self.dim = 0

    def _rademacher(self, rows: int, cols: int) -> torch.Tensor:
        # Drawn by the CPU generator, so a seed gives the same probes on every device.
        signs = torch.randint(0, 2, (rows, cols), generator=self.gen, dtype=torch.float64) * 2 - 1
        return signs.to(self.a.device)

    def extend(self) -> None:
        """One block step: multiply the newest block, extend T, orthonormalise the next block."""
        lo, hi = self.dim, self.dim + self.block
        if lo == 0:
            p, z = _product64(self.a, self.basis[:, lo:hi])
        else:
            with _full_fp32_precision(self.a.device):
                p = self.a @ self.basis[:, lo:hi].to(self.a.dtype)
                z = (self.a.T @ p).to(torch.float64)
        self.images[:, lo:hi] = p
        cross = self.images[:, :hi].T @ self.images[:, lo:hi]
        self.t[:hi, lo:hi] = cross
        self.t[lo:hi, :hi] = cross.T
        done = self.basis[:, :hi]
        for _ in range(2):
            z -= done @ (done.T @ z)
        q = self._orthonormal(z, done)
        self.basis[:, hi : hi + self.block] = q
        self.coupling = q.T @ z
        self.dim = hi

    def _orthonormal(self, z: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis of z's columns (already projected off `done`), orthogonal to `done`.

        A column of z (numerically) inside span(done), e.g. when G has low rank, comes out of QR
        as rounding noise that is not orthogonal to the basis; such columns are replaced by
        random vectors, which keeps the basis orthonormal so that T stays a valid projection.
        """
        with one_blas_thread():
            q, _ = torch.linalg.qr(z)
            for _ in range(3):
                q = q - done @ (done.T @ q)
                q, r = torch.linalg.qr(q)
                lost = r.diagonal().abs() < 0.5  # unit columns that lost half their length
                if not bool(lost.any()):
                    break
                q[:, lost] = self._rademacher(q.shape[0], int(lost.sum())) / math.sqrt(q.shape[0])
        return q

    def ritz(self) -> _Ritz:
        """Ritz pairs of the current basis.

        With G·Q = Q·T + Q_next·B·E_lastᵀ, the residual of the Ritz vector Q·y is ‖B·y_last‖
        (y_last: the last block of y), and with X = Q₀R₀ the quadrature weight of probe c is
        (R₀ᵀ·y_first)_c²: only Q₀ meets the probes.
        """
        with one_blas_thread():
            theta, y = torch.linalg.eigh(self.t[: self.dim, : self.dim])
        theta, y = theta.flip(0), y.flip(1)
        residual = torch.linalg.norm(self.coupling @ y[self.dim - self.block :], dim=0)
        weights = (self.r0.T @ y[: self.block]) ** 2
        return _Ritz(theta.cpu().numpy(), residual.cpu().numpy(), weights.cpu().numpy())


def _product64(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A·x, Aᵀ·A·x) in float64, converting A one chunk of rows at a time."""
    rows = max(1, CHUNK_ELEMENTS // max(a.shape[1], 1))
    p = torch.empty((a.shape[0], x.shape[1]), dtype=torch.float64, device=a.device)
    z = torch.zeros((a.shape[1], x.shape[1]), dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[0], rows):
        chunk = a[s : s + rows].to(torch.float64)
        p[s : s + rows] = chunk @ x
        z.addmm_(chunk.T, p[s : s + rows])
    return p, z


def _iterate(lanczos: _BlockLanczos, *, k: int, tol: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Block steps until the top k are within tol·σ₁ and the quadrature has settled, or the budget.

    Returns the top k singular values, their error estimates, effective_rank and its relative
    standard error. Every Ritz pair within tol·σ₁, anywhere in the spectrum, is deflated.
    """
    previous = math.nan
    next_check = 0
    while True:
        lanczos.extend()
        last = lanczos.dim >= lanczos.capacity
        if lanczos.dim < next_check and not last:
            continue
        next_check = int(_CHECK_GROWTH * lanczos.dim)  # eigensolves of T stay a fraction of the work
        ritz = lanczos.ritz()
        sigma = np.sqrt(np.clip(ritz.theta, 0.0, None))
        err = _sv_errors(ritz.theta, ritz.residual)
        converged = err <= tol * sigma[0]
        vectors_converged = _angles(ritz.theta, ritz.residual) <= _ANGLE
        erank, rse = _effective_rank(sigma, ritz.weights, converged & vectors_converged)
        settled = abs(erank - previous) <= _SETTLED * erank
        previous = erank
        if (lanczos.dim >= k and converged[:k].all() and settled) or last:
            return sigma[:k], err[:k], erank, rse


class _full_fp32_precision:
    """Switch TF32 off for float32 matmuls on CUDA (set_float32_matmul_precision("high") would
    cost three decimal digits) and restore the caller's setting afterwards."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cuda"

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.set_float32_matmul_precision(self.saved)


def _sv_errors(theta: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Error estimates of the singular values √θ from the Ritz residuals.

    An eigenvalue of G lies within r of θ, and within r²/gap when the gap to the rest of the
    spectrum is known; the neighbouring Ritz values stand in for it, so min(r, r²/gap) is an
    estimate, not a bound. In σ it is the half width of [√(θ - δ), √(θ + δ)], which stays
    meaningful near σ = 0.
    """
    theta = np.clip(theta, 0.0, None)
    gaps = np.abs(np.diff(theta))
    gap = np.minimum(np.concatenate(([np.inf], gaps)), np.concatenate((gaps, [np.inf])))
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.minimum(residual, np.where(gap > 0, residual**2 / gap, np.inf))
    return (np.sqrt(theta + delta) - np.sqrt(np.clip(theta - delta, 0.0, None))) / 2


def _angles(theta: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Estimated angle between each Ritz vector and its eigenvector: r / gap (Davis-Kahan)."""
    gaps = np.abs(np.diff(theta))
    gap = np.minimum(np.concatenate(([np.inf], gaps)), np.concatenate((gaps, [np.inf])))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, residual / gap, np.inf)


def _effective_rank(sigma: np.ndarray, weights: np.ndarray, deflated: np.ndarray) -> tuple[float, float]:
    """exp(H), H = ln S - T/S with S = Σσ and T = Σσ ln σ, and its jackknife relative error.

    Deflated Ritz values enter with weight 1, the others with each probe's quadrature weight;
    S and T are averaged over the probes before the ratio is taken. The jackknife over probes
    gives the standard error of H, which is the relative standard error of exp(H).
    """
    f1 = sigma
    f2 = sigma * np.log(np.where(sigma > 0, sigma, 1.0))  # 0·ln 0 = 0, as in rank_norm_metrics
    rest = weights[:, ~deflated]
    per_s = f1[deflated].sum() + rest @ f1[~deflated]  # one estimate of S per probe
    per_t = f2[deflated].sum() + rest @ f2[~deflated]
    s, t = float(per_s.mean()), float(per_t.mean())
    h = math.log(s) - t / s
    b = per_s.size
    s_out = (b * s - per_s) / (b - 1)  # leave-one-probe-out means
    t_out = (b * t - per_t) / (b - 1)
    h_out = np.log(s_out) - t_out / s_out
    rse = math.sqrt((b - 1) / b * float(np.sum((h_out - h_out.mean()) ** 2)))
    return math.exp(h), rse


def _numerical_rank(top: np.ndarray, err: np.ndarray, rtol: float) -> int | None:
    """#{σ > rtol·σ₁} when the values settle it, else None.

    Settled when the last value is certainly below the threshold (so are all later ones: they
    are no larger) and no value is within its error of the threshold.
    """
    if top.size == 0:
        return None
    threshold = rtol * top[0]
    margin = _SAFETY * (err + rtol * err[0])
    if top[-1] + margin[-1] >= threshold or np.any(np.abs(top - threshold) <= margin):
        return None
    return int(np.count_nonzero(top > threshold))


def _energy_rank(top: np.ndarray, err: np.ndarray, frob_sq: float) -> int | None:
    """Fewest leading σ with Σσ² ≥ 0.99‖W‖_F², when the values settle it, else None.

    ‖W‖_F² is exact; a partial sum of the estimates is off by at most Σ(2σᵢeᵢ + eᵢ²). Settled
    when the sum up to the answer is certainly ≥ the target and the one before it certainly below.
    """
    if top.size == 0:
        return None
    target = 0.99 * frob_sq
    energy = np.cumsum(top**2)
    slack = _SAFETY * np.cumsum(2 * top * err + err**2)
    n = int(np.searchsorted(energy, target, side="left"))
    if n == top.size or energy[n] - slack[n] < target:
        return None
    if n > 0 and energy[n - 1] + slack[n - 1] >= target:
        return None
    return n + 1
