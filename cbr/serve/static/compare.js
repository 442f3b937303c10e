// cbr serve's compare view: the query and one neighbour side by side, on two canvases that share
// one zoom and centre (linked zoom and pan), one window/level and one map opacity. No framework,
// nothing from the network: a few hundred lines do what a tiled deep-zoom viewer would, for images
// of at most a few megapixels.
"use strict";

const view = { zoom: 1, cx: 0.5, cy: 0.5, level: 128, width: 256, opacity: 0.5, map: "similarity", full: false,
               voi: "" };
const panes = [];
const MAX_ZOOM = 32;

function loadImage(url) {
  return new Promise((resolve) => {
    if (!url) { resolve(null); return; }
    const img = new Image();
    img.onload = () => resolve(img.naturalWidth > 0 ? img : null);
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

function withParams(url) {
  const extra = (view.full ? "&full=1" : "") + (view.voi ? "&window=" + encodeURIComponent(view.voi) : "");
  return url + extra;
}

// The base image through the window/level lookup table, into an offscreen canvas (redone only when
// the window or the picture changes, never on a pan or zoom).
function windowed(pane) {
  const img = pane.base;
  if (!img) return null;
  const key = [view.level, view.width, img.src].join("|");
  if (pane.windowedKey === key) return pane.windowedCanvas;
  const c = pane.windowedCanvas || document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  if (view.level !== 128 || view.width !== 256) {
    const lut = new Uint8ClampedArray(256);
    const lo = view.level - view.width / 2;
    for (let v = 0; v < 256; v++) lut[v] = Math.round(((v - lo) / view.width) * 255);
    const data = ctx.getImageData(0, 0, c.width, c.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      px[i] = lut[px[i]]; px[i + 1] = lut[px[i + 1]]; px[i + 2] = lut[px[i + 2]];
    }
    ctx.putImageData(data, 0, 0);
  }
  pane.windowedCanvas = c;
  pane.windowedKey = key;
  return c;
}

// Where the square image lies on a canvas: its side and top-left corner in canvas pixels.
function placement(canvas) {
  const side = Math.min(canvas.width, canvas.height) * view.zoom;
  return { side, left: canvas.width / 2 - view.cx * side, top: canvas.height / 2 - view.cy * side };
}

function drawMarks(ctx, pane, at) {
  const ring = view.map === "similarity" ? pane.ring : null;  // the match belongs to the similarity maps
  if (ring) {
    const x = at.left + ring[0] * at.side, y = at.top + ring[1] * at.side;
    const r = Math.max(10, 0.045 * at.side);
    ctx.lineWidth = 3; ctx.strokeStyle = "#fff";
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
    ctx.lineWidth = 1.5; ctx.strokeStyle = "#000";
    ctx.beginPath(); ctx.arc(x, y, r + 3, 0, 2 * Math.PI); ctx.stroke();
  }
  // the region a region query searched, or a neighbour's finding nearest to it: in every mode; the
  // lesion localiser's region belongs to its map, so only with the finding map
  const region = pane.region;
  if (region && (region.source !== "localiser" || view.map === "finding")) {
    region.boxes.forEach((b) => {
      const [x, y, w, h] = [at.left + b[0] * at.side, at.top + b[1] * at.side, (b[2] - b[0]) * at.side,
                            (b[3] - b[1]) * at.side];
      ctx.lineWidth = 4; ctx.strokeStyle = "#000"; ctx.strokeRect(x, y, w, h);
      ctx.lineWidth = 2; ctx.strokeStyle = "#00e5ff"; ctx.strokeRect(x, y, w, h);
    });
  }
  const box = pane.lesion;
  if (box) {
    ctx.setLineDash([6, 4]); ctx.lineWidth = 2; ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(at.left + box[0] * at.side, at.top + box[1] * at.side,
                   (box[2] - box[0]) * at.side, (box[3] - box[1]) * at.side);
    ctx.setLineDash([]);
  }
}

function draw() {
  panes.forEach((pane) => {
    const canvas = pane.canvas;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const at = placement(canvas);
    const base = windowed(pane);
    if (base) {
      // Upscaled pixels stay visible as squares (as a PACS viewer shows them); downscaled ones are smoothed.
      ctx.imageSmoothingEnabled = at.side < base.width;
      ctx.drawImage(base, at.left, at.top, at.side, at.side);
    }
    const overlay = pane.maps[view.map];
    if (overlay && view.opacity > 0) {
      ctx.imageSmoothingEnabled = true;
      ctx.globalAlpha = view.opacity;
      ctx.drawImage(overlay, at.left, at.top, at.side, at.side);
      ctx.globalAlpha = 1;
    }
    drawMarks(ctx, pane, at);
  });
  const text = document.getElementById("zoom-text");
  const pane = panes[0];
  if (text && pane && pane.base) {
    const shown = placement(pane.canvas).side / pane.base.naturalWidth;
    text.textContent = "zoom " + view.zoom.toFixed(1) + "\u00d7 · " + pane.base.naturalWidth + " px image, "
      + shown.toFixed(2) + " screen px per image px" + (view.full ? " (full resolution)" : "");
  }
  const wl = document.getElementById("wl-text");
  if (wl) wl.textContent = "L " + Math.round(view.level) + " W " + Math.round(view.width);
}

function resize() {
  // one size for both panes, so the linked views show the same part at the same scale
  const box = panes[0].canvas.parentElement.getBoundingClientRect();
  const top = panes[0].canvas.getBoundingClientRect().top;
  const width = Math.max(200, Math.floor(box.width - 14));
  const height = Math.floor(Math.min(Math.max(240, window.innerHeight - top - 70), width * 1.05));
  panes.forEach((pane) => { pane.canvas.width = width; pane.canvas.height = height; });
  draw();
}

function zoomAt(factor, fx, fy) {
  // Keep the image point under (fx, fy) (fractions of the canvas) where it is.
  const canvas = panes[0].canvas;
  const before = placement(canvas);
  const px = (fx * canvas.width - before.left) / before.side, py = (fy * canvas.height - before.top) / before.side;
  view.zoom = Math.min(MAX_ZOOM, Math.max(0.5, view.zoom * factor));
  const side = Math.min(canvas.width, canvas.height) * view.zoom;
  view.cx = px - (fx * canvas.width - canvas.width / 2) / side;
  view.cy = py - (fy * canvas.height - canvas.height / 2) / side;
  draw();
}

function setWindow(level, width) {
  view.level = Math.min(255, Math.max(0, level));
  view.width = Math.min(512, Math.max(2, width));
  document.getElementById("wl-level").value = String(Math.round(view.level));
  document.getElementById("wl-width").value = String(Math.round(view.width));
  draw();
}

function wirePointer(canvas) {
  let drag = null;
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("pointerdown", (ev) => {
    canvas.setPointerCapture(ev.pointerId);
    drag = { x: ev.clientX, y: ev.clientY, wl: ev.shiftKey || ev.button === 2, level: view.level, width: view.width,
             cx: view.cx, cy: view.cy };
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (drag.wl) {  // right: wider, down: brighter (the level goes down), as PACS viewers do
      setWindow(drag.level - dy, drag.width + 2 * dx);
    } else {
      const side = placement(canvas).side;
      view.cx = drag.cx - dx / side;
      view.cy = drag.cy - dy / side;
      draw();
    }
  });
  const end = () => { drag = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = canvas.getBoundingClientRect();
    zoomAt(ev.deltaY < 0 ? 1.25 : 0.8, (ev.clientX - r.left) / r.width, (ev.clientY - r.top) / r.height);
  }, { passive: false });
}

function wireKeys(root) {
  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target && ev.target.tagName) || "";
    if (["INPUT", "SELECT", "TEXTAREA", "BUTTON"].includes(tag) || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const onCanvas = tag === "CANVAS";
    const step = 0.1 / view.zoom;
    const go = (url) => { if (url) window.location.assign(url); };
    const keys = {
      "+": () => zoomAt(1.25, 0.5, 0.5), "=": () => zoomAt(1.25, 0.5, 0.5), "-": () => zoomAt(0.8, 0.5, 0.5),
      "n": () => go(root.dataset.next), "p": () => go(root.dataset.prev),
      "ArrowRight": () => (onCanvas ? (view.cx += step, draw()) : go(root.dataset.next)),
      "ArrowLeft": () => (onCanvas ? (view.cx -= step, draw()) : go(root.dataset.prev)),
      "ArrowUp": () => (onCanvas ? (view.cy -= step, draw()) : null),
      "ArrowDown": () => (onCanvas ? (view.cy += step, draw()) : null),
    };
    if (keys[ev.key]) { ev.preventDefault(); keys[ev.key](); }
  });
}

