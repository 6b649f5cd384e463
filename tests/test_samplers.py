"""Samplers: DDS, DPS, classifier-free guidance, schedules, ensembles (tiny problems, CPU)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import sigpy.mri
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from utils.channels import channels_to_complex, complex_to_channels
from utils.operators import SenseOperator
from utils.samplers import (
    DC_SAMPLERS,
    PRESETS,
    DiffusionSchedule,
    SamplerStats,
    dc_sample,
    dds_sample,
    dpmpp2m_sample,
    dps_sample,
    ensemble_stats,
    make_cfg_eps_fn,
    make_generators,
    make_timesteps,
)
from utils.samplers.core import randn_images

SCHEDULE = DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
ACP = SCHEDULE.alphas_cumprod


# These problems are tiny: one thread is fastest, and it avoids OpenMP spin-waiting, which makes small FFTs and
# convolutions ~100x slower when the cores are shared with other processes (conftest's fixture restores it afterwards).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def _line_mask(w: int, g: torch.Generator) -> torch.Tensor:
    """1-D phase-encode mask ``(1, W)``: 4 centre lines plus W/4 random lines (~2.5–3x)."""
    mask = torch.zeros(1, w)
    mask[:, w // 2 - 2 : w // 2 + 2] = 1
    mask[:, torch.randperm(w, generator=g)[: w // 4]] = 1
    return mask


def _problem(b: int = 2, coils: int = 4, h: int = 16, w: int = 16, seed: int = 0):
    """A random multi-coil problem: unit-norm birdcage maps, a 1-D line mask, complex images, y = A x."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((coils, h, w))).to(torch.complex64)
    maps = maps / maps.abs().square().sum(0, keepdim=True).sqrt()  # Σ|S|² = 1
    mask = _line_mask(w, g)
    x0 = torch.complex(torch.randn(b, h, w, generator=g), torch.randn(b, h, w, generator=g))
    op = SenseOperator(maps.expand(b, -1, -1, -1).clone(), mask)
    return op, op(x0), x0


