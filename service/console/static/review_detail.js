// One sample in full: every message of the dialogue, its scores, its review and the controls.

import { clear, el, fmtNum, fmtTime } from "./dom.js";

const ROLES = new Set(["system", "user", "assistant"]);

function flagWord(flagged) {
  return flagged ? "flagged" : "not flagged";
}

/** Whether a review overrides RDS: it decides the other way than RDS's flag. */
export function isOverride(sample) {
  return sample.review !== null && sample.flagged !== sample.rds_flagged;
}

function scoresTable(sample) {
  const s = sample.scores || {};
  const rows = [
    // The scoring job's log-probabilities per condition: role, unsafe and reference prompts.
    ["lp_role (mean log-prob per token, role prompt)", fmtNum(s.role?.mean, 4)],
    ["lp_unsafe (unsafe prompt)", fmtNum(s.unsafe?.mean, 4)],
    ["lp_ref (no system prompt)", s.ref ? fmtNum(s.ref.mean, 4) : "not computed"],
    ["s_role", fmtNum(s.s_role, 4)],
    ["s_unsafe", fmtNum(s.s_unsafe, 4)],
    ["difference (s_unsafe − s_role)", fmtNum(sample.difference, 4)],
    ["response tokens", s.role?.count ?? "—"],
    ["truncated", s.truncated ? "yes" : "no"],
    ["RDS flag", flagWord(sample.rds_flagged)],
    ["effective flag", flagWord(sample.flagged)],
  ];
  return el(
    "table",
    { class: "scores" },
    el(
      "tbody",
      {},
      rows.map(([name, value]) => el("tr", {}, el("th", {}, name), el("td", {}, String(value)))),
    ),
  );
}

function reviewLine(sample) {
  const review = sample.review;
  if (!review)
    return el("p", { class: "muted", id: "review-state" }, "Not reviewed: RDS's flag stands.");
  const parts = [
    el("strong", { class: `decision ${review.decision}` }, review.decision),
    ` by ${review.reviewer}, ${fmtTime(review.reviewed_at)}`,
  ];
  if (isOverride(sample)) parts.push(el("span", { class: "badge override" }, "overrides RDS"));
  const line = el("p", { id: "review-state" }, parts);
  if (review.note) line.append(el("br"), el("span", { class: "note" }, `Note: ${review.note}`));
  return line;
}

/**
 * Fills ``aside`` with the sample; ``onDecide(decision)`` runs for the buttons ("flag", "keep",
 * null). Returns the note input (the keyboard's "n" focuses it).
 */
export function renderDetail(aside, sample, { onDecide, reviewable }) {
  clear(aside);
  if (!sample) {
    aside.append(el("p", { class: "muted" }, "No sample selected."));
    return null;
  }
  const note = el("input", {
    id: "note",
    type: "text",
    maxlength: 2000,
    placeholder: "Note for the next decision (n)",
    value: sample.review?.note ?? "",
    disabled: !reviewable,
  });
  const button = (label, decision, cls) =>
    el(
      "button",
      { type: "button", class: cls, disabled: !reviewable, onclick: () => onDecide(decision) },
      label,
    );
  aside.append(
    el(
      "h2",
      {},
      `Sample #${sample.index}`,
      el("span", { class: "muted" }, ` · line ${sample.line}`),
    ),
    el(
      "p",
      { class: "badges" },
      el(
        "span",
        { class: `badge ${sample.rds_flagged ? "flag" : "keep"}` },
        `RDS: ${flagWord(sample.rds_flagged)}`,
      ),
      el(
        "span",
        { class: `badge ${sample.flagged ? "flag" : "keep"}` },
        `effective: ${flagWord(sample.flagged)}`,
      ),
    ),
    reviewLine(sample),
    el(
      "div",
      { class: "decide" },
      note,
      button("Flag (f)", "flag", "danger"),
      button("Keep (g)", "keep", "ok"),
      button("Clear (c)", null, "quiet"),
    ),
    el(
      "section",
      { class: "dialogue", "aria-label": "dialogue" },
      (sample.messages || []).map((m) =>
        el(
          "div",
          { class: `msg ${ROLES.has(m.role) ? m.role : "other"}` },
          el("div", { class: "msg-role" }, m.role),
          el("div", { class: "msg-text" }, m.content),
        ),
      ),
    ),
    el("h3", {}, "Scores"),
    scoresTable(sample),
  );
  return note;
}
