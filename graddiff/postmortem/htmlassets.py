"""The CSS and JavaScript of the interactive HTML reports (``graddiff.postmortem.html``).

Hand-written, no library: one canvas heatmap (steps x records, hover values, drag to zoom a
step range, a filter box shared with the records table), SVG line charts with a legend outside
the data, sortable tables. About 20 KiB in all, so a report is its data plus this; an embedded
plotting library would add 1-4 MiB to every file and still need the same custom marks
(tolerance, first divergence, masked zeros). Kept here as Python strings so the wheel carries
them without package-data configuration. Written for any current browser (ES2017, canvas,
SVG; ``DecompressionStream`` for compressed heatmaps, with a message where it is missing).
"""

CSS = r"""
:root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg2:#f6f8fa;--red:#cf222e;--amber:#9a6700}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--fg);
margin:0 auto;max-width:1280px;padding:16px 24px 48px}
h1{font-size:20px;margin:4px 0 2px}h2{font-size:16px;margin:28px 0 8px;padding-bottom:4px;
border-bottom:1px solid var(--line)}
code,.mono,td{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.muted{color:var(--muted)}.small{font-size:12px}
.verdict{padding:12px 16px;border-radius:8px;margin:12px 0;border:1px solid}
.verdict .head{font-size:16px;font-weight:600}
.v-diverged{background:#ffebe9;border-color:#ff8182}.v-identical{background:#dafbe1;border-color:#4ac26b}
.v-within_tolerance{background:#fff8c5;border-color:#d4a72c}.v-run{background:var(--bg2);border-color:var(--line)}
.cause{margin-top:10px}.cause .title{font-weight:600}
.cause ul{margin:6px 0 0;padding-left:20px}.fix{margin-top:6px}
.fix b{color:#1a7f37}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:6px 0}
.facts dt{color:var(--muted)}.facts dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:var(--bg2);font-weight:600;position:sticky;top:0;z-index:1}
th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \2195";color:#aaa}
th.asc:after{content:" \2191";color:var(--fg)}th.desc:after{content:" \2193";color:var(--fg)}
td.num{text-align:right}tr.relevant td{background:#fff8c5}
.tablebox{max-height:460px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.toolbar{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin:8px 0}
.toolbar input[type=search]{font:inherit;padding:4px 8px;width:420px;max-width:100%;border:1px solid var(--line);
border-radius:6px}
button{font:inherit;padding:3px 10px;border:1px solid var(--line);border-radius:6px;background:#fff;cursor:pointer}
button:hover{background:var(--bg2)}
.heat{position:relative;border:1px solid var(--line);border-radius:6px;padding:6px;background:#fff}
.heat canvas{display:block}
.legend{display:flex;gap:14px;flex-wrap:wrap;align-items:center;font-size:12px;color:var(--muted);margin-top:6px}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #bbb;vertical-align:-2px;margin-right:4px}
#tip{position:fixed;pointer-events:none;background:#24292f;color:#fff;padding:6px 8px;border-radius:6px;
font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;z-index:10;display:none;max-width:520px;white-space:pre-wrap}
.chart{display:flex;gap:12px;align-items:flex-start}
.chart svg{flex:1 1 auto;min-width:0;border:1px solid var(--line);border-radius:6px;background:#fff}
.chart .keys{flex:0 0 170px;font-size:12px;list-style:none;padding:0;margin:0}
.chart .keys li{margin:2px 0}.chart .keys i{display:inline-block;width:16px;height:3px;vertical-align:3px;margin-right:6px}
.finding{margin:6px 0}.finding .where{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.note{color:var(--muted);font-size:12.5px;margin:4px 0}
"""

JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("graddiff-data").textContent);
const $ = (s, el) => (el || document).querySelector(s);
const tip = document.getElementById("tip");
const fmt = (x) => {
  if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e-3 && a < 1e4 ? String(+x.toPrecision(3)) : x.toExponential(2);
};
function showTip(ev, text) {
  tip.textContent = text; tip.style.display = "block";
  const w = tip.offsetWidth, h = tip.offsetHeight;
  let x = ev.clientX + 14, y = ev.clientY + 14;
  if (x + w > innerWidth - 4) x = ev.clientX - w - 14;
  if (y + h > innerHeight - 4) y = ev.clientY - h - 14;
  tip.style.left = x + "px"; tip.style.top = y + "px";
}
function hideTip() { tip.style.display = "none"; }

// ---- colours ---------------------------------------------------------------------------
const VIRIDIS = ["#440154","#482878","#3e4989","#31688e","#26828e","#1f9e89","#35b779","#6ece58","#b5de2b","#fde725"];
const COOL = ["#eef4fb","#c6dbef","#9ecae1","#6baed6","#4292c6","#2171b5","#084594"];
const HOT = ["#fee391","#fec44f","#fe9929","#ec7014","#cc4c02","#993404","#67000d"];
function hex(c) { return [parseInt(c.slice(1,3),16), parseInt(c.slice(3,5),16), parseInt(c.slice(5,7),16)]; }
function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t)); const p = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(p));
  const a = hex(stops[i]), b = hex(stops[i + 1]), f = p - i;
  return [0,1,2].map(k => Math.round(a[k] + (b[k] - a[k]) * f));
}
const ABSENT = [226,226,226], ZERO_DIFF = [255,255,255], ZERO_NORM = [252,228,236], NONFINITE = [214,39,40];

