"""The mp_fit analyzer against WeightWatcher 0.7.x itself, on a real GPT-NeoX checkpoint whose
matrices carry planted structure (spikes, heavy tails, a rank-deficient head), and rand_distance
against an independent float64 SVD."""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
import pytest
import torch

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.mp_fit import MPFitAnalyzer, MPFitOptions, permuted
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family
from runs import write_checkpoint

MP = ("sigma_mp", "bulk_max", "bulk_min", "mp_softrank", "num_spikes")
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=300,
             max_position_embeddings=64, tie_word_embeddings=False)


def _spectrum(rng: np.random.Generator, rows: int, cols: int, sv: np.ndarray) -> torch.Tensor:
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sv))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sv))))
    return torch.from_numpy((u * sv) @ v.T).float()


@functools.cache
def _model_and_checkpoint(root: str) -> tuple[torch.nn.Module, Checkpoint]:
    """A GPT-NeoX with 64-256 wide matrices, saved as fp16 safetensors; the model holds exactly the stored values."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(**SHAPE)
    model = GPTNeoXForCausalLM(cfg).eval()
    rng = np.random.default_rng(1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qkv = "gpt_neox.layers.1.attention.query_key_value.weight"
    state[qkv] += _spectrum(rng, 192, 64, np.array([3.0, 2.0, 1.5]))  # three spikes above the bulk
    state["gpt_neox.layers.1.attention.dense.weight"] = _spectrum(rng, 64, 64, 0.02 * (rng.pareto(2.0, 64) + 1))  # Q = 1
    state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = _spectrum(rng, 256, 64, 0.05 * (rng.pareto(1.5, 64) + 1))
    state["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"] *= 7.0  # scale only
    head = state["lm_head.weight"]
    state["lm_head.weight"] = (head[:, :40] @ torch.randn(40, 64, generator=torch.Generator().manual_seed(2))) * 0.1  # rank 40
    state = {k: v.half() for k, v in state.items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    state["embed_out.weight"] = state.pop("lm_head.weight")
    config = cfg.to_dict()
    config["architectures"] = ["GPTNeoXForCausalLM"]
    from pathlib import Path

    path = write_checkpoint(Path(root) / "step100", state, config, dtype=None)
    return model, Checkpoint(path, step=100)


def _context(ckpt: Checkpoint) -> AnalysisContext:
    return AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config)


def _values(rows) -> dict[tuple[str, str], float]:
    return {(t, m): v for t, m, v in zip(rows.metrics["tensor"], rows.metrics["metric"], rows.metrics["value"])}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[torch.nn.Module, Checkpoint]:
    return _model_and_checkpoint(str(tmp_path_factory.mktemp("mp")))


@pytest.mark.filterwarnings("ignore")
def test_matches_weightwatcher(built, monkeypatch) -> None:
    ww = pytest.importorskip("weightwatcher")
    rmt = pytest.importorskip("weightwatcher.RMT_Util")
    monkeypatch.setattr(rmt, "EPSILON", 1e-10)  # WW switches to 6e-5 on a CUDA host; ours is the CPU value
    model, ckpt = built
    logging.disable(logging.WARNING)
    np.random.seed(0)  # WW shuffles with numpy's global state: fixed, so its rand_distance is one fixed draw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            details = ww.WeightWatcher(model=model).analyze(mp_fit=True, randomize=True)
    finally:
        logging.disable(logging.NOTSET)
    rows = MPFitAnalyzer(MPFitOptions.build(rand_distance=True)).analyze(_context(ckpt))
    got = _values(rows)
    ours = {t for t, _ in got}
    theirs = {("embed_out" if r.longname == "lm_head" else r.longname) + ".weight": r for r in details.itertuples()}
    assert ours == set(theirs), "the same matrices as WeightWatcher"
    assert len(ours) == 10
    mp_ok, report = 0, []
    for name, row in sorted(theirs.items()):
        assert got[(name, "matrix_entropy")] == pytest.approx(row.entropy, rel=1e-6), name
        assert got[(name, "log_alpha_norm")] == pytest.approx(row.log_alpha_norm, rel=1e-6), name
        close = all(got[(name, k)] == pytest.approx(getattr(row, k), rel=1e-3, abs=1e-12) for k in MP)
        mp_ok += close
        report.append(f"{name}: {'ok ' if close else 'OFF'} " + " ".join(
            f"{k}={got[(name, k)]:.6g}/{getattr(row, k):.6g}" for k in MP)
            + f" rand_distance={got[(name, 'rand_distance')]:.4f}/{row.rand_distance:.4f}")
    print("\n".join(report))
    assert mp_ok >= 0.9 * len(theirs)
    # WW's shuffle is unseeded, so rand_distance can only agree in size: both are one draw of the same statistic.
    for name, row in theirs.items():
        assert got[(name, "rand_distance")] == pytest.approx(row.rand_distance, rel=0.5, abs=0.01), name
    spikes = {n: got[(n, "num_spikes")] for n in ours}
    assert spikes["gpt_neox.layers.1.attention.query_key_value.weight"] >= 3  # the planted spikes are found


def test_rand_distance_is_seeded_and_matches_svd(built) -> None:
    from scipy.spatial.distance import jensenshannon

    _, ckpt = built
    a = _values(MPFitAnalyzer(MPFitOptions.build(rand_distance=True, seed=5)).analyze(_context(ckpt)))
    b = _values(MPFitAnalyzer(MPFitOptions.build(rand_distance=True, seed=5)).analyze(_context(ckpt)))
    c = _values(MPFitAnalyzer(MPFitOptions.build(rand_distance=True, seed=6)).analyze(_context(ckpt)))
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert a == b  # reruns agree
    assert a[(name, "rand_distance")] != c[(name, "rand_distance")]
    w = ckpt.read(name)
    import zlib

    shuffled = permuted(w, [5, zlib.crc32(name.encode())])
    assert sorted(shuffled.flatten().tolist()) == sorted(w.flatten().tolist())  # the same entries, moved
    assert not torch.equal(shuffled, w)
    ev = np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)
    ev_r = np.sort(np.linalg.svd(shuffled.double().numpy(), compute_uv=False) ** 2)
    assert a[(name, "rand_distance")] == pytest.approx(float(jensenshannon(ev, ev_r)), rel=1e-6)
    assert (name, "rand_distance") not in _values(MPFitAnalyzer(MPFitOptions.build()).analyze(_context(ckpt)))  # off by default


def test_reuses_shared_singular_values(built) -> None:
    """Singular values the weights analyzer left in ctx.shared are used instead of a new eigensolve."""
    _, ckpt = built
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    plain = _values(MPFitAnalyzer().analyze(_context(ckpt)))
    ctx = _context(ckpt)
    sv = np.linalg.svd(ckpt.read(name).double().numpy(), compute_uv=False)
    ctx.shared[("sv", name, "mlp.in")] = 2.0 * sv  # planted: the spectrum of 2W
    shared = _values(MPFitAnalyzer().analyze(ctx))
    assert shared[(name, "bulk_max")] == pytest.approx(4.0 * plain[(name, "bulk_max")], rel=1e-9)
    for key in ("sigma_mp", "mp_softrank", "num_spikes", "matrix_entropy"):  # scale-free after WW's rescaling
        assert shared[(name, key)] == pytest.approx(plain[(name, key)], rel=1e-9), key
    other = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    assert shared[(other, "bulk_max")] == plain[(other, "bulk_max")]


def test_size_filters_and_bad_options(built) -> None:
    from ckptscope.errors import CkptscopeError

    _, ckpt = built
    ctx = _context(ckpt)
    assert len(MPFitAnalyzer(MPFitOptions.build(max_n=299)).matrices(ctx)) == 8  # embeddings (300 rows) skipped
    assert len(MPFitAnalyzer(MPFitOptions.build(min_evals=65)).matrices(ctx)) == 0
    with pytest.raises(CkptscopeError, match="--min-evals"):
        MPFitOptions.build(min_evals=0)
