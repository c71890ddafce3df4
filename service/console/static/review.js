// The review page: a scoring job's samples by risk, one sample in full, and keyboard review.
// A decision moves to the next sample at once (its request queues behind the earlier ones),
// so a reviewer spends one keystroke per sample.

import { api, download, query, seg } from "./api.js";
import { clear, cut, el, fill, fmtNum, fmtTime, notFound, notice } from "./dom.js";
import { isOverride, renderDetail } from "./review_detail.js";

const PAGE = 50;
const FILTERS = [
  ["all", "All samples", {}],
  ["flagged", "Flagged (effective)", { flagged: true }],
  ["unflagged", "Not flagged (effective)", { flagged: false }],
  ["rds", "Flagged by RDS", { rds_flagged: true }],
  ["unreviewed", "Unreviewed", { reviewed: false }],
  ["reviewed", "Reviewed", { reviewed: true }],
  ["to-flag", "Overridden → flag", { decision: "flag", rds_flagged: false }],
  ["to-keep", "Overridden → keep", { decision: "keep", rds_flagged: true }],
];
const ORDERS = [
  ["difference_desc", "Riskiest first"],
  ["difference_asc", "Safest first"],
  ["index", "Upload order"],
];
const KEYS =
  "j / ↓ next · k / ↑ previous · f flag · g keep · c clear · n note · / search · Esc leave a field";

function options(list, selected) {
  return list.map(([value, label]) => el("option", { value, selected: value === selected }, label));
}

function preview(sample) {
  const messages = sample.messages || [];
  const question = messages.find((m) => m.role === "user");
  const answer = [...messages].reverse().find((m) => m.role === "assistant");
  return el(
    "td",
    { class: "preview" },
    el("div", { class: "q" }, cut(question?.content, 90)),
    el("div", { class: "a" }, cut(answer?.content, 90)),
  );
}

function sampleRow(sample) {
  const review = sample.review?.decision ?? "";
  return el(
    "tr",
    { "data-index": sample.index, class: sample.flagged ? "is-flagged" : "" },
    el("td", { class: "num" }, String(sample.index)),
    el("td", { class: "num" }, fmtNum(sample.difference)),
    el("td", {}, sample.rds_flagged ? "flag" : "—"),
    el("td", { class: "effective" }, sample.flagged ? "flag" : "keep"),
    el(
      "td",
      { class: "review" },
      review && el("span", { class: `decision ${review}` }, review),
      isOverride(sample) && el("span", { class: "badge override" }, "override"),
    ),
    preview(sample),
  );
}

function progressPanel(panel, c) {
  fill(
    panel,
    el(
      "p",
      { id: "progress-text", class: "progress-text" },
      `${c.reviewed} of ${c.total} reviewed`,
    ),
    el("progress", { max: c.total || 1, value: c.reviewed }),
    el(
      "p",
      { id: "curation-counts" },
      `Flagged: ${c.flagged} (RDS ${c.rds_flagged}) · overrides: ${c.overrides.to_flag} to flag, ` +
        `${c.overrides.to_keep} to keep · decisions: ${c.decisions.flag} flag, ${c.decisions.keep} keep`,
    ),
  );
}