// ---- heatmap ---------------------------------------------------------------------------
// codes: 0 absent, 1 zero (bitwise equal / zero norm), 65535 NaN/Inf, else log10 value.
async function decode(h) {
  let bytes = Uint8Array.from(atob(h.data), c => c.charCodeAt(0));
  if (h.deflate) {
    if (typeof DecompressionStream === "undefined") throw new Error("this browser cannot decompress the heatmap (no DecompressionStream)");
    const s = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    bytes = new Uint8Array(await new Response(s).arrayBuffer());
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Uint16Array(bytes.byteLength / 2);
  for (let i = 0; i < out.length; i++) out[i] = dv.getUint16(2 * i, true);
  return out;
}
function logOf(h, code) { return h.lo + (code - 2) / 65532 * (h.hi - h.lo); }
function describeCell(h, code) {
  if (code === 0) return "not recorded";
  if (code === 65535) return "NaN/Inf";
  if (h.scale === "diff") {
    if (code === 1) return "bitwise equal";
    const v = Math.pow(10, logOf(h, code));
    return "rel diff " + fmt(v) + (h.tol !== null ? (v > h.tolValue ? "  (beyond " : "  (within ") + h.tolName + ")" : "");
  }
  if (code === 1) return "norm 0 (masked)";
  return "norm " + fmt(Math.pow(10, logOf(h, code)));
}
function colourOf(h, code) {
  if (code === 0) return ABSENT;
  if (code === 65535) return NONFINITE;
  if (code === 1) return h.scale === "diff" ? ZERO_DIFF : ZERO_NORM;
  const v = logOf(h, code);
  if (h.scale === "diff") {
    if (h.tol !== null && v > h.tol) return ramp(HOT, (v - h.tol) / Math.max(1e-9, h.hi - h.tol));
    const top = h.tol !== null ? h.tol : h.hi;
    return ramp(COOL, (v - h.lo) / Math.max(1e-9, top - h.lo));
  }
  return ramp(VIRIDIS, (v - h.lo) / Math.max(1e-9, h.hi - h.lo));
}

class Heatmap {
  constructor(root, h) {
    this.root = root; this.h = h; this.values = null;
    this.rows = h.rows.map((r, i) => i); this.x0 = 0; this.x1 = h.steps.length;
    root.innerHTML = "";
    const bar = document.createElement("div"); bar.className = "toolbar small";
    bar.innerHTML = '<span class="range muted"></span><button class="zoomout" type="button">Zoom out</button>' +
      '<button class="reset" type="button">Reset zoom</button><span class="muted">drag across the map to zoom into steps; double-click to reset</span>';
    root.appendChild(bar);
    this.canvas = document.createElement("canvas"); root.appendChild(this.canvas);
    this.legend = document.createElement("div"); this.legend.className = "legend"; root.appendChild(this.legend);
    $(".reset", bar).onclick = () => { this.x0 = 0; this.x1 = h.steps.length; this.draw(); };
    $(".zoomout", bar).onclick = () => {
      const n = this.x1 - this.x0, c = (this.x0 + this.x1) / 2;
      this.x0 = Math.max(0, Math.floor(c - n)); this.x1 = Math.min(h.steps.length, Math.ceil(c + n)); this.draw();
    };
    this.rangeEl = $(".range", bar);
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { hideTip(); this.dragTo = null; });
    this.canvas.addEventListener("mousedown", (e) => { const c = this.cell(e); if (c) { this.dragFrom = c.col; this.dragTo = c.col; } });
    this.canvas.addEventListener("mouseup", (e) => this.endDrag(e));
    this.canvas.addEventListener("dblclick", () => { this.x0 = 0; this.x1 = h.steps.length; this.draw(); });
    new ResizeObserver(() => this.draw()).observe(root);
    this.drawLegend();
  }
  async load() {
    try { this.values = await decode(this.h); }
    catch (err) { this.root.insertAdjacentHTML("beforeend", '<p class="muted">' + String(err.message) + "</p>"); return; }
    this.draw();
    this.root.dataset.ready = "1";
  }
  filter(match) { this.rows = this.h.rows.map((r, i) => i).filter(i => match(this.h.rows[i])); this.draw(); }
  layout() {
    const ctx = this.canvas.getContext("2d"), h = this.h, n = this.rows.length;
    const width = Math.max(320, this.root.clientWidth - 14);
    // a label on every row up to 160 rows (the map grows to fit them); beyond, thin rows
    const rowH = !n ? 18 : n <= 160 ? Math.min(18, Math.max(11, Math.floor(240 / n))) : Math.max(2, Math.floor(900 / n));
    ctx.font = (rowH < 13 ? "10px" : "11px") + " ui-monospace,Menlo,Consolas,monospace";  // as drawn
    let gutter = 0;
    if (rowH >= 11) for (const i of this.rows) gutter = Math.max(gutter, ctx.measureText(h.rows[i].display).width);
    gutter = Math.min(Math.ceil(gutter) + 10, Math.floor(width * 0.42));
    return { width, rowH, gutter, top: 4, heatW: width - gutter - 4, heatH: Math.max(rowH, n * rowH), axis: 30 };
  }
  draw() {
    if (!this.values) return;
    const h = this.h, L = this.layout(); this.L = L;
    Object.assign(this.canvas.dataset, { gutter: L.gutter, top: L.top, rowH: L.rowH, heatW: L.heatW });
    const dpr = window.devicePixelRatio || 1, c = this.canvas;
    c.style.width = L.width + "px"; c.style.height = (L.top + L.heatH + L.axis) + "px";
    c.width = Math.round(L.width * dpr); c.height = Math.round((L.top + L.heatH + L.axis) * dpr);
    const ctx = c.getContext("2d"); ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, L.width, L.top + L.heatH + L.axis);
    const nCols = this.x1 - this.x0, nRows = this.rows.length;
    this.rangeEl.textContent = `steps ${h.steps[this.x0]}–${h.steps[this.x1 - 1]} (${nCols} of ${h.steps.length}), ${nRows} of ${h.rows.length} records`;
    if (!nRows || !nCols) { ctx.fillStyle = "#666"; ctx.fillText("no record matches the filter", L.gutter, L.top + 14); return; }
    const img = new ImageData(nCols, nRows), px = img.data, S = h.steps.length;
    for (let r = 0; r < nRows; r++) {
      const base = this.rows[r] * S;
      for (let k = 0; k < nCols; k++) {
        const rgb = colourOf(h, this.values[base + this.x0 + k]), o = 4 * (r * nCols + k);
        px[o] = rgb[0]; px[o + 1] = rgb[1]; px[o + 2] = rgb[2]; px[o + 3] = 255;
      }
    }
    const off = document.createElement("canvas"); off.width = nCols; off.height = nRows;
    off.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, L.gutter, L.top, L.heatW, nRows * L.rowH);
    ctx.strokeStyle = "#999"; ctx.lineWidth = 1; ctx.strokeRect(L.gutter + 0.5, L.top + 0.5, L.heatW - 1, nRows * L.rowH - 1);
    // row labels
    ctx.fillStyle = "#1f2328"; ctx.font = (L.rowH < 13 ? "10px" : "11px") + " ui-monospace,Menlo,Consolas,monospace"; ctx.textBaseline = "middle";
    if (L.rowH >= 11) {
      for (let r = 0; r < nRows; r++) {
        let t = h.rows[this.rows[r]].display;
        while (t.length > 4 && ctx.measureText(t).width > L.gutter - 8) t = t.slice(0, -2);
        if (t !== h.rows[this.rows[r]].display) t = t.slice(0, -1) + "…";
        ctx.fillText(t, 2, L.top + (r + 0.5) * L.rowH);
      }
    } else {
      ctx.save(); ctx.translate(12, L.top + nRows * L.rowH / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
      ctx.fillText(nRows + " records (hover for names, filter to enlarge)", 0, 0); ctx.restore();
    }
    // step axis
    ctx.textBaseline = "top"; ctx.textAlign = "center"; ctx.fillStyle = "#656d76";
    const y = L.top + nRows * L.rowH + 4, cw = L.heatW / nCols, every = Math.max(1, Math.ceil(nCols / Math.max(2, Math.floor(L.heatW / 70))));
    for (let k = 0; k < nCols; k += every) ctx.fillText(String(h.steps[this.x0 + k]), L.gutter + (k + 0.5) * cw, y);
    ctx.textAlign = "right"; ctx.fillText("step", L.width - 2, y + 13);
    ctx.textAlign = "left";
    // the first divergence
    if (h.mark) {
      const r = this.rows.indexOf(h.mark.row), k = h.mark.col - this.x0;
      if (r >= 0 && k >= 0 && k < nCols) {
        const w = Math.max(cw, 8), hh = Math.max(L.rowH, 8);
        const x = L.gutter + (k + 0.5) * cw - w / 2 - 2, yy = L.top + (r + 0.5) * L.rowH - hh / 2 - 2;
        ctx.strokeStyle = "#cf222e"; ctx.lineWidth = 2.5; ctx.strokeRect(x, yy, w + 4, hh + 4);
      }
    }
    if (this.dragTo !== null && this.dragTo !== undefined && this.dragFrom !== undefined && this.dragFrom !== this.dragTo) {
      const a = Math.min(this.dragFrom, this.dragTo) - this.x0, b = Math.max(this.dragFrom, this.dragTo) - this.x0 + 1;
      ctx.fillStyle = "rgba(9,105,218,0.18)"; ctx.fillRect(L.gutter + a * cw, L.top, (b - a) * cw, nRows * L.rowH);
    }
  }
  cell(e) {
    const L = this.L; if (!L) return null;
    const b = this.canvas.getBoundingClientRect(), x = e.clientX - b.left - L.gutter, y = e.clientY - b.top - L.top;
    const nCols = this.x1 - this.x0;
    if (x < 0 || x >= L.heatW || y < 0 || y >= this.rows.length * L.rowH) return null;
    const col = this.x0 + Math.min(nCols - 1, Math.floor(x / L.heatW * nCols)), r = Math.floor(y / L.rowH);
    return { col, row: this.rows[r] };
  }
  hover(e) {
    const c = this.cell(e);
    if (this.dragFrom !== undefined && this.dragTo !== null && c && e.buttons === 1) { this.dragTo = c.col; this.draw(); }
    if (!c) { hideTip(); return; }
    const h = this.h, code = this.values[c.row * h.steps.length + c.col];
    let text = h.rows[c.row].display + "\nstep " + h.steps[c.col] + ": " + describeCell(h, code);
    if (h.mark && h.mark.row === c.row && h.mark.col === c.col) text += "\n\u25a0 first divergence";
    showTip(e, text);
    this.root.dataset.hover = text;
  }
  endDrag(e) {
    const c = this.cell(e);
    if (this.dragFrom !== undefined && c && c.col !== this.dragFrom) {
      this.x0 = Math.min(this.dragFrom, c.col); this.x1 = Math.max(this.dragFrom, c.col) + 1;
    }
    this.dragFrom = undefined; this.dragTo = null; this.draw();
  }
  drawLegend() {
    const h = this.h, sw = (rgb) => `<span class="swatch" style="background:rgb(${rgb.join(",")})"></span>`;
    const parts = [];
    if (h.scale === "diff") {
      parts.push(sw(ZERO_DIFF) + "bitwise equal");
      const tol = h.tol !== null ? h.tol : h.hi;
      parts.push(sw(ramp(COOL, 0.15)) + sw(ramp(COOL, 0.9)) + `rel diff ${fmt(Math.pow(10, h.lo))} … ${fmt(Math.pow(10, Math.min(tol, h.hi)))} (within tolerance)`);
      if (h.tol !== null && h.hi > h.tol) parts.push(sw(ramp(HOT, 0.05)) + sw(ramp(HOT, 1)) + `beyond ${h.tolName} … ${fmt(Math.pow(10, h.hi))}`);
      parts.push(sw(ABSENT) + "not recorded / not comparable");
      if (h.mark) parts.push('<span class="swatch" style="border:2px solid #cf222e"></span>first divergence');
    } else {
      parts.push(sw(ramp(VIRIDIS, 0)) + sw(ramp(VIRIDIS, 0.5)) + sw(ramp(VIRIDIS, 1)) + `norm ${fmt(Math.pow(10, h.lo))} … ${fmt(Math.pow(10, h.hi))} (log scale)`);
      parts.push(sw(ZERO_NORM) + "zero norm (masked)");
      parts.push(sw(NONFINITE) + "NaN/Inf");
      parts.push(sw(ABSENT) + "not recorded");
    }
    this.legend.innerHTML = parts.map(p => "<span>" + p + "</span>").join("");
  }
}

