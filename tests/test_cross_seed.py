"""Cross-seed similarity (cka_model, seed_similarity, analyze seeds) and the seed-group report sections,
on real seed groups trained by scripts/make_seed_suite.py and ingested through the real pipeline."""

from __future__ import annotations

import json
import math
import re
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
from ckptscope.phases import fit_phases
from ckptscope.pipeline import analyze, ingest
from ckptscope.reports import build_report
from ckptscope.seeds import seed_intervals
from ckptscope.store.db import Store
from test_convergence import ref_cka, ref_cka_debiased
from test_reports import assert_renders_cleanly, open_report, report_payload, section_titles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_seed_suite import make_seed_suite  # noqa: E402

STEPS = (0, 1, 2, 4, 8)  # five steps: enough for the HMM of `phases`
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
    assert runs["analyzer"].unique(maintain_order=True).to_list() == ["convergence:s2", "convergence:s3"]
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
    assert steps["step"].to_list() == [0, 1, 4, 8]
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


# -- the report's seed sections -------------------------------------------------------------------

def label(row: dict) -> str:
    return f"{row['tensor']} ({row['component']})"


def test_seed_report_bands_equal_seed_intervals(suite, browser, tmp_path):
    store = tmp_path / "report.duckdb"
    shutil.copy(suite["store"], store)
    phases = fit_phases("recipe-a", store=store, max_states=3, seed=0)
    report = build_report(store, tmp_path / "seeds.html", metrics=["stable_rank"], groups=["recipe-a", "recipe-b"],
                          seed_bootstrap=100, seed=3)
    info = open_report(browser, report, tmp_path / "seeds.png")
    # overview, stable_rank per model (5 x heatmap + lines), spectra (5), bands (2 groups), cross-seed CKA, phases, difference
    assert_renders_cleanly(info, tmp_path / "seeds.png", min_charts=1 + 5 * 2 + 5 + 2 + 1 + 1 + 1)
    titles = section_titles(browser)
    assert {"Seed group: recipe-a", "Seed group: recipe-b", "Seed groups compared with recipe-a"} <= set(titles)
    charts = report_payload(report)

    band = next(c for c in charts if c["type"] == "seedband" and c["group"] == "recipe-a")
    expected: dict[str, dict[int, dict]] = {}
    for r in seed_intervals("recipe-a", "stable_rank", store=store, nboot=100, seed=3).to_dicts():
        expected.setdefault(label(r), {})[r["step"]] = r
    assert [c["label"] for c in band["cells"]] and {c["label"] for c in band["cells"]} == set(expected)
    with Store(store, read_only=True) as db:
        raw = db.sql("SELECT m.seed, v.step, v.tensor, v.component, v.value FROM metric_values v JOIN models m USING (model) "
                     "WHERE m.group_name = 'recipe-a' AND v.metric = 'stable_rank'")
    for cell in band["cells"]:
        want = expected[cell["label"]]
        assert cell["steps"] == sorted(want) == list(STEPS)
        for key in ("mean", "low", "high"):
            assert cell[key] == pytest.approx([want[s][key] for s in cell["steps"]], rel=1e-12)
        tensor, component = cell["label"].removesuffix(")").rsplit(" (", 1)
        assert len(cell["seeds"]) == 3
        for line in cell["seeds"]:
            own = raw.filter((pl.col("seed") == line["seed"]) & (pl.col("tensor") == tensor) & (pl.col("component") == component))
            own = own.sort("step")
            assert line["values"] == own["value"].to_list() and line["steps"] == own["step"].to_list()

    diff = next(c for c in charts if c["type"] == "seeddiff")
    assert (diff["group"], diff["compare"]) == ("recipe-a", "recipe-b")
    first = diff["cells"][0]
    component = first["label"].rsplit(" (", 1)[1].rstrip(")")
    direct = seed_intervals("recipe-a", "stable_rank", store=store, component=component, compare="recipe-b", nboot=100, seed=3)
    direct = direct.filter(pl.col("tensor") == first["label"].rsplit(" (", 1)[0]).sort("step")
    for key in ("difference", "low", "high", "p"):
        assert first[key] == pytest.approx(direct[key].to_list(), rel=1e-12)

    cka = next(c for c in charts if c["type"] == "seedcka")
    view = seed_similarity("recipe-a", store=store, metric="cka_seed")
    comp = cka["components"].index("resid")
    for s in cka["series"][comp]:
        got = view.filter((pl.col("component") == "resid") & (pl.col("layer") == s["layer"])).sort("step")
        assert s["mean"] == pytest.approx(got["mean"].to_list(), rel=1e-12) and s["n_pairs"] == [3] * len(STEPS)

    drawn = next(c for c in charts if c["type"] == "phases")
    for line in drawn["seeds"]:
        assert line["state"] == phases.filter(pl.col("model") == line["model"]).sort("step")["state"].to_list()
    assert not any(c["type"] == "phases" and c["group"] == "recipe-b" for c in charts)  # no phases fitted for it

    hover = browser.execute_script(
        "const gd = document.getElementById(arguments[0]); Plotly.Fx.hover(gd, [{curveNumber: 2, pointNumber: 1}]);"
        "return gd.querySelector('.hoverlayer').textContent;", f"{band['id']}-0")
    assert "seed 1 (s1)" in hover and "step: 1" in hover, hover


def test_report_groups_option(suite, tmp_path):
    out = _cli("report", "--store", str(suite["store"]), "--groups", "recipe-z", "-o", str(tmp_path / "r.html"))
    assert out.returncode == 1 and "seed group(s) recipe-z not in the store" in out.stderr and "Traceback" not in out.stderr
    ok = _cli("report", "--store", str(suite["store"]), "--metrics", "stable_rank", "--seed-bootstrap", "0", "-o", str(tmp_path / "r.html"))
    assert ok.returncode == 0, ok.stderr
    titles = re.findall(r"<h2>(.*?)</h2>", (tmp_path / "r.html").read_text())
    assert "Seed group: recipe-a" in titles and "Seed groups compared with recipe-a" in titles
