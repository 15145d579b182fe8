// dinosearch web page: browse the collection, query by example, region by box, objects by click or box, parts
// overlay, filters, index jobs. No external code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, photoId: null, name: "", img: null, size: null, box: null, point: null, parts: null, drag: null,
                queryObject: null, boxMode: false, maxK: 1000, view: "browse", shown: 0, part: null, like: [], unlike: [] };
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const PAGE = 40;  // photos per browse page ("Show more" adds the next)

function palette(i) {
  const h = (i * 0.618034) % 1;
  return `hsla(${Math.round(h * 360)}, 85%, 50%, 0.45)`;
}

// a grid of cells (parts labels, heat values) drawn over a w x h canvas: one pixel per cell, scaled up (smoothly
// for a heat map), so neighbouring cells leave no seams
function drawGrid(g, rows, w, h, colour, smooth) {
  const n = rows.length, c = document.createElement("canvas");
  c.width = rows[0].length; c.height = n;
  const cg = c.getContext("2d");
  rows.forEach((row, y) => row.forEach((v, x) => { cg.fillStyle = colour(v); cg.fillRect(x, y, 1, 1); }));
  g.imageSmoothingEnabled = smooth;
  g.drawImage(c, 0, 0, w, h);
  g.imageSmoothingEnabled = true;
}

function say(text) { $("message").textContent = text || ""; }

// -- talking to the server: every failure becomes one sentence a person can act on

const FIELDS = { k: "number of results", box: "box", point: "point", part: "part", taken_after: "'taken from' date",
                 taken_before: "'to' date", near: "place", folder: "folder", camera: "camera", label: "tag", limit: "page size" };
const BY_STATUS = {
  401: "The token is missing or wrong.", 403: "The server does not allow that.", 404: "That photo is no longer in the index.",
  409: "The index is busy or does not match the server's model.", 410: "That photo's file has changed or gone since it was indexed.",
  413: "That photo is too large for the server.", 415: "That file is not a photo the server can read.",
  503: "The server is busy; try again in a moment.",
};

function sentence(text) {
  const s = String(text).split("\n")[0].trim();
  return s.charAt(0).toUpperCase() + s.slice(1) + (/[.!?…]$/.test(s) ? "" : ".");
}

// the server's {"detail": ...}: a typed error's own sentence, or FastAPI's validation list (its first problem)
function explain(status, body) {
  const d = body && body.detail;
  if (typeof d === "string" && d) return sentence(d);
  if (Array.isArray(d) && d.length) {
    const e = d[0], field = e.loc ? e.loc[e.loc.length - 1] : "input";
    return sentence(`The ${FIELDS[field] || field} is not accepted: ${String(e.msg || "invalid").toLowerCase()}`);
  }
  return BY_STATUS[status] || `The server could not answer (HTTP ${status}).`;
}

class ApiError extends Error {}

async function api(url, options = {}) {
  let r;
  try {
    r = await fetch(url, options);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("The server cannot be reached; is dinosearch serve still running?");
  }
  const body = r.headers.get("content-type")?.includes("json") ? await r.json().catch(() => null) : null;
  if (!r.ok) throw new ApiError(explain(r.status, body));
  return body;
}

// -- one view at a time: only the newest request's reply is shown (older ones are aborted), busy at once

let inflight = null;

function busy(on) {
  const sec = $("results-section");
  sec.classList.toggle("busy", on);
  sec.setAttribute("aria-busy", String(on));
  $("go").setAttribute("aria-disabled", String(on));  // aria-disabled, not disabled: a focused button keeps focus
  $("spinner").hidden = !on;
}

async function latest(work) {
  if (inflight) inflight.abort();
  const ctl = inflight = new AbortController();
  const current = () => ctl === inflight;
  busy(true);
  try {
    await work(ctl.signal, current);
  } catch (e) {
    if (current() && e.name !== "AbortError") showError(e.message);
  } finally {
    if (current()) { inflight = null; busy(false); }
  }
}

