"""fastMRI preprocessing: fast ESPIRiT, MVUE vs ground truth, CLI round trip, corrupt files, resume, stats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from _synthetic import FAST_ESPIRIT_ARGS, FASTMRI_CROP, generate_fastmri

import make_metadata_stats
import pre_processing_final
from utils.coils import center_crop_or_pad, espirit_maps, espirit_maps_fast
from utils.fastmri_io import FastMRIFile
from utils.metadata import load_metadata_stats, load_records
from utils.preprocessing.fastmri import (
    PreprocessConfig,
    contrast_from_acquisition,
    infer_anatomy,
    load_fastmri_plus,
    run_preprocessing,
)
from utils.preprocessing.layout import read_scale
from utils.preprocessing.slices import EspiritParams, process_kspace_slice

SMALL_ESPIRIT = EspiritParams(calib_width=16, kernel_width=5)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    generate_fastmri(out)
    return out


@pytest.fixture(scope="module")
def processed(gen_dir, tmp_path_factory):
    """One CLI run (train split: --write_stats is train-only; fastMRI+ pathology, stats)."""
    out = tmp_path_factory.mktemp("out")
    args = ["--input_dir", str(gen_dir), "--output_root", str(out), "--train", "--crop_size", str(FASTMRI_CROP),
            "--write_stats",
            "--fastmri_plus_csv", str(gen_dir / "ground_truth" / "fastmri_plus_brain.csv"), "--no_progress",
            *FAST_ESPIRIT_ARGS]  # fmt: skip
    assert pre_processing_final.main(args) == 0
    return out


def _corr_inside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[:, mask], b[:, mask]
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fast_espirit_equals_sigpy(gen_dir):
    with FastMRIFile.open(sorted(gen_dir.glob("*.h5"))[0]) as f:
        k = f.read_slice(1)
    ref = espirit_maps(k, calib_width=16, kernel_width=5, max_iter=100)
    fast = espirit_maps_fast(k, calib_width=16, kernel_width=5)
    inside = (np.abs(ref) ** 2).sum(0) > 0.5
    assert inside.mean() > 0.2
    assert _corr_inside(ref, fast, inside) > 0.9999
    assert np.abs(ref - fast)[:, inside].max() < 1e-3
    # Evaluating only the kept pixels is exact (crop and pad).
    for shape in [(48, 48), (40, 60)]:
        np.testing.assert_allclose(espirit_maps_fast(k, 16, kernel_width=5, out_shape=shape),
                                   center_crop_or_pad(fast, shape), atol=1e-5)  # fmt: skip


def test_mvue_matches_ground_truth(gen_dir):
    path = sorted(gen_dir.glob("*.h5"))[0]
    gt = np.load(gen_dir / "ground_truth" / f"{path.stem}.npz")
    with FastMRIFile.open(path) as f:
        out = process_kspace_slice(f.read_slice(1), FASTMRI_CROP, SMALL_ESPIRIT)
    image = out.image * out.scale
    truth = center_crop_or_pad(gt["image"][1], (FASTMRI_CROP, FASTMRI_CROP))
    true_maps = center_crop_or_pad(gt["maps"], (FASTMRI_CROP, FASTMRI_CROP))
    # ESPIRiT maps carry coil 0's phase removed, so the MVUE is the object times that phase.
    expected = truth * np.exp(1j * np.angle(true_maps[0]))
    obj = np.abs(truth) > 0.1 * np.abs(truth).max()
    rel = np.linalg.norm((image - expected)[obj]) / np.linalg.norm(expected[obj])
    assert rel < 0.05, rel
    assert np.percentile(np.abs(out.image), 99) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose((np.abs(out.maps) ** 2).sum(0)[obj], 1.0, atol=1e-3)  # maps not scaled


def test_cli_round_trip_layout_and_metadata(gen_dir, processed):
    ds = processed / f"brain_mvue_{FASTMRI_CROP}_train"
    files = sorted(p.stem for p in gen_dir.glob("*.h5"))
    for stem in files:
        for idx in range(3):
            img = np.load(ds / "slice" / stem / f"{idx:03d}.npy")
            mps = np.load(ds / "mps" / stem / f"{idx:03d}.npy")
            assert img.dtype == np.complex64 and img.shape == (FASTMRI_CROP, FASTMRI_CROP)
            assert mps.dtype == np.complex64 and mps.shape == (4, FASTMRI_CROP, FASTMRI_CROP)
            assert np.percentile(np.abs(img), 99) == pytest.approx(1.0, rel=1e-5)
            assert (np.abs(mps) ** 2).sum(0).max() == pytest.approx(1.0, abs=1e-3)
            assert read_scale(ds, stem, idx) > 0
    assert not list(processed.rglob("*.tmp"))
    # The CSV agrees with what the simulator put in the headers / attributes, column for column.
    ours = pd.read_csv(processed / "metadata_brain_train.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(gen_dir / "ground_truth" / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(ours.columns) == list(truth.columns)
    key = ["filename", "slice"]
    ours_s = ours.sort_values(key).reset_index(drop=True).drop(columns="pathology")
    truth_s = truth.sort_values(key).reset_index(drop=True).drop(columns="pathology")
    pd.testing.assert_frame_equal(ours_s, truth_s)
    # Pathology comes from the fastMRI+ CSV: one label per annotation box.
    ann = pd.read_csv(gen_dir / "ground_truth" / "fastmri_plus_brain.csv")
    records = load_records(processed / "metadata_brain_train.csv")
    assert sum(len(r["pathology"] or []) for r in records) == len(ann) > 0
    stats = load_metadata_stats(processed / "metadata_stats.json")
    assert stats["anatomy"] == ["brain"] and set(stats["contrast"]) == set(truth["contrast"])


def test_corrupt_file_is_reported_and_others_processed(gen_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    good = sorted(gen_dir.glob("*.h5"))
    for p in good:
        shutil.copy(p, inp / p.name)
    data = good[0].read_bytes()
    (inp / "file_brain_AXT2_999_truncated.h5").write_bytes(data[: len(data) // 2])
    (inp / "file_brain_AXT2_999_garbage.h5").write_bytes(b"not an hdf5 file")
    out = tmp_path / "out"
    args = ["--input_dir", str(inp), "--output_root", str(out), "--train", "--crop_size", str(FASTMRI_CROP),
            "--num_workers", "2", "--no_progress", *FAST_ESPIRIT_ARGS]  # fmt: skip
    assert pre_processing_final.main(args) == 1
    printed = capsys.readouterr().out
    assert "FAILED file_brain_AXT2_999_truncated" in printed and "FAILED file_brain_AXT2_999_garbage" in printed
    assert "2/4 ok" in printed
    csv = pd.read_csv(out / "metadata_brain_train.csv")
    assert sorted(set(csv["filename"])) == sorted(p.stem for p in good)
    assert len(csv) == 6
    assert len(list((out / f"brain_mvue_{FASTMRI_CROP}_train" / "slice").rglob("*.npy"))) == 6


def test_resume_after_killed_run(gen_dir, processed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(processed, out)
    ds = out / f"brain_mvue_{FASTMRI_CROP}_train"
    stem = sorted(p.stem for p in gen_dir.glob("*.h5"))[0]
    # What a kill leaves: a slice never written, a leftover temporary file, a slice whose scale was not yet recorded.
    (ds / "slice" / stem / "002.npy").unlink()
    (ds / "mps" / stem / ".001.npy.12345.tmp").write_bytes(b"\x93NUMPY half")
    scale_file = ds / "scale" / f"{stem}.json"
    info = json.loads(scale_file.read_text())
    del info["scale"]["001"]
    scale_file.write_text(json.dumps(info))
    untouched = ds / "slice" / stem / "000.npy"
    before = untouched.stat().st_mtime_ns
    cfg = PreprocessConfig(input_dir=gen_dir, output_root=out, split="train", crop_size=FASTMRI_CROP,
                           espirit=SMALL_ESPIRIT)
    summary = run_preprocessing(cfg, show_progress=False)
    assert summary.ok
    assert (summary.slices_written, summary.slices_skipped) == (2, 4)
    assert untouched.stat().st_mtime_ns == before
    assert not list(out.rglob("*.tmp"))
    ref = np.load(processed / f"brain_mvue_{FASTMRI_CROP}_train" / "slice" / stem / "002.npy")
    np.testing.assert_allclose(np.load(ds / "slice" / stem / "002.npy"), ref, atol=1e-6)
    assert read_scale(ds, stem, 1) is not None
    # A complete output is left alone.
    again = run_preprocessing(cfg, show_progress=False)
    assert (again.slices_written, again.slices_skipped) == (0, 6)


def test_make_metadata_stats_on_real_csvs(test_data_dir, tmp_path):
    out = tmp_path / "stats.json"
    csvs = [test_data_dir / "metadata_val_knee.csv", test_data_dir / "metadata_val_brain_head.csv"]
    assert make_metadata_stats.main([*map(str, csvs), "--output", str(out)]) == 0
    stats = load_metadata_stats(out)
    assert stats["anatomy"] == ["brain", "knee"]
    assert {"PD", "PDFS", "FLAIR"} <= set(stats["contrast"])
    assert "Nonspecific white matter lesion" in stats["pathology"]
    assert stats["TR"]["max"] >= 9000 and stats["slice_number"]["min"] == 0


def test_small_helpers(tmp_path):
    assert infer_anatomy("file_brain_AXT1_202_2020576.h5") == "brain"
    assert infer_anatomy("file1000007") == "knee"
    assert contrast_from_acquisition("CORPDFS_FBK") == "PDFS"
    assert contrast_from_acquisition("AXT1POST") == "T1 post-contrast"
    assert contrast_from_acquisition(None) is None
    p = tmp_path / "plus.csv"
    p.write_text("file,slice,study_level,x,y,width,height,label\n"
                 "file_a,3,No,1,2,3,4,Nonspecific lesion\nfile_a,3,No,1,2,3,4,Nonspecific lesion\n"
                 "file_a,,Yes,,,,,Normal for age\n")  # fmt: skip
    assert load_fastmri_plus(p) == {("file_a", 3): ["Nonspecific lesion", "Nonspecific lesion"]}
    with pytest.raises(ValueError):
        EspiritParams(backend="bart")


@pytest.mark.parametrize("shape", [(63, 41), (64, 33)])
def test_fast_espirit_odd_sizes(shape):
    import sigpy.mri as mr

    h, w = shape
    rng = np.random.default_rng(0)
    maps = mr.birdcage_maps((4, h, w)).astype(np.complex64)
    yy, xx = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    img = ((yy / 0.6) ** 2 + (xx / 0.8) ** 2 < 1) * (1 + 0.3 * np.sin(5 * yy)) * np.exp(1j * xx)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k = (k + 1e-3 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(np.complex64)
    ref = espirit_maps(k, calib_width=16, kernel_width=5, max_iter=200)
    fast = espirit_maps_fast(k, calib_width=16, kernel_width=5)
    np.testing.assert_array_equal(np.abs(ref) > 0, np.abs(fast) > 0)
    assert np.abs(ref - fast).max() < 1e-4
