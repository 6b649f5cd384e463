"""CMRxRecon ``.mat`` files on the ``--raw_dir`` path: FullSample (retrospective), undersampled files with their mask
files (2023 and 2024 layouts), the submission ``.mat``, noise, maps and metadata (``utils/raw_cmrx.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from utils.masks import get_mask, seed_from_name
from utils.metrics import evaluate_volume
from utils.raw_cmrx import CMRxRawVolume, calibration_noise_sigma, cmrx_noise_sigma, read_submission_mat
from utils.raw_data import coil_maps_from_acs, estimate_noise_sigma, list_raw_files, open_raw_volume
from utils.raw_reconstruction import RawReconSettings, run_raw_reconstruction, summarize_raw, validate_volumes

MATRIX = (64, 56)  # (kx, ky): readout x phase encode
NZ, NT = 3, 4  # short-axis slices, frames
CF = 0.17


def _simulate(out: Path, layout: str, snr: float = 25.0, seed: int = 3) -> Path:
    from utils.simulation.cmrx_writer import CMRxConfig, generate_cmrx_dataset

    cfg = CMRxConfig(output_dir=out, layout=layout, num_volumes=1, num_slices_sax=NZ, num_slices_lax=1,
                     num_frames=NT, matrix=MATRIX, num_coils=4, seed=seed, accelerations=(4,), snr=snr,
                     task2_patterns=("ktRadial",))  # fmt: skip
    generate_cmrx_dataset(cfg, log=None)
    return out / "MultiCoil" / "Cine" / "TrainingSet"


@pytest.fixture(scope="module")
def cmrx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmrx")
    return {"2023": _simulate(root / "y23", "2023"), "2024": _simulate(root / "y24", "2024"), "root": root}


def _kspace_numpy(path: Path, variable: str) -> np.ndarray:
    """Independent reader: h5py compound -> complex, MATLAB (kx, ky, C, nz, nt) -> numpy [nz, nt, C, kx, ky]."""
    with h5py.File(path, "r") as f:
        d = f[variable][()]  # h5py: (nt, nz, C, ky, kx)
    k = d["real"] + 1j * d["imag"]
    return np.swapaxes(k, -1, -2).transpose(1, 0, 2, 3, 4)


def _rss_numpy(k: np.ndarray) -> np.ndarray:
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return np.sqrt((np.abs(img) ** 2).sum(-3))


def _run(volumes, settings, out, **kw):
    run_raw_reconstruction(volumes, settings, out, progress=False, **kw)
    return summarize_raw(out, volumes)


def test_fullsample_zero_filled_is_rss_of_masked_kspace_and_outputs_rescore(cmrx, tmp_path) -> None:
    path = cmrx["2023"] / "FullSample" / "P001" / "cine_sax.mat"
    vol = open_raw_volume(path)
    assert isinstance(vol, CMRxRawVolume) and vol.kind == "validation" and vol.has_target
    assert vol.num_slices == NZ * NT and vol.grid_shape == MATRIX
    assert vol.stem == "Cine_TrainingSet_FullSample_P001_cine_sax"
    settings = RawReconSettings(method="zero_filled", mask_type="random", acc_factor=4, center_fraction=CF)
    summary = _run([vol], settings, tmp_path / "zf")

    k = _kspace_numpy(path, "kspace_full")
    expected, target = [], []
    for z in range(NZ):
        for t in range(NT):  # masks over ky, seeded from (stem, slice * num_frames + frame)
            m = get_mask("random", MATRIX, 4, center_fraction=CF, seed=seed_from_name(vol.stem, z * NT + t)).mask
            expected.append(_rss_numpy(k[z, t] * m.numpy()[0]))
            target.append(_rss_numpy(k[z, t]))
    expected, target = np.stack(expected), np.stack(target)
    with h5py.File(tmp_path / "zf" / "reconstructions" / f"{vol.stem}.h5", "r") as f:
        rec = f["reconstruction"][()]
        assert f["reconstruction"].dtype == np.float32 and rec.shape == (NZ * NT, *MATRIX)
        assert f["reconstruction_complex"].dtype == np.complex64
    np.testing.assert_allclose(rec, expected, rtol=0, atol=1e-5 * expected.max())

    row = summary["volumes"][0]
    m = evaluate_volume(target, rec, protocol="fastmri")  # fastMRI protocol vs the RSS of the full k-space
    assert abs(m["psnr"] - row["fastmri_psnr"]) < 1e-6 and abs(m["ssim"] - row["fastmri_ssim"]) < 1e-6

    # the submission file: MATLAB v7.3, img4ranking single (round(kx/3), round(ky/2), 2 central slices, 3 frames)
    sub = tmp_path / "zf" / "submission" / "MultiCoil" / "Cine" / "TrainingSet" / "FullSample" / "P001" / "cine_sax.mat"
    assert sub.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    cx, cy = round(MATRIX[0] / 3), MATRIX[1] // 2  # 21, 28
    with h5py.File(sub, "r") as f:
        assert list(f) == ["img4ranking"] and f["img4ranking"].dtype == np.float32
        assert f["img4ranking"].shape == (3, 2, cy, cx)  # h5py: (frames, slices, y, x)
        assert f["img4ranking"].attrs["MATLAB_class"] == b"single"
    sub_img = read_submission_mat(sub)  # (x, y, slices, frames)
    x0, y0 = MATRIX[0] // 2 - cx // 2, MATRIX[1] // 2 - cy // 2  # MATLAB crop: floor(n/2) + ceil(-m/2)
    zs = [0, 1]  # MATLAB round(3/2)-1 : round(3/2) = 1:2
    rec5 = rec.reshape(NZ, NT, *MATRIX)
    np.testing.assert_array_equal(sub_img, rec5[zs][:, :3, x0 : x0 + cx, y0 : y0 + cy].transpose(2, 3, 0, 1))
    g = target.reshape(NZ, NT, *MATRIX)[zs][:, :3, x0 : x0 + cx, y0 : y0 + cy].reshape(-1, cx, cy)
    p = np.ascontiguousarray(sub_img.transpose(2, 3, 0, 1)).reshape(-1, cx, cy)
    mc = evaluate_volume(g, p, protocol="fastmri")  # rescoring the submission reproduces the summary's cmrx_*
    assert abs(mc["psnr"] - row["cmrx_psnr"]) < 1e-5 and abs(mc["nmse"] - row["cmrx_nmse"]) < 1e-7
    assert summary["cmrx_psnr"]["n"] == 1


def test_undersampled_file_uses_its_own_mask_and_refuses_contradicting_flags(cmrx, tmp_path) -> None:
    """2023 AccFactor04: the mask file is the one used; with γ → ∞ (zero network, many CG steps) the result's
    k-space reproduces the measured lines far better than the unmeasured ones."""
    from utils.operators import SenseOperator
    from utils.samplers import dds_sample

    path = cmrx["2023"] / "AccFactor04" / "P001" / "cine_sax.mat"
    vol = open_raw_volume(path)
    assert vol.kind == "test" and not vol.has_target and vol.file_acceleration == 4
    assert vol.mask_path.name == "cine_sax_mask.mat" and vol.mask_variable == "mask04"
    for bad in (dict(acc_factor=8.0), dict(mask_type="poisson2d"), dict(mask_type="random")):
        with pytest.raises(ValueError, match="contradicts"):
            validate_volumes([vol], RawReconSettings(**bad))
    validate_volumes([vol], RawReconSettings(acc_factor=4.0, mask_type="equispaced"))  # agrees: accepted

    with h5py.File(path.with_name("cine_sax_mask.mat"), "r") as f:
        file_mask = f["mask04"][()].T > 0  # MATLAB (kx, ky)
    acp = torch.linspace(0.9999, 0.98, 1000).cumprod(0)

    def stub(y, op, records, prompts, gens):
        x = dds_sample(lambda xt, t: torch.zeros_like(xt), op, y, acp, num_steps=2, gamma=1e4, cg_iter=60,
                       generators=gens)  # fmt: skip
        assert records[0]["view"] == "sax" and records[0]["field_strength"] == 3.0
        return x, 2

    summary = _run([vol], RawReconSettings(method="diffusion", gamma=1e4, outside="zero", batch_size=NZ * NT),
                   tmp_path / "dds", diffusion=stub)  # fmt: skip
    row = summary["volumes"][0]
    assert abs(row["acceleration"] - file_mask.size / file_mask.sum()) < 1e-9  # achieved = the mask file's
    k_us = _kspace_numpy(path, "kspace_sub04")
    k_full = _kspace_numpy(cmrx["2023"] / "FullSample" / "P001" / "cine_sax.mat", "kspace_full")
    idx = 5
    z, t = divmod(idx, NT)
    res = np.load(tmp_path / "dds" / "slices" / vol.stem / f"{idx:03d}.npz")
    np.testing.assert_array_equal(np.broadcast_to(res["mask"], MATRIX) > 0, file_mask)
    y = k_us[z, t]
    maps = coil_maps_from_acs(y, res["mask"])
    k_rec = SenseOperator(torch.from_numpy(maps), torch.ones(1, MATRIX[1])).forward(
        torch.from_numpy(res["image_full"])[None])[0].numpy()  # fmt: skip
    meas, unmeas = file_mask[0], ~file_mask[0]
    err_meas = np.linalg.norm((k_rec - y)[..., meas]) / np.linalg.norm(y[..., meas])
    err_unmeas = np.linalg.norm((k_rec - k_full[z, t])[..., unmeas]) / np.linalg.norm(k_full[z, t][..., unmeas])
    assert err_meas < 0.25 and err_meas < 0.5 * err_unmeas, (err_meas, err_unmeas)

    zf = _run([vol], RawReconSettings(method="zero_filled"), tmp_path / "zf")
    with h5py.File(tmp_path / "zf" / "reconstructions" / f"{vol.stem}.h5", "r") as f:
        rec = f["reconstruction"][()]
    expected = _rss_numpy(k_us.reshape(NZ * NT, *k_us.shape[2:]) * file_mask)
    np.testing.assert_allclose(rec, expected, rtol=0, atol=1e-5 * expected.max())
    assert zf["fastmri_psnr"] is None and "cmrx_psnr" not in zf  # no target in an undersampled file


def test_script_2024_layouts_kt_masks_and_refusals(cmrx, tmp_path, capsys) -> None:
    """The real 2024 validation layout (``UnderSample_Task1`` + sibling ``Mask_Task1``), per-frame 2-D (radial) masks,
    and one-line refusals (exit 2) of contradicting flags through ``recon_complex_multi.py``."""
    import recon_complex_multi

    src = cmrx["2024"] / "Mask_Task1" / "P001"
    val = tmp_path / "MultiCoil" / "Cine" / "ValidationSet"
    (val / "UnderSample_Task1" / "P001").mkdir(parents=True)
    (val / "Mask_Task1" / "P001").mkdir(parents=True)
    shutil.copy(src / "cine_sax_kus_Uniform4.mat", val / "UnderSample_Task1" / "P001")
    shutil.copy(src / "cine_sax_mask_Uniform4.mat", val / "Mask_Task1" / "P001")
    assert [p.name for p in list_raw_files(val)] == ["cine_sax_kus_Uniform4.mat"]  # mask files are not volumes
    out = tmp_path / "out"
    rc = recon_complex_multi.main(["--raw_dir", str(val), "--method", "zero_filled", "--save_dir", str(out)])
    assert rc == 0
    subs = list(out.glob("raw/file_mask/zero_filled-*/submission/MultiCoil/Cine/ValidationSet/Task1/P001/*.mat"))
    assert [s.name for s in subs] == ["cine_sax_kus_Uniform4.mat"]  # 2024 submission tree: Task1, same file name
    capsys.readouterr()
    for flags in (["--acc_factor", "8"], ["--mask_type", "random"], ["--mask_type", "gaussian2d"]):
        argv = ["--raw_dir", str(val), "--method", "zero_filled", "--save_dir", str(out), *flags]
        rc = recon_complex_multi.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "contradicts" in err and len(err.splitlines()) == 1, (flags, err)

    radial = cmrx["2024"] / "Mask_Task2" / "P001" / "cine_sax_kus_ktRadial4.mat"
    vol = open_raw_volume(radial)
    assert vol.kind == "test" and vol.pattern == "ktradial" and vol.frame_masks.shape == (NT, *MATRIX)
    with pytest.raises(ValueError, match="2-D mask"):
        validate_volumes([vol], RawReconSettings(mask_type="equispaced"))
    _run([vol], RawReconSettings(method="zero_filled"), tmp_path / "radial")
    for idx in (0, NT - 1):  # each frame with its own mask
        res = np.load(tmp_path / "radial" / "slices" / vol.stem / f"{idx:03d}.npz")
        np.testing.assert_array_equal(res["mask"] > 0, vol.frame_masks[idx % NT])

    wrong = tmp_path / "wrong" / "P001"  # a mask that does not belong to the data: refused with one line
    wrong.mkdir(parents=True)
    shutil.copy(cmrx["2023"] / "AccFactor04" / "P001" / "cine_sax.mat", wrong)
    shutil.copy(cmrx["2023"] / "AccFactor04" / "P001" / "cine_lax_mask.mat", wrong / "cine_sax_mask.mat")
    from utils.simulation.matlab_io import save_mat_v73

    save_mat_v73(wrong / "cine_sax_mask.mat", {"mask04": np.ones(MATRIX) * (np.arange(MATRIX[1]) % 7 == 0)})
    capsys.readouterr()
    rc = recon_complex_multi.main(["--raw_dir", str(wrong), "--method", "zero_filled", "--save_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not belong" in err and len(err.splitlines()) == 1, err
    bad = tmp_path / "bad" / "P001"
    bad.mkdir(parents=True)
    (bad / "cine_sax.mat").write_bytes(b"MATLAB 7.3 MAT-file, truncated")
    rc = recon_complex_multi.main(["--raw_dir", str(bad.parent), "--method", "zero_filled", "--save_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cine_sax.mat" in err and len(err.splitlines()) == 1, err


def test_maps_depend_only_on_the_acs_lines(cmrx) -> None:
    vol = open_raw_volume(cmrx["2023"] / "AccFactor04" / "P001" / "cine_sax.mat")
    k = vol.read_kspace(2)
    m = vol.measurement(2, k)
    maps = coil_maps_from_acs(m.y, m.mask)
    assert np.abs(maps).max() > 0
    rng = np.random.default_rng(0)
    acs = np.zeros(MATRIX[1], bool)
    c = MATRIX[1] // 2
    acs[c - 12 : c + 12] = True  # the 24 ACS lines of the 2023 layout
    k2 = k.copy()
    k2[..., ~acs] = (rng.standard_normal(k2[..., ~acs].shape) + 1j) * np.abs(k).max()  # every other column changed
    m2 = vol.measurement(2, k2)
    np.testing.assert_allclose(coil_maps_from_acs(m2.y, m2.mask), maps, atol=1e-6)
    k3 = k.copy()
    k3[:, MATRIX[0] // 2, c] *= 3.0  # one ACS sample changed: the maps change
    m3 = vol.measurement(2, k3)
    assert np.abs(coil_maps_from_acs(m3.y, m3.mask) - maps).max() > 1e-4


def _true_sigma(root: Path, kspace: np.ndarray) -> float:
    """σ of the simulator's noise: the k-space minus the noise-free k-space of its ground-truth sidecar."""
    gt = np.load(root / "ground_truth" / "2023_P001_cine_sax.npz")
    img, maps = gt["image"], gt["maps"]  # [nz, nt, kx, ky], [C, kx, ky]
    clean = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps[None, None] * img[:, :, None], axes=(-2, -1)),
                                        norm="ortho"), axes=(-2, -1))  # fmt: skip
    noise = kspace - clean
    return float(np.std(np.concatenate([noise.real.ravel(), noise.imag.ravel()])))


