"""Tissue relaxation parameters and MR signal equations.

The simulated images get their contrast *only* from these equations, so the acquisition metadata written into a file
(sequence, TR, TE, TI, flip angle, field strength, contrast agent) truly determines what the image looks like.

Relaxation times are rounded literature values for adult brain (e.g. Wansapura et al., JMRI 1999; Stanisz et al.,
MRM 2005; Bojorquez et al., MRI 2017) and myocardium/blood (Stanisz 2005; von Knobelsdorff-Brenkenhoff et al., JCMR
2013). They are representative, not authoritative; what matters for the project is that the ordering and the field
dependence (T1 lengthens with B0, T2 shortens slightly) are right.

Notation (all times in ms, angles in degrees at the API, radians inside):
    PD   proton density (relative, CSF = 1)
    E1 = exp(-TR/T1), E2 = exp(-TE/T2)
    SE / TSE:          S = PD (1 - E1) E2                                   (refocused echo, TR >> echo train)
    IR-(T)SE (FLAIR):  S = PD |1 - 2 exp(-TI/T1) + E1| E2                   (magnitude reconstruction)
    spoiled GRE:       S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*) (Ernst, perfect spoiling)
    bSSFP:             S = PD sin(a) (1 - E1) / (1 - (E1 - E2) cos(a) - E1 E2) exp(-TE/T2)   (on resonance)
    gadolinium:        1/T1' = 1/T1 + r1 C,  1/T2' = 1/T2 + r2 C            (C in mM, r in 1/(mM s))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tissue classes the phantoms use, in the order of their fraction maps.
BRAIN_TISSUES: tuple[str, ...] = ("wm", "gm", "csf", "fat", "lesion")
CARDIAC_TISSUES: tuple[str, ...] = ("myocardium", "blood", "fat", "muscle", "liver", "lung")


@dataclass(frozen=True)
class TissueParams:
    """Relaxation properties of one tissue at one field strength.

    Attributes:
        t1: longitudinal relaxation time (ms).
        t2: transverse relaxation time (ms).
        t2s: effective T2* (ms), used by gradient-echo sequences.
        pd: relative proton density (CSF = 1).
        gd_conc: tissue gadolinium concentration after a standard 0.1 mmol/kg dose (mM); 0 = no enhancement.
    """

    t1: float
    t2: float
    t2s: float
    pd: float
    gd_conc: float = 0.0


# Values at 1.5 T and 3 T. "lesion" = white-matter hyperintensity (gliosis/oedema: long T1 and T2, more water).
_TISSUES: dict[float, dict[str, TissueParams]] = {
    1.5: {
        "wm": TissueParams(t1=600.0, t2=80.0, t2s=60.0, pd=0.69, gd_conc=0.02),
        "gm": TissueParams(t1=1000.0, t2=100.0, t2s=75.0, pd=0.80, gd_conc=0.05),
        "csf": TissueParams(t1=4200.0, t2=2000.0, t2s=1500.0, pd=1.00, gd_conc=0.0),
        "fat": TissueParams(t1=260.0, t2=80.0, t2s=40.0, pd=0.90, gd_conc=0.10),
        "lesion": TissueParams(t1=1100.0, t2=180.0, t2s=120.0, pd=0.85, gd_conc=0.05),
        "myocardium": TissueParams(t1=950.0, t2=50.0, t2s=35.0, pd=0.75, gd_conc=0.15),
        "blood": TissueParams(t1=1450.0, t2=250.0, t2s=150.0, pd=0.90, gd_conc=0.5),
        "muscle": TissueParams(t1=850.0, t2=40.0, t2s=30.0, pd=0.70, gd_conc=0.05),
        "liver": TissueParams(t1=580.0, t2=45.0, t2s=30.0, pd=0.70, gd_conc=0.10),
        "lung": TissueParams(t1=1200.0, t2=40.0, t2s=2.0, pd=0.15, gd_conc=0.0),
    },
    3.0: {
        "wm": TissueParams(t1=830.0, t2=70.0, t2s=50.0, pd=0.69, gd_conc=0.02),
        "gm": TissueParams(t1=1330.0, t2=90.0, t2s=60.0, pd=0.80, gd_conc=0.05),
        "csf": TissueParams(t1=4300.0, t2=2000.0, t2s=1200.0, pd=1.00, gd_conc=0.0),
        "fat": TissueParams(t1=370.0, t2=70.0, t2s=30.0, pd=0.90, gd_conc=0.10),
        "lesion": TissueParams(t1=1450.0, t2=160.0, t2s=100.0, pd=0.85, gd_conc=0.05),
        "myocardium": TissueParams(t1=1200.0, t2=45.0, t2s=28.0, pd=0.75, gd_conc=0.15),
        "blood": TissueParams(t1=1900.0, t2=200.0, t2s=100.0, pd=0.90, gd_conc=0.5),
        "muscle": TissueParams(t1=1100.0, t2=35.0, t2s=25.0, pd=0.70, gd_conc=0.05),
        "liver": TissueParams(t1=800.0, t2=35.0, t2s=20.0, pd=0.70, gd_conc=0.10),
        "lung": TissueParams(t1=1300.0, t2=35.0, t2s=1.0, pd=0.15, gd_conc=0.0),
    },
}

# Gadolinium relaxivities (1/(mM s)) of a typical macrocyclic agent in tissue.
_RELAXIVITY: dict[float, tuple[float, float]] = {1.5: (4.3, 5.5), 3.0: (3.8, 5.3)}


def _nearest_field(field_strength_t: float) -> float:
    """Map a header field strength (e.g. 1.494, 2.89362) to the nearest tabulated one (1.5 or 3.0)."""
    return min(_TISSUES, key=lambda b: abs(b - float(field_strength_t)))


def tissue_params(tissue: str, field_strength_t: float, post_contrast: bool = False) -> TissueParams:
    """Relaxation parameters of ``tissue`` at ``field_strength_t``, optionally after gadolinium.

    Args:
        tissue: a key of the tables (``wm``, ``gm``, ``csf``, ``fat``, ``lesion``, cardiac tissues).
        field_strength_t: B0 in tesla; the nearest of 1.5 T / 3 T is used.
        post_contrast: apply the T1/T2 shortening of the tissue's gadolinium concentration.

    Returns:
        The (possibly contrast-shortened) :class:`TissueParams`.
    """
    b0 = _nearest_field(field_strength_t)
    p = _TISSUES[b0][tissue]
    if not post_contrast or p.gd_conc == 0.0:
        return p
    r1, r2 = _RELAXIVITY[b0]
    # Relaxivities are per second; relaxation times are in ms.
    t1 = 1.0 / (1.0 / p.t1 + r1 * p.gd_conc / 1000.0)
    t2 = 1.0 / (1.0 / p.t2 + r2 * p.gd_conc / 1000.0)
    t2s = 1.0 / (1.0 / p.t2s + r2 * p.gd_conc / 1000.0)
    return TissueParams(t1=t1, t2=t2, t2s=t2s, pd=p.pd, gd_conc=p.gd_conc)


def spin_echo(pd: np.ndarray | float, t1, t2, tr: float, te: float) -> np.ndarray:
    """Spin-echo / turbo-spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``.

    Args:
        pd, t1, t2: proton density and relaxation times (ms), scalars or broadcastable arrays.
        tr, te: repetition and (effective) echo time in ms.

    Returns:
        Signal magnitude, same shape as the broadcast inputs.
    """
    return np.asarray(pd) * (1.0 - np.exp(-tr / np.asarray(t1))) * np.exp(-te / np.asarray(t2))


def inversion_recovery(pd, t1, t2, tr: float, te: float, ti: float) -> np.ndarray:
    """Inversion-recovery (T)SE magnitude ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``.

    With TI ≈ T1_CSF · ln 2 (≈ 2500 ms at TR 9000 ms) the CSF signal is nulled: FLAIR.
    """
    t1 = np.asarray(t1)
    mz = 1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)
    return np.asarray(pd) * np.abs(mz) * np.exp(-te / np.asarray(t2))


def spoiled_gre(pd, t1, t2s, tr: float, te: float, flip_angle_deg: float) -> np.ndarray:
    """Spoiled gradient echo (FLASH) steady state, ``PD sin a (1 - E1) / (1 - cos a E1) exp(-TE/T2*)``."""
    a = np.deg2rad(flip_angle_deg)
    e1 = np.exp(-tr / np.asarray(t1))
    return np.asarray(pd) * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1) * np.exp(-te / np.asarray(t2s))


def bssfp(pd, t1, t2, tr: float, te: float, flip_angle_deg: float) -> np.ndarray:
    """Balanced SSFP (TrueFISP) on-resonance steady state; bright blood through the T2/T1 ratio."""
    a = np.deg2rad(flip_angle_deg)
    e1 = np.exp(-tr / np.asarray(t1))
    e2 = np.exp(-tr / np.asarray(t2))
    ss = np.sin(a) * (1.0 - e1) / (1.0 - (e1 - e2) * np.cos(a) - e1 * e2)
    return np.asarray(pd) * ss * np.exp(-te / np.asarray(t2))


@dataclass(frozen=True)
class Acquisition:
    """The acquisition parameters that decide the image contrast (what the header and metadata CSV report).

    Attributes:
        acquisition: fastMRI label (``AXT1``, ``AXT1PRE``, ``AXT1POST``, ``AXT2``, ``AXFLAIR``; cardiac: ``CINE``).
        contrast: clean contrast label (``T1``, ``T1 pre-contrast``, ``T1 post-contrast``, ``T2``, ``FLAIR``).
        sequence: ISMRMRD ``sequence_type`` (``TurboSpinEcho``, ``Flash``, ``TrueFISP``).
        tr, te, ti: times in ms (``ti`` may be a scanner placeholder for non-IR protocols, as in real fastMRI headers).
        flip_angle: degrees (refocusing angle for TSE, excitation angle for GRE/bSSFP).
        field_strength: B0 in tesla as the header reports it (e.g. 1.494, 2.89362).
        post_contrast: gadolinium given before this series.
        inversion: an inversion pulse precedes the readout (FLAIR); ``ti`` only matters when True.
    """

    acquisition: str
    contrast: str
    sequence: str
    tr: float
    te: float
    ti: float | None
    flip_angle: float
    field_strength: float
    post_contrast: bool = False
    inversion: bool = False


def tissue_signal(tissue: str, acq: Acquisition, variation: tuple[float, float, float] | None = None) -> float:
    """Steady-state signal of one pure tissue under ``acq`` (PD-weighted, arbitrary units).

    Args:
        tissue: tissue name (see :data:`BRAIN_TISSUES`, :data:`CARDIAC_TISSUES`).
        acq: the acquisition.
        variation: optional per-subject multiplicative factors ``(t1, t2, pd)`` (T2* scales with T2).

    Returns:
        The signal magnitude (float, >= 0).

    Raises:
        ValueError: for an unknown sequence type.
    """
    p = tissue_params(tissue, acq.field_strength, acq.post_contrast)
    if variation is not None:
        f1, f2, fp = variation
        p = TissueParams(t1=p.t1 * f1, t2=p.t2 * f2, t2s=p.t2s * f2, pd=p.pd * fp, gd_conc=p.gd_conc)
    seq = acq.sequence.lower()
    if seq in ("turbospinecho", "spinecho", "tse", "se"):
        if acq.inversion:
            if acq.ti is None:
                raise ValueError("an inversion-recovery acquisition needs TI")
            return float(inversion_recovery(p.pd, p.t1, p.t2, acq.tr, acq.te, acq.ti))
        return float(spin_echo(p.pd, p.t1, p.t2, acq.tr, acq.te))
    if seq in ("flash", "gradientecho", "spgr", "gre"):
        return float(spoiled_gre(p.pd, p.t1, p.t2s, acq.tr, acq.te, acq.flip_angle))
    if seq in ("truefisp", "bssfp", "ssfp"):
        return float(bssfp(p.pd, p.t1, p.t2, acq.tr, acq.te, acq.flip_angle))
    raise ValueError(f"unknown sequence type {acq.sequence!r}")


def tissue_signals(
    tissues: tuple[str, ...], acq: Acquisition, variations: np.ndarray | None = None
) -> np.ndarray:
    """Signals of several tissues, ``float64 [len(tissues)]`` in the given order.

    Args:
        tissues: tissue names.
        acq: the acquisition.
        variations: optional ``[len(tissues), 3]`` per-tissue ``(t1, t2, pd)`` factors (subject variability).
    """
    out = []
    for i, t in enumerate(tissues):
        var = None if variations is None else tuple(float(v) for v in variations[i])
        out.append(tissue_signal(t, acq, var))
    return np.array(out, dtype=np.float64)
