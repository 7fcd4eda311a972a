// ComfyUI-WanBench in the ComfyUI frontend (public extension API only: `app`, `api`,
// `registerExtension`, `node.addDOMWidget`; no internal modules, no deprecated widget fields).
//
// - Wan Benchmark Report: the summary a user wants first (case, total, s/step, peak memory,
//   activity, MFU, top finding) as a table in the node; "Full report" opens the Markdown report
//   rendered in an overlay; the chart is a thumbnail that opens at full size on click.
// - Wan Profiler: the live view while a prompt runs (stage, and small traces of SM activity or
//   GPU busy, VRAM, CPU and RSS), from the server's `wanbench.live` messages (at most 2 a second).
// - Wan Sampler: the settings that ran (task defaults filled in for widgets left at 0).
//
// Every text that comes from the server is inserted with `textContent` (never as HTML), so a case
// name such as `| x | <script>` shows as those characters. The pack's message types are
// registered with `api.addEventListener`, so the frontend never reports them as unknown.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const REPORT = "WanBenchReport";
const PROFILER = "WanBenchProfiler";
const SAMPLER = "WanBenchSampler";
const LIVE_POINTS = 120; // samples kept per trace (one minute at 2 messages a second)
const SUMMARY_ROWS = [
  ["case", "Case"],
  ["task", "Task"],
  ["size", "Size"],
  ["steps", "Steps"],
  ["status", "Status"],
  ["total_s", "Total (s)"],
  ["s_per_step", "s/step"],
  ["peak_memory", "Peak memory"],
  ["activity", "Activity (steps)"],
  ["mfu", "MFU"],
  ["top_finding", "Top finding"],
];
const TRACES = [
  ["activity", "activity", "%", "#6fb1ff"],
  ["vram_gb", "VRAM", "GB", "#f0b35a"],
  ["cpu_pct", "CPU", "%", "#7fd07f"],
  ["rss_gb", "RSS", "GB", "#c99bf0"],
];

const STYLE = `
.wanbench-panel { font: 12px/1.35 sans-serif; color: var(--input-text, #ddd); overflow: auto;
  box-sizing: border-box; padding: 4px 6px; }
.wanbench-panel table { border-collapse: collapse; width: 100%; }
.wanbench-panel th { text-align: left; font-weight: 600; padding: 2px 8px 2px 0; white-space: nowrap;
  vertical-align: top; opacity: 0.8; }
.wanbench-panel td { padding: 2px 0; word-break: break-word; }
.wanbench-panel .wanbench-actions { display: flex; gap: 6px; margin: 6px 0 4px; align-items: center; }
.wanbench-panel button, .wanbench-panel a.wanbench-link { font: inherit; cursor: pointer;
  padding: 2px 8px; border-radius: 4px; border: 1px solid #666; background: #333; color: #eee;
  text-decoration: none; }
.wanbench-panel img.wanbench-chart { width: 100%; cursor: zoom-in; border-radius: 3px; display: block; }
.wanbench-panel .wanbench-muted { opacity: 0.7; }
.wanbench-panel canvas { width: 100%; height: 34px; display: block; }
.wanbench-overlay { position: fixed; inset: 0; z-index: 10000; background: rgba(0, 0, 0, 0.8);
  display: flex; align-items: flex-start; justify-content: center; overflow: auto; padding: 32px; }
.wanbench-overlay .wanbench-sheet { background: #1e1f22; color: #e6e6e6; max-width: 1100px;
  width: 100%; padding: 20px 28px; border-radius: 8px; font: 14px/1.5 sans-serif; position: relative; }
.wanbench-overlay .wanbench-close { position: sticky; top: 0; float: right; font-size: 16px;
  cursor: pointer; background: #444; color: #fff; border: 0; border-radius: 4px; padding: 4px 10px; }
.wanbench-overlay table { border-collapse: collapse; margin: 8px 0; font-size: 12px; }
.wanbench-overlay th, .wanbench-overlay td { border: 1px solid #444; padding: 3px 6px; text-align: left; }
.wanbench-overlay code { background: #2c2d31; padding: 0 3px; border-radius: 3px; }
.wanbench-overlay img { max-width: 100%; }
.wanbench-overlay img.wanbench-full { max-width: none; cursor: zoom-out; }
`;

