"""Subject-specific brain anatomy from the MNI152 2009 template shipped with nilearn.

The template's GM/WM probability maps and brain mask (1 mm, 197×233×189, RAS world coordinates in mm) give partial-volume
tissue fractions; CSF = brain mask − GM − WM. Each simulated subject gets

* a random affine (in-plane rotation, small tilt, anisotropic scaling, shift) and a smooth random displacement field
  (a sum of a few low-frequency 3-D sinusoids, a few mm), so no two subjects share the exact anatomy;
* per-tissue T1/T2/PD variation and a smooth multiplicative proton-density texture;
* a scalp (skull = signal void, then a subcutaneous fat layer) grown around the brain;
* optionally white-matter hyperintensities (soft ellipsoids inside WM) recorded per slice as fastMRI+-style
  pathology labels with bounding boxes.

Image convention: rows run anterior (top) → posterior, columns run patient right → left (radiological), slices inferior →
superior, the way fastMRI brain reconstructions are displayed. Slices sit around the lateral ventricles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from utils.simulation.tissue import BRAIN_TISSUES, Acquisition, tissue_signals

WMH_LABEL = "Nonspecific white matter lesion"


@dataclass(frozen=True)
class MNITissues:
    """Tissue fraction volumes on the MNI grid (float32 ``[X, Y, Z]`` in [0, 1]) and their voxel-to-mm affine."""

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    affine: np.ndarray
    wm_core: np.ndarray  # int32 [N, 3] voxel indices with WM probability > 0.95 (lesion seeds)


@functools.lru_cache(maxsize=1)
def load_mni_tissues() -> MNITissues:
    """Load (once per process) the nilearn MNI152 2009 GM/WM maps and brain mask, offline from the wheel."""
    from nilearn import datasets  # imported lazily: nilearn import is slow

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    gm = np.asarray(gm_img.get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.clip(wm, 0.0, 1.0)
    gm = np.clip(gm, 0.0, 1.0)
    # Probabilities may overlap slightly; renormalise so wm + gm <= 1 before deriving CSF.
    tot = wm + gm
    over = tot > 1.0
    wm[over] /= tot[over]
    gm[over] /= tot[over]
    csf = np.clip(mask - wm - gm, 0.0, 1.0).astype(np.float32)
    core = np.argwhere(wm > 0.95).astype(np.int32)
    return MNITissues(wm=wm, gm=gm, csf=csf, affine=np.asarray(gm_img.affine, dtype=np.float64), wm_core=core)


@dataclass(frozen=True)
class Lesion:
    """A soft ellipsoidal white-matter hyperintensity in MNI mm coordinates."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]


