"""Reconstruction of raw simulated acquisitions (no inverse crime): readers, masks, maps, noise, scale, outputs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from utils.masks import get_mask, seed_from_name
from utils.raw_data import (
    coil_maps_from_acs,
    estimate_noise_sigma,
    list_raw_files,
    load_metadata_overrides,
    open_raw_volume,
    slice_measurement,
)
from utils.raw_reconstruction import RawReconSettings, run_raw_reconstruction, summarize_raw, validate_volumes

MATRIX = "96x48"
CF = 0.17  # 8 of 48 centre lines: enough for ESPIRiT at this tiny width (real files: 15-30 ACS lines)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    """One simulated volume (2 slices, 4 coils, partial phase encode, noise) + its 4x test-format copy, written by the
    real script."""
    import make_synthetic_data

    out = tmp_path_factory.mktemp("raw")
    rc = make_synthetic_data.main([
        "--format", "fastmri", "--output_dir", str(out), "--num_volumes", "1", "--num_slices", "2", "--matrix", MATRIX,
        "--num_coils", "4", "--seed", "5", "--challenge_accelerations", "4", "--challenge_center_fraction", str(CF),
    ])  # fmt: skip
    assert rc == 0
    return out


def _numpy_rss(kspace: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Independent RSS: numpy's centred orthonormal inverse FFT, RSS over coils, fastMRI centre crop."""
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    rss = np.sqrt((np.abs(img) ** 2).sum(-3))
    h, w = crop
    top, left = (rss.shape[-2] - h) // 2, (rss.shape[-1] - w) // 2
    return rss[..., top : top + h, left : left + w]


def _run(volumes, settings, out, **kw):
    run_raw_reconstruction(volumes, settings, out, progress=False, **kw)
    return summarize_raw(out, volumes)


def test_zero_filled_is_rss_of_masked_raw_kspace_and_scores_reproduce(raw_dir, tmp_path) -> None:
    path = next(raw_dir.glob("*.h5"))
    vol = open_raw_volume(path)
    assert vol.kind == "validation" and vol.has_target
    settings = RawReconSettings(method="zero_filled", mask_type="random", acc_factor=4, center_fraction=CF)
    summary = _run([vol], settings, tmp_path / "zf")

    with h5py.File(path, "r") as f:
        kspace = f["kspace"][()]
        target = f["reconstruction_rss"][()]
    w = kspace.shape[-1]
    # acquired band from the header limits, as fastMRI computes it; masks seeded from (file stem, slice)
    left = w // 2 - vol.header.pe_center
    acquired = np.zeros(w, bool)
    acquired[left : left + vol.header.pe_max + 1] = True
    expected = []
    for i in range(kspace.shape[0]):
        m = get_mask("random", kspace.shape[-2:], 4, center_fraction=CF, seed=seed_from_name(path.stem, i)).mask
        expected.append(_numpy_rss(kspace[i] * (m.numpy()[0] * acquired), target.shape[-2:]))
    expected = np.stack(expected)

    with h5py.File(tmp_path / "zf" / "reconstructions" / path.name, "r") as f:  # plain h5py, submission format
        rec = f["reconstruction"][()]
        assert f["reconstruction"].dtype == np.float32
    assert rec.shape == target.shape
    np.testing.assert_allclose(rec, expected, rtol=0, atol=1e-5 * expected.max())

    # scoring the file against reconstruction_rss reproduces the summary (fastMRI protocol, independent formula)
    mse = np.mean((target.astype(np.float64) - rec) ** 2)
    psnr = 20 * np.log10(target.max()) - 10 * np.log10(mse)
    nmse = np.sum((target.astype(np.float64) - rec) ** 2) / np.sum(target.astype(np.float64) ** 2)
    assert summary["fastmri_psnr"]["mean"] == pytest.approx(psnr, abs=1e-4)
    assert summary["fastmri_nmse"]["mean"] == pytest.approx(nmse, rel=1e-4)
    row = summary["volumes"][0]
    # achieved acceleration over the acquired columns, not over the padded width
    masks = [np.load(tmp_path / "zf" / "slices" / path.stem / f"{i:03d}.npz")["mask"] for i in range(2)]
    assert row["acceleration"] == pytest.approx(np.mean([acquired.sum() / m[0, acquired].sum() for m in masks]))
    assert all(m[0, ~acquired].sum() == 0 for m in masks)  # padded columns never count as measured


