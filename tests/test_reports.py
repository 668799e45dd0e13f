"""Reports: HTML rendered from real ingested stores and checked in headless Chromium; static plots.

Browser tests need Debian's `chromium` and `chromium-driver` (installed by .ci/run) and are
skipped, with that reason, where they are absent.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

import ckptscope
from ckptscope.analyzers.memorization import MEMORIZATION
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.reports import build_report, metric_figure, plot_metric
from ckptscope.reports import queries as q
from runs import neox_state, trajectory, write_run

XSS = "<script>alert(1)</script>"
NAN_TENSOR = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
from conftest import CHROMIUM
PDFTOTEXT = shutil.which("pdftotext")
STEP_AXIS = "step (log scale of step + 1)"  # the title of every step axis in the report
HEADS = "Attention heads: OV and QK circuits"  # the section of `circuits`, a default analyzer
DEMO_SUITE = Path(ckptscope.__file__).parent / "demo_suite"
DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "report.png"


def ingest_run(base: Path, store: Path, name: str, steps: list[int], *, num_layers: int = 2, seed: int = 0,
               duplicate: tuple[int, int] | None = None, nan_step: int | None = None) -> None:
    """A real run on disk, optionally with a duplicate checkpoint and a NaN tensor, ingested into `store`."""
    state, config = neox_state(seed, num_layers)
    states = trajectory(state, steps, seed=seed + 1)
    if duplicate:
        states[duplicate[1]] = {k: v.clone() for k, v in states[duplicate[0]].items()}
    if nan_step is not None:
        states[nan_step][NAN_TENSOR][0, 0] = math.nan
    root = write_run(base / f"run-{seed}-{num_layers}", states, config)
    ckptscope.ingest(root, store=store, name=name, tokens_per_step=2048)


@pytest.fixture(scope="module")
def one_model(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("one")
    store = base / "one.duckdb"
    ingest_run(base, store, "pythia-tiny", [0, 1, 2, 4, 8, 16, 32], duplicate=(2, 4), nan_step=8)
    return store


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("two")
    store = base / "two.duckdb"
    ingest_run(base, store, "shallow-2L", [0, 1, 2, 4, 8, 16], num_layers=2, seed=0, duplicate=(4, 8))
    ingest_run(base, store, "deep-4L", [0, 2, 8, 32, 64], num_layers=4, seed=3)
    return store


def cka(depth: float, progress: float) -> float:
    """Synthetic CKA to the final checkpoint at relative depth `depth`: 1 at the end, deeper layers settle later."""
    return 1 - 0.5 * (1 - progress) ** (1 + 3 * (1 - depth))


def gpt2_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """A tiny real GPT-2 (untied head): two embeddings without a layer (wte, wpe), lm_head, ln_1/ln_2 per layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, tie_word_embeddings=False,
                     bos_token_id=0, eos_token_id=0)
    state = {k: v.detach().clone().contiguous() for k, v in GPT2LMHeadModel(cfg).named_parameters()}
    config = cfg.to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    return state, config


@pytest.fixture(scope="module")
def gpt2_store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("gpt2")
    state, config = gpt2_state()
    root = write_run(base / "run", trajectory(state, [0, 1, 2, 4, 8, 16], seed=5, scale=0.05), config)
    store = base / "gpt2.duckdb"
    ckptscope.ingest(root, store=store, name="gpt2-tiny", tokens_per_step=1024)
    return store


def stored_series(store: Path, metric: str, where: str) -> dict[str, list[float]]:
    """tensor -> values by step, straight from metric_values (not through the report's queries)."""
    with ckptscope.Store(store, read_only=True) as db:
        df = db.sql(f"SELECT tensor, step, value FROM metric_values WHERE metric = '{metric}' AND {where} ORDER BY tensor, step")
    return {t: g["value"].to_list() for (t,), g in df.partition_by("tensor", as_dict=True, maintain_order=True).items()}


def report_payload(report: Path) -> list[dict]:
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', report.read_text(), re.S)[1])