def _acp_at(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return ACP.to(like.dtype)[t].reshape(-1, 1, 1, 1)


def oracle_eps_fn(x0: torch.Tensor):
    """The noise that takes x0 to x_t: eps = (x_t − √ᾱ x0)/√(1−ᾱ), so Tweedie's x̂₀ is exactly x0."""
    x0_ch = complex_to_channels(x0)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _acp_at(t, x_t)
        return (x_t - a.sqrt() * x0_ch.to(x_t.dtype)) / (1 - a).sqrt()

    return eps_fn


def gaussian_prior_eps_fn(mean: float = 0.0, std: float = 1.0):
    """Exact ε for an i.i.d. Gaussian prior N(mean, std²) per real channel (x̂₀ depends on x_t, unlike the oracle)."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _acp_at(t, x_t)
        x0_hat = mean + a.sqrt() * std**2 / (a * std**2 + 1 - a) * (x_t - a.sqrt() * mean)
        return (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()

    return eps_fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _line_residual(op: SenseOperator, x: torch.Tensor, y: torch.Tensor) -> float:
    return _rel(op(x), op.mask * y)


# ----------------------------------------------------------------------------------------------------------------------
# Schedule


def test_leading_timesteps_are_the_reference_and_match_diffusers():
    ts = make_timesteps(1000, 100)
    assert ts.tolist() == list(range(990, -1, -10))
    assert SCHEDULE.timesteps(100).tolist() == ts.tolist()
    for spacing, n in [("leading", 30), ("trailing", 30), ("linspace", 30), ("trailing", 100)]:
        ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        ddim.set_timesteps(n)
        assert make_timesteps(1000, n, spacing).tolist() == ddim.timesteps.tolist(), spacing
    # "uniform" covers the whole range when num_steps does not divide T.
    assert make_timesteps(1000, 300, "uniform")[0] == 996
    assert make_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        make_timesteps(1000, 0)


def test_schedule_from_config_reads_betas_from_the_file(tmp_path):
    config = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    for source in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json", config):
        schedule = DiffusionSchedule.from_config(source)
        assert schedule.alphas_cumprod.dtype == torch.float64
        assert torch.equal(schedule.alphas_cumprod, expected.double())
    assert not torch.allclose(schedule.alphas_cumprod, ACP)  # not silently the default linear schedule
    with pytest.raises(FileNotFoundError):
        DiffusionSchedule.from_config(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------------
# DDS


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_dds_with_oracle_denoiser_returns_ground_truth(eta):
    op, y, x0 = _problem()
    stats = SamplerStats()
    seen = []
    x = dds_sample(
        oracle_eps_fn(x0), op, y, ACP, num_steps=20, eta=eta, generators=make_generators([0, 1]),
        callback=lambda i, t, x_t, x0_hat: seen.append((i, t)), stats=stats,
    )
    assert x.dtype == torch.complex64 and x.shape == x0.shape
    assert _rel(x, x0) < 1e-4
    assert stats.num_steps == stats.eps_calls == stats.nfe == stats.network_forwards == 20
    assert [t for _, t in seen] == make_timesteps(1000, 20).tolist()


def _smooth_eps_fn(seed: int = 5):
    """A smooth, t-dependent stand-in for a network (x̂₀ depends on x_t non-linearly)."""
    weight = torch.randn(2, 2, generator=torch.Generator().manual_seed(seed)) * 0.3

    def eps_fn(x_t, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x_t)) * (1 + t.reshape(-1, 1, 1, 1) / 1000)

    return eps_fn


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_dds_without_data_consistency_is_diffusers_ddim(eta):
    """cg_iter=0 leaves plain DDIM: same trajectory as diffusers' DDIMScheduler fed the same noise (η = 0: the
    deterministic DDIM alternative of the NFE benchmark)."""
    op, y, _ = _problem(b=2)
    eps_fn = _smooth_eps_fn()
    n = 10
    x = dds_sample(eps_fn, op, y, ACP, num_steps=n, eta=eta, cg_iter=0, generators=make_generators([3, 4]))

    gens = make_generators([3, 4])
    ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(n)
    sample = complex_to_channels(randn_images(gens, (16, 16), torch.complex64, torch.device("cpu")))
    for i, t in enumerate(ddim.timesteps):
        noise = complex_to_channels(randn_images(gens, (16, 16), torch.complex64, torch.device("cpu")))
        if i + 1 == n:
            noise = torch.zeros_like(noise)  # the last step draws none (σ = 0 when ᾱ_prev = 1)
        eps = eps_fn(sample, t.repeat(2))
        sample = ddim.step(eps, t, sample, eta=eta, variance_noise=noise).prev_sample
    assert _rel(x, channels_to_complex(sample)) < 1e-5


def test_dds_large_gamma_reproduces_measured_lines():
    op, y, x0 = _problem(b=2, seed=1)
    eps_fn = gaussian_prior_eps_fn()  # a prior that knows nothing about x0
    gens = lambda: make_generators([0, 1])  # noqa: E731
    # Single coil: AᴴA is a k-space projection, CG is exact in 2 iterations and the lines match to ~1/γ.
    single = SenseOperator.single_coil(op.mask, (2, 16, 16))
    y1 = single(x0)
    x = dds_sample(eps_fn, single, y1, ACP, num_steps=4, gamma=1e4, generators=gens())
    assert _line_residual(single, x, y1) < 1e-4
    # Multi-coil: the residual on the measured lines falls as γ grows (CG run longer: the system is stiffer).
    plain = dds_sample(eps_fn, op, y, ACP, num_steps=4, cg_iter=0, generators=gens())
    default = dds_sample(eps_fn, op, y, ACP, num_steps=4, generators=gens())
    strong = dds_sample(eps_fn, op, y, ACP, num_steps=4, gamma=1e4, cg_iter=30, generators=gens())
    r_plain, r_default, r_strong = (_line_residual(op, v, y) for v in (plain, default, strong))
    assert r_strong < 1e-2 < r_default < 0.5 < r_plain, (r_strong, r_default, r_plain)


def test_dds_per_sample_generators_make_slices_independent_of_the_batch():
    op, y, _ = _problem(b=3, seed=2)
    eps_fn = gaussian_prior_eps_fn(std=0.7)
    batch = dds_sample(eps_fn, op, y, ACP, num_steps=8, eta=0.8, generators=make_generators([10, 11, 12]))
    alone_op = SenseOperator(op.maps[1:2], op.mask)
    alone = dds_sample(eps_fn, alone_op, y[1:2], ACP, num_steps=8, eta=0.8, generators=make_generators([11]))
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)
    # A per-sample γ is honoured per sample.
    mixed = dds_sample(
        eps_fn, op, y, ACP, num_steps=8, eta=0.8, gamma=torch.tensor([5.0, 5.0, 0.0]),
        generators=make_generators([10, 11, 12]),
    )
    torch.testing.assert_close(mixed[:2], batch[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[2], batch[2], atol=1e-2)
    with pytest.raises(ValueError):
        dds_sample(eps_fn, op, y, ACP, num_steps=2, generators=make_generators([0]))


# ----------------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) with DDS data consistency


@pytest.mark.parametrize("sampler", ["dds_eta0", "dpmpp2m"])
def test_alternative_samplers_with_oracle_denoiser_return_ground_truth(sampler):
    op, y, x0 = _problem()
    stats = SamplerStats()
    settings = dict(num_steps=10, generators=make_generators([0, 1]), stats=stats)
    if sampler == "dds_eta0":
        x = dds_sample(oracle_eps_fn(x0), op, y, ACP, eta=0.0, **settings)
    else:
        x = dpmpp2m_sample(oracle_eps_fn(x0), op, y, ACP, **settings)
    assert x.dtype == torch.complex64 and x.shape == x0.shape
    assert _rel(x, x0) < 1e-4
    assert stats.num_steps == stats.nfe == 10


def _diffusers_dpmpp2m(eps_fn, x_T: torch.Tensor, timesteps: list[int] | None, n: int) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    if timesteps is None:
        sched.set_timesteps(n)
    else:
        sched.set_timesteps(timesteps=timesteps)
    sample = complex_to_channels(x_T)
    for t in sched.timesteps:
        sample = sched.step(eps_fn(sample, t.repeat(sample.shape[0])), t, sample).prev_sample
    return channels_to_complex(sample)


@pytest.mark.parametrize("spacing", ["leading", "diffusers"])
def test_dpmpp2m_without_data_consistency_is_diffusers_dpmsolver_multistep(spacing):
    """cg_iter 0 (and γ 0 with CG on) leaves DPM-Solver++(2M): diffusers' scheduler on the same ε-model and noise."""
    op, y, _ = _problem(b=2)
    eps_fn = _smooth_eps_fn(7)
    n = 8
    x_T = randn_images(make_generators([3, 4]), (16, 16), torch.complex64, torch.device("cpu"))
    if spacing == "leading":
        ts = make_timesteps(1000, n).tolist()
    else:  # diffusers' own default ("linspace" over [0, 999], first point dropped)
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000)
        sched.set_timesteps(n)
        ts = sched.timesteps.tolist()
    expected = _diffusers_dpmpp2m(eps_fn, x_T, ts, n)
    ours = dpmpp2m_sample(eps_fn, op, y, ACP, timesteps=ts, cg_iter=0, x_T=x_T)
    assert _rel(ours, expected) < 1e-4
    no_weight = dpmpp2m_sample(eps_fn, op, y, ACP, timesteps=ts, gamma=0.0, cg_iter=5, x_T=x_T)
    assert _rel(no_weight, expected) < 1e-4
    # The second-order correction matters: the first-order solver (= DDIM η 0 with ε re-derived) ends elsewhere.
    ddim = dds_sample(eps_fn, op, y, ACP, timesteps=ts, eta=0.0, cg_iter=0, x_T=x_T)
    assert _rel(ddim, expected) > 1e-3