@pytest.mark.parametrize("snr", [8.0, 40.0])
def test_noise_estimate_with_and_without_readout_oversampling(tmp_path, snr) -> None:
    """Within 20 % of the simulator's σ on its (2x oversampled) files, and still when the readout oversampling is
    removed: the object then fills the readout margins, which alone overestimate σ several times."""
    base = _simulate(tmp_path / "sim", "2023", snr=snr, seed=11)
    path = base / "FullSample" / "P001" / "cine_sax.mat"
    k = _kspace_numpy(path, "kspace_full")
    sigma = _true_sigma(tmp_path / "sim", k)
    from utils.simulation.cmrx_writer import uniform_mask

    mask = uniform_mask(MATRIX[1], MATRIX[0], 4, 24)[:1].astype(np.float32)  # the 2023 pattern: every 4th + 24 ACS
    # readout oversampling removed as scanners do it: keep the central half of the image rows, back to k-space
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    h = MATRIX[0] // 2
    k_nos = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img[..., h // 2 : h // 2 + h, :], axes=(-2, -1)),
                                        norm="ortho"), axes=(-2, -1))  # fmt: skip
    for z, t in ((0, 0), (1, 2)):
        y = k[z, t] * mask
        assert abs(cmrx_noise_sigma(y, mask) / sigma - 1) < 0.2
        assert abs(calibration_noise_sigma(y, mask) / sigma - 1) < 0.2
        y_nos = k_nos[z, t] * mask
        est = cmrx_noise_sigma(y_nos, mask)
        assert abs(est / sigma - 1) < 0.2, (est / sigma, estimate_noise_sigma(y_nos, mask) / sigma)
    assert estimate_noise_sigma(y_nos, mask) > 1.5 * sigma  # the margins alone fail without oversampling


