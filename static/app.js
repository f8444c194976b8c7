// The web page's script, served as its own file so the page's policy can forbid inline script.
"use strict";
const $ = (id) => document.getElementById(id);
const text = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

// The API key, when the service requires one: asked for at the first 401 of
// a gallery or search call and kept for the session (admin routes take the admin token).
const apiKey = () => sessionStorage.getItem("lookalike-api-key");
const keyHeaders = () => (apiKey() ? { "api-key": apiKey() } : {});

async function api(path, options = {}, retried = false) {
  const response = await fetch(path, { ...options, headers: { ...keyHeaders(), ...(options.headers ?? {}) } });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401 && !path.startsWith("/admin") && !retried) {
    const key = window.prompt("This service needs an API key:");
    if (key?.trim()) {
      sessionStorage.setItem("lookalike-api-key", key.trim());
      return api(path, options, true);
    }
  }
  if (!response.ok) throw new Error(body?.error?.message ?? `HTTP ${response.status}`);
  return body;
}

// Stored images are fetched with the key (an <img> cannot send one) and shown from blob URLs.
function loadImages(container) {
  for (const img of container.querySelectorAll("img[data-src]")) {
    fetch(img.dataset.src, { headers: keyHeaders() })
      .then((r) => (r.ok ? r.blob() : null))
      .then((blob) => {
        if (!blob) return;
        img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
        img.src = URL.createObjectURL(blob);
      });
  }
}
function show(el, message, kind = "") { el.className = `status ${kind}`; el.textContent = message; }

// Tabs
for (const button of document.querySelectorAll("nav button")) {
  button.addEventListener("click", () => {
    for (const b of document.querySelectorAll("nav button")) b.setAttribute("aria-selected", String(b === button));
    for (const s of document.querySelectorAll("main section")) s.hidden = s.id !== `tab-${button.dataset.tab}`;
    if (button.dataset.tab === "gallery") loadGallery(true);
    if (button.dataset.tab === "admin") loadModels();
  });
}

// Drop zones: click to pick, drop to choose; `onFiles` gets the files.
function dropZone(zone, input, onFiles) {
  zone.addEventListener("click", (e) => { if (e.target !== input) input.click(); });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => input.files.length && onFiles([...input.files]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
}
function preview(zone, file) {
  zone.querySelector("img")?.remove();
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file); img.alt = file.name;
  zone.appendChild(img);
}
function card(item, extra = "") {
  return `<div class="card" data-id="${item.id}">
    <img data-src="/gallery/${item.id}/image" alt="item ${item.id}">
    <div class="label">${text(item.label ?? "—")}</div>
    <div class="muted">#${item.id}${item.score !== undefined ? ` · ${item.score.toFixed(3)}` : ""}</div>${extra}</div>`;
}

async function refreshHealth() {
  try {
    const h = await api("/health");
    $("health").textContent = `${h.model} on ${h.device} · ${h.indexed_items} items`;
  } catch (e) { $("health").textContent = `unreachable: ${e.message}`; }
}

// Search
dropZone($("search-drop"), $("search-file"), (files) => search(files[0]));
async function search(file) {
  preview($("search-drop"), file);
  show($("search-status"), "searching…");
  $("search-results").innerHTML = ""; $("search-prediction").textContent = "";
  const params = new URLSearchParams({ k: $("search-k").value || "12" });
  if ($("search-label").value.trim()) params.set("label", $("search-label").value.trim());
  const form = new FormData(); form.append("image", file);
  try {
    const r = await api(`/search?${params}`, { method: "POST", body: form });
    const p = r.prediction;
    $("search-prediction").innerHTML = p.known
      ? `Looks like <b>${text(p.label)}</b> (${Math.round(p.confidence * 100)} % of ${p.votes} votes)`
      : `Label: <b>unknown</b>${p.nearest_distance != null ? ` (nearest labelled item at distance ${p.nearest_distance.toFixed(3)})` : ""}`;
    $("search-results").innerHTML = r.results.map((n) => card(n)).join("");
    loadImages($("search-results"));
    show($("search-status"), `${r.results.length} results in ${r.timing.total_ms.toFixed(1)} ms`, "ok");
    if ($("search-explain").checked) await explainResults(file, r.results.slice(0, 3));
  } catch (e) { show($("search-status"), e.message, "error"); }
}

