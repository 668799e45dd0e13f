"""Subspace rotation: planted rotations, scipy's principal angles, undefined subspaces, the demo suite."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.subspace import MIN_GAP, SubspaceAnalyzer, SubspaceOptions
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify, family
from runs import write_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "src" / "ckptscope" / "demo_suite"
ROWS, COLS, K = 40, 30, 4
THETA = 0.7


def orthogonal(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def build(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u[:, : s.size] @ np.diag(s) @ v[:, : s.size].T)


def analyze(steps: dict[int, Path], step: int, *, previous: int | None, final: int | None, k: int = K):
    ckpt = Checkpoint(steps[step], step=step)
    refs = {"previous": Checkpoint(steps[previous], step=previous) if previous is not None else None,
            "final": Checkpoint(steps[final], step=final) if final is not None else None}
    ctx = AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config, references=refs)
    rows = SubspaceAnalyzer(SubspaceOptions.build(subspace_k=k)).analyze(ctx)
    values = {(t, c, m): v for t, c, m, v in zip(*(rows.metrics[x] for x in ("tensor", "component", "metric", "value")))}
    return values, rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[int, Path]:
    """Three steps of matrices U·S·Vᵀ whose singular vectors move in planted ways from step 0 to 1;
    step 2 (the final) only rescales step 1's spectrum, so its directions are step 1's."""
    u, v = orthogonal(ROWS, 1), orthogonal(COLS, 2)
    s0 = np.linspace(10, 1, COLS)  # distinct, gap after σ_4 of 0.31/7.2
    s1 = s0 * np.linspace(1.3, 0.7, COLS)  # a different spectrum, same order
    rot = np.eye(ROWS)  # turn u_1 towards u_{k+1} by THETA; the right vectors stay
    rot[[0, 0, K, K], [0, K, 0, K]] = [math.cos(THETA), -math.sin(THETA), math.sin(THETA), math.cos(THETA)]
    swap_u = np.r_[np.arange(K, 2 * K), np.arange(K), np.arange(2 * K, ROWS)]  # top-k directions -> the next k
    swap_v = np.r_[np.arange(K, 2 * K), np.arange(K), np.arange(2 * K, COLS)]
    step1 = {"same.weight": build(u, s1, v), "rotated.weight": build(u @ rot, s0, v),
             "orthogonal.weight": build(u[:, swap_u], s0, v[:, swap_v]),
             "wide.weight": build(u @ rot, s0, v).T.contiguous()}  # (30 × 40): left and right swap roles
    step0 = {"same.weight": build(u, s0, v), "rotated.weight": build(u, s0, v), "orthogonal.weight": build(u, s0, v),
             "wide.weight": build(u, s0, v).T.contiguous()}
    step2 = {name: 2.0 * w for name, w in step1.items()}
    root = tmp_path_factory.mktemp("planted")
    return {i: write_checkpoint(root / f"step{i}", state, None, dtype=torch.float64) for i, state in enumerate((step0, step1, step2))}


def test_planted_rotations_give_their_known_mean_cos2(planted):
    rotated = (K - 1 + math.cos(THETA) ** 2) / K
    want = {"same.weight": (1.0, 1.0), "rotated.weight": (rotated, 1.0), "orthogonal.weight": (0.0, 0.0),
            "wide.weight": (1.0, rotated)}
    at1, rows = analyze(planted, 1, previous=0, final=2)
    at0, _ = analyze(planted, 0, previous=None, final=2)
    at2, _ = analyze(planted, 2, previous=1, final=None)
    assert not rows.anomalies
    gap = (np.linspace(10, 1, COLS)[K - 1] - np.linspace(10, 1, COLS)[K]) / np.linspace(10, 1, COLS)[K - 1]
    for name, (left, right) in want.items():
        key = lambda m: (name, "other", m)  # noqa: E731
        assert at1[key("subspace_prev_left")] == pytest.approx(left, abs=1e-12), name
        assert at1[key("subspace_prev_right")] == pytest.approx(right, abs=1e-12), name
        assert at0[key("subspace_final_left")] == pytest.approx(left, abs=1e-12), name  # step 2 has step 1's directions
        assert at0[key("subspace_final_right")] == pytest.approx(right, abs=1e-12), name
        for values, metric in ((at1, "subspace_final_left"), (at1, "subspace_final_right"), (at2, "subspace_prev_left"),
                               (at2, "subspace_prev_right")):
            assert values[key(metric)] == pytest.approx(1.0, abs=1e-12), (name, metric)
        assert at2[key("subspace_final_left")] == at2[key("subspace_final_right")] == 1.0  # the final step itself
        assert at0[key("subspace_k")] == K and at0[key("subspace_gap")] == pytest.approx(gap, rel=1e-10)
        assert not any(m[2].startswith("subspace_prev") for m in at0)  # the first step has no previous


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> dict[int, Path]:
    rng = np.random.default_rng(7)
    shapes = {"tall.weight": (60, 25), "wide.weight": (25, 60), "square.weight": (33, 33), "thin.weight": (50, 3)}
    base = {n: rng.standard_normal(s) for n, s in shapes.items()}
    steps = [{n: torch.from_numpy(w + scale * rng.standard_normal(w.shape)) for n, w in base.items()} for scale in (0.0, 0.4, 0.8)]
    root = tmp_path_factory.mktemp("random")
    return {i: write_checkpoint(root / f"step{i}", state, None, dtype=torch.float64) for i, state in enumerate(steps)}


def test_random_matrices_agree_with_scipy_principal_angles(random_run):
    values, rows = analyze(random_run, 1, previous=0, final=2, k=5)
    assert not rows.anomalies
    read = {i: Checkpoint(random_run[i], step=i) for i in random_run}
    for name in read[1].tensors:
        svd = {i: np.linalg.svd(read[i].read(name).numpy(), full_matrices=False) for i in read}
        k = min(5, min(svd[1][1].shape[0], 5))
        s = svd[1][1]
        gap = (s[k - 1] - (s[k] if k < s.size else 0.0)) / s[k - 1]
        assert values[(name, "other", "subspace_k")] == k
        assert values[(name, "other", "subspace_gap")] == pytest.approx(gap, rel=1e-9)
        for ref, short in ((0, "prev"), (2, "final")):
            for side, basis in (("left", lambda t: t[0][:, :k]), ("right", lambda t: t[2][:k].T)):
                angles = scipy.linalg.subspace_angles(basis(svd[1]), basis(svd[ref]))
                assert values[(name, "other", f"subspace_{short}_{side}")] == pytest.approx(np.mean(np.cos(angles) ** 2), abs=1e-10)
            ref_s = svd[ref][1]
            ref_gap = (ref_s[k - 1] - (ref_s[k] if k < ref_s.size else 0.0)) / ref_s[k - 1]
            assert values[(name, "other", f"subspace_gap_{short}")] == pytest.approx(min(gap, ref_gap), rel=1e-9)
    # the thin matrix's right subspace is the whole 3-dimensional input space: cos² = 1 whatever moved
    assert values[("thin.weight", "other", "subspace_prev_right")] == pytest.approx(1.0, abs=1e-12)


def test_tied_or_missing_singular_values_omit_the_values_and_say_why(tmp_path):
    u, v = orthogonal(ROWS, 3), orthogonal(COLS, 4)
    s = np.linspace(10, 1, COLS)
    tied = s.copy()
    tied[K] = tied[K - 1]  # σ_k = σ_{k+1}: any rotation inside the tied pair is a valid top-k subspace
    low = np.r_[s[: K - 2], np.zeros(COLS - K + 2)]  # rank k-2 < k
    steps = [{"a.weight": build(u, s, v), "b.weight": build(u, s, v)},
             {"a.weight": build(u, tied, v), "b.weight": build(u, low, v)},
             {"a.weight": build(u, s, v), "b.weight": build(u, s, v)}]
    paths = {i: write_checkpoint(tmp_path / f"step{i}", st, None, dtype=torch.float64) for i, st in enumerate(steps)}
    at1, rows1 = analyze(paths, 1, previous=0, final=2)
    at2, rows2 = analyze(paths, 2, previous=1, final=None)
    for name in ("a.weight", "b.weight"):
        assert not any(m[0] == name and m[2].startswith(("subspace_prev", "subspace_final")) for m in at1)
        assert at1[(name, "other", "subspace_k")] == K
        assert not any(m[0] == name and m[2].startswith("subspace_prev") for m in at2)  # its previous step is undefined
        assert at2[(name, "other", "subspace_final_left")] == 1.0
    assert at1[("a.weight", "other", "subspace_gap")] < MIN_GAP
    assert at1[("b.weight", "other", "subspace_gap")] == 0.0
    details = {t: d for t, kind, d in rows1.anomalies if kind == "subspace_undefined"}
    assert set(details) == {"a.weight", "b.weight"} and len(rows1.anomalies) == 2
    assert "tie" in details["a.weight"] and "rank below k" in details["b.weight"]
    assert sorted((t, kind) for t, kind, d in rows2.anomalies if "previous step 1" in d) == \
        [("a.weight", "subspace_undefined"), ("b.weight", "subspace_undefined")]


def test_demo_suite_against_an_independent_svd():
    """Real GPT-NeoX checkpoints (fp16): every matrix and each q/k/v part of the fused QKV."""
    steps = {s: DEMO / f"step{s}" for s in (1000, 1500, 2000)}
    values, rows = analyze(steps, 1500, previous=1000, final=2000, k=16)
    assert not rows.anomalies
    ckpts = {s: Checkpoint(p, step=s) for s, p in steps.items()}
    config = ckpts[1500].config
    heads, hidden = config["num_attention_heads"], config["hidden_size"]

    def matrices(step: int) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        for name, info in ckpts[step].tensors.items():
            if len(info.shape) != 2:
                continue
            w = ckpts[step].read(name).numpy().astype(np.float64)
            component = classify(name, family(config)).component
            out[(name, component)] = w
            if component == "attn.qkv":  # rows grouped per head as (q, k, v) blocks of hidden/heads rows
                per_head = w.reshape(heads, 3, hidden // heads, hidden)
                out.update({(name, part): per_head[:, i].reshape(hidden, hidden) for i, part in enumerate(("attn.q", "attn.k", "attn.v"))})
        return out

    mats = {s: matrices(s) for s in steps}
    checked = 0
    for (name, component), w in mats[1500].items():
        svd = {s: np.linalg.svd(mats[s][(name, component)], full_matrices=False) for s in steps}
        k = min(16, *w.shape)
        for ref, short in ((1000, "prev"), (2000, "final")):
            left = np.sum((svd[1500][0][:, :k].T @ svd[ref][0][:, :k]) ** 2) / k
            right = np.sum((svd[1500][2][:k] @ svd[ref][2][:k].T) ** 2) / k
            assert values[(name, component, f"subspace_{short}_left")] == pytest.approx(left, abs=1e-8), (name, component)
            assert values[(name, component, f"subspace_{short}_right")] == pytest.approx(right, abs=1e-8), (name, component)
            checked += 1
    assert checked == 2 * (4 * 4 + 2 + 3 * 4)  # 4 matrices per layer, embed in/out, 3 QKV parts per layer; two references


def test_one_instance_over_a_run_caches_bases_and_agrees(planted):
    """An analyzer instance lives for a whole run: each checkpoint's bases are computed once and
    reused while that checkpoint is a reference (previous, final); the values are those of fresh instances."""
    shared = SubspaceAnalyzer(SubspaceOptions.build(subspace_k=K))
    ckpt = {i: Checkpoint(planted[i], step=i) for i in planted}
    for step, previous, final in ((0, None, 2), (1, 0, 2), (2, 1, None)):
        refs = {"previous": ckpt.get(previous), "final": ckpt.get(final)}
        ctx = AnalysisContext(checkpoint=ckpt[step], family=family(ckpt[step].config), config=ckpt[step].config, references=refs)
        rows = shared.analyze(ctx)
        got = {(t, c, m): v for t, c, m, v in zip(*(rows.metrics[x] for x in ("tensor", "component", "metric", "value")))}
        fresh, fresh_rows = analyze(planted, step, previous=previous, final=final)
        assert got == fresh and rows.anomalies == fresh_rows.anomalies
        # only the open checkpoints' bases are kept: this step's and its references'
        assert {key[1] for key in shared._cache} == {s for s in (step, previous, final) if s is not None}
        assert len(shared._cache) == len({s for s in (step, previous, final) if s is not None}) * len(ckpt[step].tensors)
