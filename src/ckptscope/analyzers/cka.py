"""Linear CKA (Kornblith et al. 2019) from streamed feature-space statistics.

Activations come in batches of token positions (rows = samples, columns = features), far more
rows than features, so everything is accumulated in feature space: X̃ᵀX̃, X̃ᵀỸ (p×p) plus a few
vectors and scalars, never an n×n Gram matrix and never all activations at once.

Rows are accumulated around a fixed shift (the first batch's mean): centring at the end then
subtracts only the small residual mean, so the float64 sums do not cancel catastrophically on
residual streams with large mean components.

Two estimators:

* biased: ‖XcᵀYc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F) on column-centred Xc, Yc;
* debiased: the unbiased HSIC U-statistic (Song et al. 2012) of the linear kernels K = XXᵀ,
  L = YYᵀ with zeroed diagonals, HSIC₁ ∝ tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1,
  normalised like CKA. It is invariant to translating either representation, so it can be
  evaluated exactly on shifted rows; every term reduces to the feature-space sums kept here.
  It may be negative, and is undefined for n < 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class Summary:
    """What the other side of a CKA needs from one representation once its pass is over."""

    n: int
    shift: torch.Tensor  # the fixed shift the rows were taken around
    total: torch.Tensor  # Σ x̃ᵢ
    sq: float  # Σ ‖x̃ᵢ‖²
    centered_norm: float  # ‖XcᵀXc‖_F
    hsic: float  # n(n−3)·HSIC₁(K, K)

    def shifted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a new batch of this representation, around its shift, with their squared norms."""
        xs = x.to(F64) - self.shift
        return xs, (xs * xs).sum(1)


class Side:
    """Streaming sums of one representation: n, Σx̃, X̃ᵀX̃, Σ‖x̃‖², Σ‖x̃‖⁴, Σ‖x̃‖²x̃."""

    def __init__(self) -> None:
        self.n = 0
        self.shift = self.total = self.gram = self.weighted = None
        self.sq = self.sq2 = 0.0

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate a batch of rows; returns them shifted, with their squared norms, for `Cross`."""
        x = x.to(F64)
        if self.shift is None:
            self.shift = x.mean(0)
            p = x.shape[1]
            self.total = x.new_zeros(p)
            self.weighted = x.new_zeros(p)
            self.gram = x.new_zeros(p, p)
        xs = x - self.shift
        a = (xs * xs).sum(1)
        self.n += xs.shape[0]
        self.total += xs.sum(0)
        self.gram.addmm_(xs.T, xs)
        self.sq += float(a.sum())
        self.sq2 += float((a * a).sum())
        self.weighted += a @ xs
        return xs, a

    def summary(self) -> Summary:
        n, s = self.n, self.total
        centered = self.gram - torch.outer(s, s) / n
        ones_k_ones = float(s @ s) - self.sq  # 1ᵀK̃1
        ones_kk_ones = float(s @ self.gram @ s) - 2 * float(s @ self.weighted) + self.sq2  # 1ᵀK̃K̃1
        hsic = _hsic(float(self.gram.square().sum()) - self.sq2, ones_k_ones, ones_k_ones, ones_kk_ones, n)
        return Summary(n, self.shift, s, self.sq, float(torch.linalg.matrix_norm(centered)), hsic)


class Cross:
    """Streaming cross terms of two representations of the same rows: X̃ᵀỸ, Σ‖x̃‖²‖ỹ‖², Σ‖x̃‖²ỹ, Σ‖ỹ‖²x̃."""

    def __init__(self) -> None:
        self.gram = self.ay = self.bx = None
        self.ab = 0.0

    def add(self, xs: torch.Tensor, a: torch.Tensor, ys: torch.Tensor, b: torch.Tensor) -> None:
        if self.gram is None:
            self.gram = xs.new_zeros(xs.shape[1], ys.shape[1])
            self.ay = ys.new_zeros(ys.shape[1])
            self.bx = xs.new_zeros(xs.shape[1])
        self.gram.addmm_(xs.T, ys)
        self.ab += float((a * b).sum())
        self.ay += a @ ys
        self.bx += b @ xs

    def cka(self, x: Summary, y: Summary) -> tuple[float, float]:
        """(linear CKA, debiased linear CKA); NaN where undefined (a constant representation, n < 4)."""
        n = x.n
        if y.n != n:
            raise ValueError(f"the representations have {x.n} and {y.n} rows; CKA compares the same samples")
        sx, sy = x.total, y.total
        centered = self.gram - torch.outer(sx, sy) / n
        denom = x.centered_norm * y.centered_norm
        biased = float(centered.square().sum()) / denom if denom > 0 else math.nan
        ones_kl_ones = float(sx @ self.gram @ sy) - float(sy @ self.ay) - float(sx @ self.bx) + self.ab  # 1ᵀK̃L̃1
        hsic = _hsic(float(self.gram.square().sum()) - self.ab, float(sx @ sx) - x.sq, float(sy @ sy) - y.sq, ones_kl_ones, n)
        scale = x.hsic * y.hsic
        debiased = hsic / math.sqrt(scale) if scale > 0 else math.nan
        return biased, debiased


def _hsic(trace_kl: float, ones_k: float, ones_l: float, ones_kl: float, n: int) -> float:
    """n(n−3)·HSIC₁ from tr(K̃L̃), 1ᵀK̃1, 1ᵀL̃1 and 1ᵀK̃L̃1 (the factor cancels in CKA)."""
    if n < 4:
        return math.nan
    return trace_kl + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl


def linear_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> tuple[float, float]:
    """(linear CKA, debiased linear CKA) of two n×p activation matrices, streamed `batch_size` rows at a time."""
    sx, sy, cross = Side(), Side(), Cross()
    step = batch_size or x.shape[0]
    for start in range(0, x.shape[0], step):
        xs, a = sx.add(x[start : start + step])
        ys, b = sy.add(y[start : start + step])
        cross.add(xs, a, ys, b)
    return cross.cka(sx.summary(), sy.summary())
