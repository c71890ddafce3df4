// One fine-tuning job, live: status and progress polled every 2 s until it finishes, loss and
// KL curves from its step events, its checkpoints, the curation it trained on, the downloads.

import { api, download, query, seg } from "./api.js";
import { lineChart } from "./chart.js";
import { el, fill, fmtNum, fmtPct, fmtSig, fmtTime, notFound, notice } from "./dom.js";
import { FINISHED, progressCell } from "./fine_tuning_list.js";

/** The job's events, kept across polls: each poll reads only the pages newer than the last. */
class EventLog {
  constructor(path) {
    this.path = path;
    this.byId = new Map();
  }

  async update(ctx) {
    let after = null;
    for (;;) {
      const page = await api(`${this.path}${query({ limit: 100, after })}`, ctx);
      let seen = false;
      for (const event of page.data) {
        if (this.byId.has(event.id)) seen = true;
        else this.byId.set(event.id, event);
      }
      if (seen || !page.has_more || !page.data.length) return;
      after = page.data[page.data.length - 1].id;
    }
  }

  /** Oldest first: ids are evt_<increasing number>. */
  list() {
    const number = (e) => Number(e.id.slice(4));
    return [...this.byId.values()].sort((a, b) => number(a) - number(b));
  }

  /** [step, value] of every step event that carries ``key``. */
  series(key) {
    return this.list()
      .filter((e) => e.message.startsWith("step ") && Number.isFinite(e.data?.[key]))
      .map((e) => [e.data.step, e.data[key]]);
  }
}

function curationLine(curation) {
  if (!curation) return "The scoring job's flags as RDS set them (no curation record).";
  const list = (indices) => (indices.length ? ` (#${indices.join(", #")})` : "");
  return (
    `Trained on ${curation.flagged} flagged samples (RDS ${curation.rds_flagged}); ` +
    `${curation.reviewed} reviewed; overrides: ${curation.to_flag.length} to flag` +
    `${list(curation.to_flag)}, ${curation.to_keep.length} to keep${list(curation.to_keep)}.`
  );
}

function evaluationTable(result) {
  const evaluation = result?.evaluation;
  if (!evaluation?.base || !evaluation?.tuned) return null;
  const rows = [];
  for (const setting of Object.keys(evaluation.base)) {
    const base = evaluation.base[setting];
    const tuned = evaluation.tuned[setting] || {};
    for (const set of Object.keys(base.refusal_rate || {})) {
      rows.push([
        `${setting}: refusal rate on ${set}`,
        fmtPct(base.refusal_rate[set]),
        fmtPct(tuned.refusal_rate?.[set]),
      ]);
    }
    rows.push([`${setting}: ROUGE-L`, fmtNum(base.rouge_l, 1), fmtNum(tuned.rouge_l, 1)]);
  }
  return el(
    "table",
    { class: "scores", id: "evaluation" },
    el(
      "thead",
      {},
      el("tr", {}, el("th", {}, "evaluation"), el("th", {}, "base"), el("th", {}, "tuned")),
    ),
    el(
      "tbody",
      {},
      rows.map((r) =>
        el(
          "tr",
          {},
          r.map((c, i) => (i ? el("td", { class: "num" }, c) : el("th", {}, c))),
        ),
      ),
    ),
  );
}

function checkpointTable(jobPath, jobId, checkpoints, ctx) {
  if (!checkpoints.length) return el("p", { class: "muted" }, "No checkpoints yet.");
  const m = (c, k) => fmtSig(c.metrics[k]);
  return el(
    "table",
    { class: "jobs", id: "checkpoints" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ["step", "train loss", "train KL", "valid loss", "valid KL", "saved", ""].map((h, i) =>
          el("th", { class: i < 5 ? "num" : null }, h),
        ),
      ),
    ),
    el(
      "tbody",
      {},
      checkpoints.map((c) =>
        el(
          "tr",
          {},
          el("td", { class: "num" }, String(c.step_number)),
          el("td", { class: "num" }, m(c, "train_loss")),
          el("td", { class: "num" }, m(c, "train_kl")),
          el("td", { class: "num" }, m(c, "valid_loss")),
          el("td", { class: "num" }, m(c, "valid_kl")),
          el("td", {}, fmtTime(c.created_at)),
          el(
            "td",
            {},
            el(
              "button",
              {
                type: "button",
                onclick: () =>
                  download(
                    `${jobPath}/checkpoints/${seg(c.id)}/content`,
                    `${jobId}-step-${c.step_number}.tar.gz`,
                    ctx,
                  ).catch(ctx.fail),
              },
              "Download",
            ),
          ),
        ),
      ),
    ),
  );
}