def test_dpmpp2m_batch_equals_one_slice_at_a_time_and_data_consistency_acts():
    op, y, _ = _problem(b=3, seed=2)
    eps_fn = gaussian_prior_eps_fn(std=0.7)
    batch = dpmpp2m_sample(eps_fn, op, y, ACP, num_steps=8, gamma=5.0, generators=make_generators([10, 11, 12]))
    for k in range(3):
        alone = dpmpp2m_sample(eps_fn, SenseOperator(op.maps[k : k + 1], op.mask), y[k : k + 1], ACP, num_steps=8,
                               gamma=5.0, generators=make_generators([10 + k]))
        torch.testing.assert_close(alone[0], batch[k], rtol=0, atol=1e-6)
    plain = dpmpp2m_sample(eps_fn, op, y, ACP, num_steps=8, cg_iter=0, generators=make_generators([10, 11, 12]))
    assert _line_residual(op, batch, y) < 0.5 * _line_residual(op, plain, y)
    with pytest.raises(ValueError, match="eta"):
        dpmpp2m_sample(eps_fn, op, y, ACP, num_steps=2, eta=0.5, generators=make_generators([0, 1, 2]))


def test_dc_sample_dispatches_by_name_and_presets_name_known_samplers():
    op, y, _ = _problem(b=2, seed=4)
    eps_fn = gaussian_prior_eps_fn()
    for name, fn in DC_SAMPLERS.items():
        a = dc_sample(name, eps_fn, op, y, ACP, num_steps=4, eta=0.0, generators=make_generators([1, 2]))
        b = fn(eps_fn, op, y, ACP, num_steps=4, eta=0.0, generators=make_generators([1, 2]))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        dc_sample("euler", eps_fn, op, y, ACP, num_steps=2)
    for preset in PRESETS.values():
        assert preset["sampler"] in DC_SAMPLERS and preset["num_steps"] >= 1