def unpack(b64: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of html._pack, written out again: byte planes 1-3 of little-endian float32."""
    planes = np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(3, -1)
    out = np.zeros((planes.shape[1], 4), dtype=np.uint8)
    out[:, 1:] = planes.T
    return out.view("<f4").reshape(shape)


@pytest.fixture(scope="module")
def convergence_store(two_models, tmp_path_factory) -> Path:
    """The two-model store plus rows of analyzers that do not exist yet (CKA, memorization).

    SYNTHETIC ROWS, written with SQL because no analyzer produces them yet: metrics `cka_final`
    and `memorization_logit_lens` per layer (component `residual`) and rows of the store's
    `memorization` table, under one run of analyzer `synthetic-test` per checkpoint. Replace
    with the real analyzers once they land.
    """
    store = tmp_path_factory.mktemp("conv") / "conv.duckdb"
    shutil.copy(two_models, store)
    with ckptscope.Store(store) as db:
        ckpts = db.sql("SELECT c.model, c.step, max(c.step) OVER (PARTITION BY c.model) AS last, m.num_layers "
                       "FROM checkpoints c JOIN models m USING (model) ORDER BY c.model, c.step").rows()
        metric_rows, mem_rows = [], []
        for model, step, last, num_layers in ckpts:
            run_id = db.con.execute("SELECT nextval('run_ids')").fetchall()[0][0]
            db.con.execute("INSERT INTO runs (run_id, model, step, analyzer, version, parameters, dtype, backend) "
                           "VALUES (?, ?, ?, 'synthetic-test', '0', '{}', 'float64', 'test')", [run_id, model, step])
            for layer in range(num_layers):
                tensor = f"gpt_neox.layers.{layer}"
                metric_rows.append((run_id, model, step, tensor, layer, "residual", "cka_final", cka(layer / num_layers, step / last)))
                metric_rows.append((run_id, model, step, tensor, layer, "residual", "memorization_logit_lens", 0.1 * layer + step / last))
            for seq in range(10):
                memorized = seq < round(10 * step / last)
                mem_rows.append((run_id, model, step, f"seq-{seq}", 1.0 if memorized else seq / 20, memorized, 3.0 - step / last))
        cols = ["run_id", "model", "step", "tensor", "layer", "component", "metric", "value"]
        db.con.register("synthetic_metrics", pa.table(dict(zip(cols, map(list, zip(*metric_rows))))))
        db.con.execute(f"INSERT INTO metric_values ({', '.join(cols)}) SELECT * FROM synthetic_metrics")
        for statement in (MEMORIZATION.ddl(), *MEMORIZATION.views):  # the table the memorization analyzer declares
            db.con.execute(statement)
        db.con.executemany("INSERT INTO memorization (run_id, model, step, sequence_id, score, memorized, loss) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", mem_rows)
    return store


@pytest.fixture(scope="module")
def xss_store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("xss")
    store = base / "xss.duckdb"
    ingest_run(base, store, XSS, [0, 1, 4])
    return store


# -- the browser ---------------------------------------------------------------------------------

CHART_CHECK = """
return Array.from(document.querySelectorAll("div.plot"), (div) => {
  const svg = div.querySelector("svg.main-svg");
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const marks = Array.from(div.querySelectorAll(
    ".cartesianlayer .trace path.js-line, .cartesianlayer .trace path.point, .cartesianlayer .hm image"));
  const drawn = marks.filter((m) => (m.getAttribute("d") || m.getAttribute("href") || "").length > 10);
  return {id: div.id, traces: (div._fullData || []).length, marks: drawn.length, width: box.width, height: box.height};
});
"""


def open_report(driver, report: Path, screenshot: Path) -> dict:
    """Load `report`, wait for its charts, and return console errors, requests and chart states."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser"), driver.get_log("performance")  # drain what earlier pages left
    driver.set_window_size(1400, 1000)
    driver.get(report.resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.documentElement.dataset.state") != "loading")
    state = driver.execute_script("return document.documentElement.dataset.state")
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    info = {
        "state": state,
        "errors": [e for e in driver.get_log("browser") if e["level"] == "SEVERE"],
        # Plotly draws heatmaps as in-memory data: images; those are not network requests.
        "requests": [u for u in requests if u != report.resolve().as_uri() and not u.startswith("data:")],
        "resources": driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)"),
        "charts": driver.execute_script(CHART_CHECK),
    }
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height, 8000))
    driver.save_screenshot(str(screenshot))
    return info


def assert_renders_cleanly(info: dict, screenshot: Path, min_charts: int) -> None:
    assert info["state"] == "ready", info["errors"]
    assert info["errors"] == []
    assert info["requests"] == [] and info["resources"] == []
    assert len(info["charts"]) >= min_charts
    for chart in info["charts"]:
        assert chart["traces"] > 0 and chart["marks"] > 0 and chart["width"] > 100 and chart["height"] > 100, chart
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def section_titles(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('main h2'), (h) => h.textContent)")


