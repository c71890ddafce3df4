// Roles side by side: each role's share of flagged samples in its latest scoring job, with the
// 95% interval, and the way into reviewing that job.

import { api, query, seg } from "./api.js";
import { cut, el, fill, fmtNum, fmtPct, fmtTime, notice, svg } from "./dom.js";

/** The flagged share on a 0-100% track, its interval as a band. */
function intervalBar(fraction, [low, high]) {
  const x = (v) => 4 + v * 292;
  return svg(
    "svg",
    { viewBox: "0 0 300 18", class: "interval", role: "img", "aria-label": "flagged share" },
    svg("rect", { x: 4, y: 7, width: 292, height: 4, class: "track" }),
    svg("rect", {
      x: x(low),
      y: 3,
      width: Math.max(1, x(high) - x(low)),
      height: 12,
      class: "band",
    }),
    svg("rect", { x: x(fraction) - 1.5, y: 0, width: 3, height: 18, class: "point" }),
  );
}

function roleCard(role) {
  const card = el("article", { class: "card role-card", "data-role": role.role_id });
  card.append(el("h2", {}, role.role_name));
  if (!role.scoring_job_id) {
    card.append(el("p", { class: "muted" }, "No succeeded scoring job yet."));
    return card;
  }
  const [low, high] = role.flagged_interval || [0, 0];
  card.append(
    el(
      "p",
      { class: "risk" },
      el("strong", { class: "risk-value" }, fmtPct(role.flagged_fraction)),
      " flagged",
    ),
    intervalBar(role.flagged_fraction, [low, high]),
    el("p", { class: "muted" }, `95% interval ${fmtPct(low)} – ${fmtPct(high)}`),
    el(
      "dl",
      { class: "facts" },
      el("dt", {}, "samples"),
      el("dd", {}, `${role.num_flagged} flagged of ${role.num_samples}`),
      el("dt", {}, "difference"),
      el("dd", {}, `median ${fmtNum(role.difference?.median)}, margin ${fmtNum(role.margin, 2)}`),
      el("dt", {}, "scored"),
      el("dd", {}, `${fmtTime(role.finished_at)} · ${role.model ?? "default model"}`),
      el("dt", {}, "job"),
      el("dd", { class: "mono" }, role.scoring_job_id),
    ),
  );
  if (role.top_flagged?.length) {
    card.append(
      el("h3", {}, "Most flagged"),
      el(
        "ol",
        { class: "top-flagged" },
        role.top_flagged.map((s) =>
          el("li", {}, el("span", { class: "mono" }, `#${s.index} `), cut(s.text, 160)),
        ),
      ),
    );
  }
  card.append(
    el(
      "p",
      { class: "actions" },
      el("a", { class: "button primary", href: `#/review/${seg(role.scoring_job_id)}` }, "Review"),
      el(
        "a",
        { class: "button", href: `#/fine-tuning/new/${seg(role.scoring_job_id)}` },
        "Fine-tune",
      ),
    ),
  );
  return card;
}

export async function renderRoles(main, ctx) {
  const grid = el("section", { class: "role-grid", id: "roles" });
  const more = el("button", { type: "button", hidden: true }, "More roles");
  fill(
    main,
    el("h1", {}, "Roles"),
    el(
      "p",
      { class: "muted" },
      "Each role's latest succeeded scoring job: the share of samples flagged (reviews " +
        "included) with its 95% interval.",
    ),
    grid,
    more,
  );
  let after = null;
  async function page() {
    more.hidden = true;
    const list = await api(`/v1/roles/risk${query({ samples: 2, limit: 24, after })}`, ctx);
    if (!ctx.active()) return;
    grid.append(...list.data.map(roleCard));
    if (list.data.length) after = list.data[list.data.length - 1].role_id;
    more.hidden = !list.has_more;
    if (!grid.childElementCount) {
      grid.append(
        notice("info", "No roles yet: upload a dataset (POST /v1/datasets) and score it."),
      );
    }
  }
  more.addEventListener("click", () => page().catch(ctx.fail));
  await page();
}