def test_metadata_from_the_file_name_and_csv_override(cmrx, tmp_path) -> None:
    from utils.cmrx_io import CINE_CONTRAST
    from utils.raw_data import load_metadata_overrides

    path = cmrx["2024"] / "Mask_Task1" / "P001" / "cine_sax_kus_Uniform4.mat"
    vol = open_raw_volume(path)
    r = vol.records[NT + 1]
    assert (r["slice"], r["frame"], r["view"], r["contrast"], r["anatomy"]) == (1, 1, "sax", CINE_CONTRAST, "heart")
    assert r["field_strength"] == 3.0 and r["TR"] is None  # cine TR is not published: missing, never guessed
    assert r["filename"] == "P001_cine_sax"  # the series name cardiac preprocessing writes
    csv = tmp_path / "meta.csv"
    csv.write_text("filename,slice,frame,TR,pathology\nP001_cine_sax,1,2,3.2,scar\n")
    vol = open_raw_volume(path, load_metadata_overrides(csv))
    assert vol.records[NT + 2]["TR"] == 3.2 and vol.records[NT + 2]["pathology"] == ["scar"]
    assert vol.records[NT + 1]["TR"] is None and vol.records[NT + 1]["pathology"] != ["scar"]  # other frames: not


def test_oracle_prior_through_the_cmrx_path_recovers_the_rss_target(cmrx, tmp_path) -> None:
    """DDS whose network knows the fully sampled image of each (slice, frame) item, at a prior size smaller than the
    grid: window placement, measured scale and its undoing, and the output size agree with the RSS target."""
    import math

    from utils.channels import channels_to_complex, complex_to_channels
    from utils.coils import center_crop
    from utils.raw_data import coil_combine, density_weights, measured_scale
    from utils.samplers import dds_sample

    vol = open_raw_volume(cmrx["2023"] / "FullSample" / "P001" / "cine_sax.mat")
    size = (48, 48)
    common = dict(mask_type="random", acc_factor=4, center_fraction=CF)
    truth = {}
    for i in range(vol.num_slices):
        k = vol.read_kspace(i)
        m = vol.measurement(i, k, **common)
        maps = coil_maps_from_acs(m.y, m.mask)
        scale = measured_scale(m.y, maps, size, density_weights(m.mask, vol.acquired))
        truth[i] = torch.from_numpy(center_crop(coil_combine(k, maps), size) / scale)
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def oracle(y, op, records, prompts, gens):
        x0 = torch.stack([truth[int(r["file_index"])] for r in records])

        def eps_fn(x_ch, t):
            a = float(acp[t[0]])
            return complex_to_channels((channels_to_complex(x_ch) - math.sqrt(a) * x0) / math.sqrt(1 - a))

        return dds_sample(eps_fn, op, y, acp, num_steps=10, eta=0.0, gamma=5.0, cg_iter=5, generators=gens), 10

    dds = _run([vol], RawReconSettings(method="diffusion", image_size=size, batch_size=NT, **common), tmp_path / "dds",
               diffusion=oracle)  # fmt: skip
    zf = _run([vol], RawReconSettings(method="zero_filled", **common), tmp_path / "zf")
    # inside the prior's window (the ranking region) the oracle is exact up to noise; the full grid also holds the
    # background and the columns outside the 48-wide window, which the oracle does not know (measured 35.5 vs 19.2 dB
    # and 28.7 vs 21.8 dB)
    assert dds["cmrx_psnr"]["mean"] > zf["cmrx_psnr"]["mean"] + 10, (dds["cmrx_psnr"], zf["cmrx_psnr"])
    assert dds["fastmri_psnr"]["mean"] > zf["fastmri_psnr"]["mean"] + 4, (dds["fastmri_psnr"], zf["fastmri_psnr"])