// Why the first results match the query: for each, the query and the result
// side by side, tinted by each region's share of their similarity.
async function explainResults(query, results) {
  $("search-why").innerHTML = results.map((n) => `<div class="pair" data-why="${n.id}">
    <canvas width="140" height="140" role="img" aria-label="the query, regions tinted by their share of the match with #${n.id}"></canvas>
    <canvas width="140" height="140" role="img" aria-label="result #${n.id}, regions tinted by their share of the match"></canvas>
    <div class="muted">#${n.id} · similarity ${n.score.toFixed(3)}</div></div>`).join("");
  for (const n of results) {
    const stored = await fetch(`/gallery/${n.id}/image`, { headers: keyHeaders() }).then((r) => r.blob());
    const form = new FormData(); form.append("a", query); form.append("b", stored);
    const r = await api("/verify?explain=true", { method: "POST", body: form });
    const [mapQuery, mapResult] = document.querySelectorAll(`#search-why [data-why="${n.id}"] canvas`);
    await drawHeat(mapQuery, query, r.explanation.a, r.explanation.resize);
    await drawHeat(mapResult, stored, r.explanation.b, r.explanation.resize);
  }
}
$("search-explain").addEventListener("change", () => { if (!$("search-explain").checked) $("search-why").innerHTML = ""; });

// Add
let toAdd = [];
dropZone($("add-drop"), $("add-files"), (files) => {
  toAdd = files;
  $("add-preview").innerHTML = files.map((f) => `<div class="card"><img src="${URL.createObjectURL(f)}" alt="${text(f.name)}"><div class="muted">${text(f.name)}</div></div>`).join("");
  $("add-submit").disabled = false;
  show($("add-status"), `${files.length} image(s) ready`);
});
$("add-submit").addEventListener("click", async () => {
  const form = new FormData();
  for (const f of toAdd) form.append("image", f);
  if ($("add-label").value.trim()) form.append("label", $("add-label").value.trim());
  $("add-submit").disabled = true;
  try {
    const r = await api("/gallery", { method: "POST", body: form });
    show($("add-status"), `added ${r.items.map((i) => `#${i.id}`).join(", ")}`, "ok");
    toAdd = []; $("add-preview").innerHTML = ""; $("add-files").value = "";
    refreshHealth();
  } catch (e) { show($("add-status"), e.message, "error"); $("add-submit").disabled = false; }
});

// Gallery
let nextCursor = null;
async function loadGallery(reset) {
  const params = new URLSearchParams({ limit: "24" });
  if ($("gallery-label").value.trim()) params.set("label", $("gallery-label").value.trim());
  if (!reset && nextCursor) params.set("cursor", nextCursor);
  try {
    const page = await api(`/gallery?${params}`);
    nextCursor = page.next_cursor;
    $("gallery-next").disabled = !nextCursor;
    $("gallery-items").innerHTML = page.items.map((i) => card(i, `
      <input type="text" class="edit-label" data-edit="${i.id}" data-seen="${text(i.label ?? "")}" value="${text(i.label ?? "")}"
        placeholder="no label" aria-label="label of item ${i.id}">
      <button class="small danger" data-delete="${i.id}">Delete</button>`)).join("");
    loadImages($("gallery-items"));
    show($("gallery-status"), page.items.length ? `${page.items.length} items on this page` : "no items");
  } catch (e) { show($("gallery-status"), e.message, "error"); }
}
$("gallery-refresh").addEventListener("click", () => loadGallery(true));
$("gallery-next").addEventListener("click", () => loadGallery(false));
$("gallery-items").addEventListener("click", async (e) => {
  const id = e.target.dataset?.delete;
  if (!id) return;
  try {
    await api(`/gallery/${id}`, { method: "DELETE" });
    e.target.closest(".card").remove();
    show($("gallery-status"), `deleted #${id}`, "ok");
    refreshHealth();
  } catch (err) { show($("gallery-status"), err.message, "error"); }
});

// Editing a label in place (Enter or leaving the field saves it). The edit is
// guarded by the item's ETag: if someone changed the label since this page
// showed it, nothing is overwritten and the page says so.
async function editLabel(id, seen, label) {
  const current = await fetch(`/gallery/${id}`, { headers: keyHeaders() });
  if (!current.ok) throw new Error(`item #${id}: HTTP ${current.status}`);
  const stored = (await current.json()).label ?? "";
  if (stored !== seen) throw new Error(`item #${id} was relabelled "${stored}" meanwhile; refresh and try again`);
  const headers = { "content-type": "application/merge-patch+json", "if-match": current.headers.get("etag") };
  return api(`/gallery/${id}`, { method: "PATCH", headers, body: JSON.stringify({ label: label || null }) });
}
$("gallery-items").addEventListener("change", async (e) => {
  const input = e.target.closest("input[data-edit]");
  if (!input) return;
  const id = input.dataset.edit, label = input.value.trim();
  try {
    const item = await editLabel(id, input.dataset.seen, label);
    input.dataset.seen = item.label ?? "";
    input.closest(".card").querySelector(".label").textContent = item.label ?? "—";
    show($("gallery-status"), `#${id} is now ${item.label ? `"${item.label}"` : "unlabelled"}`, "ok");
  } catch (err) { show($("gallery-status"), err.message, "error"); }
});
$("gallery-items").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target.matches("input[data-edit]")) e.target.blur(); });