function showError(text) {
  $("results").replaceChildren();
  $("more").hidden = true;
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

// -- the query photo on its canvas

function draw() {
  canvas.hidden = !state.img;  // no empty frame before a photo shows
  if (!state.img) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
  ctx.drawImage(state.img, 0, 0, canvas.width, canvas.height);
  if ($("show-parts").checked && state.parts) drawGrid(ctx, state.parts.labels, canvas.width, canvas.height, palette, false);
  const s = canvas.width / state.size[0];
  if (state.queryObject && !state.drag) {  // the object SAM found in the query: its mask and box
    const o = state.queryObject;
    if (o.mask) ctx.drawImage(maskCanvas(o.mask, [30, 200, 90]), 0, 0, canvas.width, canvas.height);
    ctx.lineWidth = 2; ctx.strokeStyle = "#1ec85a";
    ctx.strokeRect(o.box[0] * s, o.box[1] * s, (o.box[2] - o.box[0]) * s, (o.box[3] - o.box[1]) * s);
  }
  const b = state.drag || state.box;
  if (b) {
    ctx.lineWidth = 3; ctx.strokeStyle = "#ff2d2d";
    ctx.strokeRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
  }
  if (state.point) {
    ctx.fillStyle = "#ff2d2d"; ctx.beginPath();
    ctx.arc(state.point[0] * s, state.point[1] * s, 6, 0, 2 * Math.PI); ctx.fill();
  }
}

// a COCO RLE mask (column-major runs, 0s first) as a canvas: the mask in colour, the rest transparent
function maskCanvas(rle, rgb) {
  const [h, w] = rle.size, c = document.createElement("canvas");
  c.width = w; c.height = h;
  const g = c.getContext("2d"), im = g.createImageData(w, h);
  let at = 0;
  rle.counts.forEach((n, i) => {
    if (i % 2) for (let j = at; j < at + n; j++) {
      const x = Math.floor(j / h), y = j % h, o = 4 * (y * w + x);
      im.data[o] = rgb[0]; im.data[o + 1] = rgb[1]; im.data[o + 2] = rgb[2]; im.data[o + 3] = 110;
    }
    at += n;
  });
  g.putImageData(im, 0, 0);
  return c;
}

function showImage(img, size) {
  state.img = img; state.size = size;
  const w = Math.min(960, size[0]);
  canvas.width = w; canvas.height = Math.round(w * size[1] / size[0]);
  draw();
}

function newQuery(name) {
  if (inflight) inflight.abort();  // a reply for the previous query must not land on this one
  state.box = null; state.point = null; state.parts = null; state.queryObject = null; state.img = null; state.part = null;
  $("box").value = ""; $("query-name").textContent = name; $("query-name").title = name;
  say("");
  canvas.width = 480; canvas.height = 320;  // blank until the new photo shows: never the previous one
  draw();
}

function loadImage(src) {
  const img = new Image();
  img.onload = () => { if (img === state.loading) showImage(img, [img.naturalWidth, img.naturalHeight]); };
  img.onerror = () => { if (img === state.loading) say("The browser cannot show this photo; the server searches it anyway."); };
  state.loading = img;
  img.src = src;
}

function setFile(file) {
  if (!file) return;
  state.file = file; state.photoId = null;
  newQuery(file.name);
  loadImage(URL.createObjectURL(file));
  search();
}

function setPhoto(id, name, { refocus = false, part = null, box = null, objects = null } = {}) {
  state.file = null; state.photoId = id;
  newQuery(name || `photo ${id}`);
  state.part = part;
  if (box) { state.box = box; $("box").value = box.join(","); }
  if (objects !== null) { $("objects").checked = objects; $("objects-help").hidden = !objects; }
  loadImage(`/photos/${id}`);
  $("query").scrollIntoView({ block: "start" });  // on a phone the query is above the results
  search({ refocus: refocus ? id : null });
}

// -- filters (every search and the browse view) and query parameters

function filterParams() {
  const p = new URLSearchParams();
  for (const [id, name] of [["label", "label"], ["taken-after", "taken_after"], ["taken-before", "taken_before"],
                            ["camera", "camera"], ["near", "near"], ["folder-filter", "folder"]]) {
    const v = $(id).value.trim();
    if (v) p.set(name, v);
  }
  return p;
}

function clampK() {  // the server's own limit (GET /stats max_k), never a second copy of it
  const k = Math.min(state.maxK, Math.max(1, Math.round(Number($("k").value) || 12)));
  $("k").value = k;
  return k;
}

function params() {
  const p = filterParams();
  p.set("k", clampK());
  if (state.box) p.set("box", state.box.map(Math.round).join(","));
  else if (state.part !== null) { p.set("part", state.part.n); p.set("parts_k", state.part.k); }
  for (const e of state.like) p.append("like", e.id);
  for (const e of state.unlike) p.append("unlike", e.id);
  if ($("objects").checked) {
    p.set("objects", "true");
    if (state.point) p.set("point", state.point.map(Math.round).join(","));
  }
  return p;
}

function search({ refocus = null } = {}) {
  if (!state.file && !state.photoId) { showError("Choose a photo first, or pick one of yours below."); return; }
  const photoId = state.photoId, file = state.file, url = photoId ? `/photos/${photoId}/similar?${params()}` : `/search?${params()}`;
  return latest(async (signal, current) => {
    let res;
    if (photoId) res = await api(url, { signal });
    else {
      const form = new FormData(); form.append("image", file);
      res = await api(url, { method: "POST", body: form, signal });
    }
    if (!current()) return;
    showView("search");
    if (!state.img) state.size = res.query_size;
    state.queryObject = res.query_object || null;
    draw();
    $("view-title").textContent = "Results";
    $("mode").textContent = { region: "(photos containing the region)", objects: "(photos holding a like object)",
                              feedback: "(steered)" }[res.mode] || "(similar photos)";
    $("browse-all").hidden = false; $("more").hidden = true;
    document.body.classList.remove("browsing");
    render(res.results, false);
    if (!res.results.length) showError("No photo passes these filters.");
    say("");
    if (refocus !== null) {  // keyboard: focus stays on the photo just chosen (or the results' heading)
      const same = $("results").querySelector(`button.hit[data-id="${refocus}"]`);
      (same || $("results-title")).focus({ preventScroll: true });
    }
    if ($("show-parts").checked) loadParts();
  });
}

function browse({ append = false } = {}) {
  const p = filterParams();
  p.set("sort", $("sort").value); p.set("order", $("order").value);
  p.set("offset", append ? state.shown : 0); p.set("limit", PAGE);
  return latest(async (signal, current) => {
    const page = await api(`/photos?${p}`, { signal });
    if (!current()) return;
    showView("browse");
    $("view-title").textContent = "Your photos";
    $("mode").textContent = `(${page.total})`;
    $("browse-all").hidden = true;
    document.body.classList.add("browsing");
    render(page.photos, append);
    state.shown = (append ? state.shown : 0) + page.photos.length;
    $("more").hidden = state.shown >= page.total;
    if (!page.total) showError("No photo passes these filters.");
  });
}

function showView(view) {
  state.view = view;
  const dups = view === "duplicates";
  $("results").hidden = dups; $("filters").hidden = dups; $("groups").hidden = !dups; $("dup-bar").hidden = !dups;
  $("review-dups").hidden = dups;
  if (dups) { $("more").hidden = true; $("browse-all").hidden = false; }
}

function refresh() { return state.view === "search" && (state.file || state.photoId) ? search() : browse(); }

// -- tiles: justified rows (each tile grows with its photo's aspect), a button per photo

function tile(r) {
  const li = document.createElement("li");
  li.className = "result";
  const aspect = r.width && r.height ? r.width / r.height : 1;
  li.style.setProperty("--a", aspect.toFixed(3));
  const btn = document.createElement("button");
  btn.className = "hit"; btn.type = "button"; btn.dataset.id = r.id;
  const what = r.score !== undefined ? `, score ${r.score.toFixed(3)}` : (r.taken ? `, taken ${r.taken.slice(0, 10)}` : "");
  btn.setAttribute("aria-label", `${r.path}${what}: search like this photo`);
  btn.title = r.path;
  btn.addEventListener("click", (ev) => setPhoto(r.id, r.path, { refocus: ev.detail === 0 }));  // detail 0: keyboard
  const wrap = document.createElement("div"); wrap.className = "thumb";
  wrap.style.aspectRatio = `${aspect}`;
  const img = document.createElement("img");
  img.alt = ""; img.loading = "lazy"; img.src = `/photos/${r.id}/thumb?size=320`;
  wrap.append(img);
  if (r.box && r.width && r.height) {
    const m = document.createElement("div"); m.className = "match";
    m.style.left = `${100 * r.box[0] / r.width}%`; m.style.top = `${100 * r.box[1] / r.height}%`;
    m.style.width = `${100 * (r.box[2] - r.box[0]) / r.width}%`; m.style.height = `${100 * (r.box[3] - r.box[1]) / r.height}%`;
    wrap.append(m);
  }
  if (r.mask) {
    const mc = maskCanvas(r.mask, [255, 45, 45]); mc.className = "mask";
    wrap.append(mc);
  }
  const meta = document.createElement("div"); meta.className = "meta";
  const name = document.createElement("span"); name.className = "name"; name.textContent = r.path;
  meta.append(name);
  if (r.score !== undefined) {
    const score = document.createElement("span"); score.textContent = r.score.toFixed(3);
    meta.append(score);
  }
  btn.append(wrap, meta);
  const info = document.createElement("button");
  info.type = "button"; info.className = "info"; info.textContent = "i";
  info.setAttribute("aria-label", `details of ${r.path}`);
  info.addEventListener("click", () => openDetail(r));
  li.append(btn, info);
  return li;
}

function render(photos, append) {
  clearError();
  const tiles = photos.map(tile);
  if (append) $("results").append(...tiles); else $("results").replaceChildren(...tiles);
}

async function loadParts() {
  const k = $("parts-k").value, photoId = state.photoId, file = state.file;
  try {
    let parts;
    if (photoId) parts = await api(`/photos/${photoId}/parts?k=${k}`);
    else if (file) {
      const form = new FormData(); form.append("image", file);
      parts = await api(`/parts?k=${k}`, { method: "POST", body: form });
    }
    if (photoId !== state.photoId || file !== state.file) return;  // the query changed meanwhile
    state.parts = parts;
    draw();
  } catch (e) { say(e.message); }
}

// box drawing with mouse, pen or touch; coordinates kept in photo pixels. A finger draws only in box mode, so
// that a swipe over the photo scrolls the page; a tap picks an object (objects on) either way.
function toPhoto(ev) {
  const rect = canvas.getBoundingClientRect();
  const s = state.size[0] / rect.width;
  return [Math.max(0, Math.min(state.size[0], (ev.clientX - rect.left) * s)), Math.max(0, Math.min(state.size[1], (ev.clientY - rect.top) * s))];
}
canvas.addEventListener("pointerdown", (ev) => {
  if (!state.size) return;
  const drawing = ev.pointerType === "mouse" || state.boxMode;
  if (drawing) canvas.setPointerCapture(ev.pointerId);
  const p = toPhoto(ev); state.dragStart = p; state.drawing = drawing; state.drag = null;
});
canvas.addEventListener("pointermove", (ev) => {
  if (!state.dragStart || !state.drawing) return;
  const a = state.dragStart, b = toPhoto(ev);
  state.drag = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  draw();
});
canvas.addEventListener("pointercancel", () => { state.dragStart = null; state.drag = null; draw(); });  // the page scrolled
canvas.addEventListener("pointerup", (ev) => {
  if (!state.dragStart) return;
  const d = state.drag, start = state.dragStart, end = toPhoto(ev);
  state.dragStart = null; state.drag = null;
  const s = canvas.getBoundingClientRect().width / state.size[0];  // screen px per photo px
  if (d && (d[2] - d[0]) * s > 6 && (d[3] - d[1]) * s > 6) {
    state.box = d; state.point = null; $("box").value = d.map(Math.round).join(",");
    search();
  } else if ($("objects").checked && Math.hypot(end[0] - start[0], end[1] - start[1]) * s < 10) {  // a click or tap
    state.point = start; state.box = null; $("box").value = "";
    search();
  }
  draw();
});

function parseBox(text) {
  const b = text.split(",").map((v) => Number(v.trim()));
  if (b.length !== 4 || b.some((v) => !Number.isFinite(v) || v < 0)) return "The box must be four numbers: x0,y0,x1,y1 in pixels of the photo.";
  if (b[2] <= b[0] || b[3] <= b[1]) return "The box's x1 must be right of x0 and y1 below y0.";
  if (state.size && (b[0] >= state.size[0] || b[1] >= state.size[1])) return `The box starts outside the photo (${state.size[0]} × ${state.size[1]} pixels).`;
  return b;
}

$("controls").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if ($("go").getAttribute("aria-disabled") === "true") return;  // busy: the running search answers first
  const v = $("box").value.trim();
  if (v) {
    const b = parseBox(v);
    if (typeof b === "string") { showError(b); return; }
    state.box = b; state.point = null; state.part = null;
  } else state.box = null;
  draw(); search();
});
$("box-mode").addEventListener("click", () => {
  state.boxMode = !state.boxMode;
  $("box-mode").setAttribute("aria-pressed", String(state.boxMode));
  canvas.classList.toggle("boxing", state.boxMode);
});
$("objects").addEventListener("change", () => {
  $("objects-help").hidden = !$("objects").checked;
  state.point = null; state.queryObject = null; draw();
  if (state.file || state.photoId) search();
});
$("clear").addEventListener("click", () => { state.box = null; state.point = null; state.part = null; $("box").value = ""; draw(); search(); });
$("show-parts").addEventListener("change", () => { if ($("show-parts").checked) loadParts(); else draw(); });
$("parts-k").addEventListener("change", () => { if ($("show-parts").checked) loadParts(); });
$("file").addEventListener("change", (ev) => setFile(ev.target.files[0]));
$("filters").addEventListener("change", () => refresh());
$("filters").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
$("browse-all").addEventListener("click", () => { browse(); $("results-title").focus({ preventScroll: true }); });
$("more").addEventListener("click", () => browse({ append: true }));
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); setFile(ev.dataTransfer.files[0]); });

