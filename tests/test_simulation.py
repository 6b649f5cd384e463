"""Tests of the simulated-data generator: real formats, physics of the contrast, determinism."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from utils.fft import fft2c, ifft2c
from utils.simulation.brain_phantom import brain_slices, render_brain, sample_subject
from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset
from utils.simulation.kspace import centered_fft2, phase_encode_band, rss_from_kspace
from utils.simulation.tissue import BRAIN_TISSUES, Acquisition

NS = "{http://www.ismrm.org/ISMRMRD}"
REAL_HEADER = "brain_AXFLAIR_siemens_aera_1p5T.xml"


def _paths(elem: ET.Element, prefix: str = "") -> set[str]:
    """Element paths (namespace stripped) of an XML tree."""
    name = prefix + "/" + elem.tag.replace(NS, "")
    out = {name}
    for child in elem:
        out |= _paths(child, name)
    return out


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("fastmri")
    config = FastMRIConfig(out, num_volumes=2, num_slices=3, matrix=(64, 32), num_coils=(4, 6), seed=3, lesion_prob=1.0)
    return out, generate_fastmri_dataset(config, log=None)


def test_h5_has_every_real_dataset_and_attribute(tiny_dataset):
    _, results = tiny_dataset
    for res in results:
        with h5py.File(res.path, "r") as f:
            assert set(f.keys()) == {"kspace", "reconstruction_rss", "ismrmrd_header"}
            assert set(f.attrs.keys()) == {"acquisition", "max", "norm", "patient_id"}
            k = f["kspace"]
            assert k.dtype == np.complex64 and k.shape == (3, res.num_coils, 64, 32)
            assert f["reconstruction_rss"].dtype == np.float32 and f["reconstruction_rss"].shape == (3, 32, 32)
            assert f.attrs["acquisition"] in ("AXT1", "AXT1PRE", "AXT1POST", "AXT2", "AXFLAIR")
            assert res.path.name.startswith(f"file_brain_{f.attrs['acquisition']}_")
            rss = f["reconstruction_rss"][()]
            assert np.isclose(f.attrs["max"], rss.max()) and np.isclose(f.attrs["norm"], np.linalg.norm(rss))
            assert len(f.attrs["patient_id"]) == 64


def test_header_validates_and_has_every_real_field(tiny_dataset, test_data_dir):
    ismrmrd_xsd = pytest.importorskip("ismrmrd.xsd")
    real = ET.parse(test_data_dir / REAL_HEADER).getroot()
    _, results = tiny_dataset
    for res in results:
        with h5py.File(res.path, "r") as f:
            xml = f["ismrmrd_header"][()]
            kspace = f["kspace"][()]
        header = ismrmrd_xsd.CreateFromDocument(xml.decode())
        root = ET.fromstring(xml)
        missing = _paths(real) - _paths(root)
        assert not missing, f"missing header fields: {sorted(missing)}"
        enc = header.encoding[0]
        assert enc.encodedSpace.matrixSize.x == 64 and enc.encodedSpace.matrixSize.y == 32
        assert header.acquisitionSystemInformation.receiverChannels == res.num_coils
        assert header.sequenceParameters.TR[0] == res.protocol.acq.tr
        assert header.sequenceParameters.sequence_type == res.protocol.acq.sequence
        assert abs(header.acquisitionSystemInformation.systemFieldStrength_T - res.protocol.scanner.field_strength) < 1e-6
        # Zero-padded phase-encode columns are exactly where the encoding limits say (fastMRI's padding formula).
        lim = enc.encodingLimits.kspace_encoding_step_1
        left = enc.encodedSpace.matrixSize.y // 2 - lim.center
        right = left + lim.maximum + 1
        col_energy = np.abs(kspace).sum(axis=(0, 1, 2))
        assert np.all(col_energy[left:right] > 0)
        assert np.all(col_energy[:left] == 0) and np.all(col_energy[right:] == 0)


def test_reconstruction_rss_is_rss_of_stored_kspace(tiny_dataset):
    _, results = tiny_dataset
    with h5py.File(results[0].path, "r") as f:
        k = torch.from_numpy(f["kspace"][()])
        rss = f["reconstruction_rss"][()]
    img = ifft2c(k)  # the project's reference transform
    ref = torch.sqrt((img.abs() ** 2).sum(1)).numpy()[:, 16:48, :]
    np.testing.assert_allclose(rss, ref, rtol=1e-4, atol=1e-6 * ref.max())


def test_readout_oversampling_and_ground_truth(tiny_dataset):
    out, results = tiny_dataset
    res = results[0]
    gt = np.load(out / "ground_truth" / f"{res.path.stem}.npz")
    image, maps = gt["image"], gt["maps"]
    assert image.shape == (3, 64, 32) and maps.shape == (res.num_coils, 64, 32)
    np.testing.assert_allclose((np.abs(maps) ** 2).sum(0), 1.0, rtol=1e-4)
    # Object only in the central half of the readout FOV (2x oversampling).
    assert np.abs(image[:, :16]).max() == 0 and np.abs(image[:, 48:]).max() == 0
    # Stored k-space = F(S x) + noise inside the acquired band: residual is at the noise level.
    with h5py.File(res.path, "r") as f:
        k = f["kspace"][0]
    clean = fft2c(torch.from_numpy(maps * image[0][None])).numpy()
    lo, hi = gt["pe_columns"]
    resid = (k - clean)[..., lo:hi]
    assert abs(resid.std() / np.sqrt(2) - gt["noise_std"]) < 0.2 * gt["noise_std"]


def test_metadata_and_pathology_sidecars(tiny_dataset):
    import pandas as pd

    out, results = tiny_dataset
    meta = pd.read_csv(out / "ground_truth" / "metadata.csv")
    assert list(meta.columns[:10]) == ["anatomy", "filename", "slice", "contrast", "pathology", "sequence", "TR",
                                       "TE", "TI", "flip_angle"]  # fmt: skip
    assert len(meta) == 6
    ann = pd.read_csv(out / "ground_truth" / "fastmri_plus_brain.csv")
    assert list(ann.columns) == ["file", "slice", "study_level", "x", "y", "width", "height", "label"]
    # Every annotated slice carries the lesion label in the metadata and vice versa.
    labelled = {(r.filename, r.slice) for r in meta.itertuples() if isinstance(r.pathology, str) and r.pathology}
    assert labelled == {(r.file, r.slice) for r in ann.itertuples()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    digests = []
    for run in ("a", "b"):
        config = FastMRIConfig(tmp_path / run, num_volumes=1, num_slices=2, matrix=(32, 16), num_coils=(2,), seed=11)
        res = generate_fastmri_dataset(config, log=None)[0]
        files = [res.path, *sorted((tmp_path / run / "ground_truth").iterdir())]
        digests.append([(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files])
    assert digests[0] == digests[1]
    other = generate_fastmri_dataset(
        FastMRIConfig(tmp_path / "c", num_volumes=1, num_slices=2, matrix=(32, 16), num_coils=(2,), seed=12), log=None
    )[0]
    assert hashlib.sha256(other.path.read_bytes()).hexdigest() != digests[0][0][1]


def test_val_fraction_splits_by_subject(tmp_path):
    config = FastMRIConfig(tmp_path, num_volumes=4, num_slices=1, matrix=(32, 16), num_coils=(2,), seed=0,
                           val_fraction=0.5, ground_truth=False)  # fmt: skip
    results = generate_fastmri_dataset(config, log=None)
    assert sorted(p.parent.name for p in (r.path for r in results)) == ["train", "train", "val", "val"]
    with_ids = {}
    for r in results:
        with h5py.File(r.path, "r") as f:
            with_ids.setdefault(f.attrs["patient_id"], set()).add(r.path.parent.name)
    assert all(len(splits) == 1 for splits in with_ids.values())


def _tissue_means(img: np.ndarray, fractions: np.ndarray) -> dict[str, float]:
    means = {}
    for i, t in enumerate(BRAIN_TISSUES[:3]):
        pure = fractions[i] > 0.9
        means[t] = float(img[pure].mean())
    return means


def test_contrast_follows_signal_equations_on_same_anatomy():
    rng = np.random.default_rng(0)
    subject = sample_subject(rng, lesion_prob=0.0)
    slices = brain_slices(subject, 1, (96, 96), 220 / 96)
    frac = slices.fractions[:, 0]
    t1 = Acquisition("AXT1", "T1", "TurboSpinEcho", 450.0, 9.0, None, 140.0, 1.494)
    t1_flash = Acquisition("AXT1PRE", "T1 pre-contrast", "Flash", 250.0, 2.5, None, 70.0, 2.89362)
    t2 = Acquisition("AXT2", "T2", "TurboSpinEcho", 6000.0, 107.0, 100.0, 150.0, 2.89362)
    flair = Acquisition("AXFLAIR", "FLAIR", "TurboSpinEcho", 9000.0, 81.0, 2500.0, 150.0, 1.494, inversion=True)
    m = {a.acquisition: _tissue_means(render_brain(slices, a, subject)[0], frac) for a in (t1, t1_flash, t2, flair)}
    for key in ("AXT1", "AXT1PRE"):
        assert m[key]["wm"] > m[key]["gm"] > m[key]["csf"]
    assert m["AXT2"]["csf"] > m["AXT2"]["gm"] > m["AXT2"]["wm"]
    assert m["AXFLAIR"]["csf"] < 0.2 * min(m["AXFLAIR"]["wm"], m["AXFLAIR"]["gm"])
    assert m["AXFLAIR"]["gm"] > m["AXFLAIR"]["wm"]
    # Flip angle and contrast agent change the image: metadata truly determines contrast.
    low_flip = render_brain(slices, Acquisition("AXT1PRE", "T1", "Flash", 250.0, 2.5, None, 15.0, 2.89362), subject)
    assert not np.allclose(low_flip, render_brain(slices, t1_flash, subject))
    post = Acquisition("AXT1POST", "T1 post-contrast", "Flash", 250.0, 2.5, None, 70.0, 2.89362, post_contrast=True)
    m_post = _tissue_means(render_brain(slices, post, subject)[0], frac)
    assert m_post["gm"] > m["AXT1PRE"]["gm"]


def test_lesions_are_hyperintense_on_flair_and_recorded():
    rng = np.random.default_rng(5)
    subject = sample_subject(rng, lesion_prob=1.0)
    assert subject.lesions
    slices = brain_slices(subject, 16, (64, 64), 220 / 64)
    assert any(slices.pathology)
    flair = Acquisition("AXFLAIR", "FLAIR", "TurboSpinEcho", 9000.0, 81.0, 2500.0, 150.0, 3.0, inversion=True)
    img = render_brain(slices, flair, subject)
    les = slices.fractions[BRAIN_TISSUES.index("lesion")] > 0.5
    wm = slices.fractions[BRAIN_TISSUES.index("wm")] > 0.9
    assert les.any() and img[les].mean() > 1.3 * img[wm].mean()


@pytest.mark.parametrize("shape", [(64, 32), (6, 10), (7, 5)])
def test_fast_centered_fft_matches_reference(shape):
    x = torch.randn(2, *shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(centered_fft2(x), fft2c(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(centered_fft2(x, inverse=True), ifft2c(x), rtol=1e-5, atol=1e-5)


def test_phase_encode_band_matches_fastmri_padding_formula():
    for w, n in [(320, 198), (320, 320), (33, 25), (32, 31)]:
        left, center, maximum = phase_encode_band(w, n)
        assert w // 2 - center == left and maximum + 1 == n and left + n <= w


def test_rss_helper_crop_convention():
    k = np.zeros((1, 2, 8, 6), dtype=np.complex64)
    k[0, 0, 4, 3] = 1.0
    rss = rss_from_kspace(k, (4, 4))
    np.testing.assert_allclose(rss, np.full((1, 4, 4), 1 / np.sqrt(48)), rtol=1e-5)
