"""Reconstruction of real acquisitions (``recon_complex_multi.py --raw_dir``): raw multi-coil k-space in,
fastMRI-format reconstructions out. No inverse crime: the data are the file's own noisy k-space on its own grid, the
coil maps come from the measured ACS lines, the scale and the noise level from the measurement
(``docs/raw_reconstruction.md``).

Per slice: measurement (:func:`utils.raw_data.slice_measurement`: a test file's own mask, or a retrospective mask over
the raw width seeded from (file, slice)) -> σ (:func:`utils.raw_data.estimate_noise_sigma`) -> for CS and diffusion:
ESPIRiT maps from the ACS block, the scale from the density-compensated zero-filled image, the data divided by it ->
the method -> the scale multiplied back, the output centre-cropped to the target's size.

Methods: ``zero_filled`` (fastMRI's baseline: RSS of the zero-filled coil images, oversampling removed, cropped),
``cs`` (sigpy L1-wavelet SENSE on the full grid), ``diffusion`` (DDS/DPS through a
:class:`utils.diffusion_recon.DiffusionReconstructor` with :class:`utils.raw_operator.RawGridOperator` at the prior's
size; the part of the field of view outside the prior's window is a separate least-squares estimate held fixed).

Outputs under the run folder: ``rows/{stem}/{idx:03d}.json`` (per-slice status, σ, scale, γ, acceleration, timing),
``slices/{stem}/{idx:03d}.npz`` (magnitude, complex, std, the measured mask, the full-FOV complex image),
``reconstructions/{stem}.h5`` (dataset ``reconstruction`` float32 ``[S, h, w]`` on the scale of
``reconstruction_rss``, the fastMRI submission format; plus ``reconstruction_complex`` and, for ensembles, ``std``)
and ``summary.json``/``summary.csv`` (per-volume PSNR/SSIM/NMSE under the fastMRI protocol against
``reconstruction_rss`` where the file has it). Finished slices are skipped on a re-run; several processes share the
slices (each takes every n-th).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.cs_baseline import cs_l1_wavelet
from utils.files import atomic_write_bytes, sha256_json, tmp_name, write_json
from utils.masks import sample_seed
from utils.recon_options import (
    GAMMA_RULES,
    OUTSIDE_MODES,
    RECON_METHODS,
    RECON_SAMPLERS,
    SamplerSettings,
    require_choice,
)
from utils.recon_outputs import row_path
from utils.recon_settings import readable_tag
from utils.recon_summary import mean_std
from utils.raw_data import (
    RawVolume,
    check_test_flags,
    coil_maps_from_acs,
    density_weights,
    estimate_noise_sigma,
    measured_scale,
    noise_aware_gamma,
    slice_measurement,
    zero_filled_rss,
)

METHODS = RECON_METHODS  # the --method choices
#: ``scale_rule``: the scale from the measured data only, or from the fully sampled reference (a check, not a method)
SCALE_RULES = ("measured", "oracle")


@dataclass
class RawReconSettings(SamplerSettings):
    """Everything that defines a ``--raw_dir`` run (the sampler's settings and defaults: the base class).

    ``mask_type``/``acc_factor`` are needed for validation files (full k-space) and must be ``None`` or agree with a
    test file's own mask. ``image_size`` is the prior's ``(h, w)`` (``None``: each file's target size).
    ``gamma_rule``: ``"fixed"`` uses ``gamma`` as is; ``"noise"`` lowers it per slice from the estimated σ
    (:func:`utils.raw_data.noise_aware_gamma` with ``prior_error_std``). ``outside``: ``"lsq"`` estimates the image
    outside the prior's window by Tikhonov-regularised SENSE (weight ``outside_lambda``) and holds it fixed;
    ``"zero"`` assumes it is empty. ``scale_rule``: ``"measured"`` (the default, from the measured data only) or
    ``"oracle"`` (a diagnostic for validation files: the 99th percentile of the *fully sampled* coil-combined image,
    what preprocessing divides by; it uses the answer and exists to measure what the measured scale costs).
    """

    method: str = "zero_filled"
    mask_type: str | None = None
    acc_factor: float | None = None
    center_fraction: float | None = None
    gamma_rule: str = "fixed"
    prior_error_std: float = 0.1
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 1
    scale_rule: str = "measured"
    outside: str = "lsq"
    outside_lambda: float = 0.05
    outside_iter: int = 30
    espirit_calib_width: int = 24
    espirit_calib_height: int = 48
    espirit_kernel_width: int = 6
    espirit_thresh: float = 0.02
    espirit_crop: float = 0.95
    image_size: tuple[int, int] | None = None
    mixed_precision: str = "no"
    tag: str | None = None

    def __post_init__(self) -> None:
        require_choice("method", self.method, METHODS)
        require_choice("sampler", self.sampler, RECON_SAMPLERS)
        require_choice("gamma_rule", self.gamma_rule, GAMMA_RULES)
        require_choice("scale_rule", self.scale_rule, SCALE_RULES)
        require_choice("outside handling", self.outside, OUTSIDE_MODES)
        if self.num_samples < 1 or self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("num_samples, batch_size and num_steps must be >= 1")
        if self.acc_factor is not None and not (math.isfinite(self.acc_factor) and self.acc_factor > 1):
            raise ValueError(f"acc_factor must be a finite number > 1, got {self.acc_factor}")
        if self.center_fraction is not None and not 0 < self.center_fraction < 1:
            raise ValueError(f"center_fraction must lie in (0, 1), got {self.center_fraction}")
        positive = {"prior_error_std": self.prior_error_std, "outside_lambda": self.outside_lambda,
                    "dps_step": self.dps_step}  # fmt: skip
        non_negative = {"gamma": self.gamma, "eta": self.eta, "cs_lambda": self.cs_lambda}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, value in non_negative.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if min(self.cg_iter, self.outside_iter) < 0 or self.cs_iter < 1:
            raise ValueError("cg_iter and outside_iter must be >= 0, cs_iter >= 1")
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def result_settings(self) -> dict[str, Any]:
        """The settings that change a result (the fingerprint's ``settings``): batch size and tag do not, and each
        method only its own."""
        d = asdict(self)
        keys = ["method", "mask_type", "acc_factor", "center_fraction"]
        espirit = [k for k in d if k.startswith("espirit_")]
        if self.method == "cs":
            keys += espirit + ["cs_lambda", "cs_iter", "scale_rule"]
        elif self.method == "diffusion":
            keys += espirit + [k for k in d if k not in keys and k not in espirit and not k.startswith("cs_")
                               and k not in ("batch_size", "tag")]  # fmt: skip
        out = {k: d[k] for k in keys}
        if "drop_metadata_keys" in out:
            out["drop_metadata_keys"] = sorted(out["drop_metadata_keys"])
        return {"mode": "raw", **out}

    @property
    def readable_tag(self) -> str:
        """The ``--data_root`` run's readable tag (:func:`utils.recon_settings.readable_tag`), plus the γ rule for
        diffusion."""
        tag = readable_tag(self)
        return f"{tag}_{self.gamma_rule}" if self.method == "diffusion" else tag


def raw_data_identity(volumes: Sequence[RawVolume]) -> dict[str, Any]:
    """What pins the inputs without reading gigabytes: per file its name, size, kind, k-space shape and a hash of its
    header and mask."""
    files = []
    for v in volumes:
        mask_hash = sha256_json(None if v.file_mask is None else v.file_mask.astype(int).tolist())
        files.append({"name": v.path.name, "bytes": v.path.stat().st_size, "kind": v.kind,
                      "shape": [v.num_slices, v.num_coils, *v.grid_shape],
                      "header_sha256": sha256_json(v.header.to_dict() if v.header else None), "mask_sha256": mask_hash})
    return {"files": files}


def raw_out_dir(save_dir: str | Path, settings: RawReconSettings, fingerprint: dict[str, Any]) -> Path:
    """``{save_dir}/raw/{mask_type}/acc_{R}/{tag}`` (``file_mask`` for test files' own masks); without an explicit tag
    the readable tag plus the first 8 hex digits of the fingerprint hash."""
    if settings.mask_type is None or settings.acc_factor is None:
        mask_part = Path("file_mask")
    else:
        mask_part = Path(settings.mask_type) / f"acc_{settings.acc_factor:g}"
    name = settings.tag or f"{settings.readable_tag}-{fingerprint['hash'][:8]}"
    return Path(save_dir) / "raw" / mask_part / name


def validate_volumes(
    volumes: Sequence[RawVolume],
    settings: RawReconSettings,
    test_mask_type: str | None | object = ...,
    test_acc_factor: float | None | object = ...,
) -> None:
    """Refuse flags that contradict a test file, and validation files without a mask choice (one line each).

    ``test_mask_type``/``test_acc_factor``: the flags the user actually gave, checked against test files (default:
    the settings' values); a folder mixing file types undersamples its validation files with the settings' mask.
    """
    mt = settings.mask_type if test_mask_type is ... else test_mask_type
    acc = settings.acc_factor if test_acc_factor is ... else test_acc_factor
    for v in volumes:
        if v.kind == "test":
            v.check_flags(mt, acc)  # per format (fastMRI: check_test_flags)
        elif settings.mask_type is None or settings.acc_factor is None:
            raise ValueError(f"{v.path.name} holds full k-space: give --mask_type and --acc_factor for its "
                             "retrospective undersampling")  # fmt: skip


#: What a raw run writes into its folder besides ``run.json``/``settings.json`` (cleared by ``--overwrite`` through
#: :func:`utils.run_identity.clear_results`).
RAW_RESULT_ENTRIES = ("rows", "slices", "reconstructions", "summary.json", "summary.csv")


# ----------------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------------


def _slice_path(out: Path, stem: str, idx: int) -> Path:
    return out / "slices" / stem / f"{idx:03d}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


@contextmanager
def _diffusion_gamma(diffusion: Any, gamma: float | torch.Tensor):
    """Give the reconstructor a per-slice γ for one call (it reads ``.gamma``); restored afterwards."""
    if not hasattr(diffusion, "gamma"):
        yield
        return
    old = diffusion.gamma
    diffusion.gamma = gamma
    try:
        yield
    finally:
        diffusion.gamma = old


def run_raw_reconstruction(
    volumes: Sequence[RawVolume],
    settings: RawReconSettings,
    out: str | Path,
    diffusion: Callable[..., tuple[torch.Tensor, int]] | None = None,
    device: torch.device | str = "cpu",
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> Path:
    """Reconstruct (this process's share of) every slice of ``volumes`` into ``out`` (already prepared).

    Args:
        volumes: from :func:`utils.raw_data.open_raw_volume`.
        settings: the run's settings (:func:`validate_volumes` is applied).
        out: the run folder.
        diffusion: ``diffusion(y, op, records, prompts, generators) -> (x [B, h, w], nfe)`` for ``method="diffusion"``
            (:class:`utils.diffusion_recon.DiffusionReconstructor`); ``y`` and ``op`` are in the packed layout of
            :class:`utils.raw_operator.RawGridOperator`.
        device: where the work runs.
        process_index, num_processes: this process takes every ``num_processes``-th slice.
        progress: show a progress bar (main process).

    Returns:
        ``out``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    validate_volumes(volumes, settings, test_mask_type=None, test_acc_factor=None)  # flags: the caller (CLI) checks
    if settings.method == "diffusion" and diffusion is None:
        raise ValueError("method 'diffusion' needs a diffusion reconstructor (a model)")
    plan = [(vi, idx) for vi, v in enumerate(volumes) for idx in range(v.num_slices)]
    mine = [p for p in plan[process_index::num_processes] if not row_path(out, volumes[p[0]].stem, p[1]).is_file()]
    bar = tqdm(total=len(mine), desc=f"raw {settings.readable_tag}", disable=not progress or process_index != 0)
    dev = torch.device(device)
    by_vol: dict[int, list[int]] = {}
    for vi, idx in mine:
        by_vol.setdefault(vi, []).append(idx)
    for vi, idxs in by_vol.items():
        for start in range(0, len(idxs), settings.batch_size):
            chunk = idxs[start : start + settings.batch_size]
            _reconstruct_slices(volumes[vi], chunk, settings, out, diffusion, dev)
            bar.update(len(chunk))
    bar.close()
    return out


def _reconstruct_slices(vol: RawVolume, idxs: list[int], s: RawReconSettings, out: Path, diffusion, device) -> None:
    from utils.coils import center_crop_or_pad

    t0 = time.perf_counter()
    meas, sigmas, zfs, fulls_k = [], [], [], []
    for idx in idxs:
        k = vol.read_kspace(idx)
        m = vol.measurement(idx, k, s.mask_type, s.acc_factor, s.center_fraction)  # per format
        meas.append(m)
        fulls_k.append(k if s.scale_rule == "oracle" else None)
        sigmas.append(vol.noise_sigma(m))  # per format
        zfs.append(zero_filled_rss(m.y, vol.recon_shape))
    results: list[dict[str, np.ndarray]] = []
    extra: list[dict[str, Any]] = [{} for _ in idxs]
    nfe = 0
    if s.method == "zero_filled":
        results = [{"magnitude": zf, "complex": zf.astype(np.complex64)} for zf in zfs]
    else:
        prior_shape = s.image_size or vol.recon_shape
        maps, scales = [], []
        for m, k in zip(meas, fulls_k):
            mp = coil_maps_from_acs(m.y, m.mask, s.espirit_calib_width, s.espirit_calib_height, s.espirit_kernel_width,
                                    s.espirit_thresh, s.espirit_crop)  # fmt: skip
            maps.append(mp)
            if s.scale_rule == "oracle":
                if vol.kind == "test":
                    raise ValueError(f"{vol.path.name}: scale_rule 'oracle' needs fully sampled k-space")
                scales.append(measured_scale(k, mp, prior_shape))
            else:
                scales.append(measured_scale(m.y, mp, prior_shape, density_weights(m.mask, vol.acquired)))
        if s.method == "cs":
            fulls = []
            for m, mp, sc in zip(meas, maps, scales):
                y_t = torch.from_numpy(m.y / np.float32(sc))
                x = cs_l1_wavelet(y_t, torch.from_numpy(mp), torch.from_numpy(m.mask), s.cs_lambda, s.cs_iter)
                fulls.append(x.numpy() * np.float32(sc))
            stds = [None] * len(idxs)
        else:
            fulls, stds, nfe, gammas = _diffusion_batch(vol, idxs, meas, maps, scales, sigmas, prior_shape, s,
                                                        diffusion, device)  # fmt: skip
            for e, g in zip(extra, gammas):
                e["gamma"] = g
        for b, (full, sc) in enumerate(zip(fulls, scales)):
            cplx = center_crop_or_pad(full, vol.recon_shape).astype(np.complex64)
            res = {"magnitude": np.abs(cplx).astype(np.float32), "complex": cplx,
                   "image_full": full.astype(np.complex64)}  # fmt: skip
            if stds[b] is not None:
                res["std"] = center_crop_or_pad(stds[b], vol.recon_shape).astype(np.float32)
            results.append(res)
            extra[b]["scale"] = float(sc)
            extra[b]["sigma_normalized"] = sigmas[b] / float(sc)
    elapsed = (time.perf_counter() - t0) / len(idxs)
    for b, idx in enumerate(idxs):
        res = results[b]
        finite = bool(np.isfinite(res["complex"]).all())
        _save_npz(_slice_path(out, vol.stem, idx), {**res, "mask": meas[b].mask})
        row = {
            "filename": vol.stem, "slice": int(idx), "kind": vol.kind, "mask_source": meas[b].source,
            "status": "ok" if finite else "failed", **({} if finite else {"failure": "output"}),
            "acceleration": meas[b].acceleration, "num_center_lines": meas[b].num_center_lines,
            "sigma": sigmas[b], "time_s": elapsed, "nfe": nfe, **extra[b],
        }  # fmt: skip
        write_json(row_path(out, vol.stem, idx), row)


def _diffusion_batch(vol, idxs, meas, maps, scales, sigmas, prior_shape, s: RawReconSettings, diffusion, device):
    """DDS/DPS for slices of one volume in one batch; returns full-FOV complex images on the raw scale."""
    from utils.operators import SenseOperator
    from utils.raw_operator import RawGridOperator, outside_estimate, place
    from utils.samplers import ensemble_stats

    sc = torch.tensor(scales, dtype=torch.float32, device=device)
    y = torch.stack([torch.from_numpy(m.y) for m in meas]).to(device) / sc[:, None, None, None]
    maps_t = torch.stack([torch.from_numpy(mp) for mp in maps]).to(device)
    mask = torch.stack([torch.from_numpy(m.mask) for m in meas]).to(device)[:, None]  # [B, 1, 1|H, W]
    sense = SenseOperator(maps_t, mask)
    if s.outside == "lsq":
        z = outside_estimate(sense, y, prior_shape, lam=s.outside_lambda, max_iter=s.outside_iter)
    else:
        z = torch.zeros(y.shape[0], *y.shape[-2:], dtype=y.dtype, device=device)
    op = RawGridOperator(maps_t, mask, prior_shape)
    yp = op.pack(y - sense.forward(z))
    sig_n = [sg / scl for sg, scl in zip(sigmas, scales)]
    if s.gamma_rule == "noise":
        gammas = [noise_aware_gamma(s.gamma, sg, s.prior_error_std) for sg in sig_n]
    else:
        gammas = [float(s.gamma)] * len(idxs)
    gamma_t = torch.tensor(gammas, dtype=torch.float32, device=device)
    # DPS's step follows the estimated σ (utils.samplers.dps_noise_weight); DDS's γ follows it through gamma_rule.
    dps_noise = ({"noise_sigma": torch.tensor(sig_n, dtype=torch.float32, device=device),
                  "prior_error_std": s.prior_error_std} if s.sampler == "dps" else {})
    records = [vol.records[i] for i in idxs]
    from utils.metadata import build_prompt

    prompts = [build_prompt(r) for r in records]
    samples = []
    nfe = 0
    for k in range(s.num_samples):
        gens = [
            torch.Generator(device=device).manual_seed(
                sample_seed(vol.stem, idx, s.seed + k)
            )
            for idx in idxs
        ]
        with _diffusion_gamma(diffusion, gamma_t if s.gamma_rule == "noise" else float(s.gamma)):
            x, n = diffusion(yp, op, records, prompts, gens, **dps_noise)
        samples.append(x)
        nfe += n
    mean, std = ensemble_stats(torch.stack(samples), std="complex")
    full = (place(mean, op.grid_shape) + z) * sc[:, None, None]
    std_full = place(std.to(torch.float32), op.grid_shape) * sc[:, None, None] if s.num_samples > 1 else None
    fulls = [full[b].detach().cpu().numpy() for b in range(len(idxs))]
    stds = [None if std_full is None else std_full[b].detach().cpu().numpy() for b in range(len(idxs))]
    return fulls, stds, nfe, gammas


# ----------------------------------------------------------------------------------------------------------------------
# volumes and summary
# ----------------------------------------------------------------------------------------------------------------------


def write_submission_h5(path: Path, reconstruction: np.ndarray, complex_recon: np.ndarray | None = None,
                        std: np.ndarray | None = None) -> None:
    """One fastMRI submission file: dataset ``reconstruction`` float32 ``[S, h, w]`` (what ``fastmri/evaluate.py``
    reads), optionally ``reconstruction_complex`` complex64 and ``std`` float32; written atomically."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("reconstruction", data=np.asarray(reconstruction, dtype=np.float32))
        if complex_recon is not None:
            f.create_dataset("reconstruction_complex", data=np.asarray(complex_recon, dtype=np.complex64))
        if std is not None:
            f.create_dataset("std", data=np.asarray(std, dtype=np.float32))
    os.replace(tmp, path)


def summarize_raw(out: str | Path, volumes: Sequence[RawVolume], allow_incomplete: bool = False,
                  assemble: Collection[str] | None = None) -> dict[str, Any]:
    """Assemble ``reconstructions/{stem}.h5`` per finished volume, score it against ``reconstruction_rss`` (fastMRI
    protocol, :func:`utils.metrics.evaluate_volume`) and write ``summary.json`` + ``summary.csv`` (per volume).

    Args:
        out: the run folder.
        volumes: every volume of the run (all shards).
        allow_incomplete: a volume with slices not reconstructed yet (another shard still running) is listed as
            ``"status": "incomplete"`` and left out of the means, and ``complete`` is false, instead of an error.
        assemble: stems whose ``.h5`` this call writes (default: every finished volume); a shard passes its own, so
            it writes only its own files while scoring every finished volume.

    Raises:
        RuntimeError: slices not reconstructed yet (run again to finish), unless ``allow_incomplete``.
    """
    import pandas as pd

    from utils.metrics import evaluate_volume

    out = Path(out)
    missing = [f"{v.stem}/{i:03d}" for v in volumes for i in range(v.num_slices)
               if not row_path(out, v.stem, i).is_file()]  # fmt: skip
    if missing and not allow_incomplete:
        raise RuntimeError(f"{len(missing)} slice(s) not reconstructed yet (e.g. {missing[:3]}); run again to finish")
    volume_rows, slice_rows, incomplete = [], [], []
    for v in volumes:
        num_missing = sum(not row_path(out, v.stem, i).is_file() for i in range(v.num_slices))
        if num_missing:
            incomplete.append({"filename": v.stem, "kind": v.kind, "num_slices": v.num_slices,
                               "num_missing": num_missing, "status": "incomplete"})
            continue
        rows = [json.loads(row_path(out, v.stem, i).read_text()) for i in range(v.num_slices)]
        slice_rows.extend(rows)
        arrays = [np.load(_slice_path(out, v.stem, i)) for i in range(v.num_slices)]
        mag = np.stack([a["magnitude"] for a in arrays])
        cplx = np.stack([a["complex"] for a in arrays])
        std = np.stack([a["std"] for a in arrays]) if all("std" in a for a in arrays) else None
        if assemble is None or v.stem in assemble:
            write_submission_h5(out / "reconstructions" / f"{v.stem}.h5", mag, cplx, std)
            v.write_extra_outputs(out, mag, cplx, std)  # e.g. CMRxRecon's submission .mat (utils.raw_cmrx)
        row: dict[str, Any] = {
            "filename": v.stem, "kind": v.kind, "num_slices": v.num_slices,
            "failed_slices": sum(r.get("status") != "ok" for r in rows),
            "acceleration": float(np.mean([r["acceleration"] for r in rows])),
            "sigma": float(np.mean([r["sigma"] for r in rows])),
        }  # fmt: skip
        if allow_incomplete:
            row["status"] = "done"
        target = v.read_target()
        if target is not None and row["failed_slices"] == 0:
            m = evaluate_volume(target, mag, protocol="fastmri")
            row.update({f"fastmri_{k}": m[k] for k in ("psnr", "ssim", "nmse")})
            row.update(v.extra_scores(mag))  # e.g. CMRxRecon's ranking region (cmrx_psnr, ...)
        volume_rows.append(row)
    summary: dict[str, Any] = {"num_volumes": len(volume_rows), "num_slices": len(slice_rows)}
    if allow_incomplete:  # counts of a sharded run; the means cover only the finished volumes
        summary.update({"complete": not incomplete, "num_volumes_expected": len(volumes),
                        "num_volumes_incomplete": len(incomplete), "num_slices_missing": len(missing)})
    if (out / "settings.json").is_file():
        summary["settings"] = json.loads((out / "settings.json").read_text())
    cmrx_keys = [k for k in ("cmrx_psnr", "cmrx_ssim", "cmrx_nmse") if any(k in r for r in volume_rows)]
    for key in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse", *cmrx_keys):  # cmrx_*: only CMRxRecon runs have them
        stat = mean_std([r.get(key) for r in volume_rows])
        summary[key] = stat if stat["n"] else None
    for key in ("acceleration", "sigma", "time_s", "nfe", "scale", "gamma"):
        vals = [r[key] for r in slice_rows if isinstance(r.get(key), (int, float))]
        summary[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None
    summary["failed_slices"] = sum(r.get("status") != "ok" for r in slice_rows)
    summary["volumes"] = volume_rows + incomplete
    summary["protocol"] = ("fastMRI: magnitude `reconstruction` vs the file's `reconstruction_rss`, volume-wise, "
                           "data_range = max(target volume); mean ± std over volumes with a target")  # fmt: skip
    write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "summary.csv", pd.DataFrame(volume_rows + incomplete).to_csv(index=False).encode())
    return summary