function addStyle() {
  if (document.getElementById("wanbench-style")) return;
  const style = document.createElement("style");
  style.id = "wanbench-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = String(text);
  return node;
}

function viewUrl(file) {
  const params = new URLSearchParams({
    filename: file.filename,
    subfolder: file.subfolder ?? "",
    type: file.type ?? "output",
  });
  return api.apiURL(`/view?${params}`);
}

// A display-only panel under a node: never saved in the workflow nor sent with the prompt.
function panel(node, name, minHeight) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const root = el("div", { class: "wanbench-panel", "data-wanbench": name });
    widget = node.addDOMWidget(name, "wanbench", root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => widget.wanbenchHeight ?? minHeight,
      getValue: () => undefined,
      setValue: () => {},
    });
    widget.serialize = false;
    widget.wanbenchRoot = root;
  }
  return widget;
}

function fit(node, widget, height) {
  widget.wanbenchHeight = height;
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], 380), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

// ---------------------------------------------------------------------------------------------
// Overlay: the full report and the chart at full size
// ---------------------------------------------------------------------------------------------
function openOverlay(content) {
  const overlay = el("div", { class: "wanbench-overlay", "data-wanbench": "overlay" });
  const sheet = el("div", { class: "wanbench-sheet" });
  const close = el("button", { class: "wanbench-close", title: "Close (Esc)" }, "Close");
  const onKey = (event) => event.key === "Escape" && done();
  function done() {
    overlay.remove();
    document.removeEventListener("keydown", onKey);
  }
  close.addEventListener("click", done);
  overlay.addEventListener("click", (event) => event.target === overlay && done());
  document.addEventListener("keydown", onKey);
  sheet.append(close, content);
  overlay.appendChild(sheet);
  document.body.appendChild(overlay);
  return overlay;
}

function openChart(url) {
  const image = el("img", { class: "wanbench-full", src: url, alt: "timeline chart" });
  image.addEventListener("click", () => image.closest(".wanbench-overlay")?.remove());
  openOverlay(image);
}

