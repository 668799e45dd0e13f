"""Sparsity of weight matrices: the Gini index and the Hoyer measure of their entries, as
pico-analyze defines them, in one streaming pass with bounded memory.

Gini needs the entries in sorted order. Instead of sorting (8 bytes per entry in float64), each
entry's |w| goes into a bucket keyed by the high bits of its IEEE bit pattern, which for
non-negative floats sorts like the value: the buckets are ordered, and the exact count and
float64 sum per bucket give Σᵢ (2i − n − 1)·x₍ᵢ₎ exactly except for the order *within* a bucket.

* fp16 / bf16 entries: the key is all 15 bits below the sign, so a bucket holds one value and the
  Gini index is exact (2¹⁵ buckets, 1 MB).
* fp32 / fp64 entries: the key is the float32 exponent and its top `mantissa_bits` bits, so a
  bucket spans a relative width ≤ 2^−mantissa_bits. Taking mid-ranks within each bucket
  underestimates Σ i·x₍ᵢ₎ by between 0 and (max_b − min_b)·⌊c_b²/4⌋/2 per bucket b of c_b
  entries (Chebyshev's sum inequality and its extreme case), so with
  B = Σ_b (max_b − min_b)·⌊c_b²/4⌋ / (n·Σx) the exact Gini lies in [G_mid, G_mid + B]. The stored
  `gini` is the midpoint G_mid + B/2 and `gini_max_error` = B/2 bounds |gini − exact|; it is at
  most 2^−mantissa_bits/8 and, for weights spread over many buckets, orders of magnitude below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.analyzers.contract import AnalysisContext, Analyzer
from ckptscope.analyzers.spectral import CHUNK_ELEMENTS
from ckptscope.options import Options, option
from ckptscope.rows import RunRows
from ckptscope.sources.layers import classify, is_buffer

EXACT_DTYPES = (torch.float16, torch.bfloat16)  # 15 bits below the sign: one bucket per value


@dataclass(frozen=True)
class SparsityOptions(Options):
    mantissa_bits: int = option(11, help="fp32/fp64 Gini buckets keep this many mantissa bits (relative width "
                                         "2^-bits; memory 32 B x 2^(8+bits)); fp16/bf16 are always exact.",
                                check=lambda v: None if 0 <= v <= 15 else "must be between 0 and 15")


@dataclass(frozen=True)
class Sparsity:
    """Gini (with its error bound; 0 for exact dtypes) and Hoyer (NaN where undefined) of one tensor."""

    gini: float
    gini_max_error: float
    hoyer: float


def sparsity(w: torch.Tensor, *, mantissa_bits: int = 11) -> Sparsity:
    """Gini and Hoyer of |w| in one chunked pass (see the module docstring for the bound).

    Gini G = Σᵢ (2i − n − 1)·x₍ᵢ₎ / (n·Σx) over x = |w| sorted ascending; 0 when n = 0 or Σx = 0
    (pico-analyze). Hoyer H = (√n − ‖w‖₁/‖w‖₂)/(√n − 1); NaN for n ≤ 1 or w ≡ 0, where pico-analyze
    divides by zero. Non-finite entries are the caller's to exclude.
    """
    flat = w.detach().reshape(-1)
    n = flat.numel()
    exact = flat.dtype in EXACT_DTYPES
    nbins = 1 << 15 if exact else 1 << (8 + mantissa_bits)
    shift = 23 - mantissa_bits
    counts = torch.zeros(nbins, dtype=torch.int64, device=flat.device)
    sums = torch.zeros(nbins, dtype=torch.float64, device=flat.device)
    lo = hi = None
    if not exact:
        lo = torch.full((nbins,), math.inf, dtype=torch.float64, device=flat.device)
        hi = torch.full((nbins,), -math.inf, dtype=torch.float64, device=flat.device)
    sumsq = 0.0
    for start in range(0, n, CHUNK_ELEMENTS):
        a = flat[start : start + CHUNK_ELEMENTS].abs()
        if exact:
            key = a.view(torch.int16).to(torch.int64)  # sign bit cleared by abs(), so 0 .. 2¹⁵ − 1
        else:  # rounding to float32 is monotone, so the key still sorts like the value
            key = (a.to(torch.float32).view(torch.int32) >> shift).to(torch.int64)
        counts += torch.bincount(key, minlength=nbins)
        if exact:  # a bucket is one value: its sums follow from the counts after the pass
            continue
        x = a.to(torch.float64)
        sums.index_add_(0, key, x)
        sumsq += float(torch.dot(x, x))
        if not exact:
            lo.scatter_reduce_(0, key, x, "amin")
            hi.scatter_reduce_(0, key, x, "amax")
    if exact:  # c·v and c·v² are exact in float64 (v has at most 11 significant bits)
        values = torch.arange(nbins, dtype=torch.int16, device=flat.device).view(flat.dtype).to(torch.float64)
        values = torch.where(counts > 0, values, 0.0)  # NaN/Inf bit patterns are empty buckets
        sums = counts * values
        sumsq = float(torch.dot(sums, values))
    used = counts > 0
    c = counts[used].cpu().numpy()
    s = sums[used].cpu().numpy()
    total = float(s.sum())
    hoyer = math.nan
    if n > 1 and sumsq > 0:
        root = math.sqrt(n)
        hoyer = (root - total / math.sqrt(sumsq)) / (root - 1)
    if n == 0 or total == 0:
        return Sparsity(0.0, 0.0, hoyer)
    before = np.cumsum(c) - c  # entries in lower buckets
    # Bucket b holds positions before+1 .. before+c: Σ (2i − n − 1) over them = c·(2·before + c − n).
    weight = (2 * before + c - n).astype(np.float64)
    gini = float(np.dot(weight, s)) / (n * total)
    bound = 0.0
    if not exact:
        width = (hi[used] - lo[used]).cpu().numpy()
        bound = float(np.dot(width, (c * c // 4).astype(np.float64))) / (n * total)
    return Sparsity(gini + bound / 2, bound / 2, hoyer)


class SparsityAnalyzer(Analyzer):
    """Gini and Hoyer sparsity of every matrix's absolute entries (pico-analyze's definitions)."""

    name = "sparsity"
    version = "1.0.0"
    Options = SparsityOptions
    unit = "tensors"

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        out = self.new_rows("float64", f"torch-{torch.__version__}/{ctx.device}")
        names = [name for name, info in ctx.checkpoint.tensors.items()
                 if not is_buffer(name) and len(info.shape) >= 2 and info.dtype.startswith(("float", "bfloat"))]
        ctx.progress.start(len(names))
        for name in names:
            role = classify(name, ctx.family)
            w = ctx.checkpoint.read(name).to(ctx.device)
            flat = w.reshape(-1)
            if not all(bool(torch.isfinite(flat[i : i + CHUNK_ELEMENTS]).all()) for i in range(0, flat.numel(), CHUNK_ELEMENTS)):
                out.anomalies.append((name, "non_finite", "NaN or Inf values; sparsity skipped this matrix"))
            else:
                sp = sparsity(w, mantissa_bits=self.options.mantissa_bits)
                values = {"gini": sp.gini, "gini_max_error": sp.gini_max_error, "hoyer": sp.hoyer}
                out.add_metrics(name, role.layer, role.component, {k: v for k, v in values.items() if math.isfinite(v)})
            ctx.progress.advance()
        return out