async function loadPictures(root) {
  const [q, nb] = await Promise.all([loadImage(withParams(root.dataset.query)),
                                     loadImage(withParams(root.dataset.neighbour))]);
  panes[0].base = q; panes[1].base = nb;
  draw();
}

async function loadMaps(root) {
  const names = ["similarity", "class", "finding"];
  const urls = names.flatMap((k) => [root.dataset["query" + k[0].toUpperCase() + k.slice(1)],
                                     root.dataset["neighbour" + k[0].toUpperCase() + k.slice(1)]]);
  const imgs = await Promise.all(urls.map(loadImage));
  names.forEach((k, i) => { panes[0].maps[k] = imgs[2 * i]; panes[1].maps[k] = imgs[2 * i + 1]; });
  showMapNote();
  draw();
}

// Say so where a map of the chosen kind does not exist, rather than show nothing without a word.
function showMapNote() {
  const note = document.getElementById("map-note");
  const missing = ["query", "neighbour"].filter((_, i) => !panes[i].maps[view.map]);
  const why = { class: " (this model has no class head)", finding: " (this model has no lesion localiser)" };
  note.textContent = missing.length ? "no " + view.map + " map of the " + missing.join(" or the ") + (why[view.map] || "") : "";
}

function wireControls(root) {
  document.getElementById("zoom-in").addEventListener("click", () => zoomAt(1.25, 0.5, 0.5));
  document.getElementById("zoom-out").addEventListener("click", () => zoomAt(0.8, 0.5, 0.5));
  document.getElementById("zoom-fit").addEventListener("click", () => { Object.assign(view, { zoom: 1, cx: 0.5, cy: 0.5 }); draw(); });
  const full = document.getElementById("full-res");
  full.addEventListener("click", () => {
    view.full = !view.full;
    full.setAttribute("aria-pressed", String(view.full));
    loadPictures(root);
  });
  const level = document.getElementById("wl-level"), width = document.getElementById("wl-width");
  const fromSliders = () => setWindow(Number(level.value), Number(width.value));
  [level, width].forEach((s) => { s.addEventListener("input", fromSliders); s.addEventListener("change", fromSliders); });
  document.getElementById("wl-preset").addEventListener("change", (ev) => {
    const [l, w] = ev.target.value.split(",").map(Number);
    setWindow(l, w);
  });
  const voi = document.getElementById("voi-window");
  if (voi) voi.addEventListener("change", () => { view.voi = voi.value; loadPictures(root); });
  const opacity = document.getElementById("map-opacity");
  const fromOpacity = () => { view.opacity = Number(opacity.value) / 100; draw(); };
  opacity.addEventListener("input", fromOpacity);
  opacity.addEventListener("change", fromOpacity);
  document.querySelectorAll('input[name="compare-map"]').forEach((radio) => {
    radio.addEventListener("change", () => { view.map = radio.value; showMapNote(); draw(); });
  });
}

