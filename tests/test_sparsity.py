"""The sparsity analyzer against the exact formulas (full float64 sort), on adversarial inputs and
on a real checkpoint read through `Checkpoint`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.sparsity import SparsityAnalyzer, SparsityOptions, sparsity
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family
from runs import neox_state, write_checkpoint


def exact_gini(w: torch.Tensor) -> float:
    """pico-analyze's Gini of |w| by a full sort in float64 (0 for n = 0 or Σ|w| = 0)."""
    x = np.sort(np.abs(w.double().numpy().ravel()))
    n = x.size
    if n == 0 or x.sum() == 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * i - n - 1) * x) / (n * x.sum()))


def exact_hoyer(w: torch.Tensor) -> float:
    x = w.double().numpy().ravel()
    n = x.size
    return (math.sqrt(n) - np.abs(x).sum() / np.sqrt((x * x).sum())) / (math.sqrt(n) - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES = {
    "gaussian_f32": lambda: torch.randn(300, 700, generator=_gen(0)),
    "gaussian_f16": lambda: torch.randn(300, 700, generator=_gen(1)).half(),
    "gaussian_bf16": lambda: torch.randn(300, 700, generator=_gen(2)).bfloat16(),
    "gaussian_f64": lambda: torch.randn(200, 300, generator=_gen(3), dtype=torch.float64),
    "cauchy_f32": lambda: torch.distributions.Cauchy(0.0, 1.0).sample((300, 300)),  # heavy tails: 1e-4 .. 1e6
    "pareto_bf16": lambda: (torch.rand(300, 300, generator=_gen(4)) ** -2.0).bfloat16(),
    "sparse_f32": lambda: torch.randn(200, 200, generator=_gen(5)) * (torch.rand(200, 200, generator=_gen(6)) < 0.01),
    "signs_f16": lambda: torch.where(torch.rand(100, 100, generator=_gen(7)) < 0.5, -1.0, 1.0).half() * 0.25,
    "subnormal_f16": lambda: torch.randint(0, 1024, (64, 64), generator=_gen(8)).half() * 2.0**-24,
}


@pytest.mark.parametrize("name", list(CASES))
def test_gini_and_hoyer_match_exact_formula(name: str) -> None:
    torch.manual_seed(9)
    w = CASES[name]()
    got = sparsity(w)
    exact = exact_gini(w)
    if w.dtype in (torch.float16, torch.bfloat16):  # one bucket per value: exact
        assert got.gini_max_error == 0.0
        assert got.gini == pytest.approx(exact, rel=1e-12, abs=1e-15)
    else:
        assert abs(got.gini - exact) <= got.gini_max_error * (1 + 1e-9) + 1e-15
        assert got.gini_max_error <= 2.0**-11 / 8  # the a-priori bound at the default 11 mantissa bits
        assert got.gini_max_error < 1e-6  # and, spread over many buckets, far below it
    assert got.hoyer == pytest.approx(exact_hoyer(w), rel=1e-12, abs=1e-12)


def test_bound_is_attained_when_one_bucket_holds_everything() -> None:
    """All entries in one fp32 bucket [1, 1 + 2^-11): the midpoint is off by up to the bound, never more."""
    w = 1.0 + torch.rand(300, 300, generator=_gen(10)) * 2.0**-11
    got = sparsity(w)
    exact = exact_gini(w)
    assert got.gini_max_error > 1e-6  # the bound is not vacuous here...
    assert abs(got.gini - exact) <= got.gini_max_error  # ...and it holds
    assert got.gini_max_error <= 2.0**-11 / 8
    finer = sparsity(w, mantissa_bits=15)  # more buckets, tighter bound
    assert finer.gini_max_error < got.gini_max_error / 4
    assert abs(finer.gini - exact) <= finer.gini_max_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_edge_cases(dtype: torch.dtype) -> None:
    zeros = sparsity(torch.zeros(50, 40, dtype=dtype))
    assert zeros.gini == 0.0 and math.isnan(zeros.hoyer)  # pico: Gini 0; Hoyer divides by zero
    one = torch.zeros(50, 40, dtype=dtype)
    one[3, 7] = -2.5
    got = sparsity(one)
    assert got.gini == pytest.approx((2000 - 1) / 2000, rel=1e-12)  # the maximum (n-1)/n
    assert got.hoyer == pytest.approx(1.0, abs=1e-12)
    const = sparsity(torch.full((50, 40), -0.375, dtype=dtype))
    assert const.gini == pytest.approx(0.0, abs=1e-15) and const.hoyer == pytest.approx(0.0, abs=1e-12)
    single = sparsity(torch.tensor([[1.5]], dtype=dtype))
    assert single.gini == 0.0 and math.isnan(single.hoyer)  # n = 1: Hoyer undefined
    assert sparsity(torch.zeros(0, 4, dtype=dtype)).gini == 0.0


def test_options_reject_bad_bits() -> None:
    from ckptscope.errors import CkptscopeError

    with pytest.raises(CkptscopeError, match="mantissa-bits"):
        SparsityOptions.build(mantissa_bits=16)


def test_analyzer_on_real_checkpoint(tmp_path) -> None:
    state, config = neox_state(seed=3)
    state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][:, ::2] = 0.0  # a planted sparse matrix
    state["gpt_neox.layers.1.attention.dense.weight"][0, 0] = float("nan")  # reported, not fatal
    path = write_checkpoint(tmp_path / "step0", state, config, dtype=torch.bfloat16)
    ckpt = Checkpoint(path, step=0)
    ctx = AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config)
    rows = SparsityAnalyzer(SparsityOptions.build()).analyze(ctx)
    got = {(t, m): v for t, m, v in zip(rows.metrics["tensor"], rows.metrics["metric"], rows.metrics["value"])}
    matrices = [n for n, i in ckpt.tensors.items() if len(i.shape) == 2]
    for name in matrices:
        if name == "gpt_neox.layers.1.attention.dense.weight":
            assert (name, "gini") not in got
            continue
        w = ckpt.read(name)
        assert got[(name, "gini")] == pytest.approx(exact_gini(w), rel=1e-12)
        assert got[(name, "hoyer")] == pytest.approx(exact_hoyer(w), rel=1e-10)
    assert {t for t, _ in got} == set(matrices) - {"gpt_neox.layers.1.attention.dense.weight"}
    assert [a[:2] for a in rows.anomalies] == [("gpt_neox.layers.1.attention.dense.weight", "non_finite")]
    sparse = got[("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "gini")]
    assert sparse > got[("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "gini")] + 0.2
