// dinosearch web page: query by example, region by box, objects by click or box, parts overlay, index jobs.
// No external code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, photoId: null, img: null, size: null, box: null, point: null, parts: null, drag: null, queryObject: null };
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

function palette(i) {
  const h = (i * 0.618034) % 1;
  return `hsla(${Math.round(h * 360)}, 85%, 50%, 0.45)`;
}

function say(text) { $("message").textContent = text || ""; }

async function api(url, options) {
  const r = await fetch(url, options);
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error((body && (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))) || r.statusText);
  return body;
}

function draw() {
  if (!state.img) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
  ctx.drawImage(state.img, 0, 0, canvas.width, canvas.height);
  if ($("show-parts").checked && state.parts) {
    const g = state.parts.grid, cw = canvas.width / g, ch = canvas.height / g;
    state.parts.labels.forEach((row, r) => row.forEach((lab, c) => {
      ctx.fillStyle = palette(lab);
      ctx.fillRect(c * cw, r * ch, cw + 0.5, ch + 0.5);
    }));
  }
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

async function setFile(file) {
  if (!file) return;
  state.file = file; state.photoId = null; state.box = null; state.point = null; state.parts = null; $("box").value = "";
  const img = new Image();
  img.onload = () => { showImage(img, [img.naturalWidth, img.naturalHeight]); search(); };
  img.onerror = () => say("this file is not an image the browser can show; searching anyway");
  img.src = URL.createObjectURL(file);
}

async function setPhoto(id) {
  state.file = null; state.photoId = id; state.box = null; state.point = null; state.parts = null; $("box").value = "";
  const img = new Image();
  img.onload = () => { showImage(img, [img.naturalWidth, img.naturalHeight]); search(); };
  img.src = `/photos/${id}`;
}

function params() {
  const p = new URLSearchParams({ k: $("k").value || "12" });
  if (state.box) p.set("box", state.box.map(Math.round).join(","));
  if ($("label").value) p.set("label", $("label").value);
  if ($("objects").checked) {
    p.set("objects", "true");
    if (state.point) p.set("point", state.point.map(Math.round).join(","));
  }
  return p;
}

async function search() {
  if (!state.file && !state.photoId) { say("choose a photo first"); return; }
  say("searching…");
  try {
    let res;
    if (state.photoId) {
      res = await api(`/photos/${state.photoId}/similar?${params()}`);
    } else {
      const form = new FormData(); form.append("image", state.file);
      res = await api(`/search?${params()}`, { method: "POST", body: form });
    }
    if (!state.img) state.size = res.query_size;
    state.queryObject = res.query_object || null;
    draw();
    render(res);
    say("");
  } catch (e) { say(e.message); }
  if ($("show-parts").checked) loadParts();
}

function render(res) {
  $("mode").textContent = { region: "(photos containing the region)", objects: "(photos holding a like object)" }[res.mode] || "(similar photos)";
  const ol = $("results"); ol.replaceChildren();
  for (const r of res.results) {
    const li = document.createElement("li");
    li.className = "result";
    const btn = document.createElement("button");
    btn.className = "hit"; btn.type = "button";
    btn.setAttribute("aria-label", `${r.path}, score ${r.score.toFixed(3)}: search like this photo`);
    btn.addEventListener("click", () => setPhoto(r.id));
    const wrap = document.createElement("div"); wrap.className = "thumb";
    const img = document.createElement("img");
    img.alt = r.path; img.loading = "lazy"; img.src = `/photos/${r.id}/thumb?size=320`;
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
    const name = document.createElement("span"); name.textContent = r.path;
    const score = document.createElement("span"); score.textContent = r.score.toFixed(3);
    meta.append(name, score);
    btn.append(wrap, meta); li.append(btn); ol.append(li);
  }
  if (!res.results.length) ol.textContent = "no results";
}

async function loadParts() {
  const k = $("parts-k").value;
  try {
    if (state.photoId) state.parts = await api(`/photos/${state.photoId}/parts?k=${k}`);
    else if (state.file) {
      const form = new FormData(); form.append("image", state.file);
      state.parts = await api(`/parts?k=${k}`, { method: "POST", body: form });
    }
    draw();
  } catch (e) { say(e.message); }
}

// box drawing with mouse, pen or touch; coordinates kept in photo pixels
function toPhoto(ev) {
  const rect = canvas.getBoundingClientRect();
  const s = state.size[0] / rect.width;
  return [Math.max(0, Math.min(state.size[0], (ev.clientX - rect.left) * s)), Math.max(0, Math.min(state.size[1], (ev.clientY - rect.top) * s))];
}
canvas.addEventListener("pointerdown", (ev) => {
  if (!state.size) return;
  canvas.setPointerCapture(ev.pointerId);
  const p = toPhoto(ev); state.dragStart = p; state.drag = [p[0], p[1], p[0], p[1]];
});
canvas.addEventListener("pointermove", (ev) => {
  if (!state.dragStart) return;
  const a = state.dragStart, b = toPhoto(ev);
  state.drag = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  draw();
});
canvas.addEventListener("pointerup", () => {
  if (!state.dragStart) return;
  const d = state.drag, start = state.dragStart; state.dragStart = null; state.drag = null;
  if (d && d[2] - d[0] > 4 && d[3] - d[1] > 4) {
    state.box = d; state.point = null; $("box").value = d.map(Math.round).join(",");
    search();
  } else if ($("objects").checked) {  // a click: the object under it
    state.point = start; state.box = null; $("box").value = "";
    search();
  }
  draw();
});

$("controls").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("box").value.trim();
  if (v) {
    const b = v.split(",").map(Number);
    if (b.length !== 4 || b.some(isNaN)) { say("box must be x0,y0,x1,y1"); return; }
    state.box = b;
  } else state.box = null;
  draw(); search();
});
$("label").addEventListener("change", () => search());
$("objects").addEventListener("change", () => {
  $("objects-help").hidden = !$("objects").checked;
  state.point = null; state.queryObject = null; draw();
  if (state.file || state.photoId) search();
});
$("clear").addEventListener("click", () => { state.box = null; state.point = null; $("box").value = ""; draw(); search(); });
$("show-parts").addEventListener("change", () => { if ($("show-parts").checked) loadParts(); else draw(); });
$("parts-k").addEventListener("change", () => { if ($("show-parts").checked) loadParts(); });
$("file").addEventListener("change", (ev) => setFile(ev.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); setFile(ev.dataTransfer.files[0]); });