// ---- line charts (SVG) -----------------------------------------------------------------
// no red: red marks the first divergence
const PALETTE = ["#0969da","#e16f24","#1a7f37","#8250df","#bf8700","#1b7c83","#bf3989","#6e7781"];
function lineChart(root, series, opt) {
  // series: [{name, points: [[x, y], ...]}]; opt: {log, ylabel, hlines: [{y, label}], vlines: [{x, label}]}
  const W = 820, H = 260, m = { l: 64, r: 12, t: 10, b: 34 };
  const pts = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]) && (!opt.log || p[1] > 0));
  const box = document.createElement("div"); box.className = "chart";
  if (!pts.length) { root.innerHTML = '<p class="muted">nothing to plot</p>'; return; }
  const xs = pts.map(p => p[0]);
  let ys = pts.map(p => opt.log ? Math.log10(p[1]) : p[1]);
  for (const hl of opt.hlines || []) if (!opt.log || hl.y > 0) ys.push(opt.log ? Math.log10(hl.y) : hl.y);
  let x0 = Math.min(...xs), x1 = Math.max(...xs); if (x0 === x1) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...ys), y1 = Math.max(...ys); if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
  const Y = y => m.t + (1 - ((opt.log ? Math.log10(y) : y) - y0) / (y1 - y0)) * (H - m.t - m.b);
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("role", "img");
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; svg.appendChild(e); return e; };
  // y ticks
  const ticks = [];
  if (opt.log) { for (let d = Math.ceil(y0); d <= Math.floor(y1); d++) ticks.push(d); if (ticks.length > 8) { const s = Math.ceil(ticks.length / 8); for (let i = ticks.length - 1; i >= 0; i--) if (ticks[i] % s) ticks.splice(i, 1); } }
  else { const step = niceStep((y1 - y0) / 5); for (let v = Math.ceil(y0 / step) * step; v <= y1; v += step) ticks.push(v); }
  for (const t of ticks) {
    const yy = opt.log ? Y(Math.pow(10, t)) : Y(t);
    add("line", { x1: m.l, x2: W - m.r, y1: yy, y2: yy, stroke: "#eaeef2" });
    add("text", { x: m.l - 6, y: yy + 4, "text-anchor": "end", "font-size": 11, fill: "#656d76" }, opt.log ? "1e" + t : fmt(t));
  }
  const xstep = niceStep((x1 - x0) / 8);
  for (let v = Math.ceil(x0 / xstep) * xstep; v <= x1; v += xstep)
    add("text", { x: X(v), y: H - m.b + 16, "text-anchor": "middle", "font-size": 11, fill: "#656d76" }, String(Math.round(v)));
  add("text", { x: W - m.r, y: H - 4, "text-anchor": "end", "font-size": 11, fill: "#656d76" }, "step");
  add("text", { x: 12, y: m.t + (H - m.t - m.b) / 2, "text-anchor": "middle", "font-size": 11, fill: "#656d76", transform: `rotate(-90 12 ${m.t + (H - m.t - m.b) / 2})` }, opt.ylabel + (opt.log ? " (log)" : ""));
  add("rect", { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, fill: "none", stroke: "#d0d7de" });
  for (const hl of opt.hlines || []) if (!opt.log || hl.y > 0) {
    add("line", { x1: m.l, x2: W - m.r, y1: Y(hl.y), y2: Y(hl.y), stroke: "#9a6700", "stroke-dasharray": "5 4" });
  }
  for (const vl of opt.vlines || []) add("line", { x1: X(vl.x), x2: X(vl.x), y1: m.t, y2: H - m.b, stroke: "#cf222e", "stroke-dasharray": "3 3" });
  series.forEach((s, i) => {
    const col = s.color || PALETTE[i % PALETTE.length]; let d = "", pen = false;
    for (const [x, y] of s.points) {
      if (!Number.isFinite(y) || (opt.log && y <= 0)) { pen = false; continue; }
      d += (pen ? "L" : "M") + X(x).toFixed(1) + " " + Y(y).toFixed(1); pen = true;
    }
    add("path", { d, fill: "none", stroke: col, "stroke-width": 1.8, "stroke-dasharray": s.dash || "" });
  });
  const cursor = add("line", { x1: 0, x2: 0, y1: m.t, y2: H - m.b, stroke: "#57606a", visibility: "hidden" });
  svg.addEventListener("mousemove", (e) => {
    const b = svg.getBoundingClientRect(), sx = (e.clientX - b.left) / b.width * W;
    if (sx < m.l || sx > W - m.r) { cursor.setAttribute("visibility", "hidden"); hideTip(); return; }
    const xv = x0 + (sx - m.l) / (W - m.l - m.r) * (x1 - x0);
    const lines = [];
    let best = null;
    for (const s of series) {
      let near = null;
      for (const p of s.points) if (near === null || Math.abs(p[0] - xv) < Math.abs(near[0] - xv)) near = p;
      if (near) { lines.push(s.name + ": " + fmt(near[1])); best = near[0]; }
    }
    cursor.setAttribute("x1", X(best)); cursor.setAttribute("x2", X(best)); cursor.setAttribute("visibility", "visible");
    showTip(e, "step " + best + "\n" + lines.join("\n"));
  });
  svg.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); hideTip(); });
  box.appendChild(svg);
  const keys = document.createElement("ul"); keys.className = "keys";
  series.forEach((s, i) => {
    const li = document.createElement("li"); const col = s.color || PALETTE[i % PALETTE.length];
    li.innerHTML = `<i style="background:${col}"></i>`; li.appendChild(document.createTextNode(s.name)); keys.appendChild(li);
  });
  for (const hl of opt.hlines || []) { const li = document.createElement("li"); li.innerHTML = '<i style="background:#9a6700"></i>'; li.appendChild(document.createTextNode(hl.label)); keys.appendChild(li); }
  for (const vl of opt.vlines || []) { const li = document.createElement("li"); li.innerHTML = '<i style="background:#cf222e"></i>'; li.appendChild(document.createTextNode(vl.label)); keys.appendChild(li); }
  box.appendChild(keys);
  root.appendChild(box);
}
function niceStep(raw) {
  if (!(raw > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

// ---- tables ----------------------------------------------------------------------------
function table(root, columns, rows, opt) {
  // columns: [{key, label, num, fmt}], rows: objects; opt: {sortable, rowClass}
  const t = document.createElement("table"), head = t.createTHead().insertRow(), body = t.createTBody();
  columns.forEach((c, ci) => {
    const th = document.createElement("th"); th.textContent = c.label; head.appendChild(th);
    if (opt && opt.sortable) {
      th.className = "sortable";
      th.onclick = () => {
        const dir = th.classList.contains("asc") ? -1 : 1;
        head.querySelectorAll("th").forEach(x => x.classList.remove("asc", "desc"));
        th.classList.add(dir > 0 ? "asc" : "desc");
        const trs = Array.from(body.rows);
        trs.sort((a, b) => dir * cmp(a._row[c.key], b._row[c.key], c.num));
        trs.forEach(tr => body.appendChild(tr));
      };
    }
  });
  for (const r of rows) {
    const tr = body.insertRow(); tr._row = r;
    if (opt && opt.rowClass) tr.className = opt.rowClass(r);
    for (const c of columns) {
      const td = tr.insertCell(); const v = r[c.key];
      td.textContent = c.fmt ? c.fmt(v, r) : (v === null || v === undefined ? "–" : String(v));
      if (c.num) td.className = "num";
    }
  }
  const box = document.createElement("div"); box.className = "tablebox"; box.appendChild(t); root.appendChild(box);
  return body;
}
function cmp(a, b, num) {
  const na = a === null || a === undefined, nb = b === null || b === undefined;
  if (na || nb) return na === nb ? 0 : na ? 1 : -1;  // blanks last
  return num ? a - b : String(a).localeCompare(String(b), undefined, { numeric: true });
}

// ---- page ------------------------------------------------------------------------------
const maps = []; window.graddiffMaps = maps;
for (const h of D.heatmaps || []) {
  const root = document.getElementById(h.id);
  h.tolName = h.tolName || "tolerance";
  h.tolValue = h.tol !== null ? Math.pow(10, h.tol) : null;
  const hm = new Heatmap(root, h); maps.push(hm); hm.load();
}
for (const c of D.charts || []) lineChart(document.getElementById(c.id), c.series, c.options);
let recordBody = null;
if (D.records) {
  recordBody = table(document.getElementById("records"), D.records.columns.map(c => Object.assign({}, c, {
    fmt: c.kind === "num" ? (v) => fmt(v) : c.kind === "int" ? (v) => (v === null || v === undefined ? "–" : String(v)) : null,
    num: c.kind === "num" || c.kind === "int",
  })), D.records.rows, { sortable: true });
}
if (D.env) table(document.getElementById("env"), D.envSingle ? [{ key: "key", label: "key" }, { key: "a", label: "value" }]
  : [{ key: "key", label: "key" }, { key: "a", label: "A" }, { key: "b", label: "B" }], D.env, { rowClass: r => r.relevant ? "relevant" : "" });
const box = document.getElementById("filter");
if (box) {
  const apply = () => {
    const q = box.value.trim().toLowerCase(), terms = q.split(/\s+/).filter(Boolean);
    const match = (r) => terms.every(t => r.search.includes(t));
    maps.forEach(m => m.filter(match));
    let n = 0;
    if (recordBody) for (const tr of recordBody.rows) { const ok = match(tr._row); tr.style.display = ok ? "" : "none"; n += ok; }
    const count = document.getElementById("filter-count");
    if (count) count.textContent = q ? `${n} matching records` : "";
  };
  box.addEventListener("input", apply);
}
document.body.dataset.ready = "1";
"""
