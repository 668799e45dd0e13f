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

  // Training loss (top) and learning rate (bottom) per model over the step axis of the layer charts.
  function drawTraining(chart) {
    const traces = [];
    chart.series.forEach((m, i) => {
      const custom = m.steps.map((s, j) => [int(s), int(m.tokens[j])]);
      [["loss", "loss", "y"], ["learning_rate", "learning rate", "y2"]].forEach(([key, label, ya], k) => traces.push({
        type: "scatter", mode: lineMode(m.steps.length), x: m.steps.map(logStep), y: m[key], yaxis: ya, customdata: custom,
        connectgaps: true, name: esc(m.model), legendgroup: `m${i}`, showlegend: k === 0, line: {color: color(i), width: 1.5},
        marker: {size: 4}, hovertemplate: `model: ${esc(m.model)}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}` +
          `<br>${label}: %{y:.4g}<extra></extra>`,
      }));
    });
    react(plotDiv(chart, 0), traces, baseLayout({
      height: 460, grid: {rows: 2, columns: 1, subplots: [["xy"], ["xy2"]], roworder: "top to bottom"},
      xaxis: stepAxis(chart.series.flatMap((m) => m.steps)), yaxis: {title: {text: "training loss"}},
      yaxis2: {title: {text: "learning rate"}, exponentformat: "e"},
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

  // -- seed groups ---------------------------------------------------------------------------------
  const BAND = "rgba(31, 119, 180, 0.18)";
  const pctLevel = (level) => `${Math.round(100 * level)}%`;

  // An interval as two traces: its lower edge (invisible) and its upper edge filled down to it.
  function band(x, low, high, name) {
    const edge = {type: "scatter", mode: "lines", x, line: {width: 0, color: BAND}, hoverinfo: "skip", showlegend: false};
    return [{...edge, y: low}, {...edge, y: high, fill: "tonexty", fillcolor: BAND, name, showlegend: true}];
  }

  // A group's metric: band of the mean over seeds, each seed as a thin line, the mean as a thick one; one matrix at a time.
  function drawSeedBand(chart) {
    withChoice(chart, (c) => {
      const cell = chart.cells[c];
      const x = cell.steps.map(logStep);
      const traces = cell.low ? band(x, cell.low, cell.high, `${pctLevel(chart.level)} interval (${chart.nboot} resamples)`) : [];
      cell.seeds.forEach((s, i) => traces.push({
        type: "scatter", mode: "lines", x: s.steps.map(logStep), y: s.values, name: esc(`seed ${s.seed}`),
        legendgroup: "seeds", showlegend: i === 0, line: {color: "rgba(90, 90, 90, 0.45)", width: 0.8},
        customdata: s.steps.map((st) => int(st)), hovertemplate: `seed ${esc(s.seed)} (${esc(s.model)})<br>step: %{customdata}` +
          `<br>${esc(chart.metric)}: %{y:.4g}<extra></extra>`,
      }));
      const custom = cell.steps.map((st, i) => [int(st), int(cell.tokens[i]), cell.low ? `${cell.low[i]?.toPrecision(4)} – ${cell.high[i]?.toPrecision(4)}` : "n/a",
        cell.std[i] === null ? "n/a" : cell.std[i].toPrecision(4)]);
      traces.push({
        type: "scatter", mode: lineMode(x.length), x, y: cell.mean, customdata: custom, name: "mean over seeds",
        line: {color: color(0), width: 2.5}, marker: {size: 5},
        hovertemplate: `group: ${esc(chart.group)}<br>${esc(cell.label)}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}` +
          `<br>mean ${esc(chart.metric)}: %{y:.4g}<br>${pctLevel(chart.level)} interval: %{customdata[2]}<br>std over seeds: %{customdata[3]}<extra></extra>`,
      });
      react(plotDiv(chart, 0), traces, baseLayout({xaxis: stepAxis(cell.steps), yaxis: {title: {text: esc(chart.metric)}}}));
    });
  }

  // compare − group per step with the interval of the difference, and the line of no difference.
  function drawSeedDiff(chart) {
    withChoice(chart, (c) => {
      const cell = chart.cells[c];
      const x = cell.steps.map(logStep);
      const traces = cell.low ? band(x, cell.low, cell.high, `${pctLevel(chart.level)} interval`) : [];
      const custom = cell.steps.map((st, i) => [int(st), int(cell.tokens[i]), cell.mean[i]?.toPrecision(4), cell.mean_compare[i]?.toPrecision(4),
        cell.low ? `${cell.low[i]?.toPrecision(4)} – ${cell.high[i]?.toPrecision(4)}` : "n/a", cell.p ? cell.p[i]?.toPrecision(3) : "n/a"]);
      traces.push({
        type: "scatter", mode: lineMode(x.length), x, y: cell.difference, customdata: custom, name: esc(`${chart.compare} − ${chart.group}`),
        line: {color: color(3), width: 2.5}, marker: {size: 5},
        hovertemplate: `${esc(cell.label)}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}<br>${esc(chart.group)}: %{customdata[2]}` +
          `<br>${esc(chart.compare)}: %{customdata[3]}<br>difference: %{y:.4g}<br>interval: %{customdata[4]}<br>p: %{customdata[5]}<extra></extra>`,
      });
      react(plotDiv(chart, 0), traces, baseLayout({
        xaxis: stepAxis(cell.steps), yaxis: {title: {text: esc(`Δ ${chart.metric}`)}, zeroline: true, zerolinewidth: 2},
      }));
    });
  }

  // cka_seed per layer over steps, one component at a time.
  function drawSeedCka(chart) {
    const L = chart.layers.length;
    withChoice(chart, (c) => {
      const traces = chart.series[c].map((s) => ({
        type: "scatter", mode: lineMode(s.steps.length), x: s.steps.map(logStep), y: s.mean, name: `layer ${s.layer}`,
        line: {color: depthColor(L > 1 ? chart.layers.indexOf(s.layer) / (L - 1) : 0), width: 1.8}, marker: {size: 4},
        customdata: s.steps.map((st, i) => [int(st), int(s.tokens[i]), s.std[i] === null ? "n/a" : s.std[i].toPrecision(3), s.n_pairs[i]]),
        hovertemplate: `group: ${esc(chart.group)}<br>component: ${esc(chart.components[c])}<br>layer: ${s.layer}<br>step: %{customdata[0]}` +
          "<br>tokens: %{customdata[1]}<br>cka_seed: %{y:.4g}<br>std over pairs: %{customdata[2]} (%{customdata[3]} pairs)<extra></extra>",
      }));
      react(plotDiv(chart, 0), traces, baseLayout({
        xaxis: stepAxis(chart.series[c].flatMap((s) => s.steps)), yaxis: {title: {text: "cka_seed"}},
        legend: {title: {text: "layer"}, font: {size: 11}},
      }));
    });
  }

  // One band per seed along the step axis, coloured by its HMM state; a state spans from halfway to the previous step to halfway to the next.
  function drawPhases(chart) {
    const steps = [...new Set(chart.seeds.flatMap((s) => s.steps))].sort((a, b) => a - b);
    const S = chart.states;
    const scale = [];
    for (let k = 0; k < S; k++) scale.push([k / S, color(k)], [(k + 1) / S, color(k)]);
    const rows = chart.seeds.map((s) => steps.map((st) => s.state[s.steps.indexOf(st)] ?? null));
    const custom = chart.seeds.map((s) => steps.map((st) => {
      const i = s.steps.indexOf(st);
      return i < 0 ? ["", "", ""] : [int(st), int(s.tokens[i]), s.probability[i] === null ? "n/a" : s.probability[i].toFixed(3)];
    }));
    const labels = chart.seeds.map((s) => esc(`seed ${s.seed} (${s.model})`));
    const heat = {
      type: "heatmap", x: steps.map(logStep), y: labels, z: rows, customdata: custom, zmin: -0.5, zmax: S - 0.5, colorscale: scale,
      hoverongaps: false, xgap: 0, ygap: 4,
      colorbar: {title: {text: "state", side: "right"}, tickvals: [...Array(S).keys()], thickness: 12},
      hovertemplate: "%{y}<br>step: %{customdata[0]}<br>tokens: %{customdata[1]}<br>state: %{z}<br>probability: %{customdata[2]}<extra></extra>",
    };
    react(plotDiv(chart, 0), [heat], baseLayout({
      height: 120 + 40 * chart.seeds.length, xaxis: stepAxis(steps), yaxis: {type: "category", automargin: true},
    }));
  }

  // Memorisation profiles. ATT(g, t) per cohort (row) and checkpoint (column) on a diverging scale centred at 0:
  // blue where the outcome fell relative to the controls (for surprisal: memorisation), red where it rose.
  const DIVERGING = [[0, "#2166ac"], [0.25, "#92c5de"], [0.5, "#f7f7f7"], [0.75, "#f4a582"], [1, "#b2182b"]];
  const fmt = (v) => (v === null || v === undefined ? "n/a" : Number(v).toPrecision(4));
  const profileName = (chart) => `model: ${esc(chart.model)}<br>outcome: ${esc(chart.outcome)}<br>controls: ${esc(chart.control)}`;

  function drawProfileCells(chart) {
    const finite = chart.att.flat().filter((v) => v !== null);
    const span = Math.max(1e-12, ...finite.map(Math.abs));  // symmetric range: 0 sits at the middle of the scale
    const custom = chart.cohorts.map((g, i) => chart.steps.map((t, j) => [
      int(g), int(t), int(t - g), fmt(chart.ci_low[i][j]), fmt(chart.ci_high[i][j]), int(chart.n_treated[i][j]),
      int(chart.n_control[i][j]), int(chart.tokens[i][j])]));
    const heat = {
      type: "heatmap", x: chart.steps.map(String), y: chart.cohorts.map(String), z: chart.att, customdata: custom,
      colorscale: DIVERGING, zmin: -span, zmax: span, hoverongaps: false, xgap: 1, ygap: 1,
      colorbar: {title: {text: `ATT (${esc(chart.outcome)})`, side: "right"}, thickness: 12},
      hovertemplate: `${profileName(chart)}<br>cohort g: %{customdata[0]}<br>checkpoint t: %{customdata[1]}` +
        "<br>tokens: %{customdata[7]}<br>event time t − g: %{customdata[2]}<br>ATT: %{z:.4g}" +
        "<br>95% interval: %{customdata[3]} to %{customdata[4]}<br>cohort sequences: %{customdata[5]}" +
        "<br>control sequences: %{customdata[6]}<extra></extra>",
    };
    react(plotDiv(chart, 0), [heat], baseLayout({
      height: Math.max(340, 120 + 18 * chart.cohorts.length),
      xaxis: {type: "category", title: {text: "checkpoint t (step)"}},
      yaxis: {type: "category", title: {text: "cohort g (step)"}, automargin: true},
    }));
  }

  // Points with asymmetric 95% intervals, from rows of memorization_profile_summary.
  const interval = (chart) => ({
    type: "data", symmetric: false, thickness: 1.5, width: 4,
    array: chart.att.map((a, i) => (a === null || chart.ci_high[i] === null ? null : chart.ci_high[i] - a)),
    arrayminus: chart.att.map((a, i) => (a === null || chart.ci_low[i] === null ? null : a - chart.ci_low[i])),
  });
  const summaryData = (chart) => chart.att.map((_, i) => [fmt(chart.ci_low[i]), fmt(chart.ci_high[i]), fmt(chart.se[i]),
    int(chart.n_cohorts[i]), int(chart.n_treated[i])]);
  const summaryHover = (chart) => `${profileName(chart)}<br>ATT: %{customdata[5]}<br>95% interval: %{customdata[0]} to %{customdata[1]}` +
    "<br>standard error: %{customdata[2]}<br>cohorts: %{customdata[3]}<br>cohort sequences: %{customdata[4]}";
  const ZERO = {type: "line", line: {color: "#555", width: 1, dash: "dot"}};
  const zeroY = {...ZERO, xref: "paper", x0: 0, x1: 1, yref: "y", y0: 0, y1: 0};  // the line ATT = 0
  const zeroX = {...ZERO, xref: "x", x0: 0, x1: 0, yref: "paper", y0: 0, y1: 1};

  function drawProfileEvent(chart) {
    const trace = {
      type: "scatter", mode: "lines+markers", x: chart.event_time, y: chart.att, error_y: interval(chart),
      customdata: summaryData(chart).map((row, i) => [...row, fmt(chart.att[i])]), name: "ATT", line: {color: PALETTE[0]},
      hovertemplate: `${summaryHover(chart)}<br>event time e: %{x}<extra></extra>`,
    };
    react(plotDiv(chart, 0), [trace], baseLayout({
      xaxis: {title: {text: "event time e = t − g (steps)"}}, yaxis: {title: {text: `ATT (${esc(chart.outcome)})`}},
      shapes: [zeroY], showlegend: false,
    }));
  }

  function drawProfileSummary(chart) {
    const label = (i) => (chart.kind[i] === "instantaneous" ? "instantaneous (t = g)"
      : chart.kind[i] === "persistent" ? `persistent, e = ${int(chart.event_time[i])}` : `residual at step ${int(chart.at_step[i])}`);
    const colors = {instantaneous: PALETTE[3], persistent: PALETTE[0], residual: PALETTE[2]};
    const labels = chart.kind.map((_, i) => label(i));
    const trace = {
      type: "scatter", mode: "markers", x: chart.att, y: labels, error_x: interval(chart),
      marker: {size: 9, color: chart.kind.map((k) => colors[k] || PALETTE[7])},
      customdata: summaryData(chart).map((row, i) => [...row, fmt(chart.att[i])]),
      hovertemplate: `%{y}<br>${summaryHover(chart)}<extra></extra>`,
    };
    react(plotDiv(chart, 0), [trace], baseLayout({
      height: Math.max(220, 90 + 26 * labels.length), showlegend: false, shapes: [zeroX],
      xaxis: {title: {text: `ATT (${esc(chart.outcome)}) with 95% interval`}},
      yaxis: {type: "category", autorange: "reversed", automargin: true},
    }));
  }

  const DRAW = {layers: drawLayers, compare: drawCompare, checkpoints: drawCheckpoints, stabilization: drawStabilization,
    memorization: drawMemorization, spectrum: drawSpectrum, tensors: drawTensors, lines: drawLines, training: drawTraining,
    seedband: drawSeedBand, seeddiff: drawSeedDiff, seedcka: drawSeedCka, phases: drawPhases,
    profile_cells: drawProfileCells, profile_event: drawProfileEvent, profile_summary: drawProfileSummary, heatmap: drawHeatmap};

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

  // A live page (`ckptscope serve`): the token a login page kept for this tab, sent with every request.
  const TOKEN_KEY = "ckptscope-token";
  async function getJSON(url) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const response = await fetch(url, {cache: "no-store", headers: token ? {Authorization: `Bearer ${token}`} : {}});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  // Polls the server's cheap state; when the store's version moved, swaps in the new nav and main,
  // keeps the components chosen, and redraws. A failed poll (store busy, server restarting) is retried.
  async function follow(status, pollMs) {
    const root = document.documentElement;
    for (;;) {
      await new Promise((resolve) => setTimeout(resolve, pollMs));
      try {
        const state = await getJSON("/api/state");
        if (state.version === root.dataset.version) continue;
        const page = await getJSON("/api/dashboard");
        const chosen = Array.from(document.querySelectorAll("main select"), (s) => [s.id, s.value]);
        document.querySelectorAll("main .plot").forEach((div) => Plotly.purge(div));
        document.querySelector("header nav").innerHTML = page.nav;
        document.querySelector("main").innerHTML = page.main;
        for (const [id, value] of chosen) {
          const select = document.getElementById(id);
          if (select && Array.from(select.options, (o) => o.value).includes(value)) select.value = value;
        }
        document.getElementById("updated").textContent = page.generated || "–";
        for (const chart of page.charts) DRAW[chart.type](chart);
        root.dataset.version = page.version;
        root.dataset.updates = String(Number(root.dataset.updates || 0) + 1);
        status.textContent = `${page.charts.length} charts drawn; watching the store for new checkpoints.`;
        status.classList.remove("error");
      } catch (error) {
        status.textContent = `Could not update (retrying): ${error.message}`;
        status.classList.add("error");
      }
    }
  }

  function main() {
    const root = document.documentElement;
    try {
      const charts = JSON.parse(document.getElementById("report-data").textContent);
      for (const chart of charts) DRAW[chart.type](chart);
      if (document.documentElement.dataset.state === "error") return;
      status.textContent = `${charts.length} charts drawn.`;
      document.documentElement.dataset.state = "ready";
    } catch (error) {
      fail(error);
    }
    if (root.dataset.live) follow(status, Number(root.dataset.live));
  }

  main();
})();
