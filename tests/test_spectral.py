"""Tests for ckptscope.analyzers.spectral: every metric against an independent
float64 computation, planted structure, and WeightWatcher itself."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptscope.analyzers.spectral import (
    PowerLawFit,
    add_gram_,
    fit_power_law,
    gram,
    heavy_tail_metrics,
    rank_norm_metrics,
    singular_values,
    singular_values_from_gram,
    vector_metrics,
)


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def _with_spectrum(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """m x n float64 matrix with exactly the singular values s (len min(m, n))."""
    k = min(m, n)
    return (_orthonormal(rng, m, k) * s) @ _orthonormal(rng, n, k).T


# ---------------------------------------------------------------- singular values


@functools.cache  # built once, shared read-only by the parametrized tests
def _svd_cases() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    k = 100
    return {
        "tall_f32": torch.randn(300, 120, generator=gen),
        "wide_f64": torch.randn(80, 250, generator=gen, dtype=torch.float64),
        "square_f32": torch.randn(150, 150, generator=gen),
        "tall_f16": torch.randn(200, 90, generator=gen).half(),
        "wide_bf16": torch.randn(90, 200, generator=gen).bfloat16(),
        "cond_1e14": torch.from_numpy(_with_spectrum(rng, 200, k, 37.0 * np.logspace(0, -14, k))),
    }


@pytest.mark.parametrize("name", list(_svd_cases()))
def test_singular_values_match_numpy_svd(name: str) -> None:
    w = _svd_cases()[name]
    # Reference: SVD of the *stored* values, upcast (fp16/bf16 -> fp32 is exact).
    ref = np.linalg.svd(w.double().numpy(), compute_uv=False)
    got = singular_values(w)
    assert got.dtype == np.float64
    assert got.shape == (min(w.shape),)
    assert np.all(np.diff(got) <= 0), "must be descending"
    assert abs(got[0] - ref[0]) <= 1e-10 * ref[0]
    assert np.max(np.abs(got - ref)) <= 1e-7 * ref[0]


@pytest.mark.parametrize("shape", [(257, 31), (31, 257), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gram_chunked_equals_unchunked(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g_small = gram(w, chunk=7)
    g_big = gram(w, chunk=10_000)
    w64 = w.double()
    expected = w64.T @ w64 if shape[0] >= shape[1] else w64 @ w64.T
    side = min(shape)
    assert g_small.dtype == g_big.dtype == torch.float64
    assert g_small.shape == g_big.shape == (side, side)
    assert g_small.device == w.device
    torch.testing.assert_close(g_small, g_big, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_big, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", [255, 256, 257, 600, 1031])
def test_add_gram_lower_triangle_equals_the_full_product(side: int) -> None:
    a = torch.randn(side + 40, side, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    g = torch.full((side, side), 0.5, dtype=torch.float64)
    add_gram_(g, a)
    expected = 0.5 + a.T @ a
    torch.testing.assert_close(g.tril(), expected.tril(), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(gram(a), a.T @ a, rtol=1e-13, atol=1e-12)  # gram() mirrors it
    torch.testing.assert_close(gram(a, mirror=False).tril(), (a.T @ a).tril(), rtol=1e-13, atol=1e-12)


def test_gram_input_checks_and_no_grad() -> None:
    with pytest.raises(ValueError):
        gram(torch.zeros(3))
    with pytest.raises(ValueError):
        gram(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        gram(torch.zeros(3, 3), chunk=0)
    w = torch.randn(5, 3, requires_grad=True)
    assert not gram(w).requires_grad


def test_singular_values_from_gram_clips_negative_rounding() -> None:
    g = torch.diag(torch.tensor([4.0, 1.0, -1e-18], dtype=torch.float64))
    np.testing.assert_array_equal(singular_values_from_gram(g), [2.0, 1.0, 0.0])


# ---------------------------------------------------------------- rank / norm metrics


def _reference_rank_norm(sv: list[float], rtol: float) -> dict[str, float]:
    """Plain float64 loops, written independently of the implementation."""
    s = sorted((float(v) for v in sv), reverse=True)
    total = 0.0
    for v in s:
        total += v * v
    nuclear = 0.0
    for v in s:
        nuclear += v
    entropy = 0.0
    for v in s:
        if v > 0:
            p = v / nuclear
            entropy -= p * math.log(p)
    rank = 0
    for v in s:
        if v > rtol * s[0]:
            rank += 1
    running, energy_rank = 0.0, 0
    for v in s:
        running += v * v
        energy_rank += 1
        if running >= 0.99 * total:
            break
    return {
        "frobenius_norm": math.sqrt(total),
        "spectral_norm": s[0],
        "stable_rank": total / s[0] ** 2,
        "effective_rank": math.exp(entropy),
        "numerical_rank": float(rank),
        "energy_rank_99": float(energy_rank),
    }


@pytest.mark.parametrize(
    "sv",
    [
        np.random.default_rng(2).gamma(2.0, size=40),
        np.r_[np.random.default_rng(3).random(25) * 5, np.zeros(7)],
        np.r_[np.full(10, 3.0), np.full(5, 1e-4)],  # ties, and values below rtol
        np.array([2.5]),
        np.logspace(2, -6, 50),
    ],
    ids=["gamma", "with_zeros", "ties", "single", "logspace"],
)
@pytest.mark.parametrize("rtol", [1e-3, 1e-1])
def test_rank_norm_metrics_match_reference(sv: np.ndarray, rtol: float) -> None:
    shuffled = np.random.default_rng(4).permutation(sv)  # order must not matter
    got = rank_norm_metrics(shuffled, rtol=rtol)
    ref = _reference_rank_norm(list(sv), rtol)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("r", [1, 5, 17])
def test_planted_low_rank(r: int) -> None:
    rng = np.random.default_rng(r)
    w = rng.standard_normal((200, r)) @ rng.standard_normal((r, 150))
    assert rank_norm_metrics(singular_values(torch.from_numpy(w)))["numerical_rank"] == r
    # Transposed and in float32 storage too.
    w32 = torch.from_numpy(w.T.copy()).float()
    assert rank_norm_metrics(singular_values(w32))["numerical_rank"] == r


@pytest.mark.parametrize("r", [1, 5, 17])
def test_rank_of_checkpoint_delta(r: int) -> None:
    gen = torch.Generator().manual_seed(10 + r)
    w0 = torch.randn(256, 192, generator=gen)
    update = 0.01 * torch.randn(256, r, generator=gen) @ torch.randn(r, 192, generator=gen)
    w1 = w0 + update  # float32 storage: the subtraction below carries rounding noise
    metrics = rank_norm_metrics(singular_values(w1 - w0))
    assert metrics["numerical_rank"] == r
    assert metrics["energy_rank_99"] <= r


def test_identity_ranks() -> None:
    n = 64
    metrics = rank_norm_metrics(singular_values(torch.eye(n)))
    assert metrics["effective_rank"] == pytest.approx(n, rel=1e-12)
    assert metrics["stable_rank"] == pytest.approx(n, rel=1e-12)
    assert metrics["numerical_rank"] == n
    assert metrics["energy_rank_99"] == n
    assert metrics["frobenius_norm"] == pytest.approx(math.sqrt(n), rel=1e-12)
    assert metrics["spectral_norm"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    ("sigma", "expected"),
    [
        # energies 100, 25, 9, 1, .25, .01, 1e-4: 99% of 135.26 = 133.91 -> 3 leading values
        ([10, 5, 3, 1, 0.5, 0.1, 0.01], 3),
        # one dominant direction holding > 99% of the energy
        ([100, 1, 1, 1, 1], 1),
        # 20 equal values and a tiny tail: 99% needs 20 of them
        ([1.0] * 20 + [1e-3] * 10, 20),
        # energies 81, 9, 9, 1: exactly 99% after 3 values ("reaches >= 99%")
        ([9, 3, 3, 1], 3),
    ],
)
def test_energy_rank_on_diagonal(sigma: list[float], expected: int) -> None:
    w = torch.zeros(len(sigma) + 3, len(sigma), dtype=torch.float64)
    w[: len(sigma)] = torch.diag(torch.tensor(sigma, dtype=torch.float64))
    assert rank_norm_metrics(singular_values(w))["energy_rank_99"] == expected
    assert rank_norm_metrics(np.array(sigma, dtype=np.float64))["energy_rank_99"] == expected


def test_zero_matrix() -> None:
    sv = singular_values(torch.zeros(7, 5, dtype=torch.float16))
    np.testing.assert_array_equal(sv, np.zeros(5))
    metrics = rank_norm_metrics(sv)
    assert metrics["frobenius_norm"] == 0.0
    assert metrics["spectral_norm"] == 0.0
    assert metrics["numerical_rank"] == 0.0
    assert metrics["energy_rank_99"] == 0.0
    assert math.isnan(metrics["stable_rank"])
    assert math.isnan(metrics["effective_rank"])
    heavy = heavy_tail_metrics(sv)
    assert heavy["log_norm"] == -math.inf
    assert heavy["log_spectral_norm"] == -math.inf
    assert math.isnan(heavy["alpha"]) and math.isnan(heavy["alpha_weighted"])
    assert heavy["num_pl_spikes"] == 0.0


# ---------------------------------------------------------------- power-law fit


def _pareto(rng: np.random.Generator, alpha: float, n: int, xmin: float = 1.0) -> np.ndarray:
    """Inverse-transform samples of the density ∝ x^-alpha on [xmin, inf)."""
    return xmin * rng.random(n) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.5, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_recovers_pareto_exponent(alpha: float, seed: int) -> None:
    fit = fit_power_law(_pareto(np.random.default_rng(seed), alpha, 2000, xmin=0.3))
    assert fit.alpha == pytest.approx(alpha, abs=0.15)
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.num_pl_spikes), rel=1e-12)


def _naive_fit(
    evals: np.ndarray, thresh: float = 1e-5
) -> tuple[float, float, float, float, int] | None:
    """WeightWatcher 0.7.7's default WWFit semantics as a plain double loop.

    Candidates x_min = x[i], i < N-1; D uses the empirical CDF (j-i)/n. N >= 20:
    alpha = 1 + n/s, argmin D. N < 20: alpha = 1 + (n-1)/s over tails with n >= 8
    and s > 1e-12, argmin D; none -> fit the whole sample. First index wins ties.
    """
    x = sorted(float(v) for v in evals if v > thresh)
    size = len(x)
    if size < 2:
        return None
    small = size < 20

    def tail(i: int, alpha: float) -> float:
        n = size - i
        dist = 0.0
        for j in range(i, size):
            dist = max(dist, abs(1.0 - (x[j] / x[i]) ** (1.0 - alpha) - (j - i) / n))
        return dist

    def log_sum(i: int) -> float:
        total = 0.0
        for j in range(i, size):
            total += math.log(x[j] / x[i])
        return total

    best = None
    for i in range(size - 1):
        n = size - i
        s = log_sum(i)
        if small:
            if n < 8 or s <= 1e-12:
                continue
            alpha = 1.0 + (n - 1) / s
        else:
            alpha = 1.0 + n / s if s > 0 else math.inf
        dist = tail(i, alpha)
        if best is None or dist < best[0]:
            best = (dist, i, alpha)
    if best is None:
        s = log_sum(0)
        if s <= 1e-12:
            return None
        alpha = 1.0 + (size - 1) / s
        best = (tail(0, alpha), 0, alpha)
    dist, i, alpha = best
    spikes = sum(1 for v in x if v >= x[i])
    return alpha, x[i], dist, (alpha - 1) / math.sqrt(size - i), spikes


@functools.cache  # built once, shared read-only by the parametrized tests
def _fit_datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    mp = np.linalg.svd(rng.standard_normal((180, 120)) / math.sqrt(180), compute_uv=False) ** 2
    heavy = _pareto(rng, 2.2, 250, xmin=0.01)
    return {
        "pareto_300": _pareto(rng, 3.0, 300),
        "marchenko_pastur_120": mp,
        "heavy_with_subthresh": np.r_[heavy, np.full(20, 1e-7), np.zeros(5)],
        "ties": np.repeat(_pareto(rng, 2.5, 40), 3),
        # The chosen x_min is the 2nd of a tied pair: num_pl_spikes must count both.
        "tie_at_xmin": np.repeat(np.random.default_rng(0).random(40) ** (-1 / 1.5), 2),
        "tied_top": np.r_[np.linspace(1.0, 2.0, 25), np.full(10, 3.0)],
        "n20_boundary": _pareto(rng, 2.0, 20),
        "small_19": _pareto(rng, 2.0, 19),
        "small_12": _pareto(rng, 3.0, 12),
        "small_8": _pareto(rng, 3.0, 8),
        "small_5_fallback": _pareto(rng, 3.0, 5),
        "two_fallback": np.array([0.5, 2.0]),
    }


@pytest.mark.parametrize("name", list(_fit_datasets()))
def test_fit_matches_naive_reference(name: str) -> None:
    evals = _fit_datasets()[name]
    fit = fit_power_law(evals)
    alpha, xmin, dist, sigma, spikes = _naive_fit(evals)
    assert isinstance(fit, PowerLawFit)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == xmin
    assert fit.ks_distance == pytest.approx(dist, rel=1e-12, abs=1e-14)
    assert fit.sigma == pytest.approx(sigma, rel=1e-12)
    assert fit.num_pl_spikes == spikes


# WW itself warns when it divides by zero (alpha = inf on a tied tail).
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("name", list(_fit_datasets()))
def test_fit_matches_weightwatcher_wwfit(name: str) -> None:
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    evals = _fit_datasets()[name]
    fit = fit_power_law(evals)
    # WW's fit_powerlaw() passes evals > EVALS_THRESH (1e-5) to WWFit.
    ref = ww_powerlaw.WWFit(evals[evals > 1e-5])
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert fit.xmin == pytest.approx(ref.xmin, rel=1e-9)
    assert fit.ks_distance == pytest.approx(ref.D, rel=1e-9, abs=1e-12)
    assert fit.num_pl_spikes == int(np.sum(evals >= ref.xmin))
    if "fallback" not in name:  # WW reports a stale sigma there (documented deviation)
        assert fit.sigma == pytest.approx(ref.sigma, rel=1e-9)


def test_fit_tie_break_takes_smallest_xmin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal KS distances: the first candidate (smallest x_min) wins, like np.argmin in WW, in the
    large-sample search (bounds, then exact rows) and in the small-sample fit."""
    from ckptscope.analyzers import spectral

    x = np.array([1.0, 1.0, 2.0, 3.0] + list(range(4, 24)), dtype=np.float64)
    count = x.size - 1
    dists = np.full(count, 0.5)
    dists[[7, 3, 1]] = 0.1  # three-way tie; index 1 is the 2nd of the tied pair x[0] == x[1]
    monkeypatch.setattr(spectral, "_ks_distances", lambda logs, rows, alphas, tails, columns: dists[rows])
    fit = fit_power_law(x)
    assert fit.alpha == spectral._candidate_fits(x, bias=0)[0][1]
    assert fit.xmin == 1.0
    assert fit.ks_distance == 0.1
    assert fit.num_pl_spikes == x.size  # the tie below index 1 counts too (λ >= x_min)

    small = x[:12]  # under 20 eigenvalues: WW's small-N fit, tails of at least 8
    alphas, tied = np.linspace(2.0, 3.0, small.size - 1), np.full(small.size - 1, 0.5)
    tied[[3, 1]] = 0.1
    monkeypatch.setattr(spectral, "_candidate_fits", lambda data, bias: (alphas, tied, np.ones(small.size - 1)))
    fit = fit_power_law(small)
    assert (fit.alpha, fit.xmin, fit.ks_distance) == (alphas[1], 1.0, 0.1)


