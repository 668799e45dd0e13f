"""Cross-seed similarity (cka_model, seed_similarity, analyze seeds) and the seed-group report sections,
on real seed groups trained by scripts/make_seed_suite.py and ingested through the real pipeline."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file

from ckptscope.cross_seed import analyze_seeds, seed_similarity
from ckptscope.errors import CkptscopeError
from ckptscope.pipeline import analyze, ingest
from ckptscope.store.db import Store
from test_convergence import ref_cka, ref_cka_debiased

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_seed_suite import make_seed_suite  # noqa: E402

STEPS = (0, 2, 8)
GROUPS = {"recipe-a": (1, 2, 3), "recipe-b": (4, 5)}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    """Two seed groups of the demo model (3 and 2 seeds), weights ingested; a probe of unequal lengths."""
    root = tmp_path_factory.mktemp("cross")
    store = root / "cross.duckdb"
    runs = {}
    for group, seeds in GROUPS.items():
        for seed, run in make_seed_suite(root / group, seeds, train_steps=8, steps=STEPS).items():
            ingest(run, store=store, name=f"s{seed}", group=group, seed=seed, tokens_per_step=512, analyzers="weights",
                   spectrum="fast")
            runs[seed] = run
    vocab = json.loads((runs[1] / "step0" / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    probe = root / "probe.jsonl"
    probe.write_text("".join(json.dumps({"id": f"p{i}", "tokens": rng.integers(0, vocab, int(n)).tolist()}) + "\n"
                             for i, n in enumerate(rng.integers(6, 24, 8))))
    analyze_seeds("recipe-a", probe=probe, store=store, batch_size=3)
    return {"root": root, "store": store, "runs": runs, "probe": probe}


def hidden_states(step_dir: Path, probe: Path) -> list[np.ndarray]:
    """Block outputs from transformers' output_hidden_states, each sequence run alone, float64 (positions x features)."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(str(step_dir), dtype=torch.float32).eval()
    per_layer: list[list[np.ndarray]] = [[] for _ in range(model.config.num_hidden_layers - 1)]
    with torch.no_grad():
        for line in probe.read_text().splitlines():
            hidden = model(torch.tensor([json.loads(line)["tokens"]]), output_hidden_states=True).hidden_states
            for i in range(len(per_layer)):  # the last entry is after the final norm, not a block output
                per_layer[i].append(hidden[i + 1][0].double().numpy())
    return [np.concatenate(h) for h in per_layer]


def pair_rows(store: Path, metric: str) -> pl.DataFrame:
    """Per-pair rows straight from metric_values and runs.parameters (not through the view)."""
    with Store(store, read_only=True) as db:
        return db.sql("""SELECT v.model, r.parameters->>'reference_model' AS other, v.step, v.layer, v.component, v.tensor, v.value
                         FROM metric_values v JOIN runs r USING (run_id) WHERE v.metric = ? ORDER BY ALL""", [metric])


def test_cka_model_equals_float64_cka_of_hidden_states(suite):
    rows = pair_rows(suite["store"], "cka_model")
    debiased = pair_rows(suite["store"], "cka_model_debiased")
    assert set(zip(rows["model"], rows["other"])) == {("s1", "s2"), ("s1", "s3"), ("s2", "s3")}
    assert set(rows["step"]) == set(STEPS)
    for model, other, step in (("s1", "s2", 8), ("s2", "s3", 2)):
        mine = hidden_states(suite["runs"][int(model[1:])] / f"step{step}", suite["probe"])
        theirs = hidden_states(suite["runs"][int(other[1:])] / f"step{step}", suite["probe"])
        for layer, (x, y) in enumerate(zip(mine, theirs)):
            where = (pl.col("model") == model) & (pl.col("other") == other) & (pl.col("step") == step) & (pl.col("layer") == layer) \
                & (pl.col("component") == "resid")
            assert rows.filter(where)["value"].item() == pytest.approx(ref_cka(x, y), abs=2e-5)
            assert debiased.filter(where)["value"].item() == pytest.approx(ref_cka_debiased(x, y), abs=2e-5)
    with Store(suite["store"], read_only=True) as db:
        runs = db.sql("SELECT analyzer, parameters FROM runs WHERE analyzer LIKE 'convergence%' AND model = 's1' ORDER BY analyzer")
    assert runs["analyzer"].unique().to_list() == ["convergence:s2", "convergence:s3"]
    assert {json.loads(p)["reference_model"] for p in runs["parameters"]} == {"s2", "s3"}