$("job-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = $("job-status"), bar = $("job-progress");
  try {
    const job = await api("/index/jobs", {
      method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${$("token").value}` },
      body: JSON.stringify({ folder: $("folder").value }),
    });
    bar.hidden = false;
    for (;;) {
      const j = await api(`/index/jobs/${job.id}`);
      bar.max = Math.max(1, j.total); bar.value = j.done;
      status.textContent = `${j.state}: ${j.done} / ${j.total} photos, ${j.indexed} indexed, ${j.failed} failed${j.error ? " — " + j.error : ""}`;
      if (["done", "failed", "cancelled"].includes(j.state)) break;  // a job cancelled through the API ends too
      await new Promise((r) => setTimeout(r, 700));
    }
    loadStats();
  } catch (e) { status.textContent = e.message; }
});

async function loadStats() {
  try {
    const s = await api("/stats");
    $("stats").textContent = `${s.photos_indexed} photos · ${s.model.split("/").pop()} · ${s.precision}` +
      (s.objects ? ` · ${s.objects} objects` : "");
    $("objects").disabled = !s.objects;
    const sel = $("label"), keep = sel.value;
    sel.replaceChildren(new Option("any", ""));
    for (const t of await api("/labels?limit=200")) sel.append(new Option(`${t.label} (${t.photos})`, t.label));
    sel.value = keep;
  } catch (e) { $("stats").textContent = e.message; }
}
loadStats();