def test_large_sample_search_equals_the_full_argmin() -> None:
    """The bounded search of the large-sample fit picks, to the bit, what argmin over every
    candidate's exact KS distance picks: heavy-tailed, Gaussian and low-rank-plus-noise spectra
    of 20 to 1000 eigenvalues."""
    from ckptscope.analyzers import spectral

    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(120):
        n = int(rng.integers(20, 1000))
        m = n + int(rng.integers(0, 3 * n))
        w = (rng.standard_t(2 + trial % 5, size=(m, n)) if trial % 3 == 0 else rng.standard_normal((m, n)) if trial % 3 == 1
             else rng.standard_normal((m, 8)) @ rng.standard_normal((8, n)) + 0.01 * rng.standard_normal((m, n)))
        ev = np.linalg.eigvalsh(w.T @ w / m)
        x = np.sort(ev[ev > spectral.EVALS_THRESH])
        if x.size < 20:
            continue
        alphas, dists, _ = spectral._candidate_fits(x, bias=0)
        want = int(np.argmin(dists))
        assert spectral._best_candidate(x) == (want, alphas[want], dists[want]), (trial, n)
        checked += 1
    assert checked > 80
    # no finite KS distance (an infinite eigenvalue): np.argmin's choice, the first candidate
    x = np.r_[np.linspace(1.0, 30.0, 40), np.inf]
    with np.errstate(invalid="ignore"):
        alphas, dists, _ = spectral._candidate_fits(x, bias=0)
        best, alpha, dist = spectral._best_candidate(x)
    assert (best, alpha) == (int(np.argmin(dists)), alphas[0]) == (0, 1.0) and math.isnan(dist)