export async function renderFineTuningJob(main, ctx, jobId) {
  const path = `/v1/fine_tuning/jobs/${seg(jobId)}`;
  const events = new EventLog(`${path}/events`);
  const sections = {
    status: el("section", { class: "card", id: "job-status" }),
    charts: el("section", { class: "charts", id: "charts" }),
    downloads: el("section", { class: "card", id: "downloads" }),
    checkpoints: el("section", { class: "card" }),
    log: el("section", { class: "card" }),
  };
  let shown = false;

  async function refresh() {
    let job;
    try {
      job = await api(path, ctx);
    } catch (error) {
      if (error.status === 404) {
        notFound(main, "Fine-tuning job", jobId);
        return false;
      }
      throw error;
    }
    const [, checkpoints] = await Promise.all([
      events.update(ctx),
      api(`${path}/checkpoints${query({ limit: 100 })}`, ctx),
    ]);
    if (!ctx.active()) return false;
    if (!shown) {
      shown = true;
      fill(
        main,
        el("h1", {}, "Fine-tuning job ", el("span", { class: "mono" }, jobId)),
        sections.status,
        sections.charts,
        sections.downloads,
        el("h2", {}, "Checkpoints"),
        sections.checkpoints,
        el("h2", {}, "Latest events"),
        sections.log,
      );
    }
    renderStatus(job);
    fill(
      sections.charts,
      lineChart(
        "Loss",
        [
          { name: "loss", points: events.series("loss") },
          { name: "cross-entropy", points: events.series("ce") },
        ],
        { id: "loss-chart" },
      ),
      lineChart("KL to the base model", [{ name: "KL", points: events.series("kl") }], {
        id: "kl-chart",
      }),
    );
    fill(sections.checkpoints, checkpointTable(path, jobId, checkpoints.data, ctx));
    renderDownloads(job);
    fill(
      sections.log,
      el(
        "ul",
        { class: "events" },
        events
          .list()
          .slice(-12)
          .reverse()
          .map((e) =>
            el(
              "li",
              { class: e.level },
              el("span", { class: "muted" }, `${fmtTime(e.created_at)} `),
              e.message,
            ),
          ),
      ),
    );
    return !FINISHED.has(job.status);
  }

  function renderStatus(job) {
    const cancel = el("button", { type: "button", class: "quiet", id: "cancel-job" }, "Cancel");
    cancel.addEventListener("click", () =>
      api(`${path}/cancel`, { method: "POST", signal: ctx.signal }).then(
        () => ctx.rerender(),
        ctx.fail,
      ),
    );
    fill(
      sections.status,
      el(
        "p",
        { class: "status-line" },
        el("span", { class: `status ${job.status}`, id: "job-state" }, job.status),
        ` phase ${job.progress.phase} · method ${job.method} · model ${job.model ?? "default"}`,
        FINISHED.has(job.status) ? null : cancel,
      ),
      el(
        "table",
        { class: "bare" },
        el("tbody", {}, el("tr", {}, el("th", {}, "progress"), progressCell(job))),
      ),
      el(
        "p",
        {},
        `Scoring job `,
        el("a", { href: `#/review/${seg(job.scoring_job_id)}`, class: "mono" }, job.scoring_job_id),
        ` · created ${fmtTime(job.created_at)} · started ${fmtTime(job.started_at)} · finished ${fmtTime(job.finished_at)}`,
      ),
      el("p", { id: "job-curation" }, curationLine(job.curation)),
      job.estimated_finish && !FINISHED.has(job.status)
        ? el(
            "p",
            { class: "muted" },
            `Training should end around ${fmtTime(job.estimated_finish)}.`,
          )
        : null,
      job.error ? notice("error", `${job.error.code}: ${job.error.message}`) : null,
      job.fine_tuned_model
        ? el("p", {}, "Model ", el("span", { class: "mono" }, job.fine_tuned_model))
        : null,
      evaluationTable(job.result),
    );
  }

  function renderDownloads(job) {
    const ready = job.status === "succeeded";
    const button = (id, label, file, name) =>
      el(
        "button",
        {
          type: "button",
          id,
          disabled: !ready,
          onclick: () => download(`${path}/${file}`, name, ctx).catch(ctx.fail),
        },
        label,
      );
    fill(
      sections.downloads,
      el("h2", {}, "Downloads"),
      el(
        "p",
        { class: "actions" },
        button("download-adapter", "Adapter (.tar.gz)", "adapter", `${jobId}-adapter.tar.gz`),
        button(
          "download-report-html",
          "Report (HTML)",
          "report?format=html",
          `${jobId}-report.html`,
        ),
        button(
          "download-report-json",
          "Report (JSON)",
          "report?format=json",
          `${jobId}-report.json`,
        ),
      ),
      ready ? null : el("p", { class: "muted" }, "Available once the job has succeeded."),
    );
  }

  if (await refresh()) ctx.every(2000, async () => (await refresh()) || ctx.stop());
}