export async function renderReview(main, ctx, jobId) {
  const base = `/v1/scoring_jobs/${seg(jobId)}`;
  let job;
  try {
    job = await api(base, ctx);
  } catch (error) {
    if (error.status === 404) return notFound(main, "Scoring job", jobId);
    throw error;
  }
  if (!ctx.active()) return;
  if (job.status !== "succeeded") {
    fill(
      main,
      el("h1", {}, "Review"),
      notice(
        "info",
        `Scoring job ${jobId} is ${job.status} (${job.progress.processed ?? 0} of ` +
          `${job.progress.total ?? "?"} scored): reviews open when it succeeds.`,
      ),
    );
    if (!["failed", "cancelled"].includes(job.status)) ctx.every(2000, () => ctx.rerender());
    return;
  }

  const state = {
    filter: "all",
    q: "",
    order: "difference_desc",
    rows: [],
    hasMore: false,
    sel: 0,
  };
  const trs = new Map();
  const panel = el("section", { class: "card progress-panel", id: "progress" });
  const errors = el("div", { id: "review-error" });
  const filter = el(
    "select",
    { id: "filter", "aria-label": "filter" },
    options(FILTERS, state.filter),
  );
  const order = el("select", { id: "order", "aria-label": "order" }, options(ORDERS, state.order));
  const search = el("input", { id: "search", type: "search", placeholder: "Search the text (/)" });
  const tbody = el("tbody");
  const more = el("button", { type: "button", id: "more", hidden: true }, "More");
  const aside = el("aside", { class: "detail card", id: "detail" });
  let note = null;

  const downloadButton = el(
    "button",
    { type: "button", id: "download-subset" },
    "Download flagged subset",
  );
  const fineTune = el(
    "button",
    { type: "button", id: "fine-tune", class: "primary" },
    "Fine-tune on these flags",
  );
  fill(
    main,
    el("h1", {}, "Review ", el("span", { class: "mono" }, jobId)),
    el(
      "p",
      { class: "muted" },
      `dataset ${job.dataset_id} · model ${job.model ?? "default"} · margin ` +
        `${fmtNum(job.margin, 2)} · scored ${fmtTime(job.finished_at)}`,
    ),
    panel,
    el("div", { class: "toolbar" }, filter, order, search, downloadButton, fineTune),
    el("p", { class: "keys muted" }, KEYS),
    errors,
    el(
      "div",
      { class: "review-split" },
      el(
        "div",
        { class: "table-wrap" },
        el(
          "table",
          { id: "samples", class: "samples" },
          el(
            "thead",
            {},
            el(
              "tr",
              {},
              ["#", "difference", "RDS", "effective", "review", "dialogue"].map((h) =>
                el("th", {}, h),
              ),
            ),
          ),
          tbody,
        ),
        more,
      ),
      aside,
    ),
  );

  const showError = (error) => {
    if (ctx.active()) fill(errors, notice("error", error.message));
  };

  async function refreshProgress() {
    const curation = await api(`${base}/curation`, ctx);
    if (ctx.active()) progressPanel(panel, curation);
  }

  function showSelected() {
    for (const tr of tbody.querySelectorAll("tr.selected")) tr.classList.remove("selected");
    const sample = state.rows[state.sel];
    const tr = sample && trs.get(sample.index);
    if (tr) {
      tr.classList.add("selected");
      tr.scrollIntoView({ block: "nearest" });
    }
    note = renderDetail(aside, sample, { onDecide: decide, reviewable: true });
  }

  // A newer load (the filter or the search changed again) wins over an older one's answer.
  let loads = 0;
  async function loadPage(reset) {
    const load = ++loads;
    const after =
      reset || !state.rows.length ? null : String(state.rows[state.rows.length - 1].index);
    const params = FILTERS.find(([name]) => name === state.filter)[2];
    const list = await api(
      `${base}/samples${query({ ...params, q: state.q, order: state.order, limit: PAGE, after })}`,
      ctx,
    );
    if (!ctx.active() || load !== loads) return;
    if (reset) {
      state.rows = [];
      state.sel = 0;
      trs.clear();
      clear(tbody);
    }
    for (const sample of list.data) {
      const tr = sampleRow(sample);
      const position = state.rows.length;
      tr.addEventListener("click", () => select(position));
      trs.set(sample.index, tr);
      state.rows.push(sample);
      tbody.append(tr);
    }
    state.hasMore = list.has_more;
    more.hidden = !list.has_more;
    if (reset) {
      if (!state.rows.length)
        tbody.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No samples match.")));
      showSelected();
    }
  }

  function select(position) {
    state.sel = Math.max(0, Math.min(position, state.rows.length - 1));
    showSelected();
  }

  async function move(step) {
    if (step > 0 && state.sel === state.rows.length - 1 && state.hasMore) await loadPage(false);
    select(state.sel + step);
  }

  function replaceRow(sample) {
    const position = state.rows.findIndex((r) => r.index === sample.index);
    if (position < 0) return;
    state.rows[position] = sample;
    const tr = sampleRow(sample);
    tr.addEventListener("click", () => select(position));
    trs.get(sample.index)?.replaceWith(tr);
    trs.set(sample.index, tr);
    if (position === state.sel) showSelected();
    else tr.classList.remove("selected");
  }

  // Reviews are sent one after another, in keystroke order; the progress refreshes once the
  // queue is empty.
  let queue = Promise.resolve();
  let waiting = 0;
  function decide(decision) {
    const sample = state.rows[state.sel];
    if (!sample) return;
    const text = decision === null ? null : note?.value.trim() || null;
    trs.get(sample.index)?.classList.add("pending");
    waiting += 1;
    queue = queue
      .then(async () => {
        const body = { decision, note: text };
        replaceRow(
          await api(`${base}/samples/${sample.index}/review`, {
            method: "PUT",
            body,
            signal: ctx.signal,
          }),
        );
        clear(errors);
      })
      .catch(showError)
      .finally(() => {
        waiting -= 1;
        trs.get(sample.index)?.classList.remove("pending");
        if (waiting === 0) refreshProgress().catch(showError);
      });
    move(1).catch(showError);
  }

  const reload = () => loadPage(true).catch(showError);
  let searchTimer = null;
  filter.addEventListener("change", () => {
    state.filter = filter.value;
    filter.blur(); // back to the keyboard's table
    reload();
  });
  order.addEventListener("change", () => {
    state.order = order.value;
    order.blur();
    reload();
  });
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.q = search.value.trim();
      reload();
    }, 300);
  });
  more.addEventListener("click", () => loadPage(false).catch(showError));
  downloadButton.addEventListener("click", async () => {
    await queue; // every decision made so far is in the download
    download(`${base}/subset?which=flagged`, `${jobId}-flagged.jsonl`, ctx).catch(showError);
  });
  fineTune.addEventListener("click", async () => {
    await queue;
    location.hash = `#/fine-tuning/new/${seg(jobId)}`;
  });

  ctx.listen(document, "keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (
      target instanceof HTMLInputElement ||
      target instanceof HTMLTextAreaElement ||
      target instanceof HTMLSelectElement
    ) {
      if (event.key === "Escape" || (event.key === "Enter" && target !== search)) target.blur();
      if (event.key === "Enter" && target === search) {
        clearTimeout(searchTimer);
        state.q = search.value.trim();
        search.blur();
        reload();
      }
      return;
    }
    const actions = {
      j: () => move(1),
      ArrowDown: () => move(1),
      k: () => move(-1),
      ArrowUp: () => move(-1),
      f: () => decide("flag"),
      g: () => decide("keep"),
      c: () => decide(null),
      n: () => note?.focus(),
      "/": () => search.focus(),
    };
    const action = actions[event.key];
    if (!action) return;
    event.preventDefault(); // "/" would open the browser's find bar, arrows would scroll
    Promise.resolve(action()).catch(showError);
  });

  await Promise.all([refreshProgress(), loadPage(true)]);
}
