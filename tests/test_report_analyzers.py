"""The report sections of the weight analyzers beyond `weights`, on a run really ingested with
`--analyzers weights,mp_fit,subspace,circuits`: the MP bulk over the spectra, per-head circuit
heatmaps and subspace rotation per layer (the `HeatmapChart` of the analyzer contract).

Values are checked against the store's `metric_values` and `spectra` tables read directly, and the
MP overlay against numpy on the weights as written; browser checks need headless Chromium.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ckptscope
from ckptscope.cli import main
from ckptscope.reports import build_report
from ckptscope.sources.checkpoint import Checkpoint
from runs import neox_state, trajectory, write_run
from test_reports import assert_renders_cleanly, open_report, report_payload

STEPS = [0, 1, 2, 4, 8]
PLANTED = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"  # gets a rank-1 spike far above its MP bulk
SPIKE = 40.0  # its singular value


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("weights-beyond")
    state, config = neox_state(seed=7)
    gen = torch.Generator().manual_seed(11)
    rows, cols = state[PLANTED].shape
    u, v = torch.randn(rows, generator=gen), torch.randn(cols, generator=gen)
    state[PLANTED] = state[PLANTED] + SPIKE * torch.outer(u / u.norm(), v / v.norm())
    root = write_run(base / "run", trajectory(state, STEPS, seed=8, scale=0.01), config, dtype=torch.float32)
    path = base / "store.duckdb"
    result = CliRunner().invoke(main, ["ingest", str(root), "--store", str(path), "--name", "tiny-neox",
                                       "--analyzers", "weights,mp_fit,subspace,circuits"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    return build_report(store, tmp_path_factory.mktemp("report") / "report.html")


def stored(store: Path, analyzer: str, where: str, key: str = "v.layer") -> dict[tuple, float]:
    """(layer or `key`, component, metric, head, step) -> value from metric_values and runs, not the report's views."""
    with ckptscope.Store(store, read_only=True) as db:
        df = db.sql(f"SELECT {key}, v.component, v.metric, v.head, v.step, v.value FROM metric_values v "
                    f"JOIN runs r USING (run_id) WHERE r.analyzer = '{analyzer}' AND {where}")
    return {row[:5]: row[5] for row in df.rows()}


def heatmaps(payload: list[dict], facet_word: str) -> dict:
    [chart] = [c for c in payload if c["type"] == "heatmap" and any(facet_word in f["name"] for f in c["facets"])]
    return chart


def cells(chart: dict) -> dict[tuple[str, int, int], float]:
    """(facet, x, y) -> z for every filled cell of a heatmap payload."""
    return {(f["name"], x, y): z for f in chart["facets"] for i, y in enumerate(f["y"]) for j, x in enumerate(f["x"])
            if (z := f["z"][i][j]) is not None}


def test_circuit_heatmaps_equal_the_store(store, report):
    chart = heatmaps(report_payload(report), "attn.ov")
    want = {(f"layer {layer} · {comp} · {metric}", step, head): value
            for (layer, comp, metric, head, step), value in stored(store, "circuits", "v.head IS NOT NULL").items()}
    assert len(want) == 2 * 2 * 4 * 4 * len(STEPS)  # layers × circuits × metrics × heads × steps
    assert cells(chart) == want
    names = [f["name"] for f in chart["facets"]]
    assert names[0] == "layer 0 · attn.ov · effective_rank" and len(names) == 16  # ordered by layer, circuit, metric
    assert all(f["y"] == [0, 1, 2, 3] and f["x"] == STEPS for f in chart["facets"])


def test_subspace_heatmaps_equal_the_store(store, report):
    chart = heatmaps(report_payload(report), "subspace_prev_left")
    want = {(f"{comp} · {metric}", step, layer): value for (layer, comp, metric, _, step), value
            in stored(store, "subspace", "v.layer IS NOT NULL AND v.metric IN ('subspace_prev_left', 'subspace_prev_right', "
                      "'subspace_final_left', 'subspace_final_right')").items()}
    assert cells(chart) == want and len({k[0] for k in want}) == 4 * 7  # 4 metrics × attn.qkv/q/k/v, attn.o, mlp.in/out
    assert [f["name"] for f in chart["facets"]][:4] == [f"attn.k · subspace_{s}" for s in
                                                        ("prev_left", "prev_right", "final_left", "final_right")]
    # the final step against itself: the same directions
    assert all(v == 1.0 for (facet, step, _), v in want.items() if step == STEPS[-1] and "final" in facet)


def test_mp_bulk_in_spectrum_units(store, report):
    """The bulk drawn is in the histogram's λ = σ² units: its edges are mp_fit's bulk_min/bulk_max, and
    the spikes marked are the eigenvalues of the weights as written above bulk_max."""
    [spectrum] = [c for c in report_payload(report) if c["type"] == "spectrum"]
    fits = stored(store, "mp_fit", "v.metric IN ('bulk_min', 'bulk_max', 'sigma_mp', 'num_spikes')", key="v.tensor")
    drawn = 0
    for matrix in spectrum["matrices"]:
        for s in matrix["steps"]:
            key = (matrix["tensor"], matrix["component"])
            if (*key, "bulk_max", None, s["step"]) not in fits:
                assert s["mp"] is None
                continue
            mp, drawn = s["mp"], drawn + 1
            root_q = 1 / math.sqrt(mp["q"])
            assert mp["sigma2"] * (1 + root_q) ** 2 == pytest.approx(fits[(*key, "bulk_max", None, s["step"])], rel=1e-9)
            assert mp["sigma2"] * (1 - root_q) ** 2 == pytest.approx(fits[(*key, "bulk_min", None, s["step"])], rel=1e-9, abs=1e-15)
            assert mp["num_spikes"] == fits[(*key, "num_spikes", None, s["step"])]
    assert drawn >= 5 * len(spectrum["matrices"]) // 2
    planted = next(m for m in spectrum["matrices"] if m["tensor"] == PLANTED)
    w = Checkpoint(Path(store).parent / "run" / "step8", step=8).read(PLANTED).double().numpy()
    ev = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)[::-1]
    mp = next(s for s in planted["steps"] if s["step"] == 8)["mp"]
    above = ev[ev > mp["bulk_max"]]
    assert mp["above"] == len(above) >= 1 and mp["spikes"] == pytest.approx(above.tolist(), rel=1e-5)
    assert above[0] == pytest.approx(SPIKE**2, rel=0.05)


