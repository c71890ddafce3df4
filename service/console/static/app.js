// The console's entry point: sign-in, the hash router and each page's lifetime. A page gets a
// context whose signal, timers and listeners end when the user navigates away, so a slow answer
// or a poll of the last page never draws over the current one.

import { ApiError, getKey, me, setUnauthorizedHandler, signOut } from "./api.js";
import { el, fill, notice } from "./dom.js";
import { renderFineTuningJob } from "./fine_tuning_job.js";
import { renderFineTuningCreate, renderFineTuningList } from "./fine_tuning_list.js";
import { renderReview } from "./review.js";
import { renderRoles } from "./roles.js";
import { renderSignIn } from "./signin.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOutButton = document.getElementById("signout");

// Ids in the hash are fine (they are not secrets); the key never goes there.
const ROUTES = [
  [/^(?:#\/?(?:roles)?)?$/, "roles", (ctx) => renderRoles(main, ctx)],
  [/^#\/review\/([^/]+)$/, "roles", (ctx, id) => renderReview(main, ctx, id)],
  [/^#\/fine-tuning$/, "fine-tuning", (ctx) => renderFineTuningList(main, ctx)],
  [
    /^#\/fine-tuning\/new\/([^/]+)$/,
    "fine-tuning",
    (ctx, id) => renderFineTuningCreate(main, ctx, id),
  ],
  [/^#\/fine-tuning\/([^/]+)$/, "fine-tuning", (ctx, id) => renderFineTuningJob(main, ctx, id)],
];

let current = null;

function pageContext() {
  const controller = new AbortController();
  const endings = [];
  const ctx = {
    signal: controller.signal,
    active: () => current === ctx,
    // Runs ``task`` every ``ms`` until the page ends or ``stop()``; one run at a time.
    every(ms, task) {
      let timer = null;
      let stopped = false;
      ctx.stop = () => {
        stopped = true;
        clearTimeout(timer);
      };
      const tick = async () => {
        if (stopped || !ctx.active()) return;
        try {
          await task();
        } catch (error) {
          ctx.fail(error);
        }
        if (!stopped && ctx.active()) timer = setTimeout(tick, ms);
      };
      timer = setTimeout(tick, ms);
      endings.push(() => ctx.stop());
    },
    stop() {},
    listen(target, type, handler) {
      target.addEventListener(type, handler);
      endings.push(() => target.removeEventListener(type, handler));
    },
    rerender: () => ctx.active() && route(),
    fail(error) {
      if (!ctx.active() || error?.name === "AbortError") return;
      const text =
        error instanceof ApiError
          ? `${error.status} ${error.code}: ${error.message}`
          : String(error);
      main.prepend(notice("error", text));
    },
    end() {
      controller.abort();
      for (const ending of endings) ending();
    },
  };
  return ctx;
}

function showWho() {
  const signedIn = Boolean(getKey());
  nav.hidden = !signedIn;
  signOutButton.hidden = !signedIn;
  const info = me();
  who.textContent = signedIn && info ? `${info.tenant} · ${info.name}` : "";
}

function route() {
  current?.end();
  const ctx = pageContext();
  current = ctx;
  showWho();
  if (!getKey()) {
    renderSignIn(main, { onSignedIn: () => route() });
    return;
  }
  const hash = location.hash;
  for (const [pattern, page, render] of ROUTES) {
    const match = pattern.exec(hash);
    if (!match) continue;
    let id;
    try {
      id = match[1] === undefined ? undefined : decodeURIComponent(match[1]);
    } catch {
      break; // a malformed %-escape: no such page
    }
    for (const link of nav.querySelectorAll("a"))
      link.classList.toggle("active", link.dataset.page === page);
    fill(main, el("p", { class: "muted" }, "Loading…"));
    Promise.resolve(render(ctx, id)).catch((error) => ctx.fail(error));
    return;
  }
  fill(main, el("h1", {}, "No such page"), el("p", {}, el("a", { href: "#/roles" }, "Roles")));
}

setUnauthorizedHandler(() => {
  signOut();
  current?.end();
  current = pageContext();
  showWho();
  renderSignIn(main, {
    message: "The API key stopped working (revoked?): sign in again.",
    onSignedIn: () => route(),
  });
});

signOutButton.addEventListener("click", () => {
  signOut();
  route();
});
window.addEventListener("hashchange", route);
route();
