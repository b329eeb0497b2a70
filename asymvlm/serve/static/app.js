// asymvlm-serve's page: plain JavaScript, no build step, no third-party code. Every request goes to
// this origin; with an API key the browser's own prompt (HTTP Basic) supplies it to every request.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

// URLs from the origin alone: a page opened as user:key@host (the API key as the password)
// must not put those credentials into request URLs, which fetch() refuses; the browser sends its
// cached credentials for this origin by itself.
const url = (path) => new URL(path, window.location.origin).href;

async function call(path, options = {}) {
  const response = await fetch(url(path), options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function meter(el, percentile, word) {
  const fill = el.querySelector(".fill");
  const value = percentile === null || percentile === undefined ? 0 : percentile;
  fill.style.width = `${Math.max(2, Math.min(100, value))}%`; // CSSOM: allowed by the page's CSP
  el.setAttribute("aria-valuenow", String(Math.round(value)));
  el.dataset.word = word || "unknown";
}

function wordText(word) {
  return word ? word : "no reference";
}

// a percentile as a share of a reference: "92%", "99.7%" above 99, "all" at 100 (the service's wording)
function share(p) {
  if (p >= 100) return "all";
  return p >= 99 ? `${Math.min(p, 99.9).toFixed(1)}%` : `${Math.round(p)}%`;
}

const percent = (p) => `${Math.round(100 * p)}%`;

let calibrationReason = null; // why answers carry no P(right), from /v1/info

// the verdict badge: "likely right 87%" (green) / "uncertain 31%" (amber) / nothing uncalibrated
function renderVerdict(answer) {
  const badge = $("verdict");
  const c = answer.confidence;
  if (!answer.verdict || !c || c.p_correct === null || c.p_correct === undefined) {
    badge.hidden = true;
    badge.textContent = "";
    delete badge.dataset.verdict;
    return;
  }
  badge.dataset.verdict = answer.verdict;
  badge.textContent = `${answer.verdict} ${percent(c.p_correct)}`;
  badge.title = "the calibrated probability that the best image is right";
  badge.hidden = false;
}

function item(list, part, name, text) {
  const li = document.createElement("li");
  li.dataset.part = part;
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = `${name}: `;
  li.append(label, text);
  list.appendChild(li);
}

// "why": the three parts of the answer's uncertainty in words, then the reasons that apply
function renderWhy(answer) {
  const why = $("why");
  const c = answer.confidence;
  const parts = $("why-parts");
  const reasons = $("why-reasons");
  parts.replaceChildren();
  reasons.replaceChildren();
  if (!c) {
    why.hidden = true;
    return;
  }
  const amb = c.ambiguity_percentile === null || c.ambiguity_percentile === undefined
    ? `1/κ = ${fmt(c.ambiguity)} (no gallery captions to compare with)`
    : `more uncertain than ${share(c.ambiguity_percentile)} of this gallery's captions (1/κ = ${fmt(c.ambiguity)})`;
  item(parts, "ambiguity", "Ambiguity", amb);
  const n = c.effective_candidates;
  const competing = n === null || n === undefined
    ? "not computed"
    : `about ${Math.max(1, Math.round(n))} image${Math.round(n) > 1 ? "s" : ""} compete for it `
      + `(entropy ${fmt(c.retrieval_entropy)} nats); the best one holds ${percent(c.top_probability || 0)} `
      + "of the probability";
  item(parts, "retrieval", "Competition", competing);
  const strange = c.unfamiliarity_percentile === null || c.unfamiliarity_percentile === undefined
    ? "not known (the model carries no density of its training texts)"
    : `stranger than ${share(c.unfamiliarity_percentile)} of the training texts`;
  item(parts, "unfamiliarity", "Unfamiliarity", strange);
  const p = c.p_correct === null || c.p_correct === undefined
    ? `uncalibrated${calibrationReason ? ` (${calibrationReason})` : ""}`
    : `${Number(c.p_correct).toFixed(2)} that the best image is right`;
  item(parts, "p_correct", "P(right)", p);
  for (const line of answer.reasons || []) {
    const li = document.createElement("li");
    li.textContent = line;
    reasons.appendChild(li);
  }
  why.hidden = false;
}

function withheldText(answer) {
  const a = answer.abstention;
  const reasons = answer.reasons && answer.reasons.length ? ` — ${answer.reasons.join("; ")}` : "";
  if (a.criterion === "p_correct") {
    return `Withheld: P(right) ${Number(a.statistic).toFixed(2)} is below ${Number(a.threshold)}${reasons}. `
      + "The results below are a guess.";
  }
  if (a.criterion === "uncertainty") {
    const quantile = a.quantile !== undefined && a.quantile !== null ? ` (the ${a.quantile}th percentile of the captions)` : "";
    return `Withheld: its uncertainty ${fmt(a.statistic)} is above the threshold ${fmt(a.threshold)}${quantile}${reasons}. `
      + "This description fits too many images to pick one; the results below are a guess — try a more specific description.";
  }
  return `Withheld: the best image's log-likelihood ${fmt(a.statistic)} is below the threshold ${fmt(a.threshold)}`
    + `${reasons}. Nothing in this gallery fits well; the results below are a guess.`;
}

function renderSummary(answer) {
  $("query-summary").hidden = false;
  meter($("uncertainty-bar"), answer.uncertainty_percentile, answer.specificity);
  const word = $("specificity");
  word.textContent = wordText(answer.specificity);
  word.dataset.word = answer.specificity || "unknown";
  const pct = answer.uncertainty_percentile;
  const place = pct === null || pct === undefined
    ? ""
    : `more uncertain than ${Math.round(pct)}% of this gallery's captions · `;
  $("uncertainty-detail").textContent = `${place}1/κ = ${fmt(answer.uncertainty)}, κ = ${fmt(answer.concentration, 4)}`;
  renderVerdict(answer);
  renderWhy(answer);
  const banner = $("abstained-banner");
  if (answer.abstained) {
    banner.textContent = withheldText(answer);
    banner.hidden = false;
  } else {
    banner.hidden = true;
    banner.textContent = "";
  }
}

function renderHits(answer) {
  const grid = $("results");
  grid.replaceChildren();
  grid.classList.toggle("abstained", Boolean(answer.abstained));
  answer.hits.forEach((hit, i) => {
    const card = document.createElement("figure");
    card.className = "result";
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = url(hit.thumbnail);
      img.alt = `image ${hit.id}`;
      img.loading = "lazy";
      card.appendChild(img);
    }
    const cap = document.createElement("figcaption");
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = `#${i + 1} · ${hit.id}`;
    cap.appendChild(id);
    const stats = document.createElement("span");
    stats.className = "stats";
    const p = hit.probability === null || hit.probability === undefined ? "" : ` · p ${fmt(hit.probability, 2)}`;
    stats.textContent = `log q ${fmt(hit.score, 4)} · cos ${fmt(hit.cosine)}${p}`;
    cap.appendChild(document.createElement("br"));
    cap.appendChild(stats);
    card.appendChild(cap);
    grid.appendChild(card);
  });
}

async function searchText(event) {
  if (event) event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  showError("");
  $("search-button").disabled = true;
  try {
    const body = await call("/v1/search/text", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query, k: Number($("k").value) }),
    });
    const answer = body.results[0];
    renderSummary(answer);
    renderHits(answer);
  } catch (err) {
    showError(err.message);
  } finally {
    $("search-button").disabled = false;
  }
}

