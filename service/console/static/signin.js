// The sign-in form: the key is checked with GET /v1/me before anything else is shown.

import { signIn } from "./api.js";
import { clear, el, fill, notice } from "./dom.js";

export function renderSignIn(main, { message, onSignedIn }) {
  const input = el("input", {
    id: "api-key",
    type: "password",
    name: "api-key",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "sk-sarft-…",
  });
  const status = el("div", { class: "signin-status" });
  if (message) status.append(notice("info", message));
  const button = el("button", { type: "submit", class: "primary" }, "Sign in");
  const form = el(
    "form",
    { class: "signin card", id: "signin-form" },
    el("h1", {}, "Sign in"),
    el(
      "p",
      { class: "muted" },
      "Paste an API key of your tenant (`sarft serve` prints one at its first start; " +
        "`sarft keys create` makes more). It is kept in this tab only.",
    ),
    el("label", { for: "api-key" }, "API key"),
    input,
    button,
    status,
  );
  form.addEventListener("submit", async (event) => {
    // The CSP's form-action 'none' forbids a real submission: the key never leaves in a form.
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    clear(status);
    try {
      const who = await signIn(key);
      input.value = "";
      onSignedIn(who);
    } catch (error) {
      const text =
        error.status === 401
          ? "That key is unknown or revoked."
          : `Sign-in failed: ${error.message}`;
      status.append(notice("error", text));
    } finally {
      button.disabled = false;
    }
  });
  fill(main, form);
  input.focus();
}
