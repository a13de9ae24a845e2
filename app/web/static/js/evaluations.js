// The caller's evaluations in the history view: status, certified accuracy at r = 0 (rounded
// down), the curve (GET .../plot.png) and a TSV download (both need the key header, so they
// are fetched and shown from blob URLs).

import { alertIn, api, apiObjectUrl } from "./api.js";
import { count, el, roundDown, when } from "./format.js";

const $ = (id) => document.getElementById(id);
const SHOWN = 10;
let urls = []; // blob URLs of the curves shown, released on the next load

function accuracyAt0(ev) {
  if (ev.certified_accuracy && ev.certified_accuracy.length) {
    return roundDown(ev.certified_accuracy[0].accuracy, 3);
  }
  if (ev.decisions) return `${roundDown(ev.decisions.certified, 3)} certified at r=${ev.target_radius}`;
  return typeof ev.clean_accuracy === "number" ? roundDown(ev.clean_accuracy, 3) : "-";
}

function curveCell(ev) {
  const cell = el("td", {});
  if (!ev.certified_accuracy || !ev.progress.images_done) {
    cell.textContent = "-";
    return cell;
  }
  const img = el("img", { alt: `Certified accuracy against radius, evaluation ${ev.id}`,
    class: "curve", width: 240 });
  cell.append(img);
  apiObjectUrl(ev.plot_url).then((url) => { urls.push(url); img.src = url; })
    .catch((err) => { cell.textContent = err.message; });
  return cell;
}

async function downloadTsv(ev, button) {
  try {
    const url = await apiObjectUrl(ev.results_url);
    const a = el("a", { href: url, download: `evaluation-${ev.id}.tsv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (err) {
    alertIn($("evaluations-alert"), err.message);
  }
  button.disabled = false;
}

export async function loadEvaluations() {
  let page;
  try {
    page = await api(`/evaluations?limit=${SHOWN}`);
  } catch (err) {
    alertIn($("evaluations-alert"), err.message);
    return;
  }
  alertIn($("evaluations-alert"), "");
  for (const url of urls) URL.revokeObjectURL(url);
  urls = [];
  const rows = page.items.map((ev) => {
    const tsv = el("button", { type: "button", "aria-label": `Download the TSV of evaluation ${ev.id}` }, "TSV");
    tsv.addEventListener("click", () => { tsv.disabled = true; downloadTsv(ev, tsv); });
    const p = ev.progress;
    return el("tr", { "data-evaluation": ev.id },
      el("td", { text: when(ev.created_at) }),
      el("td", { class: `status-${ev.status}`, text: ev.status, title: ev.error || undefined }),
      el("td", { text: `${ev.source} (${ev.mode})` }),
      el("td", { text: `${ev.model}, sigma ${ev.sigma}, n ${count(ev.n)}` }),
      el("td", { class: "num", text: `${count(p.images_done)} of ${count(p.images_total)}` }),
      el("td", { class: "num", text: accuracyAt0(ev) }),
      curveCell(ev),
      el("td", {}, tsv),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8, text: "No evaluations yet." })));
  $("evaluations-table").tBodies[0].replaceChildren(...rows);
}