// -- the detail view: the photo large, its metadata, tags, parts (each a region query), objects, duplicates;
// for a result its match box and heat map (toggleable) and its score

const detail = { photo: null, parts: null, objects: [] };

function overlay() {
  const img = $("detail-img"), c = $("detail-overlay"), r = detail.photo;
  if (!r || !img.naturalWidth) return;
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if ($("detail-parts").checked && detail.parts) drawGrid(g, detail.parts.labels, c.width, c.height, palette, false);
  if ($("detail-match").checked && r.heat) {  // best match per cell, scaled from the photo's weakest to its strongest cell
    const flat = r.heat.flat(), lo = Math.min(...flat), hi = Math.max(...flat);
    drawGrid(g, r.heat, c.width, c.height, (v) => `rgba(255, 60, 0, ${(0.6 * (v - lo) / (hi - lo || 1)).toFixed(3)})`, true);
  }
  const sx = c.width / (r.width || c.width);
  if ($("detail-match").checked && r.box) {
    g.lineWidth = Math.max(3, c.width / 200); g.strokeStyle = "#ff2d2d";
    g.strokeRect(r.box[0] * sx, r.box[1] * sx, (r.box[2] - r.box[0]) * sx, (r.box[3] - r.box[1]) * sx);
  }
  if (detail.hover) {
    const b = detail.hover.box;
    g.lineWidth = Math.max(3, c.width / 200); g.strokeStyle = "#1ec85a";
    g.strokeRect(b[0] * sx, b[1] * sx, (b[2] - b[0]) * sx, (b[3] - b[1]) * sx);
  }
}

