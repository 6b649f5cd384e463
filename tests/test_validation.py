"""Training validation: it runs the reconstruction path's per-slice pipeline, scores, warns below zero-filling, and
draws a readable titled figure (tiny 32×32 slices, stand-in networks, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tests.test_reconstruction import _dataset, _NullConditioner, _OracleUNet
from utils.channels import channels_to_complex
from utils.diffusion_recon import DiffusionReconstructor
from utils.recon_settings import ReconSettings
from utils.reconstruction import run_reconstruction
from utils.samplers import DiffusionSchedule
from utils.training.validation import run_validation, save_validation_figure

ACP = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


class _ZeroUNet(torch.nn.Module):
    """Predicts no noise: x̂₀ = x_t/√ᾱ_t, and without data consistency DDS returns (scaled) noise."""

    def forward(self, x, t, encoder_hidden_states=None):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_validation_is_the_reconstruction_path_and_a_good_model_passes(tmp_path, one_thread):
    """A network whose result depends on the mask, the measurement and the sampler noise: validation's slice equals
    what run_reconstruction writes for the same slice and settings (one pipeline: same mask, y, seeds). The oracle
    beats zero-filling by far and nothing is flagged."""
    data = _dataset(1, 1)
    settings = {"num_steps": 5, "eta": 0.8, "gamma": 5.0, "cg_iter": 5}
    result = run_validation(_ZeroUNet(), _NullConditioner(), data, ACP, acc_factor=4.0, **settings)
    recon = DiffusionReconstructor(_ZeroUNet(), _NullConditioner(), DiffusionSchedule(ACP), **settings)
    out = run_reconstruction(data, ReconSettings(method="diffusion", acc_factor=4.0, save_png=False, **settings),
                             tmp_path, diffusion=recon, progress=False)
    rec = np.abs(np.load(out / "recon" / "file_0" / "000.npy"))
    np.testing.assert_allclose(result.images[0].recon, rec, rtol=1e-5, atol=1e-6)
    other = run_validation(_ZeroUNet(), _NullConditioner(), data, ACP, acc_factor=8.0, **settings)
    assert np.abs(other.images[0].recon - rec).max() > 1e-2  # a different mask gives a different slice

    x0 = channels_to_complex(data[0].image[None])
    good = run_validation(_OracleUNet(x0, ACP), _NullConditioner(), data, ACP, num_steps=5, acc_factor=4.0)
    assert good.rows[0]["psnr"] > good.rows[0]["zero_filled_psnr"] + 10 and not good.warnings
    assert not good.rows[0]["below_zero_filled"]


def test_a_reconstruction_below_zero_filling_is_warned_in_the_log_and_the_figure(tmp_path, caplog, one_thread):
    data = _dataset(1, 2)
    with caplog.at_level("WARNING", logger="utils.training.validation"):
        result = run_validation(_ZeroUNet(), _NullConditioner(), data, ACP, num_steps=5, cg_iter=0, gamma=0.0)
    assert len(result.warnings) == 2 and all(r["below_zero_filled"] for r in result.rows)
    assert "below zero-filling" in caplog.text
    path = save_validation_figure(result, tmp_path / "val.png", title="step 5")
    with Image.open(path) as img:
        width, height = img.size
    assert width >= 900 and height >= 2 * 200  # four titled panels with colour bars per row, two rows
    assert result.grid is not None and result.grid.shape == (2 * 32, 4 * 32) and result.grid.dtype == np.uint8


def test_the_per_slice_function_gives_dps_the_noise_sigma_per_part(one_thread):
    """--data_root with --noise_sigma σ (complex std): DPS is given σ/√2 (per real/imaginary part), DDS nothing."""
    from utils.reconstruction import measure_and_reconstruct

    data = _dataset(1, 1)
    seen = []

    def stub(y, op, records, prompts, gens, **kw):
        seen.append(kw)
        return op.adjoint(y), 1

    for sampler in ("dps", "dds"):
        measure_and_reconstruct(data, ReconSettings(sampler=sampler, noise_sigma=0.02, save_png=False), stub)
    measure_and_reconstruct(data, ReconSettings(sampler="dps", noise_sigma=0.0, save_png=False), stub)
    assert seen == [{"noise_sigma": 0.02 / np.sqrt(2.0)}, {}, {}]
