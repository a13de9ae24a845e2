// The history view: the caller's jobs, newest first, a page at a time; each opens its certificate.
// The per-image jobs of evaluations are left out unless asked for (GET /jobs?evaluations=...):
// the evaluations are summed up in their own table.

import { alertIn, api } from "./api.js";
import { loadEvaluations } from "./evaluations.js";
import { count, el, roundDown, when } from "./format.js";
import { hasRadius } from "./modes.js";

const $ = (id) => document.getElementById(id);
const PAGE = 20;
let offset = 0;

export function initHistory() {
  $("history-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadHistory(); });
  $("history-next").addEventListener("click", () => { offset += PAGE; loadHistory(); });
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-status").addEventListener("change", () => { offset = 0; loadHistory(); });
  $("history-evaluations").addEventListener("change", () => { offset = 0; loadHistory(); });
}

/** What made the job: a request, a replay (of which job) or an evaluation (which ones). */
function kindCell(job) {
  const short = (id) => id.slice(0, 8);
  if (job.replay_of) {
    return el("td", {}, "replay of ",
      el("a", { href: `#job/${job.replay_of}`, title: job.replay_of }, short(job.replay_of)));
  }
  const evs = job.evaluations || [];
  if (evs.length) {
    return el("td", { title: evs.join(", ") },
      `image of evaluation ${evs.map(short).join(", ")}`);
  }
  return el("td", { text: "request" });
}

function labelOf(job) {
  const c = job.certificate;
  if (!c) return "-";
  return c.abstained ? "abstained" : c.label;
}

export async function loadHistory() {
  loadEvaluations();
  const status = $("history-status").value;
  const query = new URLSearchParams({ limit: PAGE, offset });
  if (status) query.set("status", status);
  query.set("evaluations", $("history-evaluations").value);
  let page;
  try {
    page = await api(`/jobs?${query}`);
  } catch (err) {
    alertIn($("history-alert"), err.message);
    return;
  }
  alertIn($("history-alert"), "");
  const rows = page.items.map((job) => {
    const c = job.certificate;
    return el("tr", {},
      el("td", { text: when(job.created_at) }),
      el("td", { class: `status-${job.status}`, text: job.status }),
      el("td", { text: job.model }),
      el("td", { text: labelOf(job) }),
      el("td", { class: "num", text: c && !c.abstained && hasRadius(c.mode) ? roundDown(c.radius, 3) : "-" }),
      el("td", { class: "num", text: count(job.n) }),
      kindCell(job),
      el("td", {}, el("a", { href: `#job/${job.id}`, "aria-label": `Open job ${job.id}` }, "Open")),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8, text: "No jobs yet." })));
  $("history-table").tBodies[0].replaceChildren(...rows);
  const last = Math.min(page.total, page.offset + page.items.length);
  $("history-page").textContent = page.total
    ? `Jobs ${page.offset + 1} to ${last} of ${page.total}`
    : "";
  $("history-prev").disabled = page.offset === 0;
  $("history-next").disabled = last >= page.total;
}