// Curate: what to label next, and near-copies to review.
$("suggest").addEventListener("click", async () => {
  show($("suggest-status"), "looking for the items a label would help most…");
  try {
    const r = await api("/gallery/suggestions?n=12");
    $("suggestions").innerHTML = r.suggestions.map((s) => card(s.item, `
      <div class="muted">${text(s.reason)} · reaches ${s.cluster_size}</div>
      <input type="text" data-suggested="${s.item.id}" value="${s.prediction.known ? text(s.prediction.label) : ""}"
        placeholder="type a label" aria-label="label for item ${s.item.id}">
      <button class="small" data-accept="${s.item.id}">Label</button>
      <button class="small danger" data-skip="${s.item.id}">Skip</button>`)).join("");
    loadImages($("suggestions"));
    show($("suggest-status"), r.suggestions.length ? `${r.suggestions.length} suggestions from ${r.unlabelled} unlabelled items` : "nothing to suggest: every item is labelled", "ok");
  } catch (e) { show($("suggest-status"), e.message, "error"); }
});
async function acceptSuggestion(id) {
  const label = document.querySelector(`input[data-suggested="${id}"]`).value.trim();
  if (!label) { show($("suggest-status"), `type a label for #${id} first`, "error"); return; }
  try {
    await editLabel(id, "", label); // unlabelled when suggested: refused if someone labelled it since
    document.querySelector(`#suggestions .card[data-id="${id}"]`).remove();
    show($("suggest-status"), `#${id} labelled "${label}"`, "ok");
  } catch (e) { show($("suggest-status"), e.message, "error"); }
}
$("suggestions").addEventListener("click", (e) => {
  if (e.target.dataset?.accept) acceptSuggestion(e.target.dataset.accept);
  if (e.target.dataset?.skip) e.target.closest(".card").remove();
});
$("suggestions").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target.dataset?.suggested) acceptSuggestion(e.target.dataset.suggested); });

