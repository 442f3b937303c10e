// cbr serve: the few things a page does in the browser. No framework, nothing from the network.
"use strict";

function checkedValue(name, fallback) {
  const checked = document.querySelector('input[name="' + name + '"]:checked');
  return checked ? checked.value : fallback;
}

// The method chosen in the switch, or "" for the query-time maps (the first option, the default URLs).
function chosenMethod() {
  const select = document.getElementById("map-method");
  return select && select.selectedIndex > 0 ? select.value : "";
}

// What the page says when a map kind is missing: [for every image, for some of them].
const MISSING_MAPS = {
  class: ["No class maps here: this model has no class head, so there is no class map of the query, and the cases' stored maps are embedding maps. Use the similarity maps.",
          "have no class map (the query's needs a class head; a case's needs a stored class map)."],
  finding: ["No finding maps here: this model has no lesion localiser (it was trained without lesion masks). Use the similarity maps.",
            "have no finding map (a neighbour whose image could not be read again has none)."],
};

// Show each overlay's map of the chosen kind, scale and method; hide it where that map does not exist.
function showMaps() {
  const kind = checkedValue("map-kind", "similarity");
  const scale = checkedValue("map-scale", "shared");
  const method = chosenMethod();
  const extra = "scale=" + encodeURIComponent(scale) + (method ? "&method=" + encodeURIComponent(method) : "");
  document.body.dataset.mapKind = kind;  // the match rings belong to the similarity maps (CSS hides them)
  // the images counted: the query and the neighbours (a region-matching pair's small query copy is
  // drawn with the similarity maps only)
  const counted = [...document.querySelectorAll("img.overlay")].filter((img) => !img.closest(".pair"));
  const missing = counted.filter((img) => !img.dataset[kind]).length;
  const message = document.getElementById("map-message");
  const said = MISSING_MAPS[kind];
  if (message) {
    const all = counted.length;
    message.hidden = !said || missing === 0;
    if (said) message.textContent = missing === all ? said[0] : missing + " of the " + all + " images " + said[1];
  }
  document.querySelectorAll("img.overlay").forEach((img) => {
    const base = img.dataset[kind];
    const src = base && (base + (base.includes("?") ? "&" : "?") + extra);
    if (src) {
      if (img.getAttribute("src") !== src) img.setAttribute("src", src);
      img.classList.remove("none");
    } else {
      img.removeAttribute("src");
      img.classList.add("none");
    }
  });
}

function wireSliders() {
  document.querySelectorAll("input.opacity").forEach((slider) => {
    const apply = () => {
      const target = document.getElementById(slider.dataset.target);
      if (target) target.style.opacity = String(Number(slider.value) / 100);
    };
    slider.addEventListener("input", apply);
    slider.addEventListener("change", apply);
  });
}

// Refine by region: drag a box over the first query image; the form gets fractions of the square.
function wireRegion() {
  const stack = document.getElementById("region-stack");
  const box = document.getElementById("region-box");
  const button = document.getElementById("refine-region");
  if (!stack || !box || !button) return;
  let start = null;
  const frac = (ev) => {
    const r = stack.getBoundingClientRect();
    return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
  };
  const draw = (a, b) => {
    const [x0, x1] = [Math.min(a[0], b[0]), Math.max(a[0], b[0])];
    const [y0, y1] = [Math.min(a[1], b[1]), Math.max(a[1], b[1])];
    box.hidden = false;
    box.style.left = (100 * x0) + "%";
    box.style.top = (100 * y0) + "%";
    box.style.width = (100 * (x1 - x0)) + "%";
    box.style.height = (100 * (y1 - y0)) + "%";
    return [x0, y0, x1, y1];
  };
  stack.addEventListener("mousedown", (ev) => { ev.preventDefault(); start = frac(ev); draw(start, start); });
  stack.addEventListener("mousemove", (ev) => { if (start) draw(start, frac(ev)); });
  window.addEventListener("mouseup", (ev) => {
    if (!start) return;
    const b = draw(start, frac(ev));
    start = null;
    ["x0", "y0", "x1", "y1"].forEach((id, i) => { document.getElementById(id).value = b[i].toFixed(4); });
    const big = (b[2] - b[0]) > 0.02 && (b[3] - b[1]) > 0.02;
    button.disabled = !big;
    document.getElementById("region-text").textContent = big
      ? "box " + b.map((v) => v.toFixed(2)).join(", ") : "box too small; drag a larger one";
    offerLesion(big ? b : null);
  });
}

// The box just drawn may be kept as the lesion box with the verdict (sent as fractions of the square).
function offerLesion(box) {
  const use = document.getElementById("feedback-use-box");
  const field = document.getElementById("feedback-lesion");
  const text = document.getElementById("feedback-box-text");
  if (!use || !field) return;
  use.disabled = !box;
  if (!box) use.checked = false;
  use.dataset.box = box ? box.map((v) => v.toFixed(4)).join(",") : "";
  field.value = use.checked ? use.dataset.box : "";
  if (text) text.textContent = box ? "(box " + box.map((v) => v.toFixed(2)).join(", ") + " of the square)"
    : "(drag a box over the query image first)";
}

function wireLesion() {
  const use = document.getElementById("feedback-use-box");
  const field = document.getElementById("feedback-lesion");
  if (use && field) use.addEventListener("change", () => { field.value = use.checked ? (use.dataset.box || "") : ""; });
}

// The reviewer's name is remembered by this browser (never sent anywhere but with a verdict).
function wireReviewer() {
  const by = document.getElementById("feedback-by");
  const form = document.getElementById("feedback-form");
  if (!by || !form) return;
  try {
    if (!by.value) by.value = window.localStorage.getItem("cbr.reviewer") || "";
    form.addEventListener("submit", () => {
      if (by.value.trim()) window.localStorage.setItem("cbr.reviewer", by.value.trim());
    });
  } catch (e) { /* storage disabled: the field just stays empty */ }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll('input[name="map-kind"], input[name="map-scale"]').forEach((radio) => {
    radio.addEventListener("change", showMaps);
  });
  // A method may lack a map that another has (204): hide the overlay rather than show a broken image.
  document.querySelectorAll("img.overlay").forEach((img) => {
    img.addEventListener("error", () => { if (img.getAttribute("src")) img.classList.add("none"); });
  });
  const methodSelect = document.getElementById("map-method");
  if (methodSelect) methodSelect.addEventListener("change", showMaps);
  showMaps();
  wireSliders();
  const plain = document.getElementById("plain-images");
  if (plain) plain.addEventListener("change", () => { document.body.dataset.plain = plain.checked ? "1" : ""; });
  wireRegion();
  wireLesion();
  wireReviewer();
});
