// Line charts as SVG built from elements (no library). Geometry goes in attributes, colours in
// CSS classes: the CSP allows no style attributes.

import { el, fmtNum, fmtSig, svg } from "./dom.js";

const W = 520;
const H = 220;
const PAD = { left: 56, right: 12, top: 12, bottom: 32 };

function extent(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  return [lo, hi];
}

/**
 * A figure with one line per series: series = [{name, points: [[x, y], ...]}], each point's y
 * finite. The first series is drawn in .series-0, the next in .series-1, and so on.
 */
export function lineChart(title, series, { xLabel = "step", id } = {}) {
  const drawn = series.filter((s) => s.points.length > 0);
  const figure = el("figure", { class: "chart", id });
  figure.append(el("figcaption", {}, title));
  if (drawn.length === 0) {
    figure.append(el("p", { class: "muted" }, "No steps yet."));
    return figure;
  }
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
  const [x0, x1] = extent(xs);
  const [y0, y1] = extent(ys);
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const py = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

  const plot = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart-svg",
    role: "img",
    "aria-label": title,
  });
  const bottom = H - PAD.bottom;
  plot.append(
    svg("line", { x1: PAD.left, y1: bottom, x2: W - PAD.right, y2: bottom, class: "axis" }),
    svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: bottom, class: "axis" }),
  );
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    plot.append(
      svg("line", { x1: PAD.left, y1: py(y), x2: W - PAD.right, y2: py(y), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: py(y) + 4, class: "tick end" }, fmtSig(y)),
    );
  }
  for (const x of [x0, x1]) {
    plot.append(svg("text", { x: px(x), y: bottom + 16, class: "tick mid" }, fmtNum(x, 0)));
  }
  plot.append(svg("text", { x: (PAD.left + W) / 2, y: H - 2, class: "tick mid" }, xLabel));
  drawn.forEach((s, i) => {
    const points = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`);
    plot.append(svg("polyline", { points: points.join(" "), class: `line series-${i}` }));
    for (const [x, y] of s.points.slice(-1)) {
      plot.append(svg("circle", { cx: px(x), cy: py(y), r: 3, class: `dot series-${i}` }));
    }
  });
  figure.append(plot);
  figure.append(
    el(
      "ul",
      { class: "legend" },
      drawn.map((s, i) => {
        const last = s.points[s.points.length - 1][1];
        return el("li", { class: `series-${i}` }, `${s.name}: ${fmtSig(last)} (last)`);
      }),
    ),
  );
  return figure;
}