// Markdown escapes written by the report (`\|`, `\_`, `&lt;` ...) back to the characters.
function unescapeMarkdown(text) {
  return text
    .replace(/\\([\\`*_{}\[\]()#+\-.!|~])/g, "$1")
    .replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">")
    .replace(/&amp;/g, "&");
}

// Inline Markdown of the report: **bold**, `code`, links and images; everything as text nodes.
function inline(parent, text, files) {
  const pattern = /(!?)\[([^\]]*)\]\(([^)\s]+)\)|\*\*([^*]+)\*\*|`([^`]+)`|\\./g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    parent.append(unescapeMarkdown(text.slice(last, match.index)));
    last = match.index + match[0].length;
    if (match[0].startsWith("\\")) {
      parent.append(match[0].slice(1));
    } else if (match[3] !== undefined && match[1] === "!") {
      const name = decodeURIComponent(match[3]);
      const url = viewUrl({ ...files.markdown, filename: name });
      const image = el("img", { src: url, alt: unescapeMarkdown(match[2]) });
      image.addEventListener("click", () => openChart(url));
      parent.appendChild(image);
    } else if (match[3] !== undefined) {
      parent.append(unescapeMarkdown(match[2]));
    } else if (match[4] !== undefined) {
      parent.appendChild(el("strong", {}, unescapeMarkdown(match[4])));
    } else {
      parent.appendChild(el("code", {}, match[5]));
    }
  }
  parent.append(unescapeMarkdown(text.slice(last)));
}

function cells(line) {
  // split a table row on `|` that is not escaped as `\|`
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split(/(?<!\\)\|/).map((c) => c.trim());
}

function renderMarkdown(markdown, files) {
  const root = el("div");
  const lines = markdown.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const heading = /^(#{1,4}) (.*)$/.exec(line);
    if (heading) {
      const h = el(`h${heading[1].length}`);
      inline(h, heading[2], files);
      root.appendChild(h);
    } else if (line.startsWith("|")) {
      const table = el("table");
      const rows = [];
      while (i < lines.length && lines[i].startsWith("|")) rows.push(lines[i++]);
      i--;
      rows.forEach((row, r) => {
        if (r === 1 && /^\|\s*:?-/.test(row)) return; // the alignment row
        const tr = el("tr");
        for (const cell of cells(row)) {
          const td = el(r === 0 ? "th" : "td");
          inline(td, cell, files);
          tr.appendChild(td);
        }
        table.appendChild(tr);
      });
      root.appendChild(table);
    } else if (/^(- |\d+\. )/.test(line)) {
      const list = el(line.startsWith("- ") ? "ul" : "ol");
      while (i < lines.length && /^(- |\d+\. )/.test(lines[i])) {
        const li = el("li");
        inline(li, lines[i++].replace(/^(- |\d+\. )/, ""), files);
        list.appendChild(li);
      }
      i--;
      root.appendChild(list);
    } else if (line === "---") {
      root.appendChild(el("hr"));
    } else if (line.trim()) {
      const p = el("p");
      inline(p, line, files);
      root.appendChild(p);
    }
  }
  return root;
}

async function openReport(files) {
  const response = await api.fetchApi(
    `/view?${new URLSearchParams({ filename: files.markdown.filename, subfolder: files.markdown.subfolder ?? "", type: "output" })}`,
  );
  if (!response.ok) {
    openOverlay(el("p", {}, `The report could not be read (HTTP ${response.status}): ${files.markdown.filename}`));
    return;
  }
  openOverlay(renderMarkdown(await response.text(), files));
}

// ---------------------------------------------------------------------------------------------
// Wan Benchmark Report: summary table, full report, chart
// ---------------------------------------------------------------------------------------------
function showReport(node, output) {
  const cards = output?.wanbench_summary ?? [];
  const files = Object.fromEntries((output?.wanbench_report ?? []).map((f) => [f.kind, f]));
  const widget = panel(node, "wanbench_summary", 120);
  const root = widget.wanbenchRoot;
  root.replaceChildren();
  for (const card of cards) {
    const table = el("table", { "data-wanbench": "summary-table" });
    for (const [key, label] of SUMMARY_ROWS) {
      const tr = el("tr");
      tr.append(el("th", {}, label), el("td", { "data-key": key }, card[key] ?? "n/a"));
      table.appendChild(tr);
    }
    root.appendChild(table);
  }
  const actions = el("div", { class: "wanbench-actions" });
  if (files.markdown) {
    const full = el("button", { "data-wanbench": "open-report" }, "Full report");
    full.addEventListener("click", () => openReport(files));
    actions.appendChild(full);
  }
  if (files.json) {
    actions.appendChild(el("a", { class: "wanbench-link", href: viewUrl(files.json), download: files.json.filename }, "JSON"));
  }
  root.appendChild(actions);
  if (files.chart) {
    const url = viewUrl(files.chart);
    const chart = el("img", { class: "wanbench-chart", src: url, alt: "timeline chart (click for full size)", title: "Click for full size" });
    chart.addEventListener("click", () => openChart(url));
    root.appendChild(chart);
  } else if (cards.length) {
    root.appendChild(el("div", { class: "wanbench-muted" }, "Chart skipped (see the full report for why)."));
  }
  fit(node, widget, 24 * SUMMARY_ROWS.length * Math.max(cards.length, 1) + (files.chart ? 200 : 40));
}

// ---------------------------------------------------------------------------------------------
// Wan Profiler: live view
// ---------------------------------------------------------------------------------------------
function drawTrace(canvas, values, colour) {
  const width = (canvas.width = canvas.clientWidth || 300);
  const height = (canvas.height = 34);
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  const known = values.filter((v) => v !== null && v !== undefined);
  if (!known.length) return;
  const top = Math.max(...known, 1e-9);
  g.strokeStyle = colour;
  g.lineWidth = 1.5;
  g.beginPath();
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    const x = (i / Math.max(LIVE_POINTS - 1, 1)) * width;
    const y = height - 2 - (v / top) * (height - 4);
    i === 0 || values[i - 1] === null ? g.moveTo(x, y) : g.lineTo(x, y);
  });
  g.stroke();
}

function liveState(node) {
  // `received`: the session time of each message of the current run ("done" for the last one)
  node.wanbenchLive ??= { series: Object.fromEntries(TRACES.map(([key]) => [key, []])), received: [] };
  return node.wanbenchLive;
}

function showLive(node, data) {
  const widget = panel(node, "wanbench_live", 190);
  const root = widget.wanbenchRoot;
  const state = liveState(node);
  if (!root.dataset.built) {
    root.dataset.built = "1";
    root.appendChild(el("div", { "data-wanbench": "live-stage" }, ""));
    for (const [key, label] of TRACES) {
      root.appendChild(el("div", { class: "wanbench-muted", "data-wanbench": `live-${key}` }, `${label}: n/a`));
      root.appendChild(el("canvas", { "data-trace": key }));
    }
  }
  const stage = root.querySelector('[data-wanbench="live-stage"]');
  if (data.state === "done") {
    stage.textContent = `Finished after ${data.t ?? "?"} s`;
    root.dataset.state = "done";
    state.received.push("done");
    return;
  }
  if (root.dataset.state === "done") {
    for (const key of Object.keys(state.series)) state.series[key] = []; // a new run
    state.received = [];
  }
  state.received.push(data.t);
  root.dataset.state = "running";
  stage.textContent = `${data.stage ?? "between stages"} · ${data.t} s`;
  for (const [key, label, unit, colour] of TRACES) {
    const series = state.series[key];
    series.push(data[key] ?? null);
    if (series.length > LIVE_POINTS) series.shift();
    const name = key === "activity" ? data.activity_label ?? "SM activity / GPU busy" : label;
    const value = data[key];
    root.querySelector(`[data-wanbench="live-${key}"]`).textContent =
      value === null || value === undefined ? `${name}: n/a` : `${name}: ${value} ${unit}`;
    drawTrace(root.querySelector(`canvas[data-trace="${key}"]`), series, colour);
  }
  fit(node, widget, 190);
}

// ---------------------------------------------------------------------------------------------
// Wan Sampler: the settings that ran
// ---------------------------------------------------------------------------------------------
function showSampler(node, output) {
  const settings = output?.wanbench_sampler?.[0];
  if (!settings) return;
  const widget = panel(node, "wanbench_sampler", 40);
  const parts = [`${settings.task}: ${settings.steps} steps`, `shift ${settings.shift}`];
  if (settings.boundary !== undefined) parts.push(`boundary ${settings.boundary}`);
  if (settings.guidance !== undefined) parts.push(`guidance ${settings.guidance}`);
  else parts.push(`guidance ${settings.guidance_high} / ${settings.guidance_low}`);
  parts.push(settings.solver);
  widget.wanbenchRoot.replaceChildren(el("div", { class: "wanbench-muted", "data-wanbench": "sampler-settings" }, `Ran with ${parts.join(" · ")}`));
  fit(node, widget, 40);
}

// ---------------------------------------------------------------------------------------------
function nodeById(id) {
  return id === null || id === undefined ? null : app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
}

const SHOW = { [REPORT]: showReport, [SAMPLER]: showSampler };

app.registerExtension({
  name: "WanBench.UI",
  setup() {
    addStyle();
    api.addEventListener("wanbench.live", (event) => {
      const node = nodeById(event.detail?.node);
      if (node?.comfyClass === PROFILER) showLive(node, event.detail);
    });
    api.addEventListener("wanbench.report", (event) => {
      // The report's `executed` output fills the node; this message only says which files were written.
      const node = nodeById(event.detail?.node);
      if (node) node.wanbenchReportFiles = event.detail.files;
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const show = SHOW[nodeData.name];
    if (!show) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      show(this, output);
    };
  },
  onNodeOutputsUpdated(nodeOutputs) {
    // outputs of a past run opened from the queue: show them again
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = nodeById(id);
      const show = node && SHOW[node.comfyClass];
      if (show) show(node, output);
    }
  },
});
