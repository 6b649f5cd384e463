"""Batched conjugate gradient for ``(I + γ AᴴA) x = b``, one independent solve per sample.

The reference implementation used unconjugated inner products (``Σ r²`` instead of ``rᴴr``) and a single step size for
the whole batch, which is wrong for complex data and couples unrelated slices. Here every inner product is Hermitian
and every quantity (``α``, ``β``, residual norm, convergence) is kept per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Hermitian inner product ``aᴴb`` over all but the batch dim -> ``[B]`` (complex)."""
    return (a.conj() * b).flatten(1).sum(dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    gamma: float | torch.Tensor = 1.0,
    max_iter: int = 5,
    tol: float = 0.0,
) -> torch.Tensor:
    """Solve ``(I + γ N) x = b`` per sample, with ``N = AᴴA`` Hermitian positive semi-definite.

    Args:
        normal: function computing ``AᴴA x`` for a batch ``x`` of shape ``[B, ...]``.
        b: right-hand side ``[B, ...]`` (complex or real).
        x0: initial guess (default zeros).
        gamma: ``γ >= 0``, a scalar or one value per sample ``[B]``.
        max_iter: iteration cap.
        tol: stop a sample once ``||r|| <= tol · ||b||`` (relative); 0 runs ``max_iter`` iterations.

    Returns:
        ``x`` with the shape and dtype of ``b``.
    """
    gamma_t = torch.as_tensor(gamma, device=b.device, dtype=b.real.dtype)
    if gamma_t.ndim == 0:
        gamma_t = gamma_t.expand(b.shape[0])
    gamma_b = _bcast(gamma_t, b)

    def system(v: torch.Tensor) -> torch.Tensor:
        return v + gamma_b * normal(v)

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - system(x)
    p = r.clone()
    rs = _dot(r, r).real
    b_norm = _dot(b, b).real.sqrt()
    active = rs.sqrt() > tol * b_norm
    for _ in range(max_iter):
        if tol > 0 and not bool(active.any()):  # (with tol = 0 skip this host sync: a GPU keeps queueing work)
            break
        ap = system(p)
        pap = _dot(p, ap).real
        # Samples that have converged (or whose residual is exactly zero) take no step.
        alpha = torch.where(active & (pap > 0), rs / pap.clamp_min(torch.finfo(pap.dtype).tiny), torch.zeros_like(rs))
        x = x + _bcast(alpha, x).to(x.dtype) * p
        r = r - _bcast(alpha, r).to(r.dtype) * ap
        rs_new = _dot(r, r).real
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
        p = r + _bcast(beta, p).to(p.dtype) * p
        rs = rs_new
        active = active & (rs.sqrt() > tol * b_norm)
    return x