function chipButton(text, label, onClick, onFocus) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  if (onFocus) { b.addEventListener("focus", onFocus); b.addEventListener("mouseenter", onFocus); }
  return b;
}

async function openDetail(r) {
  detail.photo = r; detail.parts = null; detail.objects = []; detail.hover = null;
  $("detail-name").textContent = r.path;
  $("detail-score").textContent = r.score !== undefined ? `Score ${r.score.toFixed(3)} against the query` : "";
  $("detail-match-label").hidden = !(r.box || r.heat);
  $("detail-parts").checked = false;
  $("detail-part-list").replaceChildren();
  $("detail-meta").replaceChildren(); $("detail-objects").replaceChildren(); $("detail-dups").replaceChildren();
  const img = $("detail-img");
  img.onload = overlay;
  img.src = `/photos/${r.id}`;
  img.alt = r.path;
  if (!$("detail").open) { detail.opener = document.activeElement; $("detail").showModal(); }
  const [info, objects, dups] = await Promise.allSettled([
    api(`/photos/${r.id}/info`), api(`/photos/${r.id}/objects`), api(`/photos/${r.id}/duplicates`)]);
  if (detail.photo !== r) return;  // another photo was opened meanwhile
  const dl = $("detail-meta");
  if (info.status === "fulfilled") {
    const m = info.value, place = m.lat !== null && m.lon !== null ? `${m.lat.toFixed(5)}, ${m.lon.toFixed(5)}` : null;
    r.width = r.width || m.width; r.height = r.height || m.height;
    for (const [k, v] of [["File", m.path], ["Size", m.width && `${m.width} × ${m.height} pixels`],
                          ["Taken", m.taken && `${m.taken.replace("T", " ")}${m.taken_source ? ` (${m.taken_source})` : ""}`],
                          ["Camera", [m.make, m.model].filter(Boolean).join(" ")], ["Place", place],
                          ["Tags", m.tags.map((t) => `${t.label} ${Math.round(100 * t.prob)}%`).join(", ")]]) {
      if (!v) continue;
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = v; dl.append(dt, dd);
    }
  } else dl.textContent = info.reason.message;
  const objs = objects.status === "fulfilled" ? objects.value : [];
  detail.objects = objs;
  $("detail-objects").replaceChildren(...(objs.length ? objs.map((o, i) => chipButton(`object ${i + 1}`,
    `search photos holding object ${i + 1} of this photo`, () => { closeDetail(); setPhoto(r.id, r.path, { box: o.box, objects: true }); },
    () => { detail.hover = o; overlay(); })) : [document.createTextNode("none stored")]));
  const ds = dups.status === "fulfilled" ? dups.value.duplicates : [];
  $("detail-dups").replaceChildren(...(ds.length ? ds.map((d) => {
    const li = document.createElement("li");
    li.append(chipButton(`${d.path} — ${d.kind} ${d.score.toFixed(2)}`, `open ${d.path}, ${d.kind} copy`, () => openDetail(d)));
    return li;
  }) : [Object.assign(document.createElement("li"), { textContent: "none found" })]));
}