def test_fit_degenerate_inputs_are_nan() -> None:
    for evals in [np.array([]), np.array([3.0]), np.array([1e-6, 2e-6, 5.0]), np.full(6, 2.0)]:
        fit = fit_power_law(evals)
        assert math.isnan(fit.alpha) and math.isnan(fit.xmin), evals
        assert fit.num_pl_spikes == 0


def test_fit_threshold_is_strict_and_configurable() -> None:
    evals = _pareto(np.random.default_rng(11), 2.5, 60)
    padded = np.r_[evals, np.full(10, 1e-5)]  # exactly at thresh: dropped (λ > thresh)
    assert fit_power_law(padded) == fit_power_law(evals)
    # A small sample where keeping λ == thresh would change the fit (tail of 8 vs 5).
    few = np.array([0.5, 1.0, 2.0, 4.0, 9.0])
    assert fit_power_law(np.r_[few, np.full(3, 1e-5)]) == fit_power_law(few)
    assert fit_power_law(np.r_[few, np.full(3, 1e-5)], thresh=9e-6).xmin == 1e-5
    assert fit_power_law(evals, thresh=np.sort(evals)[29]) == fit_power_law(np.sort(evals)[30:])


def test_fit_large_n_is_blocked_and_consistent() -> None:
    # Crosses many row blocks; the chosen fit must equal a direct evaluation at its x_min.
    evals = _pareto(np.random.default_rng(12), 2.8, 6000, xmin=0.05)
    fit = fit_power_law(evals)
    x = np.sort(evals)
    tail = x[x >= fit.xmin]
    n = tail.size
    alpha = 1 + n / np.sum(np.log(tail / fit.xmin))
    dist = np.max(np.abs(1 - (tail / fit.xmin) ** (1 - alpha) - np.arange(n) / n))
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.ks_distance == pytest.approx(dist, rel=1e-10)
    assert fit.alpha == pytest.approx(2.8, abs=0.15)