# -- reports in the browser -----------------------------------------------------------------------

def test_one_model_report(one_model, browser, tmp_path):
    report = build_report(one_model, tmp_path / "one.html")
    assert report.stat().st_size < 6_000_000  # plotly.js (4.8 MB, embedded uncompressed) and the data
    info = open_report(browser, report, tmp_path / "one.png")
    # at least: overview + per metric (heatmap + lines) for the 6 default metrics + spectrum (then the heads section)
    assert_renders_cleanly(info, tmp_path / "one.png", min_charts=1 + 2 * 6 + 1)
    assert section_titles(browser) == ["Overview", "Layers over training: pythia-tiny", "Spectra", HEADS]
    alert = browser.execute_script("return document.querySelector('.alert').textContent")
    assert "duplicate_checkpoint" in alert and "nan" in alert
    cells = browser.execute_script("return Array.from(document.querySelectorAll('table.anomalies td'), (td) => td.textContent)")
    assert NAN_TENSOR in cells and "(checkpoint)" in cells


def test_hover_and_component_selector(one_model, browser, tmp_path):
    report = build_report(one_model, tmp_path / "hover.html", metrics=["stable_rank"])
    open_report(browser, report, tmp_path / "hover.png")

    def hover(plot: str, event: list | dict) -> str:
        time.sleep(0.1)  # plotly throttles hover events
        return browser.execute_script(
            "const gd = document.getElementById(arguments[0]); Plotly.Fx.hover(gd, arguments[1]);"
            "return gd.querySelector('.hoverlayer').textContent;", plot, event)

    # chart1 is the checkpoint overview, chart2 the stable_rank heatmap (-0) and lines (-1);
    # heatmap cells are hovered by position: x = log10(step + 1), y = layer
    with ckptscope.Store(one_model, read_only=True) as db:
        value = db.sql("SELECT value FROM metrics WHERE metric = 'stable_rank' AND component = 'attn.qkv' "
                       "AND layer = 1 AND step = 8")["value"][0]
    text = hover("chart2-0", {"xval": math.log10(8 + 1), "yval": 1})
    for fragment in ("model: pythia-tiny", "component: attn.qkv", "layer: 1", "step: 8", "tokens: 16,384",
                     f"stable_rank: {value:.4g}"):
        assert fragment in text, text
    lines = hover("chart2-1", [{"curveNumber": 0, "pointNumber": 5}])
    assert "layer: 0" in lines and "step: 16" in lines, lines
    browser.execute_script("const s = document.getElementById('chart2-component'); s.value = 'mlp.in';"
                           "s.dispatchEvent(new Event('change'));")
    assert "component: mlp.in" in hover("chart2-0", {"xval": 0, "yval": 0})


def test_two_models_compared_at_relative_depth(two_models, browser, tmp_path):
    report = build_report(two_models, tmp_path / "two.html")
    info = open_report(browser, report, tmp_path / "two.png")
    assert_renders_cleanly(info, tmp_path / "two.png", min_charts=1 + 2 * 2 * 6 + 6 + 2)
    assert section_titles(browser) == ["Overview", "Layers over training: deep-4L", "Layers over training: shallow-2L",
                                       "Comparison across models", "Spectra", HEADS]
    legend = browser.execute_script("return Array.from(document.querySelectorAll('#compare .legendtext'), (t) => t.textContent)")
    assert {"deep-4L", "shallow-2L"} <= set(legend)
    # the 4-layer model fills every quarter of depth, the 2-layer one only quarters 0 and 2
    with ckptscope.Store(two_models, read_only=True) as db:
        bins = db.sql(f"SELECT DISTINCT model, depth_bin FROM ({q.compare_sql(['deep-4L', 'shallow-2L'], 'alpha', None, True)}) ORDER BY ALL")
    assert bins.rows() == [("deep-4L", 0), ("deep-4L", 1), ("deep-4L", 2), ("deep-4L", 3), ("shallow-2L", 0), ("shallow-2L", 2)]


def assert_activation_sections(store: Path, browser, tmp_path: Path, name: str, metric: str, min_charts: int) -> None:
    """Render, open in the browser, and find the convergence and memorization sections drawn."""
    report = build_report(store, tmp_path / f"{name}.html", metrics=[metric])
    info = open_report(browser, report, tmp_path / f"{name}.png")
    assert_renders_cleanly(info, tmp_path / f"{name}.png", min_charts=min_charts)
    titles = section_titles(browser)
    assert "Convergence" in titles and "Memorization" in titles