$("dup-scan").addEventListener("click", async () => {
  const distance = $("dup-distance").value.trim();
  show($("dup-status"), "scanning the gallery…"); $("dup-groups").innerHTML = "";
  try {
    let scan = await api(`/gallery/duplicates${distance ? `?distance=${encodeURIComponent(distance)}` : ""}`, { method: "POST" });
    while (scan.state === "running") {
      show($("dup-status"), `scanning: ${scan.scanned} of ${scan.total} items`);
      await new Promise((resolve) => setTimeout(resolve, 500));
      scan = await api(`/gallery/duplicates/${scan.id}`);
    }
    if (scan.state === "failed") throw new Error(scan.error);
    $("dup-groups").innerHTML = scan.groups.map((g) => `<div class="group" data-keeper="${g.keeper}">
      <div class="grid">${g.items.map((i) => card(i, i.id === g.keeper ? '<div class="ok">keep</div>'
        : `<div class="muted">distance ${Math.min(...g.pairs.filter((p) => p.a === i.id || p.b === i.id).map((p) => p.distance)).toFixed(4)}</div>
           <button class="small danger" data-delete-copy="${i.id}">Delete</button>`)).join("")}</div>
      <button class="small danger" data-delete-group="${g.items.filter((i) => i.id !== g.keeper).map((i) => i.id).join(",")}">Delete all but the keeper</button></div>`).join("");
    loadImages($("dup-groups"));
    show($("dup-status"), `${scan.groups.length} groups, ${scan.duplicates} items besides their keepers (distance ${scan.distance.toPrecision(3)})`, "ok");
  } catch (e) { show($("dup-status"), e.message, "error"); }
});
$("dup-groups").addEventListener("click", async (e) => {
  const ids = (e.target.dataset?.deleteCopy ?? e.target.dataset?.deleteGroup)?.split(",");
  if (!ids) return;
  try {
    for (const id of ids) {
      await api(`/gallery/${id}`, { method: "DELETE" });
      document.querySelector(`#dup-groups .card[data-id="${id}"]`)?.remove();
    }
    show($("dup-status"), `deleted ${ids.map((id) => `#${id}`).join(", ")}`, "ok");
    refreshHealth();
  } catch (err) { show($("dup-status"), err.message, "error"); }
});

// Verify
const pair = {};
for (const side of ["a", "b"]) {
  dropZone($(`verify-drop-${side}`), $(`verify-${side}`), (files) => {
    pair[side] = files[0]; preview($(`verify-drop-${side}`), files[0]); verify();
  });
}
async function verify() {
  if (!pair.a || !pair.b) return;
  const form = new FormData(); form.append("a", pair.a); form.append("b", pair.b);
  const explain = $("verify-explain").checked;
  try {
    const r = await api(`/verify${explain ? "?explain=true" : ""}`, { method: "POST", body: form });
    const verdict = r.same === null ? "no calibrated threshold" : r.same ? "the same" : "different";
    $("verify-status").innerHTML = `<b>${verdict}</b> · similarity ${r.similarity.toFixed(3)} (threshold ${r.threshold?.toFixed(3) ?? "—"})`;
    if (r.explanation) {
      await drawHeat($("verify-map-a"), pair.a, r.explanation.a, r.explanation.resize);
      await drawHeat($("verify-map-b"), pair.b, r.explanation.b, r.explanation.resize);
    }
    $("verify-maps").hidden = !r.explanation; // shown once drawn
  } catch (e) { show($("verify-status"), e.message, "error"); }
}
$("verify-explain").addEventListener("change", verify);
// The image in the model's frame (whole and stretched, or its centred square),
// each grid cell tinted by its share of the match.
async function drawHeat(canvas, file, map, resize) {
  const image = await createImageBitmap(file);
  const side = Math.min(image.width, image.height), crop = resize === "center_crop";
  const [sx, sy, sw, sh] = crop ? [(image.width - side) / 2, (image.height - side) / 2, side, side] : [0, 0, image.width, image.height];
  const ctx = canvas.getContext("2d"), s = canvas.width, n = map.length;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, sx, sy, sw, sh, 0, 0, s, s);
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < n; c++) {
      ctx.fillStyle = `rgba(230, 40, 20, ${(0.65 * map[r][c]).toFixed(3)})`;
      ctx.fillRect((c * s) / n, (r * s) / n, s / n, s / n);
    }
  }
}

// Admin
$("admin-token").value = sessionStorage.getItem("lookalike-token") ?? "";
$("admin-token").addEventListener("change", () => { sessionStorage.setItem("lookalike-token", $("admin-token").value); loadModels(); });
const admin = (path, options = {}) => api(path, { ...options, headers: { ...(options.headers ?? {}), authorization: `Bearer ${$("admin-token").value}` } });
let jobId = null, polling = null;