@dataclass(frozen=True)
class BrainSubject:
    """Everything random about one simulated subject (anatomy, tissue properties); draw with :func:`sample_subject`.

    Attributes:
        rotation: 3×3 matrix applied to subject coordinates before sampling the template.
        scale: per-axis scaling (x, y, z).
        shift_mm: translation (mm).
        warp_k: ``[K, 3]`` wave vectors (rad/mm) of the smooth displacement field.
        warp_phase: ``[K]`` phases.
        warp_amp: ``[K, 3]`` displacement amplitudes (mm).
        z_center_mm: MNI z of the centre of the slice stack.
        tissue_variation: ``[len(BRAIN_TISSUES), 3]`` factors on (T1, T2, PD).
        skull_mm: (inner, outer) distance from the brain surface of the bone shell, then the fat layer to ``scalp_mm``.
        scalp_mm: outer edge of the scalp fat.
        lesions: white-matter hyperintensities (may be empty).
        texture_seed: seed of the smooth PD texture.
    """

    rotation: np.ndarray
    scale: np.ndarray
    shift_mm: np.ndarray
    warp_k: np.ndarray
    warp_phase: np.ndarray
    warp_amp: np.ndarray
    z_center_mm: float
    tissue_variation: np.ndarray
    skull_mm: tuple[float, float]
    scalp_mm: float
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)
    texture_seed: int = 0


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix from angles in radians about z (in-plane), x and y."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def sample_subject(rng: np.random.Generator, lesion_prob: float = 0.3, max_lesions: int = 6) -> BrainSubject:
    """Draw a random subject.

    Args:
        rng: the generator.
        lesion_prob: probability that the subject has white-matter hyperintensities.
        max_lesions: at most this many lesions.

    Returns:
        The :class:`BrainSubject`.
    """
    rot = _rotation(*np.deg2rad(rng.uniform([-6.0, -4.0, -3.0], [6.0, 4.0, 3.0])))
    scale = rng.uniform(0.92, 1.08, size=3) * rng.uniform(0.95, 1.05)
    shift = rng.uniform(-4.0, 4.0, size=3)
    k_num = 6
    wavelength = rng.uniform(60.0, 160.0, size=k_num)
    direction = rng.standard_normal((k_num, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    warp_k = direction * (2 * np.pi / wavelength)[:, None]
    warp_phase = rng.uniform(0, 2 * np.pi, size=k_num)
    warp_amp = rng.normal(0.0, 1.5, size=(k_num, 3))
    variation = np.clip(rng.normal(1.0, [0.05, 0.05, 0.03], size=(len(BRAIN_TISSUES), 3)), 0.85, 1.15)
    z_center = float(rng.uniform(15.0, 25.0))
    skull_in = float(rng.uniform(1.5, 3.0))
    skull_out = skull_in + float(rng.uniform(4.0, 7.0))
    scalp = skull_out + float(rng.uniform(3.0, 6.0))

    lesions: list[Lesion] = []
    if rng.random() < lesion_prob:
        tissues = load_mni_tissues()
        # Lesion seeds: deep WM voxels within the covered slab, in mm.
        core_mm = tissues.wm_core @ tissues.affine[:3, :3].T + tissues.affine[:3, 3]
        slab = core_mm[np.abs(core_mm[:, 2] - z_center) < 30.0]
        for _ in range(int(rng.integers(1, max_lesions + 1))):
            c = slab[int(rng.integers(len(slab)))]
            radii = rng.uniform([2.5, 2.5, 2.0], [7.0, 7.0, 5.0])
            lesions.append(Lesion(center=tuple(float(v) for v in c), radii=tuple(float(v) for v in radii)))
    return BrainSubject(
        rotation=rot,
        scale=scale,
        shift_mm=shift,
        warp_k=warp_k,
        warp_phase=warp_phase,
        warp_amp=warp_amp,
        z_center_mm=z_center,
        tissue_variation=variation,
        skull_mm=(skull_in, skull_out),
        scalp_mm=scalp,
        lesions=tuple(lesions),
        texture_seed=int(rng.integers(2**31)),
    )


@dataclass
class BrainSlices:
    """Tissue fractions of a slice stack.

    Attributes:
        fractions: float32 ``[len(BRAIN_TISSUES), S, h, w]`` partial-volume fractions (sum <= 1; air = remainder).
        pathology: per slice, the list of labels (one per lesion visible in that slice).
        boxes: per slice, ``(x, y, width, height, label)`` boxes in pixel units of the ``h × w`` grid.
        slice_z_mm: MNI z (before the subject transform) of each slice.
    """

    fractions: np.ndarray
    pathology: list[list[str]]
    boxes: list[list[tuple[int, int, int, int, str]]]
    slice_z_mm: np.ndarray


def _slice_positions(num_slices: int, z_center: float, thickness_mm: float) -> np.ndarray:
    """Slice centres: ``thickness_mm`` apart, shrunk so the stack never exceeds 100 mm (the brain's extent)."""
    spacing = min(thickness_mm, 100.0 / max(num_slices, 1))
    return z_center + (np.arange(num_slices) - (num_slices - 1) / 2.0) * spacing


def brain_slices(
    subject: BrainSubject,
    num_slices: int,
    shape: tuple[int, int],
    pixel_mm: float,
    slice_thickness_mm: float = 5.0,
) -> BrainSlices:
    """Sample the subject's tissue fractions on an axial slice stack.

    Args:
        subject: the subject.
        num_slices: S.
        shape: in-plane ``(h, w)`` (rows anterior→posterior, columns right→left).
        pixel_mm: in-plane pixel size (square pixels).
        slice_thickness_mm: nominal slice spacing.

    Returns:
        :class:`BrainSlices`.
    """
    tissues = load_mni_tissues()
    h, w = shape
    # Supersample coarse grids (test sizes have ~7 mm pixels) so partial volumes are area averages, not point samples.
    ss = int(np.clip(np.ceil(pixel_mm / 1.2), 1, 4))
    hs, ws = h * ss, w * ss
    step = pixel_mm / ss
    y = (hs / 2.0 - (np.arange(hs) + 0.5)) * step  # anterior at the top
    x = (ws / 2.0 - (np.arange(ws) + 0.5)) * step  # patient right on image left
    zs = _slice_positions(num_slices, subject.z_center_mm, slice_thickness_mm)

    inv_aff = np.linalg.inv(tissues.affine)
    centre = np.array([0.0, -18.0, subject.z_center_mm])
    mat = subject.rotation * subject.scale[None, :]
    names = list(BRAIN_TISSUES)
    out = np.zeros((len(names), num_slices, h, w), dtype=np.float32)
    pathology: list[list[str]] = []
    boxes: list[list[tuple[int, int, int, int, str]]] = []
    yy, xx = np.meshgrid(y, x, indexing="ij")
    for s, z in enumerate(zs):
        pts = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, z)], axis=1)  # [N, 3] subject mm
        p = (pts - centre) @ mat.T + centre + subject.shift_mm
        p = p + np.sin(pts @ subject.warp_k.T + subject.warp_phase) @ subject.warp_amp
        vox = (p @ inv_aff[:3, :3].T + inv_aff[:3, 3]).T  # [3, N]
        frac = {
            t: ndimage.map_coordinates(getattr(tissues, t), vox, order=1, mode="constant", cval=0.0).reshape(hs, ws)
            for t in ("wm", "gm", "csf")
        }
        lesion_total = np.zeros((hs, ws), dtype=np.float32)
        labels: list[str] = []
        slice_boxes: list[tuple[int, int, int, int, str]] = []
        for les in subject.lesions:
            r = np.linalg.norm((p - np.asarray(les.center)) / np.asarray(les.radii), axis=1).reshape(hs, ws)
            soft = np.clip((1.0 - r) / 0.3, 0.0, 1.0).astype(np.float32)
            if soft.max() < 0.5:
                continue
            lesion_total = np.maximum(lesion_total, soft)
            small = soft.reshape(h, ss, w, ss).mean(axis=(1, 3))
            rows, cols = np.nonzero(small > 0.25)
            if rows.size == 0:
                continue
            labels.append(WMH_LABEL)
            x0, y0 = int(cols.min()), int(rows.min())
            slice_boxes.append((x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1, WMH_LABEL))
        les_frac = lesion_total * frac["wm"]
        frac["wm"] = frac["wm"] - les_frac
        brain = frac["wm"] + frac["gm"] + frac["csf"] + les_frac
        # Scalp: a bone shell (no signal) then subcutaneous fat, at fixed distances from the brain surface.
        dist = ndimage.distance_transform_edt(brain < 0.5) * step
        fat = ((dist > subject.skull_mm[1]) & (dist <= subject.scalp_mm)).astype(np.float32)
        stack = {"wm": frac["wm"], "gm": frac["gm"], "csf": frac["csf"], "fat": fat, "lesion": les_frac}
        for i, name in enumerate(names):
            out[i, s] = stack[name].reshape(h, ss, w, ss).mean(axis=(1, 3))
        pathology.append(labels)
        boxes.append(slice_boxes)
    return BrainSlices(fractions=out, pathology=pathology, boxes=boxes, slice_z_mm=zs)


