"""A beating-heart thorax phantom for cine (bSSFP) short-axis and long-axis series.

Geometry (soft-edged ellipses, anti-aliased over one pixel): body with a subcutaneous fat layer, chest-wall muscle,
two lungs, liver (towards the apex), and the heart: LV blood pool inside a myocardial ring whose area is conserved while
the cavity contracts (so the wall thickens in systole), an RV crescent, and in the long-axis views the atria, which fill
while the ventricles empty. Contraction follows a systole (first 35 % of the R-R interval) / diastole curve. Image
intensity = Σ tissue fraction × bSSFP signal of that tissue (:func:`utils.simulation.tissue.bssfp`), so blood is bright
and myocardium dark as in real cine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.simulation.tissue import CARDIAC_TISSUES, Acquisition, tissue_signals


@dataclass(frozen=True)
class HeartSubject:
    """Random properties of one cardiac subject (all lengths in mm, relative to the image centre).

    Attributes:
        heart_center: (row, col) offset of the LV centre from the image centre.
        lv_radius: end-diastolic LV cavity radius at the base.
        wall: end-diastolic myocardial wall thickness.
        radius_ef: fractional radius reduction at end systole.
        body_axes: (AP, LR) semi-axes of the body.
        fat_mm: subcutaneous fat thickness.
        lax_angle: in-plane rotation (radians) of the long-axis views.
        tissue_variation: ``[len(CARDIAC_TISSUES), 3]`` factors on (T1, T2, PD).
    """

    heart_center: tuple[float, float]
    lv_radius: float
    wall: float
    radius_ef: float
    body_axes: tuple[float, float]
    fat_mm: float
    lax_angle: float
    tissue_variation: np.ndarray


def sample_heart(rng: np.random.Generator) -> HeartSubject:
    """Draw a random heart/thorax."""
    return HeartSubject(
        heart_center=(float(rng.uniform(-15, 5)), float(rng.uniform(-5, 20))),
        lv_radius=float(rng.uniform(22.0, 28.0)),
        wall=float(rng.uniform(8.0, 11.0)),
        radius_ef=float(rng.uniform(0.22, 0.35)),
        body_axes=(float(rng.uniform(95.0, 120.0)), float(rng.uniform(150.0, 180.0))),
        fat_mm=float(rng.uniform(6.0, 18.0)),
        lax_angle=float(rng.uniform(-0.4, 0.4)),
        tissue_variation=np.clip(rng.normal(1.0, [0.05, 0.05, 0.03], size=(len(CARDIAC_TISSUES), 3)), 0.85, 1.15),
    )


def contraction(phase: float) -> float:
    """Contraction state in [0, 1] at cardiac phase ``phase`` in [0, 1) (0 = end diastole, peak at 0.35)."""
    if phase < 0.35:
        return float(np.sin(np.pi * phase / 0.7) ** 2)
    return float(0.5 * (1.0 + np.cos(np.pi * (phase - 0.35) / 0.65)))


def _ellipse(yy, xx, center, axes, angle: float, pixel_mm: float) -> np.ndarray:
    """Soft ellipse indicator (1 inside, 0 outside, linear over about one pixel at the edge)."""
    c, s = np.cos(angle), np.sin(angle)
    u = (yy - center[0]) * c + (xx - center[1]) * s
    v = -(yy - center[0]) * s + (xx - center[1]) * c
    rho = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2)
    return np.clip(0.5 - (rho - 1.0) * min(axes) / pixel_mm, 0.0, 1.0)


def heart_fractions(
    subject: HeartSubject, view: str, slice_idx: int, num_slices: int, phase: float, shape: tuple[int, int],
    pixel_mm: float,
) -> np.ndarray:  # fmt: skip
    """Tissue fractions of one slice at one cardiac phase.

    Args:
        subject: the subject.
        view: ``"sax"`` (short axis; slice 0 = base) or ``"lax"`` (long axis; slices are rotated views).
        slice_idx, num_slices: position in the stack.
        phase: cardiac phase in [0, 1).
        shape: ``(h, w)``.
        pixel_mm: pixel size.

    Returns:
        float32 ``[len(CARDIAC_TISSUES), h, w]`` (order of :data:`CARDIAC_TISSUES`).
    """
    h, w = shape
    yy, xx = np.meshgrid((np.arange(h) - h / 2 + 0.5) * pixel_mm, (np.arange(w) - w / 2 + 0.5) * pixel_mm, indexing="ij")
    c = contraction(phase)
    ap, lr = subject.body_axes
    body = _ellipse(yy, xx, (0, 0), (ap, lr), 0.0, pixel_mm)
    inner = _ellipse(yy, xx, (0, 0), (ap - subject.fat_mm, lr - subject.fat_mm), 0.0, pixel_mm)
    cavity = _ellipse(yy, xx, (0, 0), (ap - subject.fat_mm - 12, lr - subject.fat_mm - 12), 0.0, pixel_mm)
    lungs = np.maximum(
        _ellipse(yy, xx, (-5, -0.5 * lr), (0.75 * ap, 0.35 * lr), 0.1, pixel_mm),
        _ellipse(yy, xx, (-5, 0.5 * lr), (0.75 * ap, 0.33 * lr), -0.1, pixel_mm),
    )
    depth = slice_idx / max(num_slices - 1, 1)
    hc = subject.heart_center
    rb0 = subject.lv_radius
    if view == "sax":
        taper = np.sqrt(max(1.0 - 0.85 * depth**2, 0.05))
        rb = rb0 * taper * (1.0 - subject.radius_ef * c)
        ro0 = rb0 * taper + subject.wall
        ro = np.sqrt(rb**2 + ro0**2 - (rb0 * taper) ** 2)  # myocardial area conserved: the wall thickens
        lv_out = _ellipse(yy, xx, hc, (ro, ro), 0.0, pixel_mm)
        lv_blood = _ellipse(yy, xx, hc, (rb, rb), 0.0, pixel_mm)
        rv_c = (hc[0] - 0.3 * ro, hc[1] - 0.9 * ro)
        rv_scale = taper * (1.0 - 0.2 * c)
        rv = _ellipse(yy, xx, rv_c, (1.25 * ro * rv_scale, 0.85 * ro * rv_scale), 0.5, pixel_mm) * (1 - lv_out)
        atria = np.zeros_like(yy)
        liver = _ellipse(yy, xx, (0.5 * ap, -0.35 * lr), (0.6 * ap, 0.55 * lr), 0.0, pixel_mm) * depth
    else:
        ang = subject.lax_angle + (slice_idx - (num_slices - 1) / 2) * 0.5
        long0 = 2.2 * rb0
        rb = rb0 * (1.0 - subject.radius_ef * c)
        la = long0 * (1.0 - 0.12 * c)
        apex_dir = np.array([np.cos(ang), np.sin(ang)])
        lv_c = (hc[0] + 0.3 * la * apex_dir[0], hc[1] + 0.3 * la * apex_dir[1])
        area0 = (long0 + subject.wall) * (rb0 + subject.wall) - long0 * rb0
        wall = area0 / (la + rb)  # thickening, area approximately conserved
        lv_out = _ellipse(yy, xx, lv_c, (la + wall, rb + wall), ang, pixel_mm)
        lv_blood = _ellipse(yy, xx, lv_c, (la, rb), ang, pixel_mm)
        side = np.array([-apex_dir[1], apex_dir[0]])
        rv_c = (lv_c[0] + side[0] * 1.6 * rb0, lv_c[1] + side[1] * 1.6 * rb0)
        rv = _ellipse(yy, xx, rv_c, (0.9 * la, 0.7 * rb0 * (1 - 0.2 * c)), ang, pixel_mm) * (1 - lv_out)
        base = (lv_c[0] - 1.25 * la * apex_dir[0], lv_c[1] - 1.25 * la * apex_dir[1])
        atr = (1.0 + 0.15 * c) * 0.75 * rb0
        atria = np.maximum(
            _ellipse(yy, xx, base, (atr, atr * 1.1), ang, pixel_mm),
            _ellipse(yy, xx, (base[0] + side[0] * 1.5 * rb0, base[1] + side[1] * 1.5 * rb0), (atr, atr), ang, pixel_mm),
        ) * (1 - lv_out)  # fmt: skip
        liver = _ellipse(yy, xx, (0.55 * ap, -0.3 * lr), (0.5 * ap, 0.5 * lr), 0.0, pixel_mm)
    heart = np.maximum(np.maximum(lv_out, rv), atria)
    blood = np.maximum(np.maximum(lv_blood, rv), atria)
    myo = np.clip(lv_out - lv_blood, 0, 1)
    # Epicardial fat: a thin ring around the heart.
    epi = np.clip(_ellipse(yy, xx, hc, (rb0 * 1.9 + subject.wall, rb0 * 1.9 + subject.wall), 0.0, pixel_mm) - heart, 0, 1)
    epi *= 0.25
    lung = np.clip(lungs * cavity - heart - epi, 0, 1)
    liver = np.clip(liver * cavity - heart - lung, 0, 1)
    fat = np.clip(body - inner, 0, 1) + epi * cavity
    muscle = np.clip(inner - heart * cavity - lung - liver - epi * cavity, 0, 1)
    out = {"myocardium": myo * cavity, "blood": blood * cavity, "fat": fat, "muscle": muscle, "liver": liver, "lung": lung}
    return np.stack([out[t] for t in CARDIAC_TISSUES]).astype(np.float32)


def render_cine(
    subject: HeartSubject, view: str, num_slices: int, num_frames: int, shape: tuple[int, int], pixel_mm: float,
    acq: Acquisition,
) -> np.ndarray:  # fmt: skip
    """Magnitude cine series.

    Args:
        subject: the subject.
        view: ``"sax"`` or ``"lax"``.
        num_slices, num_frames: stack size.
        shape: ``(h, w)`` per image.
        pixel_mm: pixel size.
        acq: the (bSSFP) acquisition that sets tissue signals.

    Returns:
        float32 ``[num_slices, num_frames, h, w]``.
    """
    sig = tissue_signals(CARDIAC_TISSUES, acq, subject.tissue_variation).astype(np.float32)
    out = np.empty((num_slices, num_frames) + tuple(shape), dtype=np.float32)
    for z in range(num_slices):
        for t in range(num_frames):
            frac = heart_fractions(subject, view, z, num_slices, t / num_frames, shape, pixel_mm)
            out[z, t] = np.tensordot(sig, frac, axes=(0, 0))
    return out
