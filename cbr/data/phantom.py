"""Synthetic MRI-like phantoms with lesion masks: the demo's data and the tests' fixtures.

A phantom is a 2-D axial slice: a bright skull ring around a thin dark CSF rim, a textured brain
with a darker cortical ribbon and (usually) two dark ventricles, a smooth bias field and
Rician-like noise. The classes differ by their lesion:

* ``normal``: no lesion (empty mask);
* ``tumour``: a bright enhancing lesion with an irregular bright rim, a slightly darker core
  and a faint oedema halo around it;
* ``cyst``: a dark, round, sharp-edged lesion.

Geometry is sampled in normalised coordinates (the image spans -1..1), so a patient's anatomy
does not depend on the image size. :func:`make_phantoms` renders several neighbouring slices per
patient from one :func:`sample_patient` draw.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cbr.errors import UnknownNameError

__all__ = ["CLASSES", "phantom", "sample_patient", "make_phantoms", "near_duplicate"]

CLASSES = ("normal", "tumour", "cyst")

_BRAIN_MARGIN = 0.03  # CSF gap between skull and brain, in normalised units


def sample_patient(rng: np.random.Generator) -> dict:
    """Draw one patient's anatomy and lesion geometry (shared by all its slices)."""
    a, b = rng.uniform(0.68, 0.78), rng.uniform(0.80, 0.90)
    skull = rng.uniform(0.05, 0.08)
    brain_a, brain_b = a - skull - _BRAIN_MARGIN, b - skull - _BRAIN_MARGIN
    radius = rng.uniform(0.06, 0.18) * 2  # 6-18% of the image side, in -1..1 units
    # Lesion centre: inside the brain with the whole lesion (and a margin) inside too.
    reach = max(0.0, 1 - (radius + 0.04) / min(brain_a, brain_b))
    theta, rho = rng.uniform(0, 2 * math.pi), reach * math.sqrt(rng.uniform())
    tilt, cx, cy = rng.uniform(-0.15, 0.15), rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    return {
        "head": (a, b, tilt, cx, cy),  # semi-axes, tilt (radians), centre offset
        "skull": skull,
        "brain": rng.uniform(0.42, 0.52),
        "texture_seed": int(rng.integers(2**31)),
        "ventricles": float(rng.uniform(0.7, 1.2)) if rng.uniform() < 0.85 else 0.0,
        "lesion": {
            "u": rho * math.cos(theta),
            "v": rho * math.sin(theta),
            "radius": radius,
            "aspect": rng.uniform(0.85, 1.15),
            "angle": rng.uniform(0, math.pi),
            # (harmonic, amplitude, phase) of the tumour outline
            "wobble": [
                (k, rng.uniform(0.02, 0.08), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)
            ],
        },
        "slice": 0.0,
    }


