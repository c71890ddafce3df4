// Fine-tuning jobs: the list (refreshed while any runs) and the form that creates one from a
// reviewed scoring job.

import { api, query, seg } from "./api.js";
import { clear, el, fill, fmtTime, notFound, notice } from "./dom.js";

export const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const METHODS = [
  ["sarft", "cross-entropy on every sample, KL to the base model on the flagged ones (SaRFT)"],
  ["sft", "cross-entropy only: plain fine-tuning, the flags unused"],
  ["random", "KL on as many random samples as are flagged (an ablation)"],
  ["flip", "KL on the samples not flagged (an ablation)"],
];

export function progressCell(job) {
  const { step, total_steps: total } = job.progress;
  return el(
    "td",
    { class: "progress-cell" },
    el("progress", { max: total || 1, value: total ? step : 0 }),
    el("span", { class: "muted" }, ` ${step}/${total ?? "?"}`),
  );
}

export async function renderFineTuningList(main, ctx) {
  const tbody = el("tbody");
  const more = el("button", { type: "button", hidden: true }, "More jobs");
  const picker = el("select", { id: "scoring-job", "aria-label": "scoring job" });
  const start = el("button", { type: "button", class: "primary" }, "New fine-tuning job…");
  fill(
    main,
    el("h1", {}, "Fine-tuning"),
    el(
      "section",
      { class: "card toolbar" },
      el("label", { for: "scoring-job" }, "From scoring job "),
      picker,
      start,
    ),
    el(
      "table",
      { class: "jobs", id: "jobs" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["job", "status", "phase", "progress", "method", "model", "created"].map((h) =>
            el("th", {}, h),
          ),
        ),
      ),
      tbody,
    ),
    more,
  );
  start.addEventListener("click", () => {
    if (picker.value) location.hash = `#/fine-tuning/new/${seg(picker.value)}`;
  });

  const scoring = await api(`/v1/scoring_jobs${query({ limit: 100 })}`, ctx);
  const done = scoring.data.filter((j) => j.status === "succeeded");
  picker.append(
    ...done.map((j) =>
      el(
        "option",
        { value: j.id },
        `${j.id} · dataset ${j.dataset_id} · ${fmtTime(j.finished_at)}`,
      ),
    ),
  );
  start.disabled = done.length === 0;

  let pages = 1;
  async function refresh() {
    // Every page shown so far, again: statuses and progress change in place.
    const jobs = [];
    let after = null;
    let hasMore = false;
    for (let i = 0; i < pages; i += 1) {
      const list = await api(`/v1/fine_tuning/jobs${query({ limit: 20, after })}`, ctx);
      jobs.push(...list.data);
      hasMore = list.has_more;
      if (!hasMore || !list.data.length) break;
      after = list.data[list.data.length - 1].id;
    }
    if (!ctx.active()) return false;
    fill(
      tbody,
      ...jobs.map((job) =>
        el(
          "tr",
          { "data-job": job.id },
          el("td", {}, el("a", { href: `#/fine-tuning/${seg(job.id)}`, class: "mono" }, job.id)),
          el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
          el("td", {}, job.progress.phase),
          progressCell(job),
          el("td", {}, job.method),
          el("td", { class: "mono" }, job.model ?? "default"),
          el("td", {}, fmtTime(job.created_at)),
        ),
      ),
    );
    if (!jobs.length)
      tbody.append(
        el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No fine-tuning jobs yet.")),
      );
    more.hidden = !hasMore;
    return jobs.some((job) => !FINISHED.has(job.status));
  }
  more.addEventListener("click", () => {
    pages += 1;
    refresh().catch(ctx.fail);
  });
  const running = await refresh();
  // Poll only while something moves; a new job from another tab shows on the next visit.
  if (running) ctx.every(2000, async () => (await refresh()) || ctx.stop());
}

function numberField(id, label, { min, max, step, hint }) {
  const input = el("input", { id, name: id, type: "number", min, max, step, placeholder: hint });
  return [el("label", { for: id }, label), input];
}

