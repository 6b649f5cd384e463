"""MRISliceDataset / collate_samples: generator -> preprocessing -> dataset round trip, real CSVs, error handling."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from _synthetic import FASTMRI_CROP, generate_fastmri

from utils.data import MRIBatch, MRISample, MRISliceDataset, collate_samples
from utils.metadata import build_prompt, load_records
from utils.preprocessing.fastmri import PreprocessConfig, run_preprocessing
from utils.preprocessing.slices import EspiritParams

REAL_KNEE_PROMPT = "knee, Slice 20, PDFS, Sequence: TurboSpinEcho, TR: 3120, TE: 33, TI: 100, Flip angle: 140"


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    gen = tmp_path_factory.mktemp("gen")
    generate_fastmri(gen, num_volumes=2, num_slices=2, seed=3)
    out = tmp_path_factory.mktemp("fastmri")
    cfg = PreprocessConfig(input_dir=gen, output_root=out, split="train", crop_size=FASTMRI_CROP,
                           espirit=EspiritParams(calib_width=16, kernel_width=5))  # fmt: skip
    assert run_preprocessing(cfg, show_progress=False).ok
    return gen, out


def _fake_layout(root, anatomy, filename, indices, size=8, coils=3, split="val"):
    rng = np.random.default_rng(0)
    for idx in indices:
        for sub, shape in (("slice", (size, size)), ("mps", (coils, size, size))):
            path = root / f"{anatomy}_mvue_{size}_{split}" / sub / filename / f"{idx:03d}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64))


def test_round_trip_generator_preprocessing_dataset(round_trip):
    gen, out = round_trip
    csv = out / "metadata_brain_train.csv"
    ds = MRISliceDataset(out, [csv], split="train", crop_size=FASTMRI_CROP, load_maps=True, seed=0)
    assert len(ds) == 4
    sample = ds[1]
    assert isinstance(sample, MRISample)
    assert sample.image.dtype == torch.float32 and sample.image.shape == (2, FASTMRI_CROP, FASTMRI_CROP)
    stored = np.load(out / f"brain_mvue_{FASTMRI_CROP}_train" / "slice" / sample.filename / f"{sample.slice_idx:03d}.npy")
    np.testing.assert_array_equal(sample.image[0].numpy() + 1j * sample.image[1].numpy(), stored)
    assert sample.maps.dtype == torch.complex64 and sample.maps.shape == (4, FASTMRI_CROP, FASTMRI_CROP)
    assert sample.anatomy == "brain" and sample.record["slice_number"] == float(sample.slice_idx)
    truth = pd.read_csv(gen / "ground_truth" / "metadata.csv", dtype=str, keep_default_na=False)
    row = truth[(truth.filename == sample.filename) & (truth.slice == str(sample.slice_idx))].iloc[0]
    assert sample.record["TR"] == float(row.TR) and sample.record["vendor"] == row.vendor
    assert sample.prompt.startswith(f"brain, Slice {sample.slice_idx}, {row.contrast}")
    batch = collate_samples([ds[i] for i in range(len(ds))])
    assert isinstance(batch, MRIBatch) and len(batch) == 4
    assert batch.images.shape == (4, 2, FASTMRI_CROP, FASTMRI_CROP) and batch.maps.shape == (4, 4, FASTMRI_CROP, FASTMRI_CROP)
    assert batch.slice_idx.dtype == torch.long and len(batch.prompts) == len(batch.records) == 4


def test_prompt_sequence_dropout(round_trip):
    _, out = round_trip
    csv = out / "metadata_brain_train.csv"
    train = MRISliceDataset(out, csv, split="train", crop_size=FASTMRI_CROP, seed=7)
    draws = [train.include_sequence(i) for i in range(len(train))]
    assert draws == [MRISliceDataset(out, csv, split="train", crop_size=FASTMRI_CROP, seed=7).include_sequence(i)
                     for i in range(len(train))]  # fmt: skip
    for i, keep in enumerate(draws):
        assert ("Sequence:" in train[i].prompt) == keep
    many = [train.include_sequence(i) for i in range(len(train))]
    train.set_epoch(1)
    rates = np.mean([train.include_sequence(i) for i in range(len(train))] + many)
    assert 0.0 <= rates <= 1.0
    # The draw itself is Bernoulli(p): check the rate on many indices.
    assert abs(np.mean([train.include_sequence(i) for i in range(2000)]) - 0.5) < 0.05
    never = MRISliceDataset(out, csv, split="train", crop_size=FASTMRI_CROP, prompt_sequence_prob=0.0)
    assert all("Sequence:" not in never[i].prompt for i in range(len(never)))


def test_real_metadata_csvs_load(test_data_dir, tmp_path):
    knee = load_records(test_data_dir / "metadata_val_knee.csv")
    brain = load_records(test_data_dir / "metadata_val_brain_head.csv")
    assert len(knee) == 1774 and len(brain) == 2000
    assert {r["contrast"] for r in knee} == {"PD", "PDFS"}
    assert {r["anatomy"] for r in brain} == {"brain"}
    assert any(len(r["pathology"] or []) > 1 for r in brain)  # None = not annotated
    rec = next(r for r in knee if r["filename"] == "file1001429" and r["slice"] == 20)
    assert build_prompt(rec) == REAL_KNEE_PROMPT
    # A dataset over the real CSVs with only some slices on disk: skip (with a warning) or fail clearly.
    _fake_layout(tmp_path, "knee", "file1001429", [19, 20], size=8)
    _fake_layout(tmp_path, "brain", "file_brain_AXFLAIR_200_6002447", [0], size=8)
    csvs = [test_data_dir / "metadata_val_knee.csv", test_data_dir / "metadata_val_brain_head.csv"]
    with pytest.warns(UserWarning, match="skipping"):
        ds = MRISliceDataset(tmp_path, csvs, split="val", crop_size=8, on_missing="skip", load_maps=True)
    assert len(ds) == 3 and ds.num_skipped == 1774 + 2000 - 3
    assert ds[1].prompt == REAL_KNEE_PROMPT
    assert ds[2].prompt.startswith("brain, Slice 0, FLAIR, Pathology: 1 Normal for age, Sequence: TurboSpinEcho")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        MRISliceDataset(tmp_path, csvs[:1], split="val", crop_size=8)


def test_wrong_size_and_bad_rows(tmp_path):
    _fake_layout(tmp_path, "knee", "file1", [0, 1], size=8)
    bad = tmp_path / "knee_mvue_8_val" / "slice" / "file1" / "001.npy"
    np.save(bad, np.zeros((8, 6), np.complex64))
    csv = tmp_path / "meta.csv"
    csv.write_text("anatomy,filename,slice,contrast,pathology,sequence,TR,TE,TI,flip_angle\n"
                   "knee,file1,0,PD,,TurboSpinEcho,3000,30,,\nknee,file1,1,PD,,,,,,\nknee,file1,,PD,,,,,,\n")  # fmt: skip
    with pytest.raises(FileNotFoundError) as err:
        MRISliceDataset(tmp_path, [csv], split="val", crop_size=8)
    assert "has shape (8, 6), expected (8, 8)" in str(err.value) and "no usable slice index" in str(err.value)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = MRISliceDataset(tmp_path, [csv], split="val", crop_size=8, on_missing="skip")
    assert len(ds) == 1 and ds[0].prompt == "knee, Slice 0, PD, Sequence: TurboSpinEcho, TR: 3000, TE: 30"
    with pytest.raises(ValueError):
        MRISliceDataset(tmp_path, [csv], split="test", crop_size=8)


def test_collate_mixed_coil_counts():
    def sample(c: int) -> MRISample:
        return MRISample(torch.zeros(2, 4, 4), {"slice": 0.0}, "p", torch.zeros(c, 4, 4, dtype=torch.complex64),
                         "f", 0, "knee")  # fmt: skip

    batch = collate_samples([sample(3), sample(5)])
    assert isinstance(batch.maps, list) and [m.shape[0] for m in batch.maps] == [3, 5]
    assert collate_samples([sample(3), sample(3)]).maps.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError):
        collate_samples([])