def test_cka_seed_is_the_mean_over_pairs(suite):
    view = seed_similarity("recipe-a", store=suite["store"], metric="cka_seed")
    direct = (pair_rows(suite["store"], "cka_model").group_by("step", "layer", "component")
              .agg(pl.col("value").mean().alias("m"), pl.col("value").std().alias("s"), pl.len().alias("n")))
    joined = view.join(direct, on=["step", "layer", "component"])
    assert joined.height == view.height == direct.height == len(STEPS) * 4 * 3  # 4 layers x resid, attn_out, mlp_out
    assert (joined["n_pairs"] == 3).all() and (joined["n"] == 3).all()
    assert np.allclose(joined["mean"], joined["m"], rtol=1e-12) and np.allclose(joined["std"], joined["s"], rtol=1e-9)
    assert (view["tokens"] == view["step"] * 512).all()


def test_seed_relative_distance_equals_numpy(suite):
    rows = pair_rows(suite["store"], "model_relative_distance")
    for model, other, step in (("s1", "s3", 0), ("s2", "s3", 8)):
        a = load_file(str(suite["runs"][int(model[1:])] / f"step{step}" / "model.safetensors"))
        b = load_file(str(suite["runs"][int(other[1:])] / f"step{step}" / "model.safetensors"))
        expected = {k: np.linalg.norm(a[k].astype(np.float64) - b[k].astype(np.float64)) / np.linalg.norm(b[k].astype(np.float64))
                    for k in a if np.linalg.norm(b[k].astype(np.float64)) > 0}
        got = rows.filter((pl.col("model") == model) & (pl.col("other") == other) & (pl.col("step") == step))
        assert dict(zip(got["tensor"], got["value"])) == pytest.approx(expected, rel=1e-12)
        assert len(expected) > 10
    view = seed_similarity("recipe-a", store=suite["store"], metric="seed_relative_distance").filter(pl.col("step") == 8)
    mean = rows.filter(pl.col("step") == 8).group_by("tensor").agg(pl.col("value").mean())
    assert dict(zip(view["tensor"], view["mean"])) == pytest.approx(dict(zip(mean["tensor"], mean["value"])), rel=1e-12)


def test_a_step_the_other_model_lacks_is_skipped_with_an_anomaly(suite, tmp_path):
    gappy = tmp_path / "gappy"
    shutil.copytree(suite["runs"][3], gappy)
    store = tmp_path / "gap.duckdb"
    shutil.copy(suite["store"], store)
    ingest(gappy, store=store, name="gappy", analyzers="weights", spectrum="fast", steps="0,8")
    shutil.rmtree(gappy / "step2")
    analyze("s1", "convergence", store=store, probe=suite["probe"], reference_model="gappy")
    with Store(store, read_only=True) as db:
        steps = db.sql("SELECT DISTINCT step FROM metrics WHERE analyzer = 'convergence:gappy' AND metric = 'cka_model' ORDER BY 1")
        gaps = db.sql("SELECT step, kind, detail FROM anomalies WHERE kind = 'reference_step_missing'")
    assert steps["step"].to_list() == [0, 8]
    assert gaps.rows() == [(2, "reference_step_missing", "model gappy has no step 2 in its source; cka_model was not computed for this step")]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ckptscope", *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def test_mistakes_are_one_line_errors_with_the_store_untouched(suite):
    store = suite["store"]
    before = store.read_bytes()
    probe = str(suite["probe"])
    for args, fragment in (
        (("analyze", "convergence", "s1", "--probe", probe, "--reference-model", "nobody"), "model 'nobody' is not in"),
        (("analyze", "convergence", "s1", "--probe", probe, "--reference-model", "s2", "--reference-step", "first"),
         "--reference-step and --reference-model exclude each other"),
        (("analyze", "seeds", "recipe-z", "--probe", probe), "no seed group 'recipe-z'"),
    ):
        out = _cli(*args, "--store", str(store))
        assert out.returncode == 1 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr
    with pytest.raises(CkptscopeError, match="--reference-model: `analyze seeds` compares"):
        analyze_seeds("recipe-a", probe=suite["probe"], store=store, reference_model="s2")
    assert store.read_bytes() == before


def test_analyze_seeds_cli_resumes(suite):
    out = _cli("analyze", "seeds", "recipe-a", "--probe", str(suite["probe"]), "--batch-size", "3", "--store", str(suite["store"]))
    assert out.returncode == 0, out.stderr
    assert "cka_seed across the seed pairs of recipe-a" in out.stdout and "seed_relative_distance" in out.stdout
    with Store(suite["store"], read_only=True) as db:  # every pair and step was done already: nothing recomputed
        assert db.sql("SELECT count(*) FROM runs WHERE analyzer LIKE 'convergence:%'").item() == 3 * len(STEPS)
    assert not math.isnan(seed_similarity("recipe-a", store=suite["store"], metric="cka_seed")["mean"].mean())