function schemaDefaults(openapi) {
  const props = openapi?.components?.schemas?.Hyperparameters?.properties || {};
  const hint = (name) =>
    props[name]?.default !== undefined && props[name]?.default !== null
      ? `default ${props[name].default}`
      : "server default";
  return {
    n_epochs: hint("n_epochs"),
    lambda: hint("lambda"),
    batch_size: hint("batch_size"),
    max_steps: hint("max_steps"),
  };
}

export async function renderFineTuningCreate(main, ctx, scoringJobId) {
  let job;
  try {
    job = await api(`/v1/scoring_jobs/${seg(scoringJobId)}`, ctx);
  } catch (error) {
    if (error.status === 404) return notFound(main, "Scoring job", scoringJobId);
    throw error;
  }
  const [curation, openapi] = await Promise.all([
    api(`/v1/scoring_jobs/${seg(scoringJobId)}/curation`, ctx).catch(() => null),
    fetch("/openapi.json", { signal: ctx.signal })
      .then((r) => r.json())
      .catch(() => null),
  ]);
  if (!ctx.active()) return;
  const hints = schemaDefaults(openapi);
  const method = el(
    "select",
    { id: "method", name: "method" },
    METHODS.map(([value]) => el("option", { value, selected: value === "sarft" }, value)),
  );
  const methodHint = el("span", { class: "muted", id: "method-hint" }, METHODS[0][1]);
  method.addEventListener("change", () => {
    methodHint.textContent = METHODS.find(([value]) => value === method.value)[1];
  });
  const evaluation = el("input", { id: "evaluation", type: "checkbox", checked: true });
  const status = el("div", { id: "create-status" });
  const submit = el(
    "button",
    { type: "submit", class: "primary", id: "create-job" },
    "Start fine-tuning",
  );
  const form = el(
    "form",
    { class: "card form-grid", id: "create-form" },
    el("label", { for: "method" }, "Method"),
    el("span", { class: "method" }, method, methodHint),
    ...numberField("n_epochs", "Epochs", { min: 1, max: 100, step: 1, hint: hints.n_epochs }),
    ...numberField("lambda", "λ (KL weight)", {
      min: 0,
      max: 1000,
      step: "any",
      hint: hints.lambda,
    }),
    ...numberField("batch_size", "Batch size", {
      min: 1,
      max: 4096,
      step: 1,
      hint: hints.batch_size,
    }),
    ...numberField("max_steps", "Max steps", { min: 1, step: 1, hint: hints.max_steps }),
    el("label", { for: "evaluation" }, "Evaluate before and after"),
    el(
      "span",
      {},
      evaluation,
      el("span", { class: "muted" }, " refusal rates on the server's safety sets, ROUGE-L"),
    ),
    el("span"),
    submit,
  );
  const summary = curation
    ? `Trains on the effective flags now: ${curation.flagged} of ${curation.total} flagged (RDS ` +
      `${curation.rds_flagged}), ${curation.reviewed} reviewed, overrides ${curation.overrides.to_flag} ` +
      `to flag and ${curation.overrides.to_keep} to keep.`
    : "Trains on the scoring job's flags.";
  fill(
    main,
    el("h1", {}, "New fine-tuning job"),
    el(
      "p",
      {},
      "Scoring job ",
      el("a", { href: `#/review/${seg(scoringJobId)}`, class: "mono" }, scoringJobId),
      ` of dataset ${job.dataset_id} (model ${job.model ?? "default"}).`,
    ),
    el("p", { id: "create-summary" }, summary),
    form,
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const hyperparameters = {};
    for (const name of ["n_epochs", "lambda", "batch_size", "max_steps"]) {
      const value = form.querySelector(`#${name}`).value;
      if (value !== "") hyperparameters[name] = Number(value);
    }
    const body = {
      dataset_id: job.dataset_id,
      scoring_job_id: scoringJobId,
      method: method.value,
      hyperparameters,
      // {}: the server's evaluation defaults; null skips evaluation.
      evaluation: evaluation.checked ? {} : null,
    };
    submit.disabled = true;
    clear(status);
    try {
      const created = await api("/v1/fine_tuning/jobs", {
        method: "POST",
        body,
        signal: ctx.signal,
      });
      location.hash = `#/fine-tuning/${seg(created.id)}`;
    } catch (error) {
      status.append(notice("error", `Not started: ${error.message}`));
      submit.disabled = false;
    }
  });
}
