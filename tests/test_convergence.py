"""Convergence (CKA) analyzer: the estimators against independent float64 formulas, and the
analyzer on real checkpoints against activations collected directly from `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptscope
from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.cka import linear_cka
from ckptscope.analyzers.convergence import ConvergenceAnalyzer
from ckptscope.errors import CkptscopeError
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family
from ckptscope.rows import CheckpointRows, RunRows
from ckptscope.store.db import Store
from runs import neox_state, trajectory, write_run

STEPS = [0, 5, 10]


# -- independent references (methods.md §5.5) ----------------------------------------------
def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kernel form: ⟨HKH, HLH⟩ / (‖HKH‖_F ‖HLH‖_F) with linear kernels."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def ref_cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith's feature-space debiased estimator: centre, then the debiased dot-product helper."""
    x, y = x - x.mean(0), y - y.mean(0)
    n = len(x)

    def dot(a: np.ndarray, b: np.ndarray) -> float:
        ra, rb = (a * a).sum(1), (b * b).sum(1)
        return float(np.linalg.norm(b.T @ a) ** 2 - n / (n - 2) * ra @ rb + ra.sum() * rb.sum() / ((n - 1) * (n - 2)))

    return dot(x, y) / np.sqrt(dot(x, x) * dot(y, y))


def pair(n: int, p: int, q: int, seed: int = 0, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Related random representations with large means (as residual streams have)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) + offset * rng.standard_normal(p)
    y = np.tanh(x @ rng.standard_normal((p, q))) + 0.5 * rng.standard_normal((n, q)) + offset
    return x, y


def cka(x: np.ndarray, y: np.ndarray, batch_size: int | None = None) -> tuple[float, float]:
    return linear_cka(torch.from_numpy(x), torch.from_numpy(y), batch_size)


@pytest.mark.parametrize("n,p,q,offset", [(200, 8, 12, 0.0), (300, 16, 16, 50.0), (12, 30, 5, 3.0)])
def test_cka_matches_float64_references(n, p, q, offset):
    x, y = pair(n, p, q, offset=offset)
    biased, debiased = cka(x, y)
    assert biased == pytest.approx(ref_cka(x, y), rel=1e-9)
    assert debiased == pytest.approx(ref_cka_debiased(x, y), rel=1e-8, abs=1e-10)


def test_cka_of_identical_inputs_is_one():
    x, _ = pair(100, 10, 4, offset=20.0)
    assert cka(x, x) == pytest.approx((1.0, 1.0), rel=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y = pair(150, 12, 9, seed=3)
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((9, 9)))
    base = cka(x, y)
    assert cka(x, 3.7 * y @ q + 11.0) == pytest.approx(base, rel=1e-9)
    assert cka(0.01 * x, y) == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_streaming_equals_one_shot(batch_size):
    x, y = pair(130, 6, 10, seed=5, offset=100.0)
    assert cka(x, y, batch_size) == pytest.approx(cka(x, y), rel=1e-9)


def test_stabilization_view_on_planted_cka_series(tmp_path):
    """Layer 0 stays ≥ 0.9 from step 20; layer 1 dips below at step 30, so it stabilizes at 40."""
    series = {0: {0: 0.2, 10: 0.5, 20: 0.91, 30: 0.95, 40: 0.97, 50: 1.0},
              1: {0: 0.1, 10: 0.95, 20: 0.92, 30: 0.85, 40: 0.93, 50: 1.0}}
    with Store(tmp_path / "s.duckdb") as db:
        for step in range(0, 60, 10):
            run = RunRows("convergence", "1.0.0", {}, "float32", "test")
            for layer, values in series.items():
                run.add_metrics(f"layers.{layer}", layer, "resid", {"cka_final": values[step]})
            db.write_checkpoint(CheckpointRows("m", step, None, f"step{step}", "test", None,
                                               {k: [] for k in ("tensor", "layer", "component", "shape", "dtype")}, [run]))
        got = db.sql("SELECT layer, stabilization_step, stabilization_fraction FROM stabilization ORDER BY layer").rows()
        assert got == [(0, 20, 0.4), (1, 40, 0.8)]
        assert db.sql("SELECT layer, stabilization_step FROM stabilization_at(0.8) ORDER BY layer").rows() == [(0, 20), (1, 10)]


# -- the analyzer on real checkpoints -------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("conv")
    state, config = neox_state()
    root = write_run(base / "run", trajectory(state, STEPS, scale=0.05), config)
    rng = np.random.default_rng(0)
    probe = base / "probe.jsonl"  # unequal lengths, so batches are padded
    probe.write_text("".join(json.dumps({"id": f"p{i}", "tokens": rng.integers(0, 96, int(n)).tolist()}) + "\n"
                             for i, n in enumerate(rng.integers(5, 40, 12))))
    return root, probe


def contexts(root: Path, steps: list[int] = STEPS) -> list[AnalysisContext]:
    ckpts = {s: Checkpoint(root / f"step{s}", step=s) for s in steps}
    final = ckpts[steps[-1]]
    return [AnalysisContext(checkpoint=c, family=family(c.config), config=c.config,
                            references={"first": ckpts[steps[0]] if s != steps[0] else None, "final": final if c is not final else None})
            for s, c in ckpts.items()]