def _slice_params(params: dict, rng: np.random.Generator, k: int, n: int) -> dict:
    """A neighbouring slice: the lesion shrinks away from the middle slice and drifts a little."""
    p = copy.deepcopy(params)
    z = (k - (n - 1) / 2) / max(n, 2)  # -0.5..0.5 across the stack
    p["slice"] = float(z)
    les = p["lesion"]
    les["radius"] *= math.sqrt(max(0.4, 1 - (1.2 * z) ** 2)) * rng.uniform(0.95, 1.05)
    les["u"] += rng.normal(0, 0.02)
    les["v"] += rng.normal(0, 0.02)
    les["angle"] += rng.normal(0, 0.1)
    a, b, ang, cx, cy = p["head"]
    shrink = 1 - 0.04 * abs(z)
    p["head"] = (a * shrink, b * shrink, ang, cx, cy)
    p["ventricles"] *= 1 - 0.5 * abs(z)
    return p


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about 0..1: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.normal(0.5, 0.18, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _smoothstep(edge: float, width: float, x: np.ndarray) -> np.ndarray:
    """0 below ``edge - width``, 1 above ``edge + width``: anti-aliased region edges."""
    t = np.clip((x - edge + width) / (2 * width), 0, 1)
    return t * t * (3 - 2 * t)


def phantom(
    rng: np.random.Generator,
    label: str,
    size: int = 128,
    *,
    patient_params: dict | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """Render one MRI-like slice of class ``label``: ``(image in mode L, bool lesion mask)``.

    Args:
        rng: source of the noise (and of the anatomy when ``patient_params`` is None).
        label: one of :data:`CLASSES`.
        size: width and height in pixels.
        patient_params: anatomy from :func:`sample_patient`; a new patient when None.

    Example:
        >>> img, mask = phantom(np.random.default_rng(0), "tumour", 128)
    """
    if label not in CLASSES:
        raise UnknownNameError("phantom class", label, CLASSES)
    p = patient_params if patient_params is not None else sample_patient(rng)
    px = 2.0 / size  # one pixel in normalised units
    axis = np.linspace(-1 + px / 2, 1 - px / 2, size, dtype=np.float32)  # float32: twice as fast
    y, x = np.meshgrid(axis, axis, indexing="ij")

    a, b, ang, cx, cy = p["head"]
    c, s = math.cos(ang), math.sin(ang)
    xr, yr = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    # Approximate signed distance to the head outline (negative inside).
    d = (np.sqrt((xr / a) ** 2 + (yr / b) ** 2) - 1) * min(a, b)
    skull = p["skull"]
    aa = max(px, 0.01)

    tex_rng = np.random.default_rng(p["texture_seed"])
    tex = 0.6 * _smooth_noise(tex_rng, size, 6) + 0.4 * _smooth_noise(tex_rng, size, 14)
    # Neighbouring slices share most of the texture and add a little of their own.
    tex = 0.85 * tex + 0.15 * _smooth_noise(rng, size, 14)

    head = 1 - _smoothstep(0.0, aa, d)
    brain = 1 - _smoothstep(-skull - _BRAIN_MARGIN, aa, d)
    inner = 1 - _smoothstep(-skull, aa, d)  # skull's inner edge
    img = 0.85 * (head - inner) + 0.12 * (inner - brain)  # bright skull ring, dark CSF rim
    tissue = p["brain"] + 0.3 * (tex - 0.5)
    # Cortical grey matter: a darker wiggly ribbon just inside the brain edge.
    depth = -(d + skull + _BRAIN_MARGIN)
    ribbon = np.exp(-((depth - 0.04 - 0.03 * tex) / 0.03) ** 2)
    tissue = tissue - 0.12 * ribbon
    img = img + brain * tissue

    if p["ventricles"] > 0:
        img = _ventricles(img, p["ventricles"], xr, yr, brain)

    hard_brain = d < -skull - _BRAIN_MARGIN
    mask = np.zeros((size, size), dtype=bool)
    if label != "normal":
        # the lesion's frame: its centre within the brain ellipse, rotated by its angle
        les = p["lesion"]
        brain_a, brain_b = a - skull - _BRAIN_MARGIN, b - skull - _BRAIN_MARGIN
        lx, ly = xr - les["u"] * brain_a, yr - les["v"] * brain_b
        lc, ls = math.cos(les["angle"]), math.sin(les["angle"])
        img, r = _lesion(img, label, les, lc * lx + ls * ly, -ls * lx + lc * ly, brain, tex, aa, px)
        mask = (r < 1) & hard_brain
    out = _scanner(img, rng, x, y, size)
    return Image.fromarray(out), mask


def _ventricles(img: np.ndarray, vs: float, xr: np.ndarray, yr: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Two dark, tilted ventricles of scale ``vs`` either side of the midline."""
    for side in (-1, 1):
        vx, vy = xr - side * 0.09 * vs, yr + 0.05
        t = side * 0.3
        ux, uy = math.cos(t) * vx + math.sin(t) * vy, -math.sin(t) * vx + math.cos(t) * vy
        rv = np.sqrt((ux / (0.045 * vs)) ** 2 + (uy / (0.17 * vs)) ** 2)
        v = 1 - _smoothstep(1.0, 0.15, rv)
        img = img * (1 - v * brain) + 0.16 * v * brain
    return img


def _lesion(img, label: str, les: dict, ex, ey, brain, tex, aa: float, px: float):
    """Paint a tumour or cyst in the lesion's frame (ex, ey); returns (image, lesion radius field)."""
    rho = np.sqrt((ex / les["aspect"]) ** 2 + (ey * les["aspect"]) ** 2)
    theta = np.arctan2(ey, ex)
    if label == "tumour":
        wobble = sum(amp * np.sin(k * theta + ph) for k, amp, ph in les["wobble"])
        r = rho / (les["radius"] * (1 + wobble))
        inside = (1 - _smoothstep(1.0, aa / les["radius"], r)) * brain
        core = 0.64 + 0.12 * (tex - 0.5)
        rim = 0.36 * np.exp(-((r - 0.85) / 0.11) ** 2)
        halo = 0.10 * np.clip(1 - (r - 1) / 0.7, 0, 1) * (r >= 1) * brain
        img = img * (1 - inside) + (core + rim) * inside + halo * (0.6 + tex)
    else:  # cyst: dark fluid, round, sharp edge, a faint wall
        r = rho / les["radius"]
        inside = (1 - _smoothstep(1.0, 0.5 * px / les["radius"], r)) * brain
        wall = 0.08 * np.exp(-((r - 1.0) / 0.06) ** 2) * brain
        img = img * (1 - inside) + 0.05 * inside + wall
    return img, r


def _scanner(img: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Smooth coil-sensitivity bias field and Rician noise (magnitude of complex Gaussian noise), as uint8."""
    g = [rng.uniform(-1, 1) for _ in range(2)]
    bias = 1 + 0.08 * (g[0] * x + g[1] * y) + 0.1 * (_smooth_noise(rng, size, 3) - 0.5)
    sigma = rng.uniform(0.015, 0.035)
    img = img * bias
    n1, n2 = (sigma * rng.standard_normal(img.shape, dtype=np.float32) for _ in range(2))
    img = np.sqrt((img + n1) ** 2 + n2**2)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def make_phantoms(
    out_dir,
    *,
    patients: int = 30,
    slices: int = 3,
    size: int = 128,
    seed: int = 0,
    classes=CLASSES,
) -> Path:
    """Write a phantom data set with masks and a manifest; return the manifest's path.

    Layout: ``out_dir/images/<patient>_s<slice>.png``, ``out_dir/masks/<patient>_s<slice>.png``
    (0/255, all zero for ``normal``) and ``out_dir/manifest.csv`` with columns
    ``path,label,patient_id,mask,slice`` (paths relative to the CSV). Patients take the classes
    in turn; a patient's slices share anatomy and lesion. The same seed gives the same bytes.

    Example:
        >>> manifest = make_phantoms("data/phantoms", patients=9, slices=2, size=64)
    """
    for label in classes:
        if label not in CLASSES:
            raise UnknownNameError("phantom class", label, CLASSES)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(patients - 1)))
    rows = []
    for i in range(patients):
        label = classes[i % len(classes)]
        pid = f"P{i:0{width}d}"
        rng = np.random.default_rng([seed, i])  # per patient: adding patients keeps the others
        params = sample_patient(rng)
        for k in range(slices):
            sp = _slice_params(params, rng, k, slices)
            img, mask = phantom(rng, label, size, patient_params=sp)
            name = f"{pid}_s{k}.png"
            img.save(out / "images" / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name)
            rows.append([f"images/{name}", label, pid, f"masks/{name}", str(k)])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "patient_id", "mask", "slice"])
        w.writerows(rows)
    return manifest


def near_duplicate(img: Image.Image, seed: int = 0) -> Image.Image:
    """The same image with tiny noise (+-2 grey levels): different bytes, nearly the same pixels."""
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")
    a = np.asarray(img).astype(np.int16)
    noisy = np.clip(a + np.random.default_rng(seed).integers(-2, 3, a.shape), 0, 255)
    if np.array_equal(noisy, a):  # guarantee a difference even for tiny or saturated images
        flat = noisy.reshape(-1)
        flat[0] = flat[0] + 1 if flat[0] < 255 else flat[0] - 1
    return Image.fromarray(noisy.astype(np.uint8))