// The map kind checked when the page loads (the finding map when the model has a localiser).
function checkedMap() {
  const checked = document.querySelector('input[name="compare-map"]:checked');
  return checked ? checked.value : "similarity";
}

function numbers(text) {
  return text ? text.split(",").map(Number) : null;
}

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("compare");
  if (!root) return;
  const size = Number(root.dataset.matchSize || 0);
  const ring = (t) => (size && t ? numbers(t).map((v) => v / size) : null);
  const region = (boxes, source) => (boxes ? { boxes: boxes.split(";").map(numbers), source } : null);
  panes.push({ canvas: document.getElementById("pane-query"), maps: {}, ring: ring(root.dataset.matchQuery),
               lesion: numbers(root.dataset.lesion),
               region: region(root.dataset.regionQuery, root.dataset.regionQuerySource) });
  panes.push({ canvas: document.getElementById("pane-neighbour"), maps: {}, ring: ring(root.dataset.matchCase),
               lesion: null, region: region(root.dataset.regionCase, root.dataset.regionCaseSource) });
  view.map = checkedMap();
  panes.forEach((pane) => wirePointer(pane.canvas));
  wireKeys(root);
  wireControls(root);
  window.addEventListener("resize", resize);
  // the compare view exposes its state to tests and to the console, read-only by convention
  window.cbrCompare = view;
  resize();
  loadPictures(root);
  loadMaps(root);
});
