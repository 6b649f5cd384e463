"""CMRxRecon preprocessing: both layouts, fully sampled and SENSE fallback, v7.3 reading, metadata, dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from _synthetic import generate_cmrx

import pre_process_cmrx
from utils.cmrx_io import MatKspace, find_cmrx_series, read_mask
from utils.coils import center_crop_or_pad
from utils.data import MRISliceDataset
from utils.simulation.matlab_io import save_mat_v73

CROP = 32
ESPIRIT = ["--espirit_calib_width", "16", "--espirit_kernel_width", "5"]


@pytest.fixture(scope="module")
def cmrx2023(tmp_path_factory):
    root = tmp_path_factory.mktemp("c23")
    generate_cmrx(root, "2023")
    return root


@pytest.fixture(scope="module")
def cmrx2024(tmp_path_factory):
    root = tmp_path_factory.mktemp("c24")
    generate_cmrx(root, "2024")
    return root


def _rel_error_vs_truth(out_dir, gt_file, name, num_frames, indices):
    gt = np.load(gt_file)
    ds = out_dir / f"heart_mvue_{CROP}_train"
    scales = json.loads((ds / "scale" / f"{name}.json").read_text())["scale"]
    maps = center_crop_or_pad(gt["maps"], (CROP, CROP))
    errors = []
    for idx in indices:
        z, t = divmod(idx, num_frames)
        x = np.load(ds / "slice" / name / f"{idx:03d}.npy") * scales[f"{idx:03d}"]
        truth = center_crop_or_pad(gt["image"][z, t], (CROP, CROP)) * np.exp(1j * np.angle(maps[0]))
        obj = np.abs(truth) > 0.1 * np.abs(truth).max()
        errors.append(np.linalg.norm((x - truth)[obj]) / np.linalg.norm(truth[obj]))
    return max(errors)


def test_mat_v73_reads_back_identical(tmp_path):
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((6, 4, 3, 2, 5)) + 1j * rng.standard_normal((6, 4, 3, 2, 5))).astype(np.complex64)
    mask = (rng.random((6, 4, 5)) > 0.5).astype(np.float64)
    save_mat_v73(tmp_path / "x.mat", {"kspace_full": k, "mask": mask})
    with MatKspace(tmp_path / "x.mat", "kspace_full") as ks:
        assert (ks.num_frames, ks.num_slices, ks.num_coils, ks.image_shape) == (5, 2, 3, (6, 4))
        for z in range(2):
            for t in range(5):
                np.testing.assert_array_equal(ks.read(z, t), k[:, :, :, z, t].transpose(2, 0, 1))
    np.testing.assert_array_equal(read_mask(tmp_path / "x.mat"), mask.transpose(2, 0, 1))


def test_2023_fully_sampled_round_trip(cmrx2023, tmp_path):
    out = tmp_path / "out"
    assert pre_process_cmrx.main(["--input_dir", str(cmrx2023), "--output_dir", str(out), "--crop_size", str(CROP),
                                  "--no_progress", *ESPIRIT]) == 0  # fmt: skip
    df = pd.read_csv(out / "metadata_cardiology_train.csv", dtype=str, keep_default_na=False)
    assert len(df) == 2 * 3 + 1 * 3
    assert set(df.anatomy) == {"heart"} and set(df.view) == {"sax", "lax"}
    assert set(df[df.view == "sax"].sequence) == {"Short axis CINE"}
    assert set(df[df.view == "lax"].sequence) == {"Long axis CINE"}
    assert set(df.contrast) == {"Balanced steady-state free precession"}
    assert set(df.field_strength) == {"3"} and set(df.vendor) == {"SIEMENS"}
    assert set(df.scanner_model) == {"MAGNETOM Vida"}
    assert set(df.num_coils) == {"10"}
    assert (df[["TR", "TE", "flip_angle"]] == "").all().all()  # cine protocol values are unknown: left empty
    sax = df[df.filename == "P001_cine_sax"]
    assert list(sax.file_index.astype(int)) == [int(s) * 3 + int(f) for s, f in zip(sax.slice, sax.frame)]
    gt = cmrx2023 / "ground_truth" / "2023_P001_cine_sax.npz"
    assert _rel_error_vs_truth(out, gt, "P001_cine_sax", 3, range(6)) < 0.08
    # The dataset reads the cardiac layout through file_index.
    ds = MRISliceDataset(out, [out / "metadata_cardiology_train.csv"], split="train",
                         crop_size=CROP, load_maps=True)  # fmt: skip
    assert len(ds) == 9
    s = next(ds[i] for i in range(len(ds)) if ds[i].filename == "P001_cine_sax" and ds[i].record["frame"] == 2.0)
    assert s.slice_idx == int(s.record["slice"]) * 3 + 2 and s.maps.shape == (10, CROP, CROP)
    assert s.prompt.startswith("heart, Slice")


def test_2023_undersampled_falls_back_to_sense(cmrx2023, tmp_path, capsys):
    inp = tmp_path / "in" / "MultiCoil" / "Cine" / "TrainingSet"
    shutil.copytree(cmrx2023 / "MultiCoil" / "Cine" / "TrainingSet" / "AccFactor04", inp / "AccFactor04")
    out = tmp_path / "out"
    assert pre_process_cmrx.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--crop_size",
                                  str(CROP), "--views", "sax", "--no_progress", *ESPIRIT]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "no fully sampled k-space: SENSE" in printed and "mask04" in printed
    gt = cmrx2023 / "ground_truth" / "2023_P001_cine_sax.npz"
    assert _rel_error_vs_truth(out, gt, "P001_cine_sax", 3, range(6)) < 0.12


def test_2024_layout_selection_and_info(cmrx2024, tmp_path):
    series, problems = find_cmrx_series(cmrx2024)
    assert not problems and [s.name for s in series] == ["P001_cine_lax", "P001_cine_sax"]
    assert all(s.fully_sampled and s.variable == "kspace_full" for s in series)
    assert series[1].info.get("FieldStrength") == "3"
    out = tmp_path / "out"
    args = ["--input_dir", str(cmrx2024), "--output_dir", str(out), "--crop_size", str(CROP), "--views", "sax",
            "--slices", "1", "--frames", "0", "2", "--no_progress", *ESPIRIT]  # fmt: skip
    assert pre_process_cmrx.main(args) == 0
    df = pd.read_csv(out / "metadata_cardiology_train.csv")
    assert list(zip(df.slice, df.frame, df.file_index)) == [(1, 0, 3), (1, 2, 5)]
    files = sorted(p.name for p in (out / f"heart_mvue_{CROP}_train" / "slice" / "P001_cine_sax").glob("*.npy"))
    assert files == ["003.npy", "005.npy"]
    gt = cmrx2024 / "ground_truth" / "2024_P001_cine_sax.npz"
    assert _rel_error_vs_truth(out, gt, "P001_cine_sax", 3, [3, 5]) < 0.08
    # 2024 undersampled only: the uniform (Task 1) file is preferred over the k-t patterns.
    only_us = tmp_path / "us"
    shutil.copytree(cmrx2024 / "MultiCoil" / "Cine" / "TrainingSet" / "Mask_Task1", only_us / "Mask_Task1")
    shutil.copytree(cmrx2024 / "MultiCoil" / "Cine" / "TrainingSet" / "Mask_Task2", only_us / "Mask_Task2")
    (sax,) = [s for s in find_cmrx_series(only_us)[0] if s.stem == "cine_sax"]
    assert not sax.fully_sampled and sax.path.name == "cine_sax_kus_Uniform4.mat" and sax.mask_variable == "mask"


def test_mapping_protocol_values_and_corrupt_file(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pdir = tmp_path / "MultiCoil" / "Mapping" / "TrainingSet" / "FullSample" / "P002"
    pdir.mkdir(parents=True)
    yy, xx = np.mgrid[-1:1:64j, -1:1:32j]
    img = (yy**2 / 0.5 + xx**2 / 0.7 < 1).astype(np.complex64)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img)), axes=(0, 1))
    coils = np.exp(-((yy[None] - np.array([-1, 1, 0, 0])[:, None, None]) ** 2)).astype(np.complex64)
    kk = np.stack([np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img * c))) for c in coils], axis=-1)  # [kx, ky, C]
    kk = kk + 1e-3 * rng.standard_normal(kk.shape)
    save_mat_v73(pdir / "T1map.mat", {"kspace_full": kk[:, :, :, None, None].repeat(2, axis=4).astype(np.complex64)})
    (pdir / "T2map.mat").write_bytes(b"MATLAB 7.3 MAT-file truncated")
    assert k.shape == (64, 32)
    out = tmp_path / "out"
    code = pre_process_cmrx.main(["--input_dir", str(tmp_path / "MultiCoil"), "--output_dir", str(out),
                                  "--crop_size", str(CROP), "--no_progress", *ESPIRIT])  # fmt: skip
    assert code == 1 and "T2map.mat: unreadable" in capsys.readouterr().out
    df = pd.read_csv(out / "metadata_cardiology_train.csv")
    assert list(df.filename.unique()) == ["P002_T1map"] and len(df) == 2
    assert (df.TR == 2.67).all() and (df.TE == 1.13).all() and (df.sequence == "MOLLI").all()
    assert df.TI.isna().all() and df.flip_angle.isna().all()


def test_nonfinite_frame_is_reported_and_skipped(cmrx2023, tmp_path, capsys):
    import h5py

    root = tmp_path / "in"
    shutil.copytree(cmrx2023, root)
    (path,) = [p for p in root.rglob("FullSample/P001/cine_sax.mat")]
    with h5py.File(path, "r+") as f:  # h5 order (frames, slices, coils, ky, kx), compound (real, imag)
        block = f["kspace_full"][1, 0]
        block["real"][0, :4, :4] = np.nan
        f["kspace_full"][1, 0] = block
    out = tmp_path / "out"
    args = ["--input_dir", str(root), "--output_dir", str(out), "--crop_size", str(CROP), "--no_progress", *ESPIRIT]
    assert pre_process_cmrx.main(args) == 1
    printed = capsys.readouterr().out
    assert "FAILED P001_cine_sax: 1 slice(s) skipped: slice 0 frame 1: non-finite k-space (16 of" in printed
    df = pd.read_csv(out / "metadata_cardiology_train.csv")
    sax = df[df.filename == "P001_cine_sax"]
    assert len(df) == 2 * 3 + 1 * 3 - 1 and (0, 1) not in set(zip(sax.slice, sax.frame))
    ds = out / f"heart_mvue_{CROP}_train" / "slice" / "P001_cine_sax"
    assert not (ds / "001.npy").exists()
    # the slice's other frames keep maps calibrated on the usable frames only
    assert all(np.isfinite(np.load(ds / f"{i:03d}.npy")).all() for i in (0, 2, 3, 4, 5))
