"""Simulated fastMRI multi-coil brain volumes, written exactly like the real h5 files.

Per volume (one subject): a protocol drawn from the real fastMRI brain protocol distribution and a scanner
(:mod:`utils.simulation.acquisition`), an MNI152-derived anatomy (:mod:`utils.simulation.brain_phantom`), contrast from
the signal equations (:mod:`utils.simulation.tissue`), then coils, oversampling, noise and zero-filled phase-encode
columns (:mod:`utils.simulation.kspace`).

File (docs/formats.md): ``kspace`` complex64 ``(S, C, H, W)``; ``reconstruction_rss`` float32
``(S, min(320, H//2), min(320, W))`` = RSS of the inverse FFT of the stored k-space, centre-cropped (start
``(H - h) // 2``); ``ismrmrd_header`` (XML bytes); attributes ``acquisition``, ``max``, ``norm`` (Frobenius norm of
``reconstruction_rss``), ``patient_id``. Names ``file_brain_{ACQ}_{site}_{id}.h5``.

Ground truth never goes into the h5 (it must look real). Beside it, under ``{output_dir}/ground_truth/``:
``{file}.npz`` (``image`` noise-free complex ``[S, H, W]`` on the oversampled grid with Σ|S|² = 1 maps, ``maps``
``[C, H, W]``, ``fractions`` float16 ``[T, S, H//2, W]`` tissue fractions in ``tissues`` order, ``noise_std``,
``pe_columns``), ``metadata.csv`` (one row per slice in the project's metadata columns) and ``fastmri_plus_brain.csv``
(lesion boxes in fastMRI+ format, pixel coordinates of ``reconstruction_rss``).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from utils.simulation.acquisition import Protocol, sample_protocol
from utils.simulation.brain_phantom import BrainSlices, brain_slices, pd_texture, render_brain, sample_subject
from utils.simulation.ismrmrd_header import EncodingInfo, SessionInfo, build_header_xml
from utils.simulation.kspace import (
    birdcage_coil_maps,
    embed_oversampled,
    phase_encode_band,
    rss_from_kspace,
    simulate_coil_kspace,
    smooth_phase,
)
from utils.simulation.sidecar import save_npz_deterministic
from utils.simulation.tissue import BRAIN_TISSUES

METADATA_COLUMNS: tuple[str, ...] = (
    "anatomy", "filename", "slice", "contrast", "pathology", "sequence", "TR", "TE", "TI", "flip_angle",
    "field_strength", "vendor", "scanner_model", "protocol_name", "num_coils", "matrix_x", "matrix_y", "fov_x", "fov_y",
)  # fmt: skip
ANNOTATION_COLUMNS: tuple[str, ...] = ("file", "slice", "study_level", "x", "y", "width", "height", "label")
RSS_SIZE = 320
_UID_ROOT = {"SIEMENS": "1.3.12.2.1107.5.2.18", "GE MEDICAL SYSTEMS": "1.2.840.113619.2.408", "Philips": "1.3.46.670589.11"}


@dataclass
class FastMRIConfig:
    """Options of a simulated fastMRI dataset (defaults = real fastMRI brain sizes).

    Attributes:
        output_dir: where files go.
        num_volumes: volumes (= subjects).
        num_slices: slices per volume.
        matrix: ``(H, W)``: oversampled readout × phase-encode of the stored k-space (H even).
        num_coils: coil counts to draw from, per volume.
        seed: master seed; volume ``i`` uses ``numpy.random.default_rng([seed, i])`` so it does not depend on N.
        acquisitions: restrict protocols to these labels (``None``: real frequencies of all five).
        vendors: allowed vendors (``SIEMENS`` only, as in fastMRI, by default).
        field_strengths: allowed nominal fields.
        lesion_prob: probability of white-matter hyperintensities per subject.
        snr: signal-to-noise ratio (mean brain signal / noise std of the optimal coil combination) at 1.5 T; scales
            linearly with B0.
        pe_fraction: range of the acquired fraction of phase-encode columns.
        val_fraction: if set, that fraction of subjects goes to ``val/``, the rest to ``train/``.
        ground_truth: write the sidecars.
        protocol_table: metadata CSV to draw protocols from (``None``: the shipped real distribution).
        challenge_accelerations: for each rate ``R`` also write a fastMRI *test/challenge*-format copy of every volume
            under ``{output_dir}/challenge_acc{R}/[split/]`` (see :func:`write_challenge_copy`).
        challenge_mask_type: the mask family of those copies (a fastMRI family of :mod:`utils.masks`).
        challenge_center_fraction: their fully sampled centre fraction (``None``: fastMRI's default for the rate).
    """

    output_dir: Path
    num_volumes: int = 1
    num_slices: int = 16
    matrix: tuple[int, int] = (640, 320)
    num_coils: tuple[int, ...] = (16,)
    seed: int = 0
    acquisitions: tuple[str, ...] | None = None
    vendors: tuple[str, ...] = ("SIEMENS",)
    field_strengths: tuple[float, ...] = (1.5, 3.0)
    lesion_prob: float = 0.3
    snr: float = 40.0
    pe_fraction: tuple[float, float] = (0.75, 1.0)
    val_fraction: float | None = None
    ground_truth: bool = True
    protocol_table: str | None = None
    id_offset: int = 2010000
    challenge_accelerations: tuple[int, ...] = ()
    challenge_mask_type: str = "equispaced_fraction"
    challenge_center_fraction: float | None = None

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        h, w = self.matrix
        if h % 2 or h < 8 or w < 8:
            raise ValueError(f"matrix must be even H >= 8 and W >= 8, got {self.matrix}")
        if self.num_slices < 1 or self.num_volumes < 1 or min(self.num_coils) < 1:
            raise ValueError("num_slices, num_volumes and num_coils must be positive")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError("val_fraction must lie in [0, 1]")
        lo, hi = self.pe_fraction
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("pe_fraction must satisfy 0 < lo <= hi <= 1")
        self.challenge_accelerations = tuple(int(r) for r in self.challenge_accelerations)
        if any(r < 2 for r in self.challenge_accelerations):
            raise ValueError(f"challenge accelerations must be integers >= 2, got {self.challenge_accelerations}")
        from utils.masks import FASTMRI_TYPES

        if self.challenge_mask_type not in FASTMRI_TYPES:
            raise ValueError(f"challenge_mask_type must be one of {FASTMRI_TYPES}, got {self.challenge_mask_type!r}")


@dataclass
class VolumeResult:
    """What was written for one volume."""

    path: Path
    protocol: Protocol
    num_coils: int
    pathology: list[list[str]]
    seconds: float
    records: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)


def _session(rng: np.random.Generator, protocol: Protocol, num_coils: int) -> SessionInfo:
    sc = protocol.scanner
    study = f"{int(rng.integers(7, 20)):02d}:{int(rng.integers(60)):02d}:{int(rng.integers(60)):02d}"
    meas_a = int(rng.integers(10_000_000, 99_999_999))
    meas_id = f"{sc.serial}_{meas_a}_{meas_a + int(rng.integers(1, 20))}_{int(rng.integers(100, 9999))}"
    date = f"20{int(rng.integers(15, 20))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    clock = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    root = next((v for k, v in _UID_ROOT.items() if sc.vendor.startswith(k)), "1.2.826.0.1.3680043.8.498")
    uid = f"{root}.{sc.serial}.1.{date}{clock}{int(rng.integers(100, 999))}.0.0.{int(rng.integers(1000, 9999))}"
    coils = tuple(int(c) + 1 for c in rng.choice(64, size=num_coils, replace=False))
    return SessionInfo(study_time=study, measurement_id=meas_id, frame_of_reference_uid=uid, coil_numbers=coils)


def _split_of(config: FastMRIConfig) -> list[str | None]:
    """Subject-level split: a seeded permutation puts ``round(N·val_fraction)`` subjects into ``val``."""
    n = config.num_volumes
    if config.val_fraction is None:
        return [None] * n
    n_val = int(round(n * config.val_fraction))
    perm = np.random.default_rng([config.seed, 7_777_777]).permutation(n)
    val = set(perm[:n_val].tolist())
    return ["val" if i in val else "train" for i in range(n)]


def simulate_fastmri_volume(config: FastMRIConfig, index: int, split: str | None = None) -> VolumeResult:
    """Simulate and write volume ``index`` of the dataset described by ``config``.

    Args:
        config: dataset options.
        index: volume index (its RNG stream is ``default_rng([config.seed, index])``).
        split: ``"train"``/``"val"`` subfolder or ``None`` (flat).

    Returns:
        :class:`VolumeResult` (path, protocol, per-slice pathology, metadata rows, annotation rows, time).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng([config.seed, index])
    protocol = sample_protocol(
        rng,
        acquisitions=config.acquisitions,
        vendors=config.vendors,
        field_strengths=config.field_strengths,
        table_path=config.protocol_table,
    )
    subject = sample_subject(rng, lesion_prob=config.lesion_prob)
    num_coils = int(rng.choice(np.asarray(config.num_coils)))
    big_h, w = config.matrix
    h = big_h // 2
    s = config.num_slices
    fov_read = float(rng.choice([220.0, 230.0, 240.0]))
    pixel_mm = fov_read / h
    thickness = 5.0

    slices: BrainSlices = brain_slices(subject, s, (h, w), pixel_mm, slice_thickness_mm=thickness)
    texture = pd_texture(subject, (s, h, w), pixel_mm)
    magnitude = render_brain(slices, protocol.acq, subject, texture)

    gain = 3e-4 * float(rng.uniform(0.5, 2.0))  # receiver scaling: real fastMRI brain k-space is O(1e-4)
    phases = np.stack([smooth_phase(rng, (h, w)) for _ in range(s)])
    content = (gain * magnitude * np.exp(1j * phases)).astype(np.complex64)
    image = embed_oversampled(content, big_h)
    maps = birdcage_coil_maps(num_coils, (big_h, w), object_size=max(h, w), radius=float(rng.uniform(1.15, 1.45)))

    brain = slices.fractions[:3].sum(0) + slices.fractions[BRAIN_TISSUES.index("lesion")] > 0.5
    mean_brain = float(np.abs(content)[brain].mean()) if brain.any() else float(np.abs(content).mean())
    snr = config.snr * (protocol.acq.field_strength / 1.5) * float(rng.uniform(0.8, 1.25))
    noise_std = mean_brain / snr / np.sqrt(2.0)  # per real/imag part, so the complex noise std is mean/snr
    n_acq = int(round(w * float(rng.uniform(*config.pe_fraction))))
    left, center, maximum = phase_encode_band(w, n_acq)
    pe_cols = (left, left + maximum + 1)

    session = _session(rng, protocol, num_coils)
    crop = (min(RSS_SIZE, h), min(RSS_SIZE, w))
    enc = EncodingInfo(
        encoded_matrix=(big_h, w),
        recon_matrix=(h, w),
        encoded_fov_mm=(2 * fov_read, w * pixel_mm, thickness),
        recon_fov_mm=(fov_read, w * pixel_mm, thickness),
        pe_center=center,
        pe_maximum=maximum,
        num_slices=s,
    )
    xml = build_header_xml(protocol, enc, session)
    patient_id = rng.bytes(32).hex()
    name = f"file_brain_{protocol.acq.acquisition}_{protocol.site}_{config.id_offset + index}"
    out_dir = config.output_dir / split if split else config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.h5"

    rss = np.empty((s,) + crop, dtype=np.float32)
    with h5py.File(path, "w", libver="earliest") as f:
        f.create_dataset("ismrmrd_header", data=xml.encode("ascii"), dtype=h5py.string_dtype("ascii"), track_times=False)
        kds = f.create_dataset("kspace", shape=(s, num_coils, big_h, w), dtype=np.complex64, track_times=False)
        for i in range(s):
            k = simulate_coil_kspace(image[i], maps, noise_std, pe_cols, rng)
            kds[i] = k
            rss[i] = rss_from_kspace(k, crop)
        f.create_dataset("reconstruction_rss", data=rss, track_times=False)
        f.attrs["acquisition"] = protocol.acq.acquisition
        f.attrs["max"] = float(rss.max())
        f.attrs["norm"] = float(np.linalg.norm(rss))
        f.attrs["patient_id"] = patient_id

    for rate in config.challenge_accelerations:
        challenge_dir = config.output_dir / f"challenge_acc{rate}"
        write_challenge_copy(path, challenge_dir / split if split else challenge_dir, rate, config.challenge_mask_type,
                             config.challenge_center_fraction)

    acq = protocol.acq
    records = [
        {
            "anatomy": "brain", "filename": name, "slice": i, "contrast": acq.contrast,
            "pathology": ", ".join(slices.pathology[i]), "sequence": acq.sequence, "TR": acq.tr, "TE": acq.te,
            "TI": acq.ti, "flip_angle": acq.flip_angle, "field_strength": protocol.scanner.field_strength,
            "vendor": protocol.scanner.vendor, "scanner_model": protocol.scanner.model,
            "protocol_name": protocol.protocol_name, "num_coils": num_coils, "matrix_x": big_h, "matrix_y": w,
            "fov_x": enc.encoded_fov_mm[0], "fov_y": round(enc.encoded_fov_mm[1], 4),
        }  # fmt: skip
        for i in range(s)
    ]
    # Boxes are in h × w content pixels; reconstruction_rss crops the content (start (h - crop) // 2).
    dy, dx = (h - crop[0]) // 2, (w - crop[1]) // 2
    annotations = [
        {"file": name, "slice": i, "study_level": "No", "x": bx - dx, "y": by - dy, "width": bw, "height": bh,
         "label": lab}  # fmt: skip
        for i, slice_boxes in enumerate(slices.boxes)
        for (bx, by, bw, bh, lab) in slice_boxes
    ]
    if config.ground_truth:
        gt_dir = config.output_dir / "ground_truth"
        gt_dir.mkdir(parents=True, exist_ok=True)
        save_npz_deterministic(
            gt_dir / f"{name}.npz",
            {
                "image": image,
                "maps": maps,
                "fractions": slices.fractions.astype(np.float16),
                "tissues": np.array(BRAIN_TISSUES),
                "noise_std": np.float64(noise_std),
                "pe_columns": np.array(pe_cols, dtype=np.int64),
                "slice_z_mm": slices.slice_z_mm,
            },
        )
    return VolumeResult(
        path=path,
        protocol=protocol,
        num_coils=num_coils,
        pathology=slices.pathology,
        seconds=time.perf_counter() - t0,
        records=records,
        annotations=annotations,
    )


def write_challenge_copy(
    source: Path,
    out_dir: Path,
    acceleration: int,
    mask_type: str = "equispaced_fraction",
    center_fraction: float | None = None,
) -> Path:
    """Write the fastMRI test/challenge-format copy of a fully sampled simulated file.

    As the real test files: ``kspace`` already masked (unsampled columns exactly zero), a 1-D ``mask`` dataset over the
    phase-encode width (float32 0/1; the same mask for every slice), attributes ``acceleration`` (the nominal rate),
    ``num_low_frequency``, ``acquisition``, ``max``, ``norm``, ``patient_id``, the same ``ismrmrd_header``, and no
    ``reconstruction_rss``. The mask is seeded from (file name, rate), never from the volume's random stream, so adding
    copies leaves the fully sampled files bit-identical.

    Args:
        source: the fully sampled file.
        out_dir: folder of the copy (created); the copy keeps the file name.
        acceleration: nominal rate R.
        mask_type: a fastMRI mask family.
        center_fraction: fully sampled centre fraction (``None``: fastMRI's default for the rate).

    Returns:
        The copy's path.
    """
    from utils.masks import get_mask, seed_from_name

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / source.name
    with h5py.File(source, "r") as src:
        s, c, big_h, w = src["kspace"].shape
        m = get_mask(mask_type, (big_h, w), float(acceleration), center_fraction=center_fraction,
                     seed=seed_from_name(source.name, int(acceleration)))
        mask = m.mask[0].numpy().astype(np.float32)
        with h5py.File(dest, "w", libver="earliest") as f:
            f.create_dataset("ismrmrd_header", data=src["ismrmrd_header"][()],
                             dtype=h5py.string_dtype("ascii"), track_times=False)  # fmt: skip
            kds = f.create_dataset("kspace", shape=(s, c, big_h, w), dtype=np.complex64, track_times=False)
            for i in range(s):
                kds[i] = src["kspace"][i] * mask[None, None, :]
            f.create_dataset("mask", data=mask, track_times=False)
            for key in ("acquisition", "max", "norm", "patient_id"):
                f.attrs[key] = src.attrs[key]
            f.attrs["acceleration"] = int(acceleration)
            f.attrs["num_low_frequency"] = int(m.num_center_lines)
    return dest


def _csv_value(v) -> str | int | float:
    """Missing → empty cell; whole floats written like the real CSVs (``9000``, not ``9000.0``)."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def generate_fastmri_dataset(config: FastMRIConfig, log=print) -> list[VolumeResult]:
    """Write ``config.num_volumes`` simulated fastMRI brain volumes (and the ground-truth sidecars).

    Args:
        config: options.
        log: progress callback taking a string (``None`` for silence).

    Returns:
        One :class:`VolumeResult` per volume.
    """
    results = []
    for i, split in enumerate(_split_of(config)):
        res = simulate_fastmri_volume(config, i, split)
        results.append(res)
        if log is not None:
            log(f"[{i + 1}/{config.num_volumes}] {res.path} ({res.protocol.acq.acquisition}, "
                f"{res.protocol.scanner.model} {res.protocol.scanner.field_strength} T, {res.num_coils} coils) "
                f"{res.seconds:.1f}s")  # fmt: skip
    if config.ground_truth:
        gt_dir = config.output_dir / "ground_truth"
        gt_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(gt_dir / "metadata.csv", METADATA_COLUMNS, [r for res in results for r in res.records])
        _write_csv(gt_dir / "fastmri_plus_brain.csv", ANNOTATION_COLUMNS, [a for res in results for a in res.annotations])
    return results