$("ft-start").addEventListener("click", async () => {
  const params = { epochs: Number($("ft-epochs").value), learning_rate: Number($("ft-lr").value), mining: $("ft-mining").value };
  try {
    const job = await admin("/admin/finetune", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(params) });
    jobId = job.id; renderJob(job); poll();
  } catch (e) { show($("ft-status"), e.message, "error"); }
});
$("ft-cancel").addEventListener("click", async () => {
  try { renderJob(await admin(`/admin/finetune/${jobId}`, { method: "DELETE" })); } catch (e) { show($("ft-status"), e.message, "error"); }
});
function poll() {
  clearInterval(polling);
  polling = setInterval(async () => {
    try {
      const job = await admin(`/admin/finetune/${jobId}`);
      renderJob(job);
      if (["done", "failed", "cancelled"].includes(job.state)) { clearInterval(polling); loadModels(); refreshHealth(); }
    } catch (e) { show($("ft-status"), e.message, "error"); clearInterval(polling); }
  }, 1000);
}
function renderJob(job) {
  const finished = ["done", "failed", "cancelled"].includes(job.state);
  $("ft-cancel").disabled = finished;
  const eta = job.eta_seconds != null ? ` · about ${Math.ceil(job.eta_seconds)} s left` : "";
  const outcome = job.result ? ` · ${job.result.reason}` : job.error ? ` · ${job.error}` : "";
  show($("ft-status"), `${job.state} · epoch ${job.epoch}/${job.epochs}, step ${job.step}/${job.steps_per_epoch} · ${job.elapsed_seconds.toFixed(0)} s${eta}${outcome}`,
    job.state === "failed" ? "error" : job.state === "done" ? "ok" : "");
  const v = job.validation, fmt = (x) => (x == null ? "—" : x.toFixed(3));
  $("ft-figures").innerHTML = [
    ["Recall@1 before", fmt(v.before?.recall_at_1)], ["Recall@1 best", fmt(v.best?.recall_at_1)],
    ["MAP@R before", fmt(v.before?.map_at_r)], ["MAP@R best", fmt(v.best?.map_at_r)],
    ["re-embedded", job.reembedding ? `${job.reembedding.embedded}/${job.reembedding.to_embed}` : "—"],
  ].map(([k, x]) => `<div><span class="muted">${k}</span><b>${x}</b></div>`).join("");
  drawLoss(job.step_losses);
}
function drawLoss(losses) {
  const svg = $("ft-chart");
  if (!losses.length) { svg.innerHTML = ""; return; }
  const max = Math.max(...losses) || 1, w = 640, h = 180, pad = 8;
  const x = (i) => pad + (i / Math.max(losses.length - 1, 1)) * (w - 2 * pad);
  const y = (v) => h - pad - (v / max) * (h - 2 * pad);
  const points = losses.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  svg.innerHTML = `<polyline fill="none" stroke="#2f6fde" stroke-width="1.5" points="${points}"/>
    <text x="${pad}" y="16" font-size="12" fill="#667085">loss (max ${max.toFixed(3)}), ${losses.length} steps</text>`;
}
async function loadModels() {
  if (!$("admin-token").value) { show($("models-status"), "type the admin token to manage models"); return; }
  try {
    const m = await admin("/admin/models");
    $("models").innerHTML = m.versions.map((v) => {
      const after = v.finetune?.validation_after, before = v.finetune?.validation_before;
      const figures = after ? `Recall@1 ${before.recall_at_1.toFixed(3)} → ${after.recall_at_1.toFixed(3)}, MAP@R ${before.map_at_r.toFixed(3)} → ${after.map_at_r.toFixed(3)}` : v.bundled ? "bundled" : "—";
      const action = v.active ? "<b>active</b>" : `<button class="small" data-activate="${text(v.version)}">Activate</button>`;
      return `<tr><td>${text(v.version)}</td><td>${text(v.parent ?? "—")}</td><td>${figures}</td><td>${v.embedded_items}</td><td>${action}</td></tr>`;
    }).join("");
    show($("models-status"), `active: version ${m.active}`, "ok");
  } catch (e) { show($("models-status"), e.message, "error"); }
}
$("models").addEventListener("click", async (e) => {
  const version = e.target.dataset?.activate;
  if (!version) return;
  show($("models-status"), `activating ${version}…`);
  try {
    let run = await admin(`/admin/models/${encodeURIComponent(version)}/activate`, { method: "POST" });
    while (run.state === "running") {
      show($("models-status"), `activating ${version}: ${run.progress.embedded} of ${run.progress.to_embed} images embedded`);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      run = await admin(`/admin/activations/${encodeURIComponent(run.id)}`);
    }
    if (run.state === "failed") throw new Error(run.error);
    loadModels(); refreshHealth();
  } catch (err) { show($("models-status"), err.message, "error"); }
});

refreshHealth();