function closeDetail() { if ($("detail").open) $("detail").close(); }

async function detailParts() {
  const r = detail.photo;
  if ($("detail-parts").checked && !detail.parts) {
    try { detail.parts = await api(`/photos/${r.id}/parts?k=5`); } catch (e) { say(e.message); return; }
    if (detail.photo !== r) return;
    const n = detail.parts.k;
    $("detail-part-list").replaceChildren(...Array.from({ length: n }, (_, i) => {
      const b = chipButton(`part ${i + 1}`, `search photos containing part ${i + 1} of this photo`, () => { closeDetail(); setPhoto(r.id, r.path, { part: { n: i, k: n } }); });
      b.style.borderLeft = `8px solid ${palette(i).replace("0.45", "1")}`;
      return b;
    }));
  }
  $("detail-part-list").hidden = !$("detail-parts").checked;
  overlay();
}

$("detail-overlay").addEventListener("click", (ev) => {  // a click on a part: that part as a region query
  const r = detail.photo;
  if (!$("detail-parts").checked || !detail.parts) return;
  const rect = ev.target.getBoundingClientRect(), n = detail.parts.grid;
  const x = Math.min(n - 1, Math.floor((ev.clientX - rect.left) / rect.width * n)), y = Math.min(n - 1, Math.floor((ev.clientY - rect.top) / rect.height * n));
  const part = detail.parts.labels[y][x];
  closeDetail(); setPhoto(r.id, r.path, { part: { n: part, k: detail.parts.k } });
});
$("detail-close").addEventListener("click", closeDetail);
$("detail").addEventListener("close", () => {  // keyboard: back on the button that opened it
  if (detail.opener && detail.opener.isConnected) detail.opener.focus({ preventScroll: true });
});
$("detail").addEventListener("click", (ev) => { if (ev.target === $("detail")) closeDetail(); });  // the backdrop
$("detail-match").addEventListener("change", overlay);
$("detail-parts").addEventListener("change", detailParts);
$("detail-similar").addEventListener("click", () => { const r = detail.photo; closeDetail(); setPhoto(r.id, r.path); });
$("detail-like").addEventListener("click", () => { steer("like", detail.photo); closeDetail(); });
$("detail-unlike").addEventListener("click", () => { steer("unlike", detail.photo); closeDetail(); });

