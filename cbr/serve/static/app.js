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

// Show each overlay's map of the chosen kind, scale and method; hide it where that map does not exist.
function showMaps() {
  const kind = checkedValue("map-kind", "similarity");
  const scale = checkedValue("map-scale", "shared");
  const method = chosenMethod();
  const extra = "scale=" + encodeURIComponent(scale) + (method ? "&method=" + encodeURIComponent(method) : "");
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
  });
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
  wireRegion();
});