def test_test_file_uses_its_own_mask_and_refuses_contradicting_flags(raw_dir, tmp_path) -> None:
    """A test-format copy: its mask is the one used; with γ → ∞ (zero network, many CG steps) the result's k-space
    reproduces the measured lines far better than the lines that were not measured."""
    from utils.operators import SenseOperator
    from utils.samplers import dds_sample

    path = next((raw_dir / "challenge_acc4").glob("*.h5"))
    full_path = raw_dir / path.name
    vol = open_raw_volume(path)
    assert vol.kind == "test" and not vol.has_target and vol.file_acceleration == 4
    for bad in (dict(acc_factor=8.0), dict(mask_type="poisson2d"), dict(mask_type="random")):
        with pytest.raises(ValueError, match="contradicts"):
            validate_volumes([vol], RawReconSettings(**bad))
    validate_volumes([vol], RawReconSettings(acc_factor=4.0, mask_type="equispaced_fraction"))  # agrees: accepted

    acp = torch.linspace(0.9999, 0.98, 1000).cumprod(0)

    def stub(y, op, records, prompts, gens):  # DDS with a network that predicts no noise
        x = dds_sample(lambda xt, t: torch.zeros_like(xt), op, y, acp, num_steps=2, gamma=1e4, cg_iter=60,
                       generators=gens)  # fmt: skip
        assert records[0]["TR"] is not None  # metadata from the file's own header
        return x, 2

    settings = RawReconSettings(method="diffusion", gamma=1e4, outside="zero")
    _run([vol], settings, tmp_path / "dds", diffusion=stub)
    with h5py.File(full_path, "r") as f:
        k_full = f["kspace"][0]
    with h5py.File(path, "r") as f:
        file_mask = f["mask"][()]
        y = f["kspace"][0]
    res = np.load(tmp_path / "dds" / "slices" / path.stem / "000.npz")
    np.testing.assert_array_equal(res["mask"][0], file_mask * vol.acquired)
    maps = coil_maps_from_acs(y, res["mask"])
    k_rec = SenseOperator(torch.from_numpy(maps), torch.ones(1, y.shape[-1])).forward(
        torch.from_numpy(res["image_full"])[None])[0].numpy()  # fmt: skip
    meas = (res["mask"][0] > 0)
    unmeas = vol.acquired & ~meas
    err_meas = np.linalg.norm((k_rec - y)[..., meas]) / np.linalg.norm(y[..., meas])
    err_unmeas = np.linalg.norm((k_rec - k_full)[..., unmeas]) / np.linalg.norm(k_full[..., unmeas])
    assert err_meas < 0.25 and err_meas < 0.5 * err_unmeas, (err_meas, err_unmeas)


