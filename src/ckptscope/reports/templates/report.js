// Draws a ckptscope report: each chart of the JSON payload into the divs the template laid out.
// Everything runs synchronously while the page is parsed (plotly.js is embedded as a plain script,
// grids are base64 without compression), so the charts exist before the load event: printing to
// PDF and headless screenshots capture them without waiting. <html data-state> ends as "ready" or "error".
"use strict";
(() => {
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
  const CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]};
  const STEP_TITLE = "step (log scale of step + 1)";

  // Plotly reads a subset of HTML in every label and %{…} in hover templates: store text must show literally.
  const esc = (text) => String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/%/g, "&#37;");
  const logStep = (step) => Math.log10(step + 1);
  const int = (n) => (n === null || n === undefined ? "n/a" : Number(n).toLocaleString("en-US"));
  const color = (i) => PALETTE[i % PALETTE.length];
  const depthColor = (t) => VIRIDIS[Math.round(Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1))];
  const lineMode = (points) => (points > 40 ? "lines" : "lines+markers");  // markers only help on short series

  function bytes(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // A grid packed by html.py's _pack: byte planes 1, 2, 3 of little-endian float32; byte 0 is zero. NaN = missing.
  function floats(b64) {
    const planes = bytes(b64);
    const n = planes.length / 3;
    const out = new Uint8Array(4 * n);
    for (let i = 0; i < n; i++) {
      out[4 * i + 1] = planes[i];
      out[4 * i + 2] = planes[n + i];
      out[4 * i + 3] = planes[2 * n + i];
    }
    return new Float32Array(out.buffer);
  }

  const gaps = (values) => Array.from(values, (v) => (Number.isNaN(v) ? null : v));

  // Ticks at 0 and 1, 2, 5 x 10^k (only 10^k when the range spans many decades), placed at log10(step + 1).
  function stepAxis(steps) {
    const max = Math.max(1, ...steps);
    let ticks = [0];
    for (let p = 1; p <= max; p *= 10) ticks.push(...[p, 2 * p, 5 * p].filter((t) => t <= max));
    if (ticks.length > 10) ticks = ticks.filter((t) => t === 0 || Number.isInteger(Math.log10(t)));
    const label = (t) => (t >= 1e6 ? `${t / 1e6}M` : t >= 1e3 ? `${t / 1e3}k` : `${t}`);
    return {title: {text: STEP_TITLE}, tickvals: ticks.map(logStep), ticktext: ticks.map(label), zeroline: false};
  }

  const baseLayout = (extra) => ({
    margin: {l: 64, r: 24, t: 28, b: 52}, height: 340, hovermode: "closest",
    font: {family: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size: 12},
    legend: {font: {size: 11}}, ...extra,
  });

  const plotDiv = (chart, i) => document.getElementById(`${chart.id}-${i}`);
  const selector = (chart) => document.querySelector(`#${chart.id} select.choice`);

  // Draws the choice selected in the chart's selector (component, matrix), and redraws on every change.
  function withChoice(chart, draw) {
    const select = selector(chart);
    if (select) select.addEventListener("change", () => draw(select.selectedIndex));
    draw(select ? select.selectedIndex : 0);
  }

  // Plotly draws these trace types synchronously; its promise only reports errors, which must not pass silently.
  const react = (div, traces, layout) => Plotly.react(div, traces, layout, CONFIG).catch(fail);

  // Per model and metric: a layer x step heatmap and one line per layer, for one series (a component,
  // or one tensor pattern of it, such as ln_1.weight, where a layer holds several of its tensors).
  function drawLayers(chart) {
    const S = chart.steps.length, L = chart.layers.length;
    const values = floats(chart.values);
    const x = chart.steps.map(logStep);
    const custom = chart.steps.map((s, i) => [int(s), int(chart.tokens[i])]);
    const axis = stepAxis(chart.steps);
    withChoice(chart, (c) => {
      const {component, pattern} = chart.series[c];
      const rows = chart.layers.map((_, l) => gaps(values.subarray((c * L + l) * S, (c * L + l + 1) * S)));
      const tensor = (layer) => pattern.replace(".*.", `.${layer}.`);
      const hover = (layer) => `model: ${esc(chart.model)}<br>component: ${esc(component)}<br>layer: ${layer}` +
        `<br>tensor: ${esc(tensor(layer))}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}<br>${esc(chart.metric)}: `;
      const heat = {
        type: "heatmap", x, y: chart.layers, z: rows, customdata: chart.layers.map((layer) => custom.map((cd) => [...cd, esc(tensor(layer))])),
        colorscale: "Viridis", hoverongaps: false, colorbar: {title: {text: esc(chart.metric), side: "right"}, thickness: 12},
        hovertemplate: `model: ${esc(chart.model)}<br>component: ${esc(component)}<br>layer: %{y}<br>tensor: %{customdata[2]}` +
          `<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}<br>${esc(chart.metric)}: %{z:.4g}<extra></extra>`,
      };
      const lines = chart.layers.map((layer, l) => ({
        type: "scatter", mode: lineMode(S), x, y: rows[l], customdata: custom, name: `layer ${layer}`,
        line: {color: depthColor(L > 1 ? l / (L - 1) : 0), width: 1.5}, marker: {size: 4},
        hovertemplate: `${hover(layer)}%{y:.4g}<extra></extra>`,
      }));
      const yLayer = {title: {text: "layer"}, dtick: L > 16 ? undefined : 1};
      react(plotDiv(chart, 0), [heat], baseLayout({xaxis: axis, yaxis: yLayer}));
      react(plotDiv(chart, 1), lines,
        baseLayout({xaxis: axis, yaxis: {title: {text: esc(chart.metric)}}, legend: {title: {text: "layer"}, font: {size: 11}}}));
    });
  }

  // Tensors without a layer (embeddings, unembedding, final norm): one line per tensor.
  function drawTensors(chart) {
    const traces = chart.series.map((t, i) => ({
      type: "scatter", mode: lineMode(t.steps.length), x: t.steps.map(logStep), y: t.values, name: esc(`${t.tensor} (${t.component})`),
      customdata: t.steps.map((s, j) => [int(s), int(t.tokens[j])]), line: {color: color(i), width: 1.5}, marker: {size: 4},
      hovertemplate: `model: ${esc(chart.model)}<br>tensor: ${esc(t.tensor)}<br>component: ${esc(t.component)}` +
        `<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}<br>${esc(chart.metric)}: %{y:.4g}<extra></extra>`,
    }));
    react(plotDiv(chart, 0), traces, baseLayout({
      xaxis: stepAxis(chart.series.flatMap((t) => t.steps)), yaxis: {title: {text: esc(chart.metric)}},
      legend: {title: {text: "tensor"}, font: {size: 11}},
    }));
  }

  // Across models: one panel per relative-depth bin, x = training progress, one line per model.
  function drawCompare(chart) {
    const B = chart.bins;
    const models = chart.series.map((m) => ({...m, grid: floats(m.values)}));
    const pct = (b) => `${Math.round((100 * b) / B)}–${Math.round((100 * (b + 1)) / B)}%`;
    const axes = {};
    const annotations = [];
    for (let b = 0; b < B; b++) {
      const key = b ? `xaxis${b + 1}` : "xaxis";
      axes[key] = {title: {text: "progress (step / last step)"}, range: [-0.03, 1.03]};
      annotations.push({text: `relative depth ${pct(b)}`, xref: `${b ? "x" + (b + 1) : "x"} domain`, yref: "paper",
        x: 0.5, y: 1.0, yanchor: "bottom", showarrow: false, font: {size: 12}});
    }
    withChoice(chart, (c) => {
      const component = chart.components[c];
      const traces = [];
      const shown = new Set();
      models.forEach((m, mi) => {
        const S = m.steps.length;
        const custom = m.steps.map((s, i) => [int(s), int(m.tokens[i])]);
        for (let b = 0; b < B; b++) {
          const y = gaps(m.grid.subarray((c * B + b) * S, (c * B + b + 1) * S));
          if (!m.layers[b] || y.every((v) => v === null)) continue;
          const [lo, hi] = m.layers[b];
          traces.push({
            type: "scatter", mode: lineMode(S), x: m.progress, y, customdata: custom,
            xaxis: b ? `x${b + 1}` : "x", yaxis: "y", name: esc(m.model), legendgroup: `m${mi}`, showlegend: !shown.has(mi),
            line: {color: color(mi), width: 1.5}, marker: {size: 4},
            hovertemplate: `model: ${esc(m.model)}<br>step: %{customdata[0]} (progress %{x:.3f})<br>tokens: %{customdata[1]}` +
              `<br>layer: ${lo === hi ? lo : `${lo}–${hi}`} (relative depth ${pct(b)})<br>component: ${esc(component)}` +
              `<br>${esc(chart.metric)}: %{y:.4g}<extra></extra>`,
          });
          shown.add(mi);
        }
      });
      react(plotDiv(chart, 0), traces, baseLayout({
        grid: {rows: 1, columns: B, pattern: "coupled"}, ...axes, yaxis: {title: {text: esc(chart.metric)}},
        annotations, margin: {l: 64, r: 24, t: 36, b: 52},
      }));
    });
  }

  function drawCheckpoints(chart) {
    const kinds = [
      ["ok", "circle", "#2557a7", (m, i) => m.status[i] === "ok" && m.duplicate_of[i] === null && !m.anomalies[i]],
      ["duplicate", "x", "#e07b00", (m, i) => m.duplicate_of[i] !== null],
      ["anomaly / not ok", "diamond", "#b42318", (m, i) => m.duplicate_of[i] === null && (m.anomalies[i] > 0 || m.status[i] !== "ok")],
    ];
    const traces = kinds.map(([name, symbol, col, keep]) => {
      const pts = chart.series.flatMap((m) => m.steps.map((s, i) => ({m, s, i})).filter(({m: mm, i}) => keep(mm, i)));
      return {
        type: "scatter", mode: "markers", name, marker: {symbol, color: col, size: 8},
        x: pts.map((p) => logStep(p.s)), y: pts.map((p) => esc(p.m.model)),
        customdata: pts.map(({m, s, i}) => [int(s), int(m.tokens[i]), m.status[i], m.duplicate_of[i] === null ? "–" : int(m.duplicate_of[i]), m.anomalies[i]]),
        hovertemplate: "model: %{y}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}<br>status: %{customdata[2]}" +
          "<br>duplicate of: %{customdata[3]}<br>anomalies: %{customdata[4]}<extra></extra>",
      };
    });
    const steps = chart.series.flatMap((m) => m.steps);
    react(plotDiv(chart, 0), traces, baseLayout({
      height: 120 + 36 * chart.series.length, xaxis: stepAxis(steps), yaxis: {type: "category", automargin: true},
    }));
  }

  function drawStabilization(chart) {
    const traces = chart.series.map((s, i) => ({
      type: "scatter", mode: "lines+markers", x: s.depth, y: s.fraction, name: esc(`${s.model} ${s.component}`),
      customdata: s.layers.map((layer, j) => [layer, int(s.steps[j]), int(s.tokens[j])]), line: {color: color(i)},
      hovertemplate: `model: ${esc(s.model)}<br>layer: %{customdata[0]} (relative depth %{x:.2f})<br>component: ${esc(s.component)}` +
        "<br>step: %{customdata[1]}<br>tokens: %{customdata[2]}<br>stable from: %{y:.3f} of training<extra></extra>",
    }));
    react(plotDiv(chart, 0), traces, baseLayout({
      xaxis: {title: {text: "relative depth (layer / number of layers)"}},
      yaxis: {title: {text: "stabilization step / last step"}, range: [0, 1.05]},
    }));
  }

  function drawMemorization(chart) {
    const traces = [];
    chart.series.forEach((m, i) => {
      const custom = m.steps.map((s, j) => [int(s), int(m.tokens[j]), int(m.sequences[j])]);
      [["rate", "memorized rate", "x", "y"], ["score", "mean score", "x2", "y2"]].forEach(([key, label, xa, ya], k) => traces.push({
        type: "scatter", mode: "lines+markers", x: m.steps.map(logStep), y: m[key], xaxis: xa, yaxis: ya, customdata: custom,
        name: esc(m.model), legendgroup: `m${i}`, showlegend: k === 0, line: {color: color(i)},
        hovertemplate: `model: ${esc(m.model)}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}` +
          `<br>sequences: %{customdata[2]}<br>${label}: %{y:.4g}<extra></extra>`,
      }));
    });
    const axis = stepAxis(chart.series.flatMap((m) => m.steps));
    react(plotDiv(chart, 0), traces, baseLayout({
      grid: {rows: 1, columns: 2, pattern: "independent"}, xaxis: axis, xaxis2: axis,
      yaxis: {title: {text: "memorized rate"}}, yaxis2: {title: {text: "mean score"}},
    }));
  }

  // Eigenvalue density per step of the matrix chosen in the selector, and the power-law tail fitted
  // at ingest: (n_tail / n) * (α-1)/x_min * (λ/x_min)^-α. Log axes are labelled at decades only.
  function drawSpectrum(chart) {
    // Ticks at whole decades; a range narrower than two decades would show at most one, so plotly picks them there.
    const logAxis = (title, values) => {
      const positive = values.filter((v) => v > 0);
      const wide = Math.log10(Math.max(...positive) / Math.min(...positive)) >= 2;
      return {type: "log", dtick: wide ? 1 : undefined, exponentformat: "power", title: {text: title}};
    };
    withChoice(chart, (m) => {
      const matrix = chart.matrices[m];
      const n = matrix.steps.length;
      const traces = [];
      matrix.steps.forEach((s, i) => {
        const col = depthColor(n > 1 ? i / (n - 1) : 0);
        const head = `model: ${esc(chart.model)}<br>step: ${int(s.step)}<br>tokens: ${int(s.tokens)}<br>tensor: ${esc(matrix.tensor)}` +
          `<br>layer: ${matrix.layer === null ? "–" : matrix.layer}<br>component: ${esc(matrix.component)}<br>λ: %{x:.4g}<br>`;
        traces.push({
          type: "scatter", mode: "lines+markers", x: s.eigenvalue, y: s.density, name: `step ${int(s.step)}`,
          legendgroup: `s${i}`, line: {color: col, shape: "hvh"}, marker: {size: 5},
          hovertemplate: `${head}density: %{y:.4g}<extra></extra>`,
        });
        if (s.alpha === null || s.xmin === null || s.n_tail === null || !(s.ev_max > s.xmin)) return;
        const xs = Array.from({length: 24}, (_, k) => s.xmin * Math.pow(s.ev_max / s.xmin, k / 23));
        const scale = ((s.n_tail / s.total) * (s.alpha - 1)) / s.xmin;
        traces.push({
          type: "scatter", mode: "lines", x: xs, y: xs.map((x) => scale * Math.pow(x / s.xmin, -s.alpha)),
          name: `fit α=${s.alpha.toFixed(2)}`, legendgroup: `s${i}`, line: {color: col, dash: "dash", width: 2},
          hovertemplate: `${head}fit: α = ${s.alpha.toFixed(3)}, x_min = ${s.xmin.toPrecision(3)}<br>density: %{y:.4g}<extra></extra>`,
        });
      });
      const yaxis = logAxis("density", traces.flatMap((t) => t.y));  // before the spike marks, drawn on a 0–1 axis
      matrix.steps.forEach((s, i) => { if (s.mp) traces.push(...mpTraces(s, i, depthColor(n > 1 ? i / (n - 1) : 0))); });
      react(plotDiv(chart, 0), traces, baseLayout({
        height: 400, xaxis: logAxis("eigenvalue λ = σ²", traces.flatMap((t) => t.x)), yaxis,
        yaxis2: {overlaying: "y", range: [0, 1], visible: false, fixedrange: true},
      }));
    });
  }

  // The Marchenko–Pastur bulk fitted by mp_fit, in λ units (html.py's _mp_overlay): density
  // Q·√((b − λ)(λ − a)) / (2π σ² λ) on [a, b] = [(σ(1 − Q^−½))², (σ(1 + Q^−½))²], sampled densely near
  // both edges; and the eigenvalues above b (the largest sent) as triangles along the top.
  function mpTraces(s, i, col) {
    const {sigma2, q} = s.mp;
    const a = sigma2 * (1 - 1 / Math.sqrt(q)) ** 2, b = sigma2 * (1 + 1 / Math.sqrt(q)) ** 2;
    const lo = a > 0 ? a : b * 1e-3;  // Q = 1: the bulk reaches 0, where a log axis cannot
    const xs = Array.from({length: 80}, (_, k) => lo + ((b - lo) * (1 - Math.cos((Math.PI * (k + 0.5)) / 80))) / 2);
    const fit = `σ_mp = ${s.mp.sigma_mp.toPrecision(4)} (of the spectrum scaled to mean 1), Q = ${s.mp.q.toPrecision(4)}` +
      `<br>bulk: ${s.mp.bulk_min.toPrecision(4)} – ${s.mp.bulk_max.toPrecision(4)}<br>num_spikes: ${int(s.mp.num_spikes)}`;
    const head = `step: ${int(s.step)}<br>${fit}<br>`;
    const traces = [{
      type: "scatter", mode: "lines", x: xs, y: xs.map((x) => (q * Math.sqrt(Math.max(0, (b - x) * (x - a)))) / (2 * Math.PI * sigma2 * x)),
      name: `MP bulk σ_mp=${s.mp.sigma_mp.toFixed(2)}`, legendgroup: `s${i}`, line: {color: col, dash: "dot", width: 2},
      hovertemplate: `${head}λ: %{x:.4g}<br>MP density: %{y:.4g}<extra></extra>`,
    }];
    if (s.mp.spikes.length) {
      const more = s.mp.above > s.mp.spikes.length ? ` (largest ${s.mp.spikes.length} marked)` : "";
      traces.push({
        type: "scatter", mode: "markers", x: s.mp.spikes, y: s.mp.spikes.map(() => 0.97), yaxis: "y2",
        name: `${int(s.mp.above)} above bulk_max${more}`, legendgroup: `s${i}`,
        marker: {symbol: "triangle-down", size: 9, color: col, line: {color: "#333", width: 0.5}},
        hovertemplate: `${head}spike λ: %{x:.4g}<extra></extra>`,
      });
    }
    return traces;
  }

  // Heatmaps that analyzers contribute (HeatmapChart): one x × y grid per facet, chosen in the selector.
  function drawHeatmap(chart) {
    withChoice(chart, (f) => {
      const facet = chart.facets[f];
      const x = chart.step_x ? facet.x.map(logStep) : facet.x;
      const label = chart.step_x ? facet.x.map(int) : facet.x;
      const numeric = facet.y.every((y) => typeof y === "number");
      const heat = {
        type: "heatmap", x, y: numeric ? facet.y : facet.y.map(esc), z: facet.z, customdata: facet.y.map(() => label),
        colorscale: "Viridis", hoverongaps: false, colorbar: {title: {text: esc(chart.z_title), side: "right"}, thickness: 12},
        hovertemplate: `${facet.name ? esc(facet.name) + "<br>" : ""}${esc(chart.x_title)}: %{customdata}` +
          `<br>${esc(chart.y_title)}: %{y}<br>${esc(chart.z_title)}: %{z:.4g}<extra></extra>`,
      };
      const yaxis = {title: {text: esc(chart.y_title)}, dtick: numeric && facet.y.length <= 32 ? 1 : undefined, automargin: true};
      react(plotDiv(chart, 0), [heat], baseLayout({
        height: 120 + Math.min(560, Math.max(220, 18 * facet.y.length)),
        xaxis: chart.step_x ? stepAxis(facet.x) : {title: {text: esc(chart.x_title)}}, yaxis,
      }));
    });
  }

  function drawLines(chart) {  // charts that analyzers contribute (Analyzer.report_sections)
    const traces = chart.series.map((s, i) => ({
      type: "scatter", mode: lineMode(s.x.length), x: s.x, y: s.y, name: esc(s.name), line: {color: color(i)},
      hovertemplate: `${esc(s.name)}<br>${esc(chart.x_title)}: %{x}<br>${esc(chart.y_title)}: %{y:.4g}<extra></extra>`,
    }));
    react(plotDiv(chart, 0), traces, baseLayout({
      height: 380, xaxis: {type: chart.log_x ? "log" : "linear", title: {text: esc(chart.x_title)}},
      yaxis: {title: {text: esc(chart.y_title)}},
    }));
  }

  const DRAW = {layers: drawLayers, compare: drawCompare, checkpoints: drawCheckpoints, stabilization: drawStabilization,
    memorization: drawMemorization, spectrum: drawSpectrum, tensors: drawTensors, lines: drawLines, heatmap: drawHeatmap};

  // Printing lays the page out at paper width, but each chart was drawn at the window's width: before
  // printing, narrower charts are redrawn to fit the paper (synchronously), and after it, to fit the window.
  const PRINT_WIDTH = 680;  // CSS px: A4 or Letter less Chromium's default margins
  function fitPrint(printing) {
    for (const gd of document.querySelectorAll(".js-plotly-plot")) {
      if (printing && gd._fullLayout.width > PRINT_WIDTH) Plotly.relayout(gd, {width: PRINT_WIDTH}).catch(fail);
      else if (!printing && gd.layout.width !== undefined) Plotly.relayout(gd, {width: null}).catch(fail);
    }
  }
  window.addEventListener("beforeprint", () => fitPrint(true));
  window.addEventListener("afterprint", () => fitPrint(false));

  const status = document.getElementById("status");

  function fail(error) {
    status.textContent = `Could not draw the charts: ${error}`;
    status.classList.add("error");
    document.documentElement.dataset.state = "error";
    console.error(error);
  }

  function main() {
    try {
      const charts = JSON.parse(document.getElementById("report-data").textContent);
      for (const chart of charts) DRAW[chart.type](chart);
      if (document.documentElement.dataset.state === "error") return;
      status.textContent = `${charts.length} charts drawn.`;
      document.documentElement.dataset.state = "ready";
    } catch (error) {
      fail(error);
    }
  }

  main();
})();