// -- steering: photos wanted and not wanted, shown as a tray; the results follow every change

function steer(kind, r) {
  const other = kind === "like" ? "unlike" : "like";
  state[other] = state[other].filter((e) => e.id !== r.id);
  if (!state[kind].some((e) => e.id === r.id)) state[kind].push({ id: r.id, name: r.path });
  if (!state.file && !state.photoId) {  // nothing to steer yet: the first wanted photo becomes the query
    if (kind === "unlike") { renderTray(); return; }
    state.like = state.like.filter((e) => e.id !== r.id);
    renderTray(); setPhoto(r.id, r.path); return;
  }
  renderTray(); search();
}

function renderTray() {
  for (const kind of ["like", "unlike"]) {
    $(`tray-${kind}`).replaceChildren(...state[kind].map((e) => {
      const li = document.createElement("li");
      li.className = kind;
      li.append(chipButton(`${kind === "like" ? "+" : "−"} ${e.name} ✕`, `remove ${e.name} from ${kind === "like" ? "more" : "less"} like`, () => {
        state[kind] = state[kind].filter((x) => x.id !== e.id); renderTray(); refresh();
      }));
      return li;
    }));
  }
  $("tray").hidden = !state.like.length && !state.unlike.length;
}
$("tray-clear").addEventListener("click", () => { state.like = []; state.unlike = []; renderTray(); refresh(); });

// -- duplicates review: groups side by side, what differs, the suggested keeper marked, another can be chosen,
// and the list of copies (everything but each group's keeper) exported as JSON

