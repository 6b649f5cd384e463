"""Batched conjugate gradient for ``(I + γ AᴴA) x = b`` against dense solves, per sample."""

from __future__ import annotations

import torch

from utils.cg import conjugate_gradient
from utils.operators import SenseOperator

DT = torch.complex128


def _problem(b: int, m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample explicit matrices ``A [B, m, n]`` and right-hand sides ``b [B, n]`` (complex128)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, m, n, dtype=DT, generator=g)
    rhs = torch.randn(b, n, dtype=DT, generator=g)
    return a, rhs


def _normal_of(a: torch.Tensor):
    def normal(x: torch.Tensor) -> torch.Tensor:  # x [B, n] -> AᴴA x
        return torch.einsum("bmn,bm->bn", a.conj(), torch.einsum("bmn,bn->bm", a, x))

    return normal


def _dense_solve(a: torch.Tensor, rhs: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    system = torch.eye(n, dtype=DT) + gamma.to(DT)[:, None, None] * (a.mH @ a)
    return torch.linalg.solve(system, rhs)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)


def test_matches_dense_solve_scalar_gamma() -> None:
    a, rhs = _problem(3, 6, 10, seed=0)
    x = conjugate_gradient(_normal_of(a), rhs, gamma=2.0, max_iter=40)
    ref = _dense_solve(a, rhs, torch.full((3,), 2.0))
    assert torch.all(_rel_err(x, ref) < 1e-10)
    assert x.dtype == DT and x.shape == rhs.shape


def test_per_sample_scale_and_gamma() -> None:
    """Samples whose scales differ by 1e4 and whose γ differ all converge; a shared step size would not."""
    a, rhs = _problem(3, 8, 8, seed=1)
    a = a * torch.tensor([1.0, 100.0, 0.01], dtype=torch.float64)[:, None, None]
    rhs = rhs * torch.tensor([1.0, 1e4, 1e-4], dtype=torch.float64)[:, None]
    gamma = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    x = conjugate_gradient(_normal_of(a), rhs, gamma=gamma, max_iter=60)
    ref = _dense_solve(a, rhs, gamma)
    assert torch.all(_rel_err(x, ref) < 1e-8), _rel_err(x, ref)


def test_batch_does_not_couple_samples() -> None:
    """A sample's iterate after k steps does not depend on what else is in the batch."""
    a, rhs = _problem(3, 5, 9, seed=2)
    a = a * torch.tensor([1.0, 30.0, 0.1], dtype=torch.float64)[:, None, None]
    gamma = torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)
    batched = conjugate_gradient(_normal_of(a), rhs, gamma=gamma, max_iter=3)
    for i in range(3):
        alone = conjugate_gradient(_normal_of(a[i : i + 1]), rhs[i : i + 1], gamma=gamma[i : i + 1], max_iter=3)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-12, rtol=1e-10)


def test_x0_and_tolerance_early_stop() -> None:
    a, rhs = _problem(2, 6, 12, seed=3)
    gamma = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ref = _dense_solve(a, rhs, gamma)
    calls = {"n": 0}
    base = _normal_of(a)

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return base(x)

    # Starting at the exact solution: converged before the first iteration, x0 returned untouched.
    x = conjugate_gradient(counting, rhs, x0=ref, gamma=gamma, max_iter=50, tol=1e-8)
    assert calls["n"] == 1  # only the initial residual
    torch.testing.assert_close(x, ref)

    # A loose tolerance stops early, and the stopping rule ||r|| <= tol ||b|| holds per sample.
    calls["n"] = 0
    tol = 1e-2
    x = conjugate_gradient(counting, rhs, gamma=gamma, max_iter=50, tol=tol)
    assert calls["n"] < 51
    system = x + gamma[:, None].to(DT) * base(x)
    rel_res = (rhs - system).norm(dim=1) / rhs.norm(dim=1)
    assert torch.all(rel_res <= tol)

    # One sample already solved via x0, the other not: the solved one stays put while the other converges.
    x0 = torch.stack([ref[0], torch.zeros_like(ref[1])])
    x = conjugate_gradient(base, rhs, x0=x0, gamma=gamma, max_iter=50, tol=1e-10)
    torch.testing.assert_close(x[0], ref[0])
    assert _rel_err(x[1:], ref[1:]) < 1e-8


def test_sense_normal_against_dense_matrix() -> None:
    """CG with the real SENSE normal operator equals a dense solve of the explicitly assembled matrix."""
    g = torch.Generator().manual_seed(4)
    h = w = 4
    maps = torch.randn(1, 2, h, w, dtype=DT, generator=g)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    op = SenseOperator(maps, mask)
    eye = torch.eye(h * w, dtype=DT).reshape(h * w, h, w)
    n_mat = op.normal(eye).reshape(h * w, h * w).T  # column j = AᴴA e_j
    rhs = torch.randn(1, h, w, dtype=DT, generator=g)
    gamma = 5.0
    ref = torch.linalg.solve(torch.eye(h * w, dtype=DT) + gamma * n_mat, rhs.flatten())
    x = conjugate_gradient(op.normal, rhs, gamma=gamma, max_iter=h * w + 5)
    torch.testing.assert_close(x.flatten(), ref, atol=1e-10, rtol=1e-10)


def test_float32_complex64_runs() -> None:
    a, rhs = _problem(2, 6, 8, seed=5)
    x = conjugate_gradient(_normal_of(a.to(torch.complex64)), rhs.to(torch.complex64), gamma=1.0, max_iter=30)
    assert x.dtype == torch.complex64
    ref = _dense_solve(a, rhs, torch.ones(2, dtype=torch.float64))
    assert torch.all(_rel_err(x.to(DT), ref) < 1e-4)