def pd_texture(subject: BrainSubject, shape: tuple[int, int, int], pixel_mm: float, strength: float = 0.04) -> np.ndarray:
    """Smooth multiplicative intensity texture ``1 + strength·n`` (n unit-variance, ~8 mm correlation), float32 [S,h,w]."""
    rng = np.random.default_rng(subject.texture_seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    sigma = max(8.0 / pixel_mm, 0.5)
    smooth = ndimage.gaussian_filter(noise, sigma=(0.0, sigma, sigma), mode="wrap")
    smooth /= smooth.std() + 1e-12
    return (1.0 + strength * smooth).astype(np.float32)


def render_brain(
    slices: BrainSlices, acq: Acquisition, subject: BrainSubject, texture: np.ndarray | None = None
) -> np.ndarray:
    """Magnitude images of the stack under ``acq``: Σ_tissue fraction × signal(tissue), times the PD texture.

    Args:
        slices: tissue fractions ``[T, S, h, w]``.
        acq: acquisition; its sequence/TR/TE/TI/flip/field/contrast agent set the per-tissue signal.
        subject: for the per-tissue T1/T2/PD variation.
        texture: optional ``[S, h, w]`` multiplicative texture.

    Returns:
        float32 ``[S, h, w]`` (arbitrary units, PD = 1 ↔ fully relaxed CSF).
    """
    sig = tissue_signals(BRAIN_TISSUES, acq, subject.tissue_variation).astype(np.float32)
    img = np.tensordot(sig, slices.fractions, axes=(0, 0))
    if texture is not None:
        img = img * texture
    return img.astype(np.float32)
