// DOM helpers. Every string a user or the API supplies goes in as a text node or an attribute
// value, never as markup: nothing in the console parses a string as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, props, children) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: el("td", {class: "num"}, "0.42"). */
export function el(tag, props = {}, ...children) {
  return build(document.createElement(tag), props, children);
}

/** An SVG element: sizes as attributes, since the CSP refuses style attributes. */
export function svg(tag, props = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), props, children);
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

/** Replaces the node's children; null, undefined and false children are left out (the DOM's own
 * append would show them as the text "null"). */
export function fill(node, ...children) {
  node.replaceChildren();
  return build(node, {}, children);
}

/** Four significant digits: losses near 5 and KLs near 1e-6 both stay readable. */
export function fmtSig(value) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "—";
  const number = Number(value);
  if (number === 0) return "0";
  const magnitude = Math.abs(number);
  return magnitude >= 1e-3 && magnitude < 1e5
    ? String(Number(number.toPrecision(4)))
    : number.toExponential(2);
}

export function fmtNum(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "—";
  return Number(value).toFixed(digits);
}

export function fmtPct(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "—";
  return `${(Number(value) * 100).toFixed(digits)}%`;
}

export function fmtTime(unixSeconds) {
  if (!unixSeconds) return "—";
  return new Date(unixSeconds * 1000).toLocaleString();
}

/** A one-line preview of a long text. */
export function cut(text, length = 120) {
  const flat = String(text ?? "")
    .replace(/\s+/g, " ")
    .trim();
  return flat.length > length ? `${flat.slice(0, length - 1)}…` : flat;
}

/** A notice in the page: kind is "error", "notfound" or "info". */
export function notice(kind, text) {
  return el("p", { class: `notice ${kind}`, role: kind === "info" ? "status" : "alert" }, text);
}

/** The page an unknown or foreign id gets: the API answers 404 for both, on purpose. */
export function notFound(main, what, id) {
  fill(
    main,
    el("h1", {}, `${what} not found`),
    notice(
      "notfound",
      `Not found: no ${what.toLowerCase()} ${id} for this API key's tenant (it does not exist, ` +
        "or it belongs to another tenant).",
    ),
    el("p", {}, el("a", { href: "#/roles" }, "Back to the roles")),
  );
}
