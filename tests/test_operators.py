"""SENSE operator: one shared adjoint test for every configuration, and ``normal == adjoint ∘ forward``."""

from __future__ import annotations

import pytest
import torch

from utils.masks import get_mask
from utils.operators import SenseOperator


def assert_adjoint(op, x_shape: tuple[int, ...], y_shape: tuple[int, ...], seed: int = 0, rtol: float = 1e-10) -> None:
    """Shared adjoint test: ``<A x, y> == <x, Aᴴ y>`` for random complex128 ``x``, ``y``.

    Every linear operator in the project must pass this (it needs ``forward`` and ``adjoint``).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, dtype=torch.complex128, generator=g)
    y = torch.randn(*y_shape, dtype=torch.complex128, generator=g)
    ax = op.forward(x)
    aty = op.adjoint(y)
    assert ax.shape == y.shape, f"forward gives {tuple(ax.shape)}, expected {y_shape}"
    assert aty.shape == x.shape, f"adjoint gives {tuple(aty.shape)}, expected {x_shape}"
    lhs = torch.vdot(ax.flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), aty.flatten())
    scale = ax.norm() * y.norm()
    assert (lhs - rhs).abs() <= rtol * scale, f"<Ax,y>={lhs} vs <x,AHy>={rhs}"


def _random_maps(b: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, dtype=torch.complex128, generator=g)


def _random_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < 0.4).double()


B, C, H, W = 2, 3, 12, 10

CASES = {
    "multicoil_1d_mask": lambda: SenseOperator(_random_maps(B, C, H, W, 1), _random_mask((1, W), 2)),
    "multicoil_2d_mask": lambda: SenseOperator(_random_maps(B, C, H, W, 3), _random_mask((H, W), 4)),
    "multicoil_per_sample_mask": lambda: SenseOperator(_random_maps(B, C, H, W, 5), _random_mask((B, 1, 1, W), 6)),
    "multicoil_get_mask": lambda: SenseOperator(
        _random_maps(B, C, H, W, 7), get_mask("uniform1d", (H, W), 4, seed=0).mask
    ),
    "single_coil_1d": lambda: SenseOperator.single_coil(_random_mask((1, W), 8), (B, H, W), dtype=torch.complex128),
    "single_coil_2d": lambda: SenseOperator.single_coil(_random_mask((H, W), 9), (B, H, W), dtype=torch.complex128),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sense_adjoint(case: str) -> None:
    op = CASES[case]()
    c = op.maps.shape[1]
    assert_adjoint(op, (B, H, W), (B, c, H, W))


@pytest.mark.parametrize("case", sorted(CASES))
def test_normal_is_adjoint_of_forward(case: str) -> None:
    op = CASES[case]()
    x = torch.randn(B, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), atol=1e-12, rtol=1e-12)
    # AᴴA is Hermitian positive semi-definite: <x, AᴴA x> is real and >= 0.
    q = torch.vdot(x.flatten(), op.normal(x).flatten())
    assert abs(q.imag) < 1e-9 * abs(q.real) and q.real >= 0


@pytest.mark.parametrize("shape", [(11, 9), (12, 9), (11, 10)])
def test_normal_with_odd_sizes(shape: tuple[int, int]) -> None:
    """fftshift and ifftshift differ for odd sizes; the fast AᴴA must still equal Aᴴ(A x)."""
    h, w = shape
    op = SenseOperator(_random_maps(B, C, h, w, 21), _random_mask((h, w), 22))
    x = torch.randn(B, h, w, dtype=torch.complex128, generator=torch.Generator().manual_seed(23))
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), atol=1e-12, rtol=1e-12)
    op64 = SenseOperator(op.maps.to(torch.complex64), op.mask.float())
    torch.testing.assert_close(op64.normal(x.to(torch.complex64)), op64.adjoint(op64.forward(x.to(torch.complex64))),
                               atol=1e-5, rtol=1e-5)


def test_unbatched_maps_and_forward_model() -> None:
    """``[C, H, W]`` maps get a batch dim; ``forward`` is exactly ``M ⊙ F(S ⊙ x)``."""
    from utils.fft import fft2c

    maps = _random_maps(1, C, H, W, 12)[0]
    mask = _random_mask((1, W), 13)
    op = SenseOperator(maps, mask)
    assert op.maps.shape == (1, C, H, W)
    x = torch.randn(1, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(14))
    expected = mask * fft2c(maps[None] * x[:, None])
    torch.testing.assert_close(op(x), expected)
    assert_adjoint(op, (1, H, W), (1, C, H, W))


def test_unit_norm_maps_full_mask_is_isometry() -> None:
    """With Σ|S|² = 1 and a full mask, AᴴA = I."""
    maps = _random_maps(B, C, H, W, 15)
    maps = maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()
    op = SenseOperator(maps, torch.ones(1, W))
    x = torch.randn(B, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(16))
    torch.testing.assert_close(op.normal(x), x)


def test_buffers_and_bad_inputs() -> None:
    op = SenseOperator(_random_maps(B, C, H, W, 17).to(torch.complex64), torch.ones(1, W, dtype=torch.bool))
    assert set(op.state_dict()) == {"maps", "mask"}  # the quadrant-swapped copies for AᴴA are derived, not saved
    assert op.mask.dtype == torch.float32
    with pytest.raises(TypeError):
        SenseOperator(torch.ones(B, C, H, W), torch.ones(1, W))
    with pytest.raises(ValueError):
        SenseOperator(_random_maps(B, C, H, W, 18), torch.ones(1, W + 1))