const kb = (n) => n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MB` : `${Math.round(n / 1024)} KB`;
const format = (name) => (name.split(".").pop() || "").toUpperCase();

function reviewDuplicates() {
  const kind = $("dup-kind").value;
  return latest(async (signal, current) => {
    const page = await api(`/duplicates?limit=100${kind ? `&kind=${kind}` : ""}`, { signal });
    if (!current()) return;
    showView("duplicates");
    clearError();
    $("view-title").textContent = "Duplicates";
    $("mode").textContent = `(${page.total} groups)`;
    state.groups = page.groups.map((g) => ({ ...g, chosen: g.keep }));
    $("groups").replaceChildren(...state.groups.map(groupView));
    if (!page.total) showError("No duplicates found.");
  });
}

function groupView(g, n) {
  const li = document.createElement("li");
  li.className = "group";
  const head = document.createElement("h3");
  head.textContent = `Group ${n + 1}: ${{ exact: "exact copies", edited: "edited copies", similar: "similar shots" }[g.kind] || g.kind}`;
  const why = document.createElement("p");
  why.className = "hint"; why.textContent = g.reasons.length ? `Suggested keeper: ${g.reasons.join("; ")}` : "";
  const row = document.createElement("div");
  row.className = "members"; row.setAttribute("role", "radiogroup"); row.setAttribute("aria-label", `photo to keep in group ${n + 1}`);
  const keeper = g.photos.find((p) => p.id === g.keep) || g.photos[0];
  for (const p of g.photos) {
    const fig = document.createElement("figure");
    fig.className = "member" + (p.id === g.chosen ? " kept" : "");
    const img = document.createElement("img");
    img.src = `/photos/${p.id}/thumb?size=320`; img.alt = p.path; img.loading = "lazy";
    const cap = document.createElement("figcaption");
    const diff = [p.width !== keeper.width || p.height !== keeper.height ? "size differs" : "",
                  p.bytes !== keeper.bytes ? `${p.bytes > keeper.bytes ? "+" : "−"}${kb(Math.abs(p.bytes - keeper.bytes))}` : "",
                  format(p.path) !== format(keeper.path) ? "format differs" : ""].filter(Boolean).join(", ");
    for (const line of [p.path, `${p.width} × ${p.height} · ${kb(p.bytes)} · ${format(p.path)}`,
                        p.id === g.keep ? "suggested keeper" : `${p.relation}${p.transform && p.transform !== "none" ? `, ${p.transform}` : ""} · score ${p.score.toFixed(2)}${diff ? ` · ${diff}` : ""}`,
                        p.present ? "" : "file gone or changed since indexing"]) {
      if (!line) continue;
      const span = document.createElement("span"); span.textContent = line; cap.append(span);
    }
    const pick = document.createElement("label");
    pick.className = "keep";
    const radio = document.createElement("input");
    radio.type = "radio"; radio.name = `keep-${n}`; radio.value = p.id; radio.checked = p.id === g.chosen; radio.disabled = !p.present;
    radio.addEventListener("change", () => {
      g.chosen = p.id; $("dup-move").disabled = true;
      row.querySelectorAll(".member").forEach((m) => m.classList.toggle("kept", m.contains(radio)));
    });
    pick.append(radio, " keep this one");
    fig.append(img, cap, pick);
    row.append(fig);
  }
  li.append(head, why, row);
  return li;
}

function exportCopies() {
  const list = (state.groups || []).map((g) => {
    const keep = g.photos.find((p) => p.id === g.chosen);
    return { kind: g.kind, keep: keep && { id: keep.id, path: keep.path },
             copies: g.photos.filter((p) => p.id !== g.chosen).map((p) => ({ id: p.id, path: p.path, relation: p.relation, score: p.score })) };
  });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(list, null, 2)], { type: "application/json" }));
  a.download = "dinosearch-duplicates.json";
  document.body.append(a); a.click(); a.remove();
}

// moves go through POST /duplicates/move (token): a dry run first, then the same groups for real
function moveBody(apply) {
  return JSON.stringify({ folder: $("dup-folder").value.trim(), apply,
    groups: (state.groups || []).filter((g) => g.chosen !== null).map((g) => ({ keep: g.chosen, photos: g.photos.map((p) => p.id) })) });
}

async function moveCopies(apply) {
  const status = $("dup-status");
  $("dup-move").disabled = true;
  try {
    const r = await api("/duplicates/move", { method: "POST", body: moveBody(apply), headers: {
      "content-type": "application/json", authorization: `Bearer ${$("dup-token").value || $("token").value}` } });
    const errors = r.errors.length ? `; ${r.errors.length} not: ${r.errors.map((e) => `${e.path} (${e.reason})`).join(", ")}` : "";
    if (!apply) {
      status.textContent = `${r.moved.length} files would move: ${r.moved.map((m) => `${m.source} → ${m.to}`).join(", ")}${errors}.`;
      $("dup-move").disabled = !r.moved.length;
    } else {
      status.textContent = `Moved ${r.moved.length} files${errors}. Undo: dinosearch duplicates IDX --undo ${$("dup-folder").value.trim()}/${r.manifest}; ` +
        "index the folders again so the index forgets them.";
    }
  } catch (e) { status.textContent = e.message; }
}

$("dup-preview").addEventListener("click", () => moveCopies(false));
$("dup-move").addEventListener("click", () => moveCopies(true));
$("review-dups").addEventListener("click", () => reviewDuplicates());
$("dup-kind").addEventListener("change", () => reviewDuplicates());
$("dup-export").addEventListener("click", exportCopies);

// -- index jobs: one at a time from the page, followed stage by stage; a job already running is followed on load

const LIVE = ["queued", "running", "cancelling"];
let following = null;

function jobText(j) {
  const failed = j.failed ? `, ${j.failed} failed` : "";
  if (j.state === "queued") return "Waiting to start…";
  if (j.state === "cancelling") return `Stopping after the current photo; ${j.indexed} indexed so far are kept.`;
  if (j.state === "running") {
    if (j.stage === "indexing") return `Indexing: ${j.done} of ${j.total} photos read, ${j.indexed} searchable${failed}.`;
    if (j.stage === "duplicates") return `Checking the ${j.indexed} new photos for duplicates…`;
    return "Scanning the folder…";
  }
  if (j.state === "done") return j.total ? `Done: ${j.indexed} photos indexed${failed}.` : "Done: nothing new or changed in that folder.";
  if (j.state === "cancelled") return `Cancelled; the ${j.indexed} photos indexed before it stopped are kept.`;
  return sentence(`Failed: ${j.error || "unknown error"}`);
}

async function followJob(id) {
  if (following === id) return;
  following = id;
  const status = $("job-status"), bar = $("job-progress");
  $("index-go").disabled = true; $("job-cancel").hidden = false; bar.hidden = false;
  try {
    for (;;) {
      const j = await api(`/index/jobs/${id}`);
      if (j.stage === "indexing" && j.total) { bar.max = j.total; bar.value = j.done; } else bar.removeAttribute("value");
      status.textContent = jobText(j);
      if (!LIVE.includes(j.state)) break;  // a job cancelled through the API ends too
      await new Promise((r) => setTimeout(r, 700));
    }
    bar.max = 1; bar.value = 1;
    loadStats();
    if (state.view === "browse") browse();
  } catch (e) { status.textContent = e.message; }
  following = null;
  $("index-go").disabled = false; $("job-cancel").hidden = true;
}

$("job-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (following !== null || $("index-go").disabled) return;  // one job at a time from the page
  $("index-go").disabled = true;
  try {
    const job = await api("/index/jobs", {
      method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${$("token").value}` },
      body: JSON.stringify({ folder: $("folder").value }),
    });
    followJob(job.id);
  } catch (e) { $("job-status").textContent = e.message; $("index-go").disabled = false; }
});
$("job-cancel").addEventListener("click", async () => {
  if (following === null) return;
  try {
    await api(`/index/jobs/${following}`, { method: "DELETE", headers: { authorization: `Bearer ${$("token").value}` } });
  } catch (e) { $("job-status").textContent = e.message; }
});

async function loadStats() {
  try {
    const s = await api("/stats");
    $("stats").textContent = `${s.photos_indexed} photos · ${s.model.split("/").pop()} · ${s.precision}` +
      (s.objects ? ` · ${s.objects} objects` : "");
    state.maxK = s.max_k; $("k").max = s.max_k;
    $("objects").disabled = !s.objects;
    const sel = $("label"), keep = sel.value;
    sel.replaceChildren(new Option("any", ""));
    for (const t of await api("/labels?limit=200")) sel.append(new Option(`${t.label} (${t.photos})`, t.label));
    sel.value = keep;
  } catch (e) { $("stats").textContent = e.message; }
}

async function start() {
  draw();
  await loadStats();
  if (!state.file && !state.photoId) browse();
  try {
    const live = (await api("/index/jobs")).find((j) => LIVE.includes(j.state));
    if (live) followJob(live.id);
  } catch { /* the jobs line stays empty */ }
}
start();