def test_maps_depend_only_on_the_acs_lines(raw_dir) -> None:
    vol = open_raw_volume(next(raw_dir.glob("*.h5")))
    k = vol.read_kspace(0)
    m = slice_measurement(vol, 0, k, "random", 4, CF)
    maps = coil_maps_from_acs(m.y, m.mask)
    assert (np.abs(maps) ** 2).sum(0).max() == pytest.approx(1.0, abs=1e-4)
    rng = np.random.default_rng(0)
    changed = m.y.copy()
    w = k.shape[-1]
    centre = slice(w // 2 - m.num_center_lines // 2, w // 2 - m.num_center_lines // 2 + m.num_center_lines)
    noise = (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)).astype(np.complex64) * np.abs(k).max()
    outside = np.ones(w, bool)
    outside[centre] = False
    changed[..., outside] = noise[..., outside]  # every non-ACS column: measured outer lines and unmeasured ones
    np.testing.assert_allclose(coil_maps_from_acs(changed, m.mask), maps, atol=1e-6)
    changed[:, k.shape[1] // 2, w // 2] *= 3  # an ACS sample does change them (the check can fail)
    assert np.abs(coil_maps_from_acs(changed, m.mask) - maps).max() > 1e-3


def test_noise_estimate_within_20_percent_over_snrs(tmp_path) -> None:
    from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset

    for snr in (8.0, 30.0, 120.0):
        out = tmp_path / f"snr{snr:g}"
        generate_fastmri_dataset(FastMRIConfig(output_dir=out, num_slices=1, matrix=(64, 32), num_coils=(4,),
                                               snr=snr, seed=int(snr)), log=None)  # fmt: skip
        path = next(out.glob("*.h5"))
        true_sigma = float(np.load(out / "ground_truth" / f"{path.stem}.npz")["noise_std"])
        vol = open_raw_volume(path)
        for mask_type, acc, cf in (("random", 4, 0.25), ("equispaced_fraction", 8, 0.08)):
            m = slice_measurement(vol, 0, vol.read_kspace(0), mask_type, acc, cf)
            est = estimate_noise_sigma(m.y, m.mask)
            assert abs(est / true_sigma - 1) < 0.2, (snr, mask_type, est, true_sigma)


def test_measured_scale_within_0p3_db_of_oracle_scale(raw_dir, tmp_path) -> None:
    """CS (scale-dependent through λ) with the scale from the measured data vs the oracle scale from the fully
    sampled image: the same PSNR against reconstruction_rss within 0.3 dB."""
    vol = open_raw_volume(next(raw_dir.glob("*.h5")))
    psnr = {}
    for rule in ("measured", "oracle"):
        s = RawReconSettings(method="cs", mask_type="random", acc_factor=4, center_fraction=CF, cs_iter=40,
                             scale_rule=rule)  # fmt: skip
        psnr[rule] = _run([vol], s, tmp_path / rule)["fastmri_psnr"]["mean"]
    zf = _run([vol], RawReconSettings(method="zero_filled", mask_type="random", acc_factor=4, center_fraction=CF),
              tmp_path / "zf")["fastmri_psnr"]["mean"]  # fmt: skip
    assert abs(psnr["measured"] - psnr["oracle"]) < 0.3, psnr
    assert psnr["measured"] > zf  # CS on the real grid beats zero-filling


def test_sharding_and_resume_give_the_same_summary(raw_dir, tmp_path) -> None:
    vol = open_raw_volume(next(raw_dir.glob("*.h5")))
    s = RawReconSettings(method="zero_filled", mask_type="equispaced_fraction", acc_factor=4)
    one = _run([vol], s, tmp_path / "one")
    for rank in (0, 1):
        run_raw_reconstruction([vol], s, tmp_path / "two", process_index=rank, num_processes=2, progress=False)
    two = summarize_raw(tmp_path / "two", [vol])
    (tmp_path / "two" / "rows" / vol.stem / "001.json").unlink()  # resume redoes only the missing slice
    run_raw_reconstruction([vol], s, tmp_path / "two", progress=False)
    again = summarize_raw(tmp_path / "two", [vol])
    for key in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse"):
        assert one[key] == two[key] == again[key]


def test_metadata_from_header_and_csv_override(raw_dir, tmp_path) -> None:
    import pandas as pd

    path = next(raw_dir.glob("*.h5"))
    truth = pd.read_csv(raw_dir / "ground_truth" / "metadata.csv")
    vol = open_raw_volume(path)
    rec = vol.records[1]
    row = truth[(truth.filename == path.stem) & (truth.slice == 1)].iloc[0]
    assert rec["TR"] == pytest.approx(row.TR) and rec["TE"] == pytest.approx(row.TE)
    assert rec["contrast"] == row.contrast and rec["field_strength"] == pytest.approx(row.field_strength, abs=1e-3)
    assert rec["slice_number"] == 1 and rec["pathology"] == []
    csv = tmp_path / "extra.csv"
    csv.write_text(f"filename,slice,pathology,TE\n{path.stem}.h5,1,Nonspecific lesion,\n")
    vol2 = open_raw_volume(path, load_metadata_overrides(csv))
    assert vol2.records[1]["pathology"] == ["Nonspecific lesion"]
    assert vol2.records[1]["TE"] == rec["TE"]  # an empty cell keeps the header's value
    assert vol2.records[0] == vol.records[0]
    assert list_raw_files(path) == [path]
    with pytest.raises(FileNotFoundError):
        list_raw_files(tmp_path / "nothing")


def test_script_raw_dir_smoke_and_refusals(raw_dir, tmp_path, capsys) -> None:
    """``recon_complex_multi.py --raw_dir``: test files need no mask flags; contradicting ones exit 2 with one line."""
    import recon_complex_multi

    test_dir = raw_dir / "challenge_acc4"
    rc = recon_complex_multi.main(["--raw_dir", str(test_dir), "--method", "zero_filled", "--save_dir", str(tmp_path)])
    assert rc == 0
    files = list(tmp_path.glob("raw/file_mask/zero_filled-*/reconstructions/*.h5"))
    assert [f.name for f in files] == [p.name for p in test_dir.glob("*.h5")]
    with h5py.File(files[0], "r") as f:
        assert f["reconstruction"].shape == (2, 48, 48) and f["reconstruction"].dtype == np.float32
    capsys.readouterr()
    rc = recon_complex_multi.main(["--raw_dir", str(test_dir), "--method", "zero_filled", "--acc_factor", "8",
                                   "--save_dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "contradicts" in err and len(err.splitlines()) == 1
    rc = recon_complex_multi.main(["--method", "zero_filled", "--save_dir", str(tmp_path)])
    assert rc == 2 and "--raw_dir" in capsys.readouterr().err
    rc = recon_complex_multi.main(["--raw_dir", str(test_dir), "--method", "zero_filled", "--gamma", "-1",
                                   "--save_dir", str(tmp_path)])  # fmt: skip
    assert rc == 2 and "gamma" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.h5").write_bytes(b"not an hdf5 file")
    rc = recon_complex_multi.main(["--raw_dir", str(bad), "--method", "zero_filled", "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "truncated.h5" in err and len(err.splitlines()) == 1


def test_oracle_prior_through_the_raw_path_recovers_the_rss_target(raw_dir, tmp_path) -> None:
    """DDS whose network knows the fully sampled image (placed by ``P``, on the measured scale) must give back the
    file's ``reconstruction_rss`` far better than zero-filling: the window placement, the scale and its undoing, the
    packing and the output crop agree with the target's geometry."""
    import math

    from utils.channels import channels_to_complex, complex_to_channels
    from utils.coils import center_crop
    from utils.raw_data import coil_combine, density_weights, measured_scale
    from utils.samplers import dds_sample

    vol = open_raw_volume(next(raw_dir.glob("*.h5")))
    size = vol.recon_shape
    truth = {}
    for i in range(vol.num_slices):
        k = vol.read_kspace(i)
        m = slice_measurement(vol, i, k, "random", 4, CF)
        maps = coil_maps_from_acs(m.y, m.mask)
        scale = measured_scale(m.y, maps, size, density_weights(m.mask, vol.acquired))
        truth[i] = torch.from_numpy(center_crop(coil_combine(k, maps), size) / scale)
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def oracle(y, op, records, prompts, gens):
        x0 = torch.stack([truth[r["slice_number"]] for r in records])

        def eps_fn(x_ch, t):
            a = float(acp[t[0]])
            return complex_to_channels((channels_to_complex(x_ch) - math.sqrt(a) * x0) / math.sqrt(1 - a))

        return dds_sample(eps_fn, op, y, acp, num_steps=10, eta=0.0, gamma=5.0, cg_iter=5, generators=gens), 10

    common = dict(mask_type="random", acc_factor=4, center_fraction=CF)
    dds = _run([vol], RawReconSettings(method="diffusion", image_size=size, batch_size=2, num_samples=2, **common),
               tmp_path / "dds", diffusion=oracle)  # fmt: skip
    zf = _run([vol], RawReconSettings(method="zero_filled", **common), tmp_path / "zf")
    assert dds["fastmri_psnr"]["mean"] > zf["fastmri_psnr"]["mean"] + 10, (dds["fastmri_psnr"], zf["fastmri_psnr"])
    with h5py.File(tmp_path / "dds" / "reconstructions" / vol.path.name, "r") as f:  # ensemble: the std map is saved
        rec, std, cplx = f["reconstruction"][()], f["std"][()], f["reconstruction_complex"][()]
    assert std.shape == rec.shape and std.max() < 1e-3 * rec.max()  # two samples of an oracle prior agree
    np.testing.assert_allclose(np.abs(cplx), rec, rtol=1e-6)


def test_dps_gets_each_slices_estimated_sigma_on_the_raw_path(raw_dir, tmp_path) -> None:
    """DPS's step follows σ on --raw_dir: the reconstructor receives every slice's estimated σ on the normalised scale
    (the row's ``sigma_normalized``) and the run's s. (DDS receives neither: the five-argument stubs above.)"""
    import json

    vol = open_raw_volume(next(raw_dir.glob("*.h5")))
    seen = []

    def stub(y, op, records, prompts, gens, **kw):
        seen.append(kw)
        return torch.zeros(y.shape[0], *op.image_shape, dtype=y.dtype), 1

    settings = RawReconSettings(method="diffusion", sampler="dps", mask_type="random", acc_factor=4,
                                center_fraction=CF, prior_error_std=0.2, batch_size=2)
    _run([vol], settings, tmp_path / "dps", diffusion=stub)
    (kw,) = seen
    rows = sorted((tmp_path / "dps").rglob("rows/*/*.json"))
    expected = [json.loads(r.read_text())["sigma_normalized"] for r in rows]
    assert kw["prior_error_std"] == 0.2 and kw["noise_sigma"].tolist() == pytest.approx(expected, rel=1e-6)
    assert all(v > 0 for v in expected)
