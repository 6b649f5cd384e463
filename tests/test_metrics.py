"""Metrics: known answers, agreement with scikit-image's SSIM, protocol labels, input handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from utils.metrics import (
    contextmri_metrics,
    evaluate_volume,
    minmax_normalize,
    nmse,
    psnr,
    ssim,
    ssim_slice,
    to_magnitude,
)


def _phantom(s: int = 3, h: int = 40, w: int = 36, seed: int = 0) -> np.ndarray:
    """A smooth non-negative magnitude volume with some structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    vol = []
    for i in range(s):
        blob = np.exp(-(((y - h / 2) / (8 + i)) ** 2 + ((x - w / 2) / 10) ** 2))
        vol.append(2.0 * blob + 0.5 * (np.abs(x - w / 2) < 5) + 0.05 * rng.random((h, w)))
    return np.stack(vol)


def test_identical_images() -> None:
    gt = _phantom()
    for protocol in ("fastmri", "contextmri"):
        out = evaluate_volume(gt, gt.copy(), protocol=protocol)
        assert out["protocol"] == protocol
        assert out["psnr"] == math.inf
        assert out["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert out["nmse"] == 0.0
        assert out["num_slices"] == 3


def test_known_noise_level_psnr_and_nmse() -> None:
    """Noise of exactly ±σ per pixel: MSE = σ², so PSNR = 10 log10(max(gt)² / σ²) exactly; NMSE = σ² N / ||gt||²."""
    gt = _phantom()
    sigma = 0.03
    signs = np.random.default_rng(1).choice([-1.0, 1.0], size=gt.shape)
    pred = gt + sigma * signs
    expected = 10 * np.log10(gt.max() ** 2 / sigma**2)
    assert psnr(gt, pred) == pytest.approx(expected, abs=1e-9)
    skimage_psnr = peak_signal_noise_ratio(gt, pred, data_range=gt.max())
    assert psnr(gt, pred) == pytest.approx(skimage_psnr, abs=1e-9)
    assert nmse(gt, pred) == pytest.approx(sigma**2 * gt.size / np.sum(gt**2), rel=1e-12)
    # Gaussian noise of std σ: PSNR within a few hundredths of a dB of the same value (MSE ≈ σ² ± 1.2 %).
    noisy = gt + np.random.default_rng(2).normal(0.0, sigma, size=gt.shape)
    assert psnr(gt, noisy) == pytest.approx(expected, abs=0.1)


def test_psnr_is_volume_wise() -> None:
    """fastMRI: one data range and one MSE for the volume, not an average of per-slice PSNRs."""
    gt = _phantom()
    gt[0] *= 0.1  # a dim slice: its own max would give a very different per-slice PSNR
    pred = gt + 0.01
    assert psnr(gt, pred) == pytest.approx(10 * np.log10(gt.max() ** 2 / 1e-4), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ssim_matches_skimage(dtype: type) -> None:
    gt = _phantom().astype(dtype)
    pred = (gt + np.random.default_rng(3).normal(0.0, 0.1, size=gt.shape)).clip(0).astype(dtype)
    maxval = float(gt.max())
    # fastMRI evaluate.py: skimage SSIM per slice with data_range = max of the volume, averaged over slices.
    ref = np.mean([structural_similarity(gt[i], pred[i], data_range=maxval) for i in range(len(gt))])
    assert ssim(gt, pred) == pytest.approx(ref, abs=1e-4)
    for i in range(len(gt)):
        ref_i = structural_similarity(gt[i], pred[i], data_range=2.0, win_size=7, K1=0.01, K2=0.03)
        assert ssim_slice(gt[i], pred[i], data_range=2.0) == pytest.approx(ref_i, abs=1e-4)
    assert 0.0 < ssim(gt, pred) < 1.0


def test_contextmri_protocol_honest_range() -> None:
    """ContextMRI: per-slice min-max to [0, 1], data_range 1; the reference's data_range=2 inflates SSIM."""
    gt = _phantom()
    pred = gt + np.random.default_rng(4).normal(0.0, 0.1, size=gt.shape)
    out = contextmri_metrics(gt, pred)
    g, p = minmax_normalize(gt), minmax_normalize(pred)
    assert g.min() == 0.0 and g.max() == 1.0
    ref_ssim = np.mean([structural_similarity(g[i], p[i], data_range=1.0) for i in range(len(g))])
    ref_psnr = np.mean([peak_signal_noise_ratio(g[i], p[i], data_range=1.0) for i in range(len(g))])
    assert out["ssim"] == pytest.approx(ref_ssim, abs=1e-4)
    assert out["psnr"] == pytest.approx(ref_psnr, abs=1e-9)
    inflated = np.mean([ssim_slice(g[i], p[i], data_range=2.0) for i in range(len(g))])
    assert inflated > out["ssim"]
    # Invariant to a per-slice affine change of the prediction's intensity (min-max removes it).
    scaled = contextmri_metrics(gt, 3.0 * pred + 1.0)
    assert scaled["psnr"] == pytest.approx(out["psnr"]) and scaled["ssim"] == pytest.approx(out["ssim"])


def test_torch_complex_inputs_and_shapes() -> None:
    gt = _phantom()
    phase = np.exp(1j * np.random.default_rng(5).uniform(0, 2 * np.pi, size=gt.shape))
    gt_c = torch.from_numpy(gt * phase)  # complex128 torch: magnitude is gt
    pred = gt + 0.02
    out_c = evaluate_volume(gt_c, torch.from_numpy(pred).float(), protocol="fastmri")
    out_r = evaluate_volume(gt, pred, protocol="fastmri")
    assert out_c["psnr"] == pytest.approx(out_r["psnr"], abs=1e-4)
    assert out_c["ssim"] == pytest.approx(out_r["ssim"], abs=1e-6)
    assert to_magnitude(gt[0]).shape == (1, *gt.shape[1:])  # a single slice is a one-slice volume
    with pytest.raises(ValueError):
        evaluate_volume(gt, pred[:2])
    with pytest.raises(ValueError):
        evaluate_volume(gt, pred, protocol="nonsense")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        to_magnitude(np.zeros((2, 2, 3, 3)))


@pytest.mark.parametrize("protocol", ["fastmri", "contextmri"])
@pytest.mark.parametrize("bad", ["pred", "gt", "both"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_score_nan_not_a_number(protocol, bad, value) -> None:
    """A NaN/inf image is undefined under both protocols: never ~10 dB for a NaN image or SSIM 1 for a NaN pair."""
    gt = _phantom()
    pred = gt + 0.01
    gt_b, pred_b = gt.copy(), pred.copy()
    if bad in ("gt", "both"):
        gt_b[1, 3, 4] = value
    if bad in ("pred", "both"):
        pred_b[1, 3, 4] = value
    out = evaluate_volume(gt_b, pred_b, protocol=protocol)
    assert math.isnan(out["psnr"]) and math.isnan(out["ssim"]) and math.isnan(out["nmse"])
    # the same slice pair, all finite, is scored normally
    good = evaluate_volume(gt, pred, protocol=protocol)
    assert math.isfinite(good["psnr"]) and 0 < good["ssim"] < 1


def test_minmax_normalize_marks_non_finite_slices() -> None:
    vol = _phantom()
    vol[0, 0, 0] = np.nan
    out = minmax_normalize(vol)
    assert np.isnan(out[0]).all()  # the slice with a NaN is NaN, not silently zeros
    assert np.isfinite(out[1:]).all() and out[1:].min() == 0.0 and out[1:].max() == 1.0