def test_spectra_chart_offers_whole_matrices_never_pooled_heads(store, report):
    """The circuits analyzer stores a spectrum per head (`head` set); the spectra chart shows one
    histogram per matrix, so those rows are left out of it rather than pooled per layer."""
    [spectrum] = [c for c in report_payload(report) if c["type"] == "spectrum"]
    with ckptscope.Store(store, read_only=True) as db:
        whole = db.sql("SELECT DISTINCT tensor, component FROM spectra WHERE kind = 'weight' AND head IS NULL").rows()
        per_head = db.sql("SELECT count(*) FROM spectra WHERE head IS NOT NULL").item()
    assert per_head == 2 * 2 * 4 * len(STEPS)  # layers × circuits × heads × steps
    assert sorted((m["tensor"], m["component"]) for m in spectrum["matrices"]) == sorted(whole)
    assert not {m["component"] for m in spectrum["matrices"]} & {"attn.ov", "attn.qk"}


def test_sections_drawn_in_the_browser(store, report, browser, tmp_path):
    info = open_report(browser, report, tmp_path / "beyond.png")
    assert_renders_cleanly(info, tmp_path / "beyond.png", min_charts=1 + 2 * 6 + 1 + 2)
    titles = browser.execute_script("return Array.from(document.querySelectorAll('main h2'), (h) => h.textContent)")
    assert titles[-2:] == ["Attention heads: OV and QK circuits", "Subspace rotation"]
    payload = report_payload(report)
    chart = heatmaps(payload, "attn.ov")
    div = f"{chart['id']}-0"

    def shown() -> dict:
        return browser.execute_script("const t = document.getElementById(arguments[0]).data[0];"
                                      "return {x: Array.from(t.x), y: Array.from(t.y), z: t.z.map((r) => Array.from(r))};", div)

    assert shown()["z"] == chart["facets"][0]["z"]
    facet = "layer 1 · attn.qk · spectral_norm"
    browser.execute_script("const s = document.querySelector(`#${arguments[0]} select.choice`); s.value = arguments[1];"
                           "s.dispatchEvent(new Event('change'));", chart["id"], facet)
    got = shown()
    want = stored(store, "circuits", "v.layer = 1 AND v.component = 'attn.qk' AND v.metric = 'spectral_norm'")
    assert got["x"] == pytest.approx([math.log10(s + 1) for s in STEPS]) and got["y"] == [0, 1, 2, 3]
    assert got["z"] == [[want[(1, "attn.qk", "spectral_norm", h, s)] for s in STEPS] for h in range(4)]
    hover = browser.execute_script("const gd = document.getElementById(arguments[0]); Plotly.Fx.hover(gd, {xval: arguments[1], "
                                   "yval: 2}); return gd.querySelector('.hoverlayer').textContent;", div, math.log10(4 + 1))
    assert facet in hover and "step: 4" in hover and f"value: {want[(1, 'attn.qk', 'spectral_norm', 2, 4)]:.4g}" in hover

    # the spectrum of the planted matrix: its MP bulk follows the density formula, its spike is marked
    spectrum = next(c for c in payload if c["type"] == "spectrum")
    label = f"{PLANTED} (mlp.in)"
    browser.execute_script("const s = document.querySelector(`#${arguments[0]} select.choice`); s.value = arguments[1];"
                           "s.dispatchEvent(new Event('change'));", spectrum["id"], label)
    traces = browser.execute_script("return document.getElementById(arguments[0]).data.map((t) => ({name: t.name, "
                                    "x: Array.from(t.x), y: Array.from(t.y), yaxis: t.yaxis || 'y'}))", f"{spectrum['id']}-0")
    steps = next(m for m in spectrum["matrices"] if m["tensor"] == PLANTED)["steps"]
    bulks = [t for t in traces if t["name"].startswith("MP bulk")]
    spikes = [t for t in traces if "above bulk_max" in t["name"]]
    assert len(bulks) == sum(s["mp"] is not None for s in steps) == len(spikes) >= 1
    for trace, s in zip(bulks, (s for s in steps if s["mp"])):
        lam, q, sigma2 = np.array(trace["x"]), s["mp"]["q"], s["mp"]["sigma2"]
        a, b = sigma2 * (1 - q**-0.5) ** 2, sigma2 * (1 + q**-0.5) ** 2
        assert lam.min() > a and lam.max() < b and lam.max() > b * 0.999
        assert trace["y"] == pytest.approx(q * np.sqrt((b - lam) * (lam - a)) / (2 * math.pi * sigma2 * lam), rel=1e-9)
    assert all(t["yaxis"] == "y2" for t in spikes)
    assert [t["x"] for t in spikes] == [s["mp"]["spikes"] for s in steps if s["mp"]]
