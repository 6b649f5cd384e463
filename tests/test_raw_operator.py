"""The real-grid operator ``A = M F S P``: shared adjoint test, ``normal == adjoint ∘ forward``, sampler contract."""

from __future__ import annotations

import pytest
import torch

from tests.test_operators import assert_adjoint
from utils.fft import fft2c
from utils.raw_operator import RawGridOperator, crop_to, outside_estimate, place, window_mask

B, C = 2, 3


def _maps(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, h, w, dtype=torch.complex128, generator=g)


def _line_mask(w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 1, 1, w, generator=g) < 0.4).double()


# (grid H, grid W, prior h, prior w): oversampled readout and wider phase encode; odd sizes; a prior wider than the grid
SHAPES = [(16, 12, 8, 8), (15, 11, 6, 7), (12, 10, 6, 12), (8, 8, 8, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_raw_operator_adjoint_packed_and_grid(shape) -> None:
    hh, ww, h, w = shape
    op = RawGridOperator(_maps(hh, ww, 1), _line_mask(ww, 2), (h, w))
    assert_adjoint(op, (B, h, w), (B, op.num_planes, h, w))

    class Grid:  # the same operator on the unpacked grid
        forward = staticmethod(op.forward_grid)
        adjoint = staticmethod(op.adjoint_grid)

    assert_adjoint(Grid, (B, h, w), (B, C, hh, ww))
    x = torch.randn(B, h, w, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), atol=1e-12, rtol=1e-12)
    # pack/unpack: a permutation plus padding (unpack ∘ pack = I, the padding carries mask 0)
    y = torch.randn(B, C, hh, ww, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(op.unpack(op.pack(y)), y)
    assert op.mask.shape == (B, op.num_planes, h, w)
    assert float(op.mask.sum()) == float(op.grid_mask.expand(B, C, hh, ww).sum())


def test_forward_is_mask_fft_maps_place() -> None:
    """``forward_grid`` is literally ``M ⊙ F(S ⊙ P x)`` with ``P`` the fastMRI-centred window."""
    hh, ww, h, w = 16, 12, 8, 6
    maps, mask = _maps(hh, ww, 5), _line_mask(ww, 6)
    op = RawGridOperator(maps, mask, (h, w))
    x = torch.randn(B, h, w, dtype=torch.complex128, generator=torch.Generator().manual_seed(7))
    full = torch.zeros(B, hh, ww, dtype=x.dtype)
    full[:, (hh - h) // 2 : (hh - h) // 2 + h, (ww - w) // 2 : (ww - w) // 2 + w] = x
    torch.testing.assert_close(op.forward_grid(x), mask * fft2c(maps * full[:, None]))
    torch.testing.assert_close(crop_to(place(x, (hh, ww)), (h, w)), x)
    assert float(window_mask((h, w), (hh, ww)).sum()) == h * w


def test_dds_accepts_the_operator() -> None:
    """DDS reads the image size from ``y``: with the packed layout it samples at the prior's size; with a huge γ and
    a zero network the result fits the measured samples."""
    from utils.samplers import dds_sample

    hh, ww, h, w = 16, 12, 8, 8
    maps = _maps(hh, ww, 8).to(torch.complex64)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.ones(B, 1, 1, ww)
    op = RawGridOperator(maps, mask, (h, w))
    x_true = torch.randn(B, h, w, dtype=torch.complex64, generator=torch.Generator().manual_seed(9))
    y = op.forward(x_true)
    acp = torch.linspace(0.999, 0.01, 1000).cumprod(0).clamp_min(1e-4)
    x = dds_sample(lambda xt, t: torch.zeros_like(xt), op, y, acp, num_steps=3, gamma=1e5, cg_iter=20,
                   generators=[torch.Generator().manual_seed(i) for i in range(B)])
    assert x.shape == (B, h, w)
    assert float((op.forward(x) - y).norm() / y.norm()) < 1e-3


def test_dps_accepts_the_operator() -> None:
    """DPS uses ``op.mask * y`` and differentiates through ``op.forward``: both work in the packed layout."""
    from utils.samplers import dps_sample

    hh, ww, h, w = 12, 10, 6, 6
    op = RawGridOperator(_maps(hh, ww, 12).to(torch.complex64), _line_mask(ww, 13).float(), (h, w))
    y = op.forward(torch.randn(B, h, w, dtype=torch.complex64, generator=torch.Generator().manual_seed(14)))
    acp = torch.linspace(0.999, 0.01, 1000).cumprod(0).clamp_min(1e-4)
    x = dps_sample(lambda xt, t: 0.0 * xt, op, y, acp, num_steps=3,
                   generators=[torch.Generator().manual_seed(i) for i in range(B)])  # fmt: skip
    assert x.shape == (B, h, w) and bool(torch.isfinite(x).all())


def test_outside_estimate_recovers_signal_outside_the_crop() -> None:
    """Fully sampled, unit-norm maps: the least-squares estimate outside the window is the true image there."""
    hh, ww, h, w = 16, 12, 8, 8
    maps = _maps(hh, ww, 10)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    from utils.operators import SenseOperator

    sense = SenseOperator(maps, torch.ones(1, ww, dtype=torch.float64))
    u_true = torch.randn(B, hh, ww, dtype=torch.complex128, generator=torch.Generator().manual_seed(11))
    z = outside_estimate(sense, sense.forward(u_true), (h, w), lam=1e-6, max_iter=10)
    outside = 1 - window_mask((h, w), (hh, ww)).double()
    torch.testing.assert_close(z, u_true * outside, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        outside_estimate(sense, sense.forward(u_true), (h, w), lam=0.0)