async function searchImage(event) {
  event.preventDefault();
  const file = $("upload").files[0];
  if (!file) return;
  showError("");
  const preview = $("upload-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("file", file);
  form.append("k", "8");
  $("upload-button").disabled = true;
  try {
    const body = await call("/v1/search/image/upload", { method: "POST", body: form });
    const list = $("caption-results");
    list.replaceChildren();
    for (const hit of body.results[0].hits) {
      const item = document.createElement("li");
      item.className = "caption";
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = hit.id;
      const bar = document.createElement("div");
      bar.className = "bar small";
      bar.setAttribute("role", "meter");
      bar.setAttribute("aria-label", "uncertainty of the caption");
      const fill = document.createElement("div");
      fill.className = "fill";
      bar.appendChild(fill);
      meter(bar, hit.uncertainty_percentile, hit.specificity);
      const word = document.createElement("span");
      word.className = "word";
      word.dataset.word = hit.specificity || "unknown";
      word.textContent = wordText(hit.specificity);
      const stats = document.createElement("span");
      stats.className = "stats";
      stats.textContent = `log q = ${fmt(hit.score, 4)}`;
      item.append(text, bar, word, stats);
      list.appendChild(item);
    }
  } catch (err) {
    showError(err.message);
  } finally {
    $("upload-button").disabled = false;
  }
}

async function loadInfo() {
  try {
    const info = await call("/v1/info");
    const g = info.gallery;
    const enc = info.encoder && info.encoder.spec ? info.encoder.spec : "embeddings only";
    const names = { p_correct: "P(right)", uncertainty: "1/κ", likelihood: "log q(best)" };
    const crit = info.abstain.criterion;
    const rule = crit
      ? `withholds answers when ${names[crit] || crit} ${crit === "uncertainty" ? ">" : "<"} `
        + `${crit === "p_correct" ? Number(info.abstain.threshold) : fmt(info.abstain.threshold)}`
      : "never withholds";
    const cal = info.calibration || {};
    calibrationReason = cal.source ? null : cal.reason || null;
    const calibrated = cal.source === "gallery captions"
      ? `P(right) calibrated on ${cal.count} of its captions`
      : cal.source
        ? "P(right) from the model's calibrator"
        : "uncalibrated";
    $("model-info").textContent =
      `${info.family} head on ${enc} · ${g.size} images, ${g.captions} captions · ${calibrated} · ${rule}`;
    if (info.examples && info.examples.length) {
      const box = $("examples");
      for (const text of info.examples) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "example";
        b.textContent = text;
        b.addEventListener("click", () => {
          $("query").value = text;
          searchText();
        });
        box.appendChild(b);
      }
      box.hidden = false;
    }
    $("image-search").hidden = !g.captions || !info.accepts_images;
  } catch (err) {
    showError(`cannot reach the service: ${err.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", searchText);
  $("upload-form").addEventListener("submit", searchImage);
  loadInfo();
});
