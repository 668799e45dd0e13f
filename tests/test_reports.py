"""Reports: HTML rendered from real ingested stores and checked in headless Chromium; static plots.

Browser tests need Debian's `chromium` and `chromium-driver` (installed by .ci/run) and are
skipped, with that reason, where they are absent.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

import ckptscope
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.reports import build_report, plot_metric
from ckptscope.reports import queries as q
from runs import neox_state, trajectory, write_run

XSS = "<script>alert(1)</script>"
NAN_TENSOR = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
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


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


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
    assert report.stat().st_size < 4_000_000
    info = open_report(browser, report, tmp_path / "one.png")
    # overview + per metric (heatmap + lines) for the 6 default metrics + spectrum
    assert_renders_cleanly(info, tmp_path / "one.png", min_charts=1 + 2 * 6 + 1)
    assert section_titles(browser) == ["Overview", "Layers over training: pythia-tiny", "Spectra"]
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
                                       "Comparison across models", "Spectra"]
    legend = browser.execute_script("return Array.from(document.querySelectorAll('#compare .legendtext'), (t) => t.textContent)")
    assert {"deep-4L", "shallow-2L"} <= set(legend)
    # the 4-layer model fills every quarter of depth, the 2-layer one only quarters 0 and 2
    with ckptscope.Store(two_models, read_only=True) as db:
        bins = db.sql(f"SELECT DISTINCT model, depth_bin FROM ({q.compare_sql(['deep-4L', 'shallow-2L'], 'alpha', None)}) ORDER BY ALL")
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
    assert browser.execute_script("return document.querySelectorAll('script').length") == 4  # plotly blob, data, report.js, plotly


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
    assert [(c["model"], c["metric"], c["components"]) for c in layers] == [("deep-4L", "alpha", ["mlp.in"])]
    assert layers[0]["layers"] == [0, 1, 2, 3] and layers[0]["steps"] == [0, 2, 8, 32, 64]
    assert not any(c["type"] == "compare" for c in payload)
    assert [c["component"] for c in payload if c["type"] == "spectrum"] == ["mlp.in"]
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
