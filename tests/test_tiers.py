"""Tests for ckptscope.analyzers.fast_spectrum, the `fast` tier, against the exact answer.

The reference is an independent float64 SVD (numpy) of the stored matrix. Matrices have Pythia's
real shapes (pythia-70m: hidden 512, pythia-160m: hidden 768, and the 50304-row embedding) in
three families: Gaussian init (a Marchenko-Pastur bulk, the hard case for σ₁: tiny gaps at the
edge), planted power-law spectra (trained-like heavy tails) and low-rank + small-noise deltas
W - W₀, all stored as fp16 like real checkpoints. Every error must stay below the constant the
module documents.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest
import torch

from ckptscope.analyzers.fast_spectrum import (
    EFFECTIVE_RANK_RTOL,
    MIN_FAST_SIDE,
    SPECTRAL_NORM_RTOL,
    STABLE_RANK_RTOL,
    TOP_K_RTOL,
    FastSpectrum,
    fast_spectrum,
)
from ckptscope.analyzers.spectral import rank_norm_metrics, singular_values

K = 32
PLANTED_RANK = 8
SHAPES = {
    "70m.qkv": (1536, 512),
    "70m.dense": (512, 512),
    "70m.mlp_in": (2048, 512),
    "70m.mlp_out": (512, 2048),
    "160m.qkv": (2304, 768),
    "160m.mlp_in": (3072, 768),
    "160m.mlp_out": (768, 3072),
    "70m.embed": (50304, 512),
}
# The embedding's planted power law is left out: its 50304 x 512 orthonormal basis alone takes
# longer to build than every other case together.
CASES = [(s, f) for s in SHAPES for f in ("gauss", "power_law", "delta") if (s, f) != ("70m.embed", "power_law")]
CASE_IDS = [f"{s}-{f}" for s, f in CASES]


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def _planted(rng: np.random.Generator, rows: int, cols: int, s: np.ndarray) -> np.ndarray:
    """rows x cols float64 matrix with singular values s (zeros beyond len(s))."""
    return (_orthonormal(rng, rows, s.size) * s) @ _orthonormal(rng, cols, s.size).T


@functools.cache  # built once, shared read-only by the parametrized tests
def _case(shape: str, family: str) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """(W, reference or None, exact singular values of W - reference), W stored as fp16."""
    rows, cols = SHAPES[shape]
    rng = np.random.default_rng(zlib.crc32(f"{shape}/{family}".encode()))
    ref = None
    if family == "gauss":  # Pythia's init scale
        w = torch.from_numpy(0.02 * rng.standard_normal((rows, cols))).half()
    elif family == "power_law":
        s = 0.5 * np.arange(1, min(rows, cols) + 1) ** -0.6
        w = torch.from_numpy(_planted(rng, rows, cols, s)).half()
    else:  # W₀ + a rank-8 update + small noise, both steps rounded to fp16
        w0 = 0.02 * rng.standard_normal((rows, cols))
        update = _planted(rng, rows, cols, np.geomspace(20.0, 2.0, PLANTED_RANK))
        ref = torch.from_numpy(w0).half()
        w = torch.from_numpy(w0 + update + 2e-5 * rng.standard_normal((rows, cols))).half()
    diff = w.double() if ref is None else w.double() - ref.double()
    return w, ref, np.linalg.svd(diff.numpy(), compute_uv=False)


@functools.cache
def _fast(shape: str, family: str) -> FastSpectrum:
    w, ref, _ = _case(shape, family)
    return fast_spectrum(w, minus=ref, k=K)


def _rel(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / abs(exact)


# ---------------------------------------------------------------- accuracy on Pythia shapes


@pytest.mark.parametrize(("shape", "family"), CASES, ids=CASE_IDS)
def test_norms_and_stable_rank(shape: str, family: str) -> None:
    fs, sv = _fast(shape, family), _case(shape, family)[2]
    exact = rank_norm_metrics(sv)
    assert not fs.exact and fs.products > 0
    assert _rel(fs.metrics["frobenius_norm"], exact["frobenius_norm"]) <= 1e-12
    assert _rel(fs.metrics["spectral_norm"], exact["spectral_norm"]) <= SPECTRAL_NORM_RTOL
    assert _rel(fs.metrics["stable_rank"], exact["stable_rank"]) <= STABLE_RANK_RTOL


@pytest.mark.parametrize(("shape", "family"), CASES, ids=CASE_IDS)
def test_top_singular_values(shape: str, family: str) -> None:
    fs, sv = _fast(shape, family), _case(shape, family)[2]
    assert fs.top_sv.dtype == np.float64
    assert fs.top_sv.size == K  # all of them converged within the default budget
    assert np.all(np.diff(fs.top_sv) <= 0)
    assert np.max(np.abs(fs.top_sv - sv[:K])) <= TOP_K_RTOL * sv[0]
    assert fs.top_sv[0] == fs.metrics["spectral_norm"]


@pytest.mark.parametrize(("shape", "family"), CASES, ids=CASE_IDS)
def test_effective_rank(shape: str, family: str) -> None:
    fs, sv = _fast(shape, family), _case(shape, family)[2]
    err = _rel(fs.metrics["effective_rank"], rank_norm_metrics(sv)["effective_rank"])
    assert err <= EFFECTIVE_RANK_RTOL
    # The reported standard error is of the right size: neither vacuous nor overconfident.
    assert 0 < fs.effective_rank_rse <= EFFECTIVE_RANK_RTOL
    assert err <= 4 * fs.effective_rank_rse + 1e-3


@pytest.mark.parametrize(("shape", "family"), CASES, ids=CASE_IDS)
def test_counting_ranks_exact_when_returned(shape: str, family: str) -> None:
    fs, sv = _fast(shape, family), _case(shape, family)[2]
    exact = rank_norm_metrics(sv)
    for key in ("numerical_rank", "energy_rank_99"):
        if key in fs.metrics:
            assert fs.metrics[key] == exact[key], key
    if family == "delta":  # the top 32 decide both, and the planted rank is recovered
        assert fs.metrics["numerical_rank"] == PLANTED_RANK == exact["numerical_rank"]
        assert fs.metrics["energy_rank_99"] == exact["energy_rank_99"]
    else:  # a full-rank bulk: the top 32 cannot decide either, so neither is guessed
        assert "numerical_rank" not in fs.metrics and "energy_rank_99" not in fs.metrics


def test_steep_spectrum_settles_both_ranks() -> None:
    # σᵢ = i⁻²: 31 values above 1e-3·σ₁, energy in the first few; both within the top 32.
    rng = np.random.default_rng(1)
    w = torch.from_numpy(_planted(rng, 2048, 512, np.arange(1, 513, dtype=np.float64) ** -2.0)).float()
    exact = rank_norm_metrics(np.linalg.svd(w.double().numpy(), compute_uv=False))
    fs = fast_spectrum(w, k=K)
    assert fs.metrics["numerical_rank"] == exact["numerical_rank"] == 31
    assert fs.metrics["energy_rank_99"] == exact["energy_rank_99"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_ambiguous_counting_ranks_are_omitted(dtype: torch.dtype) -> None:
    # σ₄ sits at rtol·σ₁ to 12 digits and σ₁² is 99% of the energy to 12 digits. Products in
    # float32 (fp16/fp32 storage) resolve ~1e-7·σ₁: neither rank may be guessed. float64
    # products resolve ~1e-16·σ₁: both may be returned, and then they are exact.
    rng = np.random.default_rng(2)
    tail = np.full(296, 1e-7)
    s = np.concatenate(([1.0, 0.01, 0.004, 1e-3 * (1 + 1e-12)], tail))
    s[1] = math.sqrt(1 / 0.99 - 1 - np.sum(s[2:] ** 2)) * (1 - 1e-12)  # σ₁² = 0.99 Σσ² (just)
    w = torch.from_numpy(_planted(rng, 1024, 300, s)).to(dtype)
    exact = rank_norm_metrics(np.linalg.svd(w.double().numpy(), compute_uv=False))
    fs = fast_spectrum(w, k=K)
    for key in ("numerical_rank", "energy_rank_99"):
        if dtype == torch.float64:
            assert fs.metrics.get(key, exact[key]) == exact[key], key
        else:
            assert key not in fs.metrics, key
    assert _rel(fs.metrics["spectral_norm"], exact["spectral_norm"]) <= SPECTRAL_NORM_RTOL


# ---------------------------------------------------------------- properties


def test_deterministic_per_seed() -> None:
    w, ref, _ = _case("70m.mlp_in", "power_law")
    a, b = fast_spectrum(w, k=K, seed=7), fast_spectrum(w, k=K, seed=7)
    assert a.metrics == b.metrics
    assert np.array_equal(a.top_sv, b.top_sv)
    other = fast_spectrum(w, k=K, seed=8)
    assert other.metrics["effective_rank"] != a.metrics["effective_rank"]  # the seed is used
    assert _rel(other.metrics["effective_rank"], a.metrics["effective_rank"]) <= 2 * EFFECTIVE_RANK_RTOL


def test_wide_equals_transposed_tall() -> None:
    w = _case("70m.mlp_out", "gauss")[0]  # 512 x 2048
    wide, tall = fast_spectrum(w, k=K), fast_spectrum(w.T.contiguous(), k=K)
    for key, value in wide.metrics.items():
        assert tall.metrics[key] == pytest.approx(value, rel=1e-9), key
    np.testing.assert_allclose(tall.top_sv, wide.top_sv, rtol=1e-9)


def test_minus_equals_materialised_difference() -> None:
    w, ref, _ = _case("160m.qkv", "delta")
    inside = fast_spectrum(w, minus=ref, k=K)
    outside = fast_spectrum(w.float() - ref.float(), k=K)  # exact in float32 for fp16 inputs
    assert inside.metrics == outside.metrics
    assert np.array_equal(inside.top_sv, outside.top_sv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_storage_dtypes(dtype: torch.dtype) -> None:
    w = _case("160m.mlp_in", "power_law")[0].to(dtype)
    sv = np.linalg.svd(w.double().numpy(), compute_uv=False)
    exact = rank_norm_metrics(sv)
    fs = fast_spectrum(w, k=K)
    assert _rel(fs.metrics["spectral_norm"], exact["spectral_norm"]) <= SPECTRAL_NORM_RTOL
    assert np.max(np.abs(fs.top_sv - sv[: fs.top_sv.size])) <= TOP_K_RTOL * sv[0]
    assert _rel(fs.metrics["effective_rank"], exact["effective_rank"]) <= EFFECTIVE_RANK_RTOL


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
def test_zero_matrix(shape: tuple[int, int]) -> None:
    zero = torch.zeros(shape, dtype=torch.float16)
    w = _case("70m.mlp_in", "gauss")[0][: shape[0], : shape[1]]
    if shape[0] < shape[1]:
        w = _case("70m.mlp_out", "gauss")[0][: shape[0], : shape[1]]
    for fs in (fast_spectrum(zero, k=K), fast_spectrum(w, minus=w.clone(), k=K)):
        assert not fs.exact
        assert np.array_equal(fs.top_sv, np.zeros(K))
        assert fs.metrics["frobenius_norm"] == fs.metrics["spectral_norm"] == 0.0
        assert math.isnan(fs.metrics["stable_rank"]) and math.isnan(fs.metrics["effective_rank"])
        assert fs.metrics["numerical_rank"] == fs.metrics["energy_rank_99"] == 0.0


@pytest.mark.parametrize(("rows", "cols", "k"), [(300, 40, 40), (40, 300, 64), (900, 300, 300), (3, 5, 32),
                                                   (1, 1, 1), (700, MIN_FAST_SIDE, 8)])
def test_exact_path(rows: int, cols: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows * cols)
    w, ref = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    for minus in (None, ref):
        fs = fast_spectrum(w, k=k, minus=minus)
        sv = singular_values(w.double() if minus is None else w.double() - ref.double())
        assert fs.exact and fs.products == 0 and fs.effective_rank_rse == 0.0
        assert fs.metrics == rank_norm_metrics(sv)
        np.testing.assert_array_equal(fs.top_sv, sv[:k])


def test_invalid_input() -> None:
    w = torch.ones(400, 300)
    with pytest.raises(ValueError, match="2-D"):
        fast_spectrum(torch.ones(300))
    with pytest.raises(ValueError, match="shape"):
        fast_spectrum(w, minus=torch.ones(300, 400))
    with pytest.raises(ValueError, match=">= 1"):
        fast_spectrum(w, k=0)
    for shape in ((400, 300), (30, 20)):
        bad = torch.ones(shape)
        bad[3, 4] = math.nan
        with pytest.raises(ValueError, match="finite"):
            fast_spectrum(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    w, ref, sv = _case("160m.qkv", "delta")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 must be switched off inside
    try:
        fs = fast_spectrum(w.cuda(), minus=ref.cuda(), k=K)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert torch.get_float32_matmul_precision() == precision
    cpu = _fast("160m.qkv", "delta")
    assert _rel(fs.metrics["spectral_norm"], sv[0]) <= SPECTRAL_NORM_RTOL
    assert np.max(np.abs(fs.top_sv - sv[: fs.top_sv.size])) <= TOP_K_RTOL * sv[0]
    assert fs.metrics["numerical_rank"] == cpu.metrics["numerical_rank"] == PLANTED_RANK
    assert _rel(fs.metrics["effective_rank"], cpu.metrics["effective_rank"]) <= EFFECTIVE_RANK_RTOL