def metric(rows: RunRows, name: str) -> dict[tuple[int, str], float]:
    m = rows.metrics
    return {(l, c): v for l, c, k, v in zip(m["layer"], m["component"], m["metric"], m["value"]) if k == name}


def direct_activations(path: Path, probe: Path) -> dict[tuple[int, str], np.ndarray]:
    """Each sequence run alone (no padding), sub-layers hooked by hand, block outputs from hidden_states."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    layers = model.gpt_neox.layers
    acts: dict[tuple[int, str], list] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for component, module in (("attn_out", layer.attention), ("mlp_out", layer.mlp), ("resid", layer)):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, o, key=(i, component): acts.setdefault(key, []).append((o[0] if isinstance(o, tuple) else o)[0])))
    with torch.no_grad():
        for line in probe.read_text().splitlines():
            ids = torch.tensor([json.loads(line)["tokens"]])
            hidden = model(ids, output_hidden_states=True).hidden_states
            for i in range(len(layers) - 1):  # the last entry is after the final norm
                assert torch.allclose(hidden[i + 1][0], acts[(i, "resid")][-1], atol=1e-5)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double().numpy() for k, v in acts.items()}


def test_analyzer_matches_direct_computation(run):
    root, probe = run
    analyzer = ConvergenceAnalyzer.of(probe=probe, batch_size=5)
    rows = [analyzer.analyze(ctx) for ctx in contexts(root)]
    final = direct_activations(root / f"step{STEPS[-1]}", probe)
    for step, out in zip(STEPS[:-1], rows):
        current = direct_activations(root / f"step{step}", probe)
        biased, debiased = metric(out, "cka_final"), metric(out, "cka_final_debiased")
        assert set(biased) == set(final) and len(biased) == 6
        for key in final:
            assert biased[key] == pytest.approx(ref_cka(current[key], final[key]), abs=2e-5)
            assert debiased[key] == pytest.approx(ref_cka_debiased(current[key], final[key]), abs=2e-5)
        assert out.parameters["reference"] == STEPS[-1] and out.parameters["positions"] == len(final[(0, "resid")])
        assert "float16" in out.dtype and out.metrics["tensor"][0].startswith("gpt_neox.layers.0")
    assert set(metric(rows[-1], "cka_final").values()) == {1.0}
    assert metric(rows[0], "cka_final")[(0, "resid")] < metric(rows[1], "cka_final")[(0, "resid")] < 1.0


def test_bounded_memory_paths_agree(run):
    """Recomputing the reference (no activation cache) and one site per pass give the same values."""
    root, probe = run
    ctx = contexts(root)[1]
    default = ConvergenceAnalyzer.of(probe=probe, batch_size=4).analyze(ctx)
    bounded = ConvergenceAnalyzer.of(probe=probe, batch_size=4, cache_mb=0, stats_mb=1e-6)
    got = bounded.analyze(ctx)
    assert bounded._reference_state.activations is None and bounded._reference_state.model is not None
    for name in ("cka_final", "cka_final_debiased"):
        assert metric(got, name) == pytest.approx(metric(default, name), rel=1e-9)


def test_reference_first_and_bad_options(run):
    root, probe = run
    out = ConvergenceAnalyzer.of(probe=probe, reference_step="first").analyze(contexts(root)[2])
    assert out.parameters["reference"] == 0 and metric(out, "cka_ref") and not metric(out, "cka_final")
    with pytest.raises(CkptscopeError, match="needs --probe"):
        ConvergenceAnalyzer.of()
    with pytest.raises(CkptscopeError, match="reference-step"):
        ConvergenceAnalyzer.of(probe=probe, reference_step="middle")
    with pytest.raises(CkptscopeError, match="not open"):
        ConvergenceAnalyzer.of(probe=probe, reference_step=7).analyze(contexts(root)[1])


def test_bert_masked_lm_is_supported(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50,
                     max_position_embeddings=64)
    for step in (0, 1):
        BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert" / f"step{step}")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"id": i, "tokens": list(range(i, i + 10))}) + "\n" for i in range(6)))
    out = ConvergenceAnalyzer.of(probe=probe).analyze(contexts(tmp_path / "bert", [0, 1])[0])
    values = metric(out, "cka_final")
    assert len(values) == 6 and all(0 <= v <= 1 for v in values.values())
    assert "bert.encoder.layer.1.attention.output.dense" in out.metrics["tensor"]


def test_pipeline_convergence_and_stabilization(run, tmp_path):
    """Through `ckptscope.ingest` (needs the pipeline to forward `probe`/`batch_size` to analyzers)."""
    root, probe = run
    store = tmp_path / "s.duckdb"
    ckptscope.ingest(root, store=store, analyzers="weights,convergence", probe=probe, batch_size=8)
    with Store(store, read_only=True) as db:
        cka = db.sql("SELECT step, value FROM metrics WHERE metric = 'cka_final' AND analyzer = 'convergence'")
        stab = db.sql("SELECT * FROM stabilization")
    assert cka.height == 6 * len(STEPS) and cka.filter(cka["step"] == STEPS[-1])["value"].to_list() == [1.0] * 6
    assert stab.height == 6 and stab["stabilization_step"].max() <= STEPS[-1]
