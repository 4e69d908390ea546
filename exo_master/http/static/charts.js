// Small SVG line charts of the recent stats points, drawn by hand: no library, no network.

const H = 90;
const PAD = 14;
const LEFT = 34; // room for the axis labels
const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function text(attrs, content) {
  const node = el("text", attrs);
  node.textContent = content;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function format(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(value >= 10000 ? 0 : 1)}k`;
  return value >= 10 ? value.toFixed(0) : value.toFixed(1);
}

// points: [{t, value|null}], newest last, drawn over the time they cover: at least a minute, at
// most `most` seconds. Drawn in the SVG's own pixels, so text and lines keep their shape.
export function drawChart(svg, points, most = 300) {
  svg.replaceChildren();
  const W = Math.max(svg.clientWidth, 200);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
  const covered = points.length ? now - points[0].t : 0;
  const span = Math.min(most, Math.max(60, covered));
  const known = points.filter((p) => p.value !== null && p.value !== undefined);
  const top = niceMax(Math.max(0, ...known.map((p) => p.value)));
  const x = (t) => LEFT + ((t - (now - span)) / span) * (W - LEFT - PAD);
  const y = (v) => H - PAD - (v / top) * (H - 2 * PAD);
  for (const frac of [0, 0.5, 1]) {
    svg.append(el("line", { class: "grid", x1: LEFT, x2: W - PAD, y1: y(top * frac), y2: y(top * frac) }));
  }
  svg.append(text({ x: 2, y: y(top) + 3 }, format(top)), text({ x: 2, y: y(0) + 3 }, "0"));
  const spanText = span < 90 ? `last ${Math.round(span)} s` : `last ${Math.round(span / 60)} min`;
  svg.append(text({ x: W - PAD, y: H - 2, "text-anchor": "end" }, spanText));
  if (!known.length) {
    svg.append(text({ x: W / 2, y: H / 2, "text-anchor": "middle" }, "no requests yet"));
    return;
  }
  // A gap (no request in a window) breaks the line rather than drawing a fake zero.
  let path = "";
  let area = "";
  let run = [];
  const flush = () => {
    if (!run.length) return;
    path += run.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.value).toFixed(1)}`).join("");
    area += `M${x(run[0].t).toFixed(1)},${y(0)}` + run.map((p) => `L${x(p.t).toFixed(1)},${y(p.value).toFixed(1)}`).join("")
      + `L${x(run[run.length - 1].t).toFixed(1)},${y(0)}Z`;
    run = [];
  };
  for (const p of points.filter((q) => q.t >= now - span)) {
    if (p.value === null || p.value === undefined) flush();
    else run.push(p);
  }
  flush();
  svg.append(el("path", { class: "area", d: area }), el("path", { class: "line", d: path }));
}