def test_convergence_and_memorization(convergence_store, browser, tmp_path):
    assert_activation_sections(convergence_store, browser, tmp_path, "conv", "alpha", min_charts=10)
    with ckptscope.Store(convergence_store, read_only=True) as db:
        got = db.sql(q.stabilization_sql(["deep-4L", "shallow-2L"]))
        steps = {m: db.sql(f"SELECT step FROM checkpoints WHERE model = '{m}' ORDER BY step")["step"].to_list()
                 for m in ("deep-4L", "shallow-2L")}
        mem = db.sql(q.memorization_sql(["deep-4L"]))
    fractions = set()
    for row in got.iter_rows(named=True):
        ladder = steps[row["model"]]
        depth = row["relative_depth"]
        stable = [s for i, s in enumerate(ladder) if all(cka(depth, t / ladder[-1]) >= 0.9 for t in ladder[i:])][0]
        assert row["stabilization_step"] == stable and row["stabilization_fraction"] == pytest.approx(stable / ladder[-1])
        fractions.add(row["stabilization_fraction"])
    assert got.height == 6 and len(fractions) > 1
    assert mem["memorized_rate"].to_list() == pytest.approx([round(10 * s / 64) / 10 for s in steps["deep-4L"]])


def test_report_from_real_activation_analyzers(browser, tmp_path):
    """The demo suite through the real weights, convergence and memorization analyzers, rendered."""
    suite = Path(ckptscope.__file__).parent / "demo_suite"
    store = tmp_path / "real.duckdb"
    ckptscope.ingest(suite, store=store, name="demo-neox", steps="0,512,2000", analyzers="weights,convergence,memorization",
                     probe=suite / "probe.jsonl", corpus=suite / "canaries.jsonl")
    assert_activation_sections(store, browser, tmp_path, "real", "stable_rank", min_charts=6)
    with ckptscope.Store(store, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM stabilization").item() == 12  # 4 layers x resid, attn_out, mlp_out


def test_store_text_is_escaped(xss_store, browser, tmp_path):
    report = build_report(xss_store, tmp_path / "xss.html")
    text = report.read_text()
    assert XSS not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    info = open_report(browser, report, tmp_path / "xss.png")
    assert_renders_cleanly(info, tmp_path / "xss.png", min_charts=3)
    assert browser.execute_script("return document.querySelector('td.name').textContent") == XSS
    assert XSS in browser.execute_script("return document.querySelector('#model-0 h2').textContent")
    ticks = browser.execute_script("return Array.from(document.querySelectorAll('#chart1-0 .ytick text'), (t) => t.textContent)")
    assert ticks == [XSS]
    assert browser.execute_script("return document.querySelectorAll('script').length") == 3  # plotly, data, report.js


@pytest.fixture(scope="module")
def profile_store(tmp_path_factory) -> Path:
    """A 7-step run plus real sequence_stats (a corpus with cohorts at steps 2, 4, 8, 16 and held-out
    sequences, scored by the analyzer at every step) and the memorisation profile computed from them."""
    from ckptscope.profile_run import profile

    base = tmp_path_factory.mktemp("profile")
    store = base / "profile.duckdb"
    ingest_run(base, store, "pythia-tiny", [0, 1, 2, 4, 8, 16, 32])
    gen = np.random.default_rng(7)
    rows = [{"id": f"train:{i}", "tokens": gen.integers(1, 96, 12).tolist(), "first_seen_step": [2, 3, 8, 9][i % 4],
             "split": "train"} for i in range(24)]
    rows += [{"id": f"heldout:{i}", "tokens": gen.integers(1, 96, 12).tolist(), "first_seen_step": None, "split": "heldout"}
             for i in range(12)]
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckptscope.analyze("pythia-tiny", "sequence_stats", store=store, corpus=corpus)
    profile("pythia-tiny", store=store)
    return store


def test_memorisation_profile_section(profile_store, browser, tmp_path):
    report = build_report(profile_store, tmp_path / "profile.html", metrics=["stable_rank"])
    info = open_report(browser, report, tmp_path / "profile.png")
    assert_renders_cleanly(info, tmp_path / "profile.png", min_charts=1 + 2 + 1 + 3)
    assert section_titles(browser)[-3:] == ["Memorisation profile", "Spectra", HEADS]
    charts = {c["type"]: c for c in report_payload(report) if c["type"].startswith("profile_")}
    assert set(charts) == {"profile_cells", "profile_event", "profile_summary"}
    with ckptscope.Store(profile_store, read_only=True) as db:  # straight from the tables, not the report's queries
        cells = db.sql("SELECT cohort_step, step, att, ci_low, ci_high, n_treated FROM memorization_profile ORDER BY ALL")
        summary = db.sql("SELECT kind, event_time, at_step, att, ci_low, ci_high FROM memorization_profile_summary "
                         "ORDER BY CASE kind WHEN 'instantaneous' THEN 0 WHEN 'persistent' THEN 1 ELSE 2 END, event_time")
    # cohorts 4, 8, 16 (first seen at 2 -> 2, 3 -> 4, 8 -> 8, 9 -> 16; cohort 2 has a pre-period at step 1)
    heat = charts["profile_cells"]
    assert heat["cohorts"] == sorted(cells["cohort_step"].unique().to_list()) == [2, 4, 8, 16]
    assert heat["steps"] == sorted(cells["step"].unique().to_list())
    got = {(g, t): heat["att"][i][j] for i, g in enumerate(heat["cohorts"]) for j, t in enumerate(heat["steps"])
           if heat["att"][i][j] is not None}
    assert got == {(g, t): pytest.approx(a, rel=1e-12) for g, t, a in cells.select("cohort_step", "step", "att").rows()}
    # what plotly drew: the same grid, on a colour scale whose middle (white) is ATT = 0
    drawn = browser.execute_script(f"const gd = document.getElementById('{heat['id']}-0');"
                                   "return [gd.data[0].z, gd._fullData[0].zmin, gd._fullData[0].zmax, gd._fullData[0].colorscale];")
    assert drawn[0] == heat["att"] and drawn[1] == -drawn[2] < 0
    assert drawn[2] == pytest.approx(cells["att"].abs().max()) and [0.5, "#f7f7f7"] in drawn[3]
    persistent = summary.filter(pl.col("kind") == "persistent")
    event = charts["profile_event"]
    assert event["event_time"] == persistent["event_time"].to_list() and event["att"] == persistent["att"].to_list()
    assert event["ci_low"] == persistent["ci_low"].to_list() and event["ci_high"] == persistent["ci_high"].to_list()
    bars = browser.execute_script(f"const t = document.getElementById('{event['id']}-0')._fullData[0];"
                                  "return [t.y, t.error_y.array, t.error_y.arrayminus];")
    assert bars[0] == pytest.approx(persistent["att"].to_list())
    assert bars[1] == pytest.approx((persistent["ci_high"] - persistent["att"]).to_list())
    assert bars[2] == pytest.approx((persistent["att"] - persistent["ci_low"]).to_list())
    assert charts["profile_summary"]["kind"] == summary["kind"].to_list()
    assert charts["profile_summary"]["att"] == summary["att"].to_list()
    labels = browser.execute_script(f"return document.getElementById('{charts['profile_summary']['id']}-0')._fullData[0].y")
    final = cells["step"].max()
    assert labels[0] == "instantaneous (t = g)" and labels[-1] == f"residual at step {final}"
    # each chart's SQL is printed under it, and gives its rows when run
    for chart in charts.values():
        shown = browser.execute_script(f"return Array.from(document.querySelectorAll('#{chart['id']} details.sql pre'), "
                                       "(p) => p.textContent)")
        assert len(shown) == 1
        with ckptscope.Store(profile_store, read_only=True) as db:
            assert db.sql(shown[0]).height == (cells.height if chart["type"] == "profile_cells" else
                                               persistent.height if chart["type"] == "profile_event" else summary.height)


@pytest.mark.skipif(os.environ.get("CKPTSCOPE_DOCS_SCREENSHOT") != "1" or not (DEMO_SUITE / "step0").is_dir(),
                    reason="refreshes docs/report.png from the demo suite only when asked: CKPTSCOPE_DOCS_SCREENSHOT=1")
def test_demo_suite_screenshot_for_readme(browser, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the header then names the store as `ckptscope demo` does
    store = Path("ckptscope-demo.duckdb")
    meta = DEMO_SUITE / "suite.json"
    ckptscope.ingest(DEMO_SUITE, store=store, name="demo-neox",
                     tokens_per_step=json.loads(meta.read_text()).get("tokens_per_step") if meta.is_file() else None)
    report = build_report(store, tmp_path / "demo.html")
    info = open_report(browser, report, tmp_path / "demo-full.png")
    assert info["state"] == "ready" and info["errors"] == []
    browser.set_window_size(1400, 1800)
    browser.execute_script("window.scrollTo(0, 0)")
    DOCS_PNG.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(DOCS_PNG))


# -- without a browser ----------------------------------------------------------------------------

def test_every_sql_snippet_runs_as_printed(two_models, tmp_path):
    report = build_report(two_models, tmp_path / "sql.html")
    snippets = [html.unescape(s) for s in re.findall(r"<pre><code>(.*?)</code></pre>", report.read_text(), flags=re.S)]
    assert len(snippets) >= 2 + 2 * 6 + 6 + 2 * 2
    with ckptscope.Store(two_models, read_only=True) as db:
        for sql in snippets:
            assert db.sql(sql).height > 0, sql


def test_filters_narrow_the_report(two_models, tmp_path):
    report = build_report(two_models, tmp_path / "f.html", models=["deep-4L"], metrics=["alpha"], components=["mlp.in"])
    payload = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', report.read_text(), re.S)[1])
    layers = [c for c in payload if c["type"] == "layers"]
    assert [(c["model"], c["metric"], [s["component"] for s in c["series"]]) for c in layers] == [("deep-4L", "alpha", ["mlp.in"])]
    assert layers[0]["layers"] == [0, 1, 2, 3] and layers[0]["steps"] == [0, 2, 8, 32, 64]
    assert not any(c["type"] == "compare" for c in payload)
    [spectrum] = [c for c in payload if c["type"] == "spectrum"]
    assert {m["component"] for m in spectrum["matrices"]} == {"mlp.in"} and len(spectrum["matrices"]) == 4
    with pytest.raises(CkptscopeError, match="metric.*nope not in the store.*alpha"):
        build_report(two_models, tmp_path / "x.html", metrics=["nope"])
    with pytest.raises(CkptscopeError, match="model.*ghost not in the store; it has: deep-4L, shallow-2L"):
        build_report(two_models, tmp_path / "x.html", models=["ghost"])


def test_empty_store_is_a_clear_error(tmp_path):
    store = tmp_path / "empty.duckdb"
    ckptscope.Store(store).close()
    with pytest.raises(CkptscopeError, match="holds no models yet.*ckptscope ingest"):
        build_report(store, tmp_path / "r.html")
    result = CliRunner().invoke(main, ["report", "--store", str(store), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and result.output.startswith("error:") and "holds no models" in result.output
    assert not (tmp_path / "r.html").exists()


def test_plot_metric_png_svg_pdf(one_model, tmp_path):
    png = plot_metric(one_model, "stable_rank", tmp_path / "sr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    svg = plot_metric(one_model, "delta_init_relative", tmp_path / "d.svg", component="mlp.in")
    assert ET.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg" and svg.stat().st_size > 20_000
    pdf = plot_metric(one_model, "l2_norm", tmp_path / "n.pdf", model="pythia-tiny", component="norm")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    with pytest.raises(CkptscopeError, match="figure format"):
        plot_metric(one_model, "alpha", tmp_path / "a.jpg")
    with pytest.raises(CkptscopeError, match="metric.*nope not in the store"):
        plot_metric(one_model, "nope", tmp_path / "a.png")
    with pytest.raises(CkptscopeError, match="has no alpha values for component norm"):
        plot_metric(one_model, "alpha", tmp_path / "a.png", component="norm")


def test_plot_needs_a_model_when_the_store_has_several(two_models, tmp_path):
    with pytest.raises(CkptscopeError, match="2 models.*--model"):
        plot_metric(two_models, "alpha", tmp_path / "a.png")


def test_cli_report_and_plot(two_models, tmp_path):
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(main, ["report", "--store", str(two_models), "--models", "deep-4L,shallow-2L",
                                       "--metrics", "alpha,stable_rank", "--components", "attn.qkv", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and out.stat().st_size > 1_000_000
    png = tmp_path / "a.png"
    result = CliRunner().invoke(main, ["plot", "alpha", "--store", str(two_models), "--model", "deep-4L",
                                       "--component", "mlp.in", "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    result = CliRunner().invoke(main, ["plot", "alpha", "--store", str(two_models), "-o", str(png)])
    assert result.exit_code == 1 and "--model" in result.output


# -- one series per tensor (GPT-2: wte and wpe are both `embed`, ln_1 and ln_2 both `norm`) --------

def test_plot_draws_one_line_per_tensor(gpt2_store, tmp_path):
    embed = stored_series(gpt2_store, "stable_rank", "component = 'embed'")
    assert sorted(embed) == ["transformer.wpe.weight", "transformer.wte.weight"]
    [ax] = [a for a in metric_figure(gpt2_store, "stable_rank", component="embed").axes if a.get_title() == "embed"]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines.keys() == embed.keys()
    for tensor, values in embed.items():
        assert lines[tensor] == pytest.approx(values, rel=1e-12)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == sorted(embed)

    # norm: ln_1/ln_2 weight/bias at each of 2 layers, and ln_f without a layer; the legend names the patterns
    norm = stored_series(gpt2_store, "l2_norm", "component = 'norm'")
    assert len(norm) == 10
    [ax] = [a for a in metric_figure(gpt2_store, "l2_norm", component="norm").axes if a.get_title() == "norm"]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines.keys() == norm.keys()
    for tensor, values in norm.items():
        assert lines[tensor] == pytest.approx(values, rel=1e-12)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"transformer.h.*.{n}" for n in ("ln_1.bias", "ln_1.weight", "ln_2.bias", "ln_2.weight")] + \
        ["transformer.ln_f.bias", "transformer.ln_f.weight"]

    result = CliRunner().invoke(main, ["plot", "stable_rank", "--store", str(gpt2_store), "--component", "embed",
                                       "-o", str(tmp_path / "embed.svg")])
    assert result.exit_code == 0, result.output
    svg = (tmp_path / "embed.svg").read_text()
    assert "transformer.wpe.weight" in svg and "transformer.wte.weight" in svg


def test_report_series_per_tensor(gpt2_store, tmp_path):
    payload = report_payload(build_report(gpt2_store, tmp_path / "gpt2.html", metrics=["stable_rank", "l2_norm"]))
    [norms] = [c for c in payload if c["type"] == "layers" and c["metric"] == "l2_norm" and
               {s["component"] for s in c["series"]} >= {"norm"}]
    grid = unpack(norms["values"], (len(norms["series"]), len(norms["layers"]), len(norms["steps"])))
    stored = stored_series(gpt2_store, "l2_norm", "layer IS NOT NULL")
    assert len(stored) == len(norms["series"]) * len(norms["layers"]) == 16  # 2 layers x (4 norm + 4 bias) tensors
    for i, series in enumerate(norms["series"]):
        for j, layer in enumerate(norms["layers"]):
            tensor = series["pattern"].replace(".*.", f".{layer}.")
            assert grid[i, j].tolist() == pytest.approx(stored[tensor], rel=2e-5, abs=1e-30), tensor
    # the layer-less tensors: one series each, for every metric that has them
    layerless = {c["metric"]: c for c in payload if c["type"] == "tensors"}
    assert layerless.keys() == {"stable_rank", "l2_norm"}
    for metric, chart in layerless.items():
        stored = stored_series(gpt2_store, metric, "layer IS NULL")
        assert {s["tensor"]: s["values"] for s in chart["series"]} == pytest.approx(stored, rel=1e-12)
    assert {(s["tensor"], s["component"]) for s in layerless["stable_rank"]["series"]} == {
        ("transformer.wte.weight", "embed"), ("transformer.wpe.weight", "embed"), ("lm_head.weight", "unembed")}
    # per-head circuit rows (attn.ov, attn.qk) have their own section: never averaged over heads into a layer chart
    [ranks] = [c for c in payload if c["type"] == "layers" and c["metric"] == "stable_rank"]
    assert stored_series(gpt2_store, "stable_rank", "component = 'attn.ov' AND head IS NOT NULL")
    assert {s["component"] for s in ranks["series"]} == {"attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out"}
    with pytest.raises(CkptscopeError, match="no stable_rank values for component attn.ov"):
        metric_figure(gpt2_store, "stable_rank", component="attn.ov")


# -- printing and headless capture, without --virtual-time-budget -------------------------------

def chromium_headless(*args: str) -> None:
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", *args],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def gpt2_report(gpt2_store, tmp_path_factory) -> Path:
    return build_report(gpt2_store, tmp_path_factory.mktemp("gpt2-report") / "gpt2.html")


@pytest.mark.skipif(not (CHROMIUM and PDFTOTEXT), reason="needs chromium and pdftotext (Debian: apt-get install chromium poppler-utils)")
def test_print_to_pdf_draws_every_chart(gpt2_report, tmp_path):
    pdf = tmp_path / "report.pdf"
    chromium_headless(f"--print-to-pdf={pdf}", "--no-pdf-header-footer", gpt2_report.as_uri())
    pages = subprocess.run([PDFTOTEXT, "-layout", str(pdf), "-"], check=True, capture_output=True, text=True).stdout.split("\f")
    text = "\n".join(pages)
    payload = report_payload(gpt2_report)
    step_axes = sum({"checkpoints": 1, "layers": 2, "tensors": 1, "heatmap": 1}.get(c["type"], 0) for c in payload)
    assert "Drawing charts" not in text and f"{len(payload)} charts drawn." in text
    assert text.count(STEP_AXIS) == step_axes >= 13  # every step axis is drawn, so every chart
    # a chart is not split across pages: its title and its axes are on one page
    spectrum = next(p for p in pages if "gpt2-tiny: eigenvalue spectra" in p)
    assert "eigenvalue λ = σ²" in spectrum and "density" in spectrum
    for chart in (c for c in payload if c["type"] == "tensors"):
        page = next(p for p in pages if f"{chart['metric']}: tensors without a layer" in p)
        assert STEP_AXIS in page and "transformer.wte.weight (embed)" in page


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_screenshot_shows_drawn_charts(gpt2_report, tmp_path):
    from PIL import Image

    png = tmp_path / "shot.png"
    chromium_headless(f"--screenshot={png}", "--window-size=1400,2000", gpt2_report.as_uri())
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    # Charts are the only saturated colour on the page (heatmaps, lines, markers); text and frames are grey.
    colourful = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum())
    assert colourful > 50_000, colourful


def test_spectrum_decade_ticks_and_matrix_selector(gpt2_store, gpt2_report, browser, tmp_path):
    info = open_report(browser, gpt2_report, tmp_path / "spectra.png")
    assert_renders_cleanly(info, tmp_path / "spectra.png", min_charts=20)
    [spectrum] = [c for c in report_payload(gpt2_report) if c["type"] == "spectrum"]
    div = browser.execute_script("return document.querySelector('#spectra div.plot').id")
    ticks = browser.execute_script(
        "const l = document.getElementById(arguments[0])._fullLayout;"
        "return ['xaxis', 'yaxis'].map((a) => l[a]._vals.map((v) => [v.x, v.text]));", div)
    for axis in ticks:  # log axes: positions are log10(value); labelled at whole decades only
        assert len(axis) >= 2 and all(float(x).is_integer() and text for x, text in axis), axis
    labels = [m["tensor"] + f" ({m['component']})" for m in spectrum["matrices"]]
    options = browser.execute_script("return Array.from(document.querySelectorAll('#spectra select option'), (o) => o.text)")
    assert options == labels and "transformer.wte.weight (embed)" in options and "lm_head.weight (unembed)" in options

    def drawn() -> list[dict]:
        return browser.execute_script("return document.getElementById(arguments[0]).data.map((t) => ({name: t.name, "
                                      "x: Array.from(t.x), y: Array.from(t.y)}))", div)

    first = drawn()
    browser.execute_script("const s = document.querySelector('#spectra select'); s.value = 'transformer.wte.weight (embed)';"
                           "s.dispatchEvent(new Event('change'));")
    wte = drawn()
    assert wte != first
    hover = browser.execute_script("const gd = document.getElementById(arguments[0]); Plotly.Fx.hover(gd, [{curveNumber: 0, "
                                   "pointNumber: 0}]); return gd.querySelector('.hoverlayer').textContent;", div)
    assert "tensor: transformer.wte.weight" in hover and "component: embed" in hover
    # Independently of the report's SQL: wte is 96 x 32, so each step's density integrates over its bins to 1.
    with ckptscope.Store(gpt2_store, read_only=True) as db:
        shape = db.sql("SELECT DISTINCT rows, cols FROM spectra WHERE tensor = 'transformer.wte.weight' AND kind = 'weight'").rows()
    assert sorted(shape[0]) == [32, 96]
    histograms = [t for t in wte if t["name"].startswith("step ")]
    assert len(histograms) == len({s["step"] for m in spectrum["matrices"] for s in m["steps"]})
    for trace in histograms:
        bins = np.round(np.log10(trace["x"]) * q.BINS_PER_DECADE - 0.5)
        widths = 10 ** ((bins + 1) / q.BINS_PER_DECADE) - 10 ** (bins / q.BINS_PER_DECADE)
        assert float(np.dot(trace["y"], widths)) == pytest.approx(1.0, rel=1e-3)  # densities sent to 4 digits