# ---------------------------------------------------------------- heavy-tail metrics


def test_heavy_tail_metrics_plain_formulas() -> None:
    sv = np.sqrt(_pareto(np.random.default_rng(13), 2.5, 150, xmin=0.2))
    got = heavy_tail_metrics(sv)
    lam = sv**2
    fit = fit_power_law(lam)
    assert got["log_norm"] == pytest.approx(math.log10(sum(lam)), rel=1e-12)
    assert got["log_spectral_norm"] == pytest.approx(math.log10(max(lam)), rel=1e-12)
    assert got["alpha"] == fit.alpha
    assert got["alpha_weighted"] == pytest.approx(fit.alpha * math.log10(max(lam)), rel=1e-12)
    assert got["alpha_xmin"] == fit.xmin
    assert got["alpha_ks_distance"] == fit.ks_distance
    assert got["alpha_sigma"] == fit.sigma
    assert got["num_pl_spikes"] == float(fit.num_pl_spikes)
    assert all(isinstance(v, float) for v in got.values())


@functools.cache  # built once, shared read-only by the parametrized tests
def _linear_weights() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(14)
    heavy_sv = np.sort(0.05 * (rng.pareto(1.5, 200) + 1.0))[::-1]
    return {
        "default_init": torch.nn.Linear(200, 300).weight.detach().clone(),
        "heavy_tailed": torch.from_numpy(_with_spectrum(rng, 300, 200, heavy_sv)).float(),
        "wide": torch.randn(150, 320, generator=torch.Generator().manual_seed(3)),
    }


@pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")  # inside WW
@pytest.mark.parametrize("name", list(_linear_weights()))
def test_metrics_match_weightwatcher_analyze(name: str) -> None:
    ww = pytest.importorskip("weightwatcher")
    weight = _linear_weights()[name]
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    details = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze()
    assert len(details) == 1
    row = details.iloc[0]
    sv = singular_values(layer.weight)
    heavy = heavy_tail_metrics(sv)
    ranks = rank_norm_metrics(sv)
    for key in ["log_norm", "log_spectral_norm"]:
        assert heavy[key] == pytest.approx(row[key], rel=1e-6), key
    assert ranks["stable_rank"] == pytest.approx(row["stable_rank"], rel=1e-6)
    assert heavy["alpha"] == pytest.approx(row["alpha"], rel=1e-3)
    assert heavy["alpha_weighted"] == pytest.approx(row["alpha_weighted"], rel=1e-3)
    assert heavy["alpha_xmin"] == pytest.approx(row["xmin"], rel=1e-6)
    assert heavy["num_pl_spikes"] == row["num_pl_spikes"]
    assert heavy["alpha_ks_distance"] == pytest.approx(row["D"], rel=1e-6)


# ---------------------------------------------------------------- vector metrics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_vector_metrics(dtype: torch.dtype) -> None:
    v = (3 * torch.randn(1000, generator=torch.Generator().manual_seed(5)) + 0.5).to(dtype)
    x = v.float().numpy().astype(np.float64)  # the stored values, exactly
    got = vector_metrics(v)
    assert got["l2_norm"] == pytest.approx(math.sqrt(sum(t * t for t in x)), rel=1e-12)
    assert got["mean"] == pytest.approx(sum(x) / len(x), rel=1e-12)
    assert got["std"] == pytest.approx(float(np.std(x, ddof=0)), rel=1e-12)  # population std
    assert got["max_abs"] == max(abs(t) for t in x)
    assert all(isinstance(value, float) for value in got.values())