def test_generator_modes_and_explicit_timesteps():
    op, y, _ = _problem(b=2, seed=6)
    eps_fn = gaussian_prior_eps_fn()
    shared = [dds_sample(eps_fn, op, y, ACP, num_steps=3, generators=torch.Generator().manual_seed(7)) for _ in "ab"]
    torch.testing.assert_close(shared[0], shared[1], rtol=0, atol=0)  # one shared generator: reproducible
    fresh = [dds_sample(eps_fn, op, y, ACP, num_steps=3) for _ in "ab"]  # OS-seeded: differs run to run
    assert bool(torch.isfinite(torch.view_as_real(fresh[0])).all()) and not torch.equal(fresh[0], fresh[1])
    state = torch.random.get_rng_state()
    steps = []
    dds_sample(eps_fn, op, y, SCHEDULE, timesteps=[900, 500, 10], generators=make_generators([0, 1]),
               callback=lambda i, t, x_t, x0_hat: steps.append(t))
    assert steps == [900, 500, 10]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    with pytest.raises(ValueError):
        dds_sample(eps_fn, op, y, ACP, timesteps=[10, 500])


def test_dds_keeps_data_consistency_in_fp32_under_bf16_autocast():
    _, _, x0 = _problem(b=2, seed=3)
    op = SenseOperator.single_coil(_line_mask(16, torch.Generator().manual_seed(3)), (2, 16, 16))
    y = op(x0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(0.1)
    prior = gaussian_prior_eps_fn()
    eps_dtypes, x_dtypes = [], []

    def eps_fn(x_t, t):  # the conv runs in bf16 under autocast, so ε arrives in bf16
        c = conv(x_t)
        eps = prior(x_t, t).to(c.dtype) + c
        eps_dtypes.append(eps.dtype)
        return eps

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = dds_sample(
            eps_fn, op, y, ACP, num_steps=4, gamma=1e4, generators=make_generators([0, 1]),
            callback=lambda i, t, x_t, x0_hat: x_dtypes.append((x_t.dtype, x0_hat.dtype)),
        )
    assert set(eps_dtypes) == {torch.bfloat16}
    assert x.dtype == torch.complex64
    assert set(x_dtypes) == {(torch.complex64, torch.complex64)}
    # bf16 keeps ~3 significant digits (relative error ~4e-3); fp32 data consistency matches the lines to ~1/γ.
    assert _line_residual(op, x, y) < 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# DPS


def test_dps_with_oracle_denoiser_returns_ground_truth():
    op, y, x0 = _problem(b=2, seed=4)
    stats = SamplerStats()
    x = dps_sample(oracle_eps_fn(x0), op, y, ACP, num_steps=20, generators=make_generators([0, 1]), stats=stats)
    assert _rel(x, x0) < 1e-4
    assert stats.nfe == 20


def test_dps_gradient_through_the_denoiser_reduces_the_data_residual():
    """A Gaussian-prior denoiser (x̂₀ depends on x_t, so the gradient flows through it): the guided run fits the data
    far better than the unguided one from the same noise, and moves closer to the truth."""
    op, y, x0 = _problem(b=2, seed=5)
    eps_fn = gaussian_prior_eps_fn()
    prior = dps_sample(eps_fn, op, y, ACP, num_steps=30, step_size=0.0, generators=make_generators([0, 1]))
    guided = dps_sample(eps_fn, op, y, ACP, num_steps=30, step_size=4.0, generators=make_generators([0, 1]))
    r_prior, r_guided = _line_residual(op, prior, y), _line_residual(op, guided, y)
    assert r_guided < 0.2 * r_prior, (r_guided, r_prior)
    assert _rel(guided, x0) < _rel(prior, x0)


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


class _RecordingUNet(torch.nn.Module):
    """A stand-in for UNet2DConditionModel that records every call's batch size."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.proj = torch.nn.Linear(8, 2)
        self.batches: list[int] = []

    def forward(self, x, t, encoder_hidden_states):
        self.batches.append(x.shape[0])
        cond = self.proj(encoder_hidden_states.mean(1))[:, :, None, None]
        return SimpleNamespace(sample=self.conv(x) * (1 + t.reshape(-1, 1, 1, 1) / 1000) + cond)


def _tokens(b: int, seed: int, length: int = 5) -> torch.Tensor:
    return torch.randn(b, length, 8, generator=torch.Generator().manual_seed(seed))


def test_cfg_scale_one_is_the_conditional_pass_with_one_forward_per_step():
    unet = _RecordingUNet()
    cond, uncond = _tokens(2, 0), _tokens(2, 1)
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([500, 500])
    with torch.no_grad():
        for w in (1.0, 0.5):
            eps = make_cfg_eps_fn(unet, cond, uncond, w)(x, t)
            assert torch.equal(eps, unet(x, t, encoder_hidden_states=cond).sample)
        unet.batches.clear()
        op, y, _ = _problem(b=2)
        eps_fn = make_cfg_eps_fn(unet, cond, None, 1.0)
        stats = SamplerStats()
        dds_sample(eps_fn, op, y, ACP, num_steps=5, generators=make_generators([0, 1]), stats=stats)
    assert unet.batches == [2] * 5
    assert stats.nfe == stats.network_forwards == eps_fn.num_forwards == 5


def test_cfg_above_one_batches_both_passes_in_one_forward():
    unet = _RecordingUNet()
    cond, uncond = _tokens(2, 0), _tokens(2, 1)
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([300, 700])
    w = 3.0
    eps_fn = make_cfg_eps_fn(unet, cond, uncond, w)
    with torch.no_grad():
        eps = eps_fn(x, t)
        assert unet.batches == [4]
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond).sample
    torch.testing.assert_close(eps, eps_u + w * (eps_c - eps_u), rtol=1e-5, atol=1e-6)
    unet.batches.clear()
    op, y, _ = _problem(b=2)
    stats = SamplerStats()
    with torch.no_grad():
        dds_sample(eps_fn, op, y, ACP, num_steps=4, generators=make_generators([0, 1]), stats=stats)
    assert unet.batches == [4] * 4
    assert stats.nfe == 8 and stats.network_forwards == 4
    with pytest.raises(ValueError):  # condition builders must agree on the token count
        make_cfg_eps_fn(unet, cond, _tokens(2, 1, length=6), w)
    with pytest.raises(ValueError):
        make_cfg_eps_fn(unet, cond, None, w)


def test_cfg_with_a_real_diffusers_unet_and_metadata_tokens():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    text, meta = _tokens(2, 0, length=4).repeat(1, 1, 2), _tokens(2, 1, length=3).repeat(1, 1, 2)
    cond = torch.cat([text, meta], dim=1)  # text tokens first, metadata tokens after
    uncond = torch.cat([text, torch.zeros_like(meta)], dim=1)  # per-attribute guidance: metadata dropped
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        eps = make_cfg_eps_fn(unet, cond, uncond, 2.5)(x, t)
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond).sample
        eps_bf16 = make_cfg_eps_fn(unet, cond, uncond, 2.5, autocast_dtype=torch.bfloat16)(x, t)
    torch.testing.assert_close(eps, eps_u + 2.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    assert eps_bf16.dtype == torch.float32
    assert _rel(eps_bf16, eps) < 0.05


# ----------------------------------------------------------------------------------------------------------------------
# Ensembles


def test_ensemble_std_is_zero_for_equal_samples_and_known_otherwise():
    a = torch.complex(torch.randn(2, 8, 8), torch.randn(2, 8, 8))
    mean, std = ensemble_stats(a.expand(4, -1, -1, -1))
    torch.testing.assert_close(mean, a)
    assert std.shape == (2, 8, 8) and float(std.abs().max()) == 0.0
    assert float(ensemble_stats(a.expand(4, -1, -1, -1), std="magnitude")[1].abs().max()) == 0.0
    b = a * torch.exp(torch.tensor(1j * np.pi / 2, dtype=torch.complex64))  # same magnitude, rotated phase
    mean, std = ensemble_stats(torch.stack([a, b]))
    torch.testing.assert_close(mean, (a + b) / 2)
    torch.testing.assert_close(std, (a - b).abs() / 2)
    torch.testing.assert_close(ensemble_stats(torch.stack([a, b]), std="magnitude")[1], torch.zeros(2, 8, 8),
                               atol=1e-6, rtol=0)


def test_clip_x0_limits_the_denoised_magnitude():
    """``clip_x0`` bounds |x̂₀| (phase kept) where an untrained network's x̂₀ explodes at large t."""
    from utils.operators import SenseOperator
    from utils.samplers import dds_sample

    torch.manual_seed(0)
    maps = torch.ones(1, 1, 8, 8, dtype=torch.complex64)
    op = SenseOperator(maps, torch.ones(1, 8))
    y = op.forward(torch.randn(1, 8, 8, dtype=torch.complex64))
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    seen = []

    def zero_eps(x, t):
        return torch.zeros_like(x)

    def record(i, t, x_t, x0_hat):
        seen.append(float(x0_hat.abs().max()))

    dds_sample(zero_eps, op, y, acp, num_steps=5, cg_iter=0, clip_x0=1.0, callback=record,
               generators=[torch.Generator().manual_seed(0)])
    assert max(seen) <= 1.0 + 1e-5
    seen.clear()
    dds_sample(zero_eps, op, y, acp, num_steps=5, cg_iter=0, callback=record,
               generators=[torch.Generator().manual_seed(0)])
    assert max(seen) > 10.0  # without clipping x_t / sqrt(alpha_bar) is large at t = 800


# ----------------------------------------------------------------------------------------------------------------------
# v-prediction


class _OracleVUNet(torch.nn.Module):
    """A "UNet" that outputs the exact v = √ᾱ ε − √(1−ᾱ) x0 for a known x0 (the noise is read off x_t)."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0_ch = complex_to_channels(x0)

    def forward(self, x, t, encoder_hidden_states=None):
        a = _acp_at(t, x)
        eps = (x - a.sqrt() * self.x0_ch) / (1 - a).sqrt()
        return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * self.x0_ch)


def test_v_prediction_target_and_conversion_are_exact_inverses():
    from utils.training.diffusion import add_noise, prediction_target

    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    x_t = add_noise(x0, noise, t, ACP.float())
    v = prediction_target(x0, noise, t, ACP, "v_prediction")
    a = _acp_at(t, x_t)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=1e-5, atol=1e-5)  # x̂₀ from v
    torch.testing.assert_close(prediction_target(x0, noise, t, ACP, "epsilon"), noise)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(x0, noise, t, ACP, "sample")


def test_dds_with_an_oracle_v_network_returns_ground_truth_and_schedule_carries_the_type():
    """The sampler receives ε from a v-predicting network through make_cfg_eps_fn (type read from the scheduler)."""
    op, y, x0 = _problem()
    schedule = DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"))
    assert schedule.prediction_type == "v_prediction" and SCHEDULE.prediction_type == "epsilon"
    unet = _OracleVUNet(x0)
    cond = _tokens(2, 0)
    x = dds_sample(make_cfg_eps_fn(unet, cond, None, 1.0, alphas_cumprod=schedule), op, y, schedule, num_steps=20,
                   eta=0.8, generators=make_generators([0, 1]))
    assert _rel(x, x0) < 1e-4
    # One call at high noise: the converted output is the true ε; read as an ε-predictor it is not.
    t = torch.tensor([800, 800])
    a = _acp_at(t, complex_to_channels(x0))
    noise = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    x_t = a.sqrt() * complex_to_channels(x0) + (1 - a).sqrt() * noise
    with torch.no_grad():
        torch.testing.assert_close(make_cfg_eps_fn(unet, cond, None, 1.0, alphas_cumprod=schedule)(x_t, t), noise,
                                   rtol=1e-4, atol=1e-4)
        assert _rel(make_cfg_eps_fn(unet, cond, None, 1.0)(x_t, t), noise) > 0.5
    with pytest.raises(ValueError, match="alphas_cumprod"):
        make_cfg_eps_fn(unet, cond, None, 1.0, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="not supported"):
        DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"))


def test_cfg_on_v_equals_cfg_on_converted_eps():
    unet = _RecordingUNet()
    cond, uncond = _tokens(2, 0), _tokens(2, 1)
    x, t, w = torch.randn(2, 2, 16, 16), torch.tensor([300, 700]), 2.5
    a = _acp_at(t, x)
    with torch.no_grad():
        guided = make_cfg_eps_fn(unet, cond, uncond, w, prediction_type="v_prediction", alphas_cumprod=ACP)(x, t)
        eps_c = a.sqrt() * unet(x, t, encoder_hidden_states=cond).sample + (1 - a).sqrt() * x
        eps_u = a.sqrt() * unet(x, t, encoder_hidden_states=uncond).sample + (1 - a).sqrt() * x
    torch.testing.assert_close(guided, eps_u + w * (eps_c - eps_u), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# steps_offset; DPS honours eta and clip_x0


def test_steps_offset_is_applied_like_diffusers_ddim_or_refused():
    for n, offset in [(100, 1), (30, 1), (50, 3)]:
        ddim = DDIMScheduler(num_train_timesteps=1000, steps_offset=offset)
        ddim.set_timesteps(n)
        assert make_timesteps(1000, n, "leading", offset).tolist() == ddim.timesteps.tolist()
    # diffusers does not use the offset for "trailing"/"linspace", so neither do we
    for spacing in ("trailing", "linspace"):
        ddim = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing=spacing)
        ddim.set_timesteps(30)
        assert make_timesteps(1000, 30, spacing, 1).tolist() == ddim.timesteps.tolist()
    with pytest.raises(ValueError, match="uniform"):
        make_timesteps(1000, 30, "uniform", 1)
    with pytest.raises(ValueError, match=">= 1000"):
        make_timesteps(1000, 1000, "leading", 1)  # 999 + 1 is no training timestep
    with pytest.raises(ValueError, match="non-negative"):
        make_timesteps(1000, 10, "leading", -1)


def test_samplers_use_the_schedule_steps_offset(tmp_path):
    """A scheduler config with steps_offset 1 moves every DDS/DPS timestep by one (991, …, 1), as DDIM does."""
    config = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
              "steps_offset": 1}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    schedule = DiffusionSchedule.from_config(tmp_path)
    assert schedule.steps_offset == 1
    op, y, x0 = _problem(b=1, seed=2)
    for sampler in (dds_sample, dps_sample):
        seen = []
        x = sampler(oracle_eps_fn(x0), op, y, schedule, num_steps=10, generators=make_generators([0]),
                    callback=lambda i, t, x_t, x0_hat: seen.append(t))
        assert seen == list(range(901, 0, -100)), sampler.__name__
        assert _rel(x, x0) < 1e-4
    # a bare ᾱ tensor has no offset
    seen = []
    dds_sample(oracle_eps_fn(x0), op, y, ACP, num_steps=10, generators=make_generators([0]),
               callback=lambda i, t, x_t, x0_hat: seen.append(t))
    assert seen == list(range(900, -1, -100))


def test_dps_honours_eta():
    """Without the measurement step (ζ' = 0) DPS is the DDIM update with η noise: it equals DDS without data
    consistency for every η, from the same noise, and η changes the result."""
    op, y, _ = _problem(b=2, seed=6)
    eps_fn = gaussian_prior_eps_fn()
    results = {}
    for eta in (0.0, 0.5, 1.0):
        dps = dps_sample(eps_fn, op, y, ACP, num_steps=15, step_size=0.0, eta=eta, generators=make_generators([1, 2]))
        dds = dds_sample(eps_fn, op, y, ACP, num_steps=15, cg_iter=0, eta=eta, generators=make_generators([1, 2]))
        assert _rel(dps, dds) < 1e-5, eta
        results[eta] = dps
    assert _rel(results[0.0], results[1.0]) > 0.05 and _rel(results[0.5], results[1.0]) > 0.01


def test_dps_honours_clip_x0_with_an_oracle_denoiser():
    """A large ground truth: the oracle's x̂₀ is clipped to ``clip_x0`` in the update (callback sees it)."""
    op, y, x0 = _problem(b=1, seed=7)
    x0 = 5 * x0 / x0.abs().max()
    y = op(x0)
    seen = []
    dps_sample(oracle_eps_fn(x0), op, y, ACP, num_steps=8, step_size=0.0, clip_x0=1.0, generators=make_generators([0]),
               callback=lambda i, t, x_t, x0_hat: seen.append(float(x0_hat.abs().max())))
    assert max(seen) <= 1.0 + 1e-5
    seen.clear()
    x = dps_sample(oracle_eps_fn(x0), op, y, ACP, num_steps=8, step_size=0.0, generators=make_generators([0]),
                   callback=lambda i, t, x_t, x0_hat: seen.append(float(x0_hat.abs().max())))
    assert min(seen) > 4.9 and _rel(x, x0) < 1e-4


class _PriorUNet(torch.nn.Module):
    """A "UNet" whose ε is the exact Gaussian-prior ε (ignores the condition tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.eps_fn = gaussian_prior_eps_fn()

    def forward(self, x, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=self.eps_fn(x, t))


def test_diffusion_reconstructor_passes_eta_and_clip_x0_to_dps():
    from models.conditioning import ConditionBuilder
    from utils.diffusion_recon import DiffusionReconstructor

    op, y, _ = _problem(b=1, seed=8)
    records, prompts = [{}], [""]
    out = {}
    for eta, clip in ((0.0, None), (1.0, None), (1.0, 0.1)):
        recon = DiffusionReconstructor(_PriorUNet(), ConditionBuilder(None, None, null_dim=4), SCHEDULE, sampler="dps",
                                       num_steps=12, eta=eta, dps_step=0.5, clip_x0=clip)
        out[(eta, clip)], _ = recon(y, op, records, prompts, make_generators([3]))
        direct = dps_sample(gaussian_prior_eps_fn(), op, y, SCHEDULE, num_steps=12, step_size=0.5, eta=eta,
                            clip_x0=clip, generators=make_generators([3]))
        assert _rel(out[(eta, clip)], direct) < 1e-5
    assert _rel(out[(0.0, None)], out[(1.0, None)]) > 0.01
    assert _rel(out[(1.0, 0.1)], out[(1.0, None)]) > 0.01


# ----------------------------------------------------------------------------------------------------------------------
# DPS step from the noise level σ


def test_dps_step_follows_sigma_as_the_rule_says():
    """One DPS step from the same x_T: the correction x̂₀ − x is ζ' g without σ and ζ' w_t g with σ, where
    w_t = v_t/(v_t + 2σ²), v_t = s² + 2(1 − ᾱ_t); so the ratio of the corrections is w_t, per sample, and it is 1
    at σ = 0, near 1 early in the schedule and near s²/(s² + 2σ²) at the end."""
    from utils.samplers import dps_noise_weight

    op, y, _ = _problem(b=2, seed=12)
    eps_fn = gaussian_prior_eps_fn()
    sigma, s = torch.tensor([0.0, 0.05]), 0.1
    weights = {}
    for t in (900, 0):
        x_T = randn_images(make_generators([3, 4]), (16, 16), torch.complex64, torch.device("cpu"))
        seen = []
        plain = dps_sample(eps_fn, op, y, ACP, timesteps=[t], step_size=0.7, eta=0.0, x_T=x_T,
                           callback=lambda i, t_, x_t, x0_hat: seen.append(x0_hat))
        aware = dps_sample(eps_fn, op, y, ACP, timesteps=[t], step_size=0.7, eta=0.0, x_T=x_T, noise_sigma=sigma,
                           prior_error_std=s)
        x0_hat = seen[0]
        for b in range(2):
            ratio = float((x0_hat[b] - aware[b]).abs().sum() / (x0_hat[b] - plain[b]).abs().sum())
            expected = float(dps_noise_weight(float(ACP[t]), float(sigma[b]), s))
            assert ratio == pytest.approx(expected, rel=1e-4), (t, b)
        weights[t] = expected
    assert weights[900] > 0.99 and weights[0] < 0.9
    assert weights[0] == pytest.approx(s**2 / (s**2 + 2 * 0.05**2), rel=0.05)
    assert dps_noise_weight(0.5, 0.0) == 1.0


def test_dps_with_sigma_beats_zero_filling_on_a_noisy_measurement():
    """A denoiser that knows the truth up to a Gaussian uncertainty (std 0.3), a noisy 2.5x measurement (σ = 0.2
    per part): DPS with the σ-aware step is far closer to the truth than zero-filling, and σ = 0 is the plain run."""
    op, y, x0 = _problem(b=2, seed=10)
    sigma, std = 0.2, 0.3
    g = torch.Generator().manual_seed(10)
    y = y + op.mask * torch.complex(torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)) * sigma
    m = complex_to_channels(x0)

    def informed_eps(x_t, t):
        a = _acp_at(t, x_t)
        x0_hat = m + a.sqrt() * std**2 / (a * std**2 + 1 - a) * (x_t - a.sqrt() * m)
        return (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()

    aware = dps_sample(informed_eps, op, y, ACP, num_steps=20, step_size=2.0, generators=make_generators([0, 1]),
                       noise_sigma=sigma, prior_error_std=std)
    assert _rel(aware, x0) < 0.5 * _rel(op.adjoint(y), x0)
    plain = dps_sample(informed_eps, op, y, ACP, num_steps=20, step_size=2.0, generators=make_generators([0, 1]))
    zero = dps_sample(informed_eps, op, y, ACP, num_steps=20, step_size=2.0, generators=make_generators([0, 1]),
                      noise_sigma=0.0)
    assert torch.equal(plain, zero) and not torch.equal(plain, aware)
