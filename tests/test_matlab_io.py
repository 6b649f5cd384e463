"""MATLAB v7.3 writer/reader and the simulated CMRxRecon layouts."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from utils.simulation.cmrx_writer import CMRxConfig, generate_cmrx_dataset, kt_radial_mask, uniform_mask
from utils.simulation.matlab_io import is_mat_v73, load_mat_v73, save_mat_v73


def test_mat_v73_round_trip_with_dimension_reversal(tmp_path):
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((6, 5, 3, 2, 4)) + 1j * rng.standard_normal((6, 5, 3, 2, 4))).astype(np.complex64)
    m = (rng.random((6, 5)) > 0.5).astype(np.float64)
    path = tmp_path / "x.mat"
    save_mat_v73(path, {"kspace_full": k, "mask04": m})
    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:126] == b"\x00\x02" and head[126:128] == b"IM"
    assert is_mat_v73(path)
    with h5py.File(path, "r") as f:
        ds = f["kspace_full"]
        assert ds.shape == (4, 2, 3, 5, 6)  # MATLAB (kx, ky, coils, slices, time) seen reversed
        assert ds.dtype.names == ("real", "imag") and ds.dtype["real"] == np.float32
        assert ds.attrs["MATLAB_class"] == b"single" and f["mask04"].attrs["MATLAB_class"] == b"double"
        raw = ds[()]
        np.testing.assert_array_equal(raw["real"].T + 1j * raw["imag"].T, k)
    back = load_mat_v73(path)
    np.testing.assert_array_equal(back["kspace_full"], k)
    np.testing.assert_array_equal(back["mask04"], m)
    assert back["kspace_full"].dtype == np.complex64


def test_masks_reach_their_acceleration():
    m = uniform_mask(ky=246, kx=8, acc=8, acs=24)
    assert np.all(m == m[:1]) and 1 / m.mean() == pytest.approx(246 / (246 // 8 + 24 - 3), rel=0.15)
    r = kt_radial_mask(ky=64, kx=96, nt=3, acc=4)
    assert r.shape == (96, 64, 3) and 3.0 < 1 / r.mean() <= 4.0
    assert not np.array_equal(r[..., 0], r[..., 1])  # rotates over time


@pytest.mark.parametrize("layout", ["2023", "2024"])
def test_cmrx_layout(tmp_path, layout):
    cfg = CMRxConfig(tmp_path, layout=layout, num_volumes=1, num_slices_sax=2, num_slices_lax=1, num_frames=3,
                     matrix=(48, 40), accelerations=(4, 8), task2_patterns=("ktRadial",))  # fmt: skip
    generate_cmrx_dataset(cfg, log=None)
    root = tmp_path / "MultiCoil" / "Cine" / "TrainingSet"
    full = load_mat_v73(root / "FullSample" / "P001" / "cine_sax.mat")["kspace_full"]
    assert full.shape == (48, 40, 10, 2, 3) and full.dtype == np.complex64
    if layout == "2023":
        sub = load_mat_v73(root / "AccFactor04" / "P001" / "cine_sax.mat")["kspace_sub04"]
        mask = load_mat_v73(root / "AccFactor04" / "P001" / "cine_sax_mask.mat")["mask04"]
        assert mask.shape == (48, 40) and mask[:, 20 - 12 : 20 + 12].all()  # 24 ACS lines
        np.testing.assert_array_equal(sub, full * mask[:, :, None, None, None])
        assert (root / "AccFactor08" / "P001" / "cine_lax_mask.mat").exists()
    else:
        kus = load_mat_v73(root / "Mask_Task1" / "P001" / "cine_sax_kus_Uniform8.mat")["kus"]
        mask = load_mat_v73(root / "Mask_Task1" / "P001" / "cine_sax_mask_Uniform8.mat")["mask"]
        np.testing.assert_array_equal(kus, full * mask[:, :, None, None, None])
        kt = load_mat_v73(root / "Mask_Task2" / "P001" / "cine_lax_mask_ktRadial4.mat")["mask"]
        assert kt.shape == (48, 40, 3)
        rows = (root / "ImgSnapshot" / "P001" / "cine_sax_info.csv").read_text().splitlines()
        assert "FieldStrength,3" in rows
    # The heart beats: frames differ, and blood (bright in bSSFP) changes in area.
    gt = np.load(tmp_path / "ground_truth" / f"{layout}_P001_cine_sax.npz")
    img = np.abs(gt["image"])
    assert not np.allclose(img[0, 0], img[0, 1])


def test_cmrx_deterministic(tmp_path):
    hashes = []
    for run in ("a", "b"):
        cfg = CMRxConfig(tmp_path / run, num_volumes=1, num_slices_sax=1, num_slices_lax=1, num_frames=2,
                         matrix=(32, 24), accelerations=(4,), ground_truth=False)  # fmt: skip
        paths = generate_cmrx_dataset(cfg, log=None)
        hashes.append(sorted((p.relative_to(tmp_path / run).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                             for p in paths))  # fmt: skip
    assert hashes[0] == hashes[1]


def test_cli_smoke(tmp_path, repo_root):
    """Runs the real script's ``main`` in-process (a subprocess would pay torch/nilearn/numba imports again)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic_data", repo_root / "make_synthetic_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--format", "fastmri", "--output_dir", str(tmp_path / "fm"), "--num_volumes", "1", "--num_slices", "2",
            "--num_coils", "2", "--seed", "4", "--acquisitions", "AXFLAIR"]  # fmt: skip
    assert script.main(args + ["--matrix", "32x16"]) == 0
    assert len(list((tmp_path / "fm").glob("file_brain_AXFLAIR_*.h5"))) == 1
    with pytest.raises(SystemExit, match="matrix"):
        script.main(args + ["--matrix", "33x16"])
    assert script.main(["--format", "cmrx", "--layout", "2024", "--output_dir", str(tmp_path / "cm"), "--num_slices",
                        "1", "--num_slices_lax", "1", "--num_frames", "2", "--matrix", "32x24", "--accelerations",
                        "4", "--no_ground_truth"]) == 0  # fmt: skip
    assert (tmp_path / "cm" / "MultiCoil" / "Cine" / "TrainingSet" / "FullSample" / "P001" / "cine_lax.mat").exists()