def test_vector_metrics_constant_and_empty() -> None:
    got = vector_metrics(torch.full((4,), -2.0))
    assert got == {"l2_norm": 4.0, "mean": -2.0, "std": 0.0, "max_abs": 2.0}
    empty = vector_metrics(torch.zeros(0))
    assert empty["l2_norm"] == 0.0 and empty["max_abs"] == 0.0
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"])


# ---------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(2, 40),
    cols=st.integers(2, 40),
    inner=st.integers(1, 40),
)
def test_metric_invariances_and_inequalities(seed: int, rows: int, cols: int, inner: int) -> None:
    rng = np.random.default_rng(seed)
    inner = min(inner, rows, cols)  # possibly rank-deficient
    w = rng.standard_normal((rows, inner)) @ rng.standard_normal((inner, cols))
    q_left = _orthonormal(rng, rows, rows)
    q_right = _orthonormal(rng, cols, cols)
    base_sv = singular_values(torch.from_numpy(w))
    base = {**rank_norm_metrics(base_sv), **heavy_tail_metrics(base_sv)}
    for variant in [w.T.copy(), q_left @ w @ q_right]:
        sv = singular_values(torch.from_numpy(variant))
        np.testing.assert_allclose(sv, base_sv, rtol=0, atol=1e-7 * base_sv[0])
        other = {**rank_norm_metrics(sv), **heavy_tail_metrics(sv)}
        for key in ["frobenius_norm", "spectral_norm", "stable_rank", "log_norm",
                    "log_spectral_norm", "numerical_rank", "energy_rank_99"]:
            assert other[key] == pytest.approx(base[key], rel=1e-9), key
        # Exact zeros come back as ~1e-8·σ₁ rounding noise (Gram route) and each
        # adds ~-p ln p ≈ 1e-7 to the entropy, so effective_rank agrees to ~1e-6.
        assert other["effective_rank"] == pytest.approx(base["effective_rank"], rel=1e-4)

    m = base
    k = min(rows, cols)
    s = base_sv
    rtol = 1e-3
    eps = 1e-9
    # Norms: σ₁ ≤ ‖W‖_F ≤ √k σ₁.
    assert m["spectral_norm"] <= m["frobenius_norm"] * (1 + eps)
    assert m["frobenius_norm"] <= math.sqrt(k) * m["spectral_norm"] * (1 + eps)
    # 1 ≤ Σσ²/σ₁² ≤ Σσ/σ₁ ≤ exp(H) ≤ #{σ > 0} ≤ k: the 2nd step as σ/σ₁ ≤ 1; the 3rd
    # as Σσ/σ₁ = 1/max p = exp(H_∞) and Rényi entropies decrease with order.
    ratio = float(s.sum() / s[0])
    assert 1 - eps <= m["stable_rank"] <= ratio * (1 + eps)
    assert ratio <= m["effective_rank"] * (1 + eps)
    assert m["effective_rank"] <= np.count_nonzero(s > 0) * (1 + eps) <= k * (1 + eps)
    # σ below rtol·σ₁ each add at most rtol² to the stable rank.
    r = m["numerical_rank"]
    assert 1 <= r <= k
    assert m["stable_rank"] <= r + (k - r) * rtol**2 + eps
    # The sub-threshold tail holds ≤ k·rtol² ≤ 1% of the energy, so 99% fits in r values.
    assert 1 <= m["energy_rank_99"] <= r


@pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")  # inside WW
def test_delta_init_heavy_tail_matches_weightwatcher_base_model(tmp_path) -> None:
    """`delta_init_alpha` and companions are WeightWatcher's delta analysis (base_model) of W_t − W_first."""
    ww = pytest.importorskip("weightwatcher")
    from safetensors.torch import save_file

    from ckptscope.analyzers.contract import AnalysisContext
    from ckptscope.analyzers.weights import WeightAnalyzer
    from ckptscope.sources.checkpoint import Checkpoint

    base = _linear_weights()["default_init"]
    trained = base + _linear_weights()["heavy_tailed"]
    ckpts = {}
    for step, weight in ((0, base), (1, trained)):
        (tmp_path / f"step{step}").mkdir()
        save_file({"proj.weight": weight.contiguous()}, tmp_path / f"step{step}" / "model.safetensors")
        ckpts[step] = Checkpoint(tmp_path / f"step{step}", step=step)
    ctx = AnalysisContext(checkpoint=ckpts[1], family="unknown", config=None, references={"first": ckpts[0], "previous": ckpts[0]})
    rows = WeightAnalyzer.of().analyze(ctx).metrics
    got = {k: v for k, v in zip(rows["metric"], rows["value"])}
    layers = [torch.nn.Sequential(torch.nn.Linear(200, 300, bias=False)) for _ in range(2)]
    with torch.no_grad():
        layers[0][0].weight.copy_(base)
        layers[1][0].weight.copy_(trained)
    # WW 0.7.7 takes the base model in its constructor; analyze(base_model=...) on an instance built
    # without one silently analyzes W itself (measured: alpha 4.18 of W instead of 1.71 of ΔW).
    row = ww.WeightWatcher(model=layers[1], base_model=layers[0]).analyze().iloc[0]
    assert got["delta_init_alpha"] == pytest.approx(row["alpha"], rel=1e-3)
    assert got["delta_init_alpha_weighted"] == pytest.approx(row["alpha_weighted"], rel=1e-3)
    assert got["delta_init_log_norm"] == pytest.approx(row["log_norm"], rel=1e-6)
    assert got["delta_init_alpha_xmin"] == pytest.approx(row["xmin"], rel=1e-6)
    assert got["delta_init_num_pl_spikes"] == row["num_pl_spikes"]
