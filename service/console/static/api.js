// The one place that talks to the API. The key lives in sessionStorage only (gone when the tab
// closes), travels only in the Authorization header, and never in a URL, so it stays out of
// server logs, browser history and Referer headers.

const KEY = "sarft.apiKey";
const WHO = "sarft.me";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function me() {
  try {
    return JSON.parse(sessionStorage.getItem(WHO) || "null");
  } catch {
    return null;
  }
}

export function signOut() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(WHO);
}

export class ApiError extends Error {
  constructor(status, code, message, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

let onUnauthorized = () => {};

/** What to do when the stored key stops working (revoked): the app signs out. */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

async function send(path, { method = "GET", body, signal, key } = {}) {
  const useKey = key ?? getKey();
  const headers = { Authorization: `Bearer ${useKey}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "omit",
    cache: "no-store",
  });
  if (!response.ok) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      // not JSON (a proxy's page): the status says enough
    }
    // A key given explicitly is being tried (sign-in): its 401 is the form's to show.
    if (response.status === 401 && key === undefined) onUnauthorized();
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || `${response.status} ${response.statusText}`,
      error.param ?? null,
    );
  }
  return response;
}

/** The JSON of an API call. */
export async function api(path, options) {
  const response = await send(path, options);
  return response.json();
}

/** Checks a key with GET /v1/me and keeps it for this tab. */
export async function signIn(key) {
  const who = await api("/v1/me", { key });
  sessionStorage.setItem(KEY, key);
  sessionStorage.setItem(WHO, JSON.stringify(who));
  return who;
}

/** A path segment from an id that came from the address bar. */
export function seg(id) {
  return encodeURIComponent(id);
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

function filenameOf(disposition) {
  if (!disposition) return null;
  const star = /filename\*=(?:UTF-8|utf-8)''([^;]+)/.exec(disposition);
  if (star) return decodeURIComponent(star[1]);
  const plain = /filename="?([^";]+)"?/.exec(disposition);
  return plain ? plain[1] : null;
}

/** Downloads an authenticated file: a link cannot send the header, so fetch it and save the
 * Blob through a temporary <a download>. */
export async function download(path, fallbackName, options) {
  const response = await send(path, options);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filenameOf(response.headers.get("Content-Disposition")) || fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  // Revoked later: the browser reads the Blob after click() returns.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
