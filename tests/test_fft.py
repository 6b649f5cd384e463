"""Centred orthonormal FFT: round trip, Parseval, agreement with numpy, batching and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.fft import fft2c, ifft2c


def _randc(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=g)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(16, 16), (3, 15, 20), (2, 4, 9, 8)])
def test_round_trip(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _randc(shape, dtype)
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    torch.testing.assert_close(ifft2c(fft2c(x)), x, atol=tol, rtol=tol)
    torch.testing.assert_close(fft2c(ifft2c(x)), x, atol=tol, rtol=tol)
    assert fft2c(x).dtype == dtype and fft2c(x).shape == x.shape


@pytest.mark.parametrize("shape", [(16, 16), (3, 15, 20)])
def test_parseval(shape: tuple[int, ...]) -> None:
    x = _randc(shape, torch.complex128, seed=1)
    assert torch.allclose(torch.linalg.vector_norm(fft2c(x)), torch.linalg.vector_norm(x), rtol=1e-12)
    # Orthonormal => unitary: inner products are preserved too, and ifft2c is the adjoint of fft2c.
    y = _randc(shape, torch.complex128, seed=2)
    assert torch.allclose(torch.vdot(fft2c(x).flatten(), fft2c(y).flatten()), torch.vdot(x.flatten(), y.flatten()))
    assert torch.allclose(torch.vdot(fft2c(x).flatten(), y.flatten()), torch.vdot(x.flatten(), ifft2c(y).flatten()))


@pytest.mark.parametrize("shape", [(12, 12), (2, 3, 11, 14)])
def test_matches_numpy_centred_fft(shape: tuple[int, ...]) -> None:
    x = _randc(shape, torch.complex128, seed=3)
    xn = x.numpy()
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(xn, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    ref_inv = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(xn, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(fft2c(x).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(ifft2c(x).numpy(), ref_inv, atol=1e-12)


def test_dc_is_centred() -> None:
    x = torch.ones(8, 10, dtype=torch.complex128)
    k = fft2c(x)
    assert torch.isclose(k[4, 5], torch.tensor(np.sqrt(80.0), dtype=torch.complex128))
    assert torch.allclose(k.abs().sum(), k[4, 5].abs())


def test_batched_equals_per_sample() -> None:
    x = _randc((3, 2, 10, 12), torch.complex64, seed=4)
    per = torch.stack([torch.stack([fft2c(x[i, j]) for j in range(2)]) for i in range(3)])
    torch.testing.assert_close(fft2c(x), per)


def test_rejects_real_input() -> None:
    with pytest.raises(TypeError):
        fft2c(torch.zeros(4, 4))
    with pytest.raises(TypeError):
        ifft2c(torch.zeros(4, 4))
