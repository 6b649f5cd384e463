"""Does a model read its metadata? Paired denoising losses and an information estimate, per attribute.

For held-out slices ``x_0`` the denoising error ``e(c) = ‖ε − ε̂(x_t, t, c)‖²`` (mean over pixels and the two
real/imag channels) is measured with the *same* image, the *same* noise ``ε`` and the *same* ``t`` for every condition
``c``:

* ``correct``: the slice's own metadata (and prompt);
* ``null``: the classifier-free-guidance null condition (``ConditionBuilder.unconditional``);
* ``drop:K``: the slice's metadata with attribute ``K`` removed (``build(..., drop_keys=[K])``: its token gets the
  learned empty embedding and its field leaves the prompt);
* ``mismatch:K``: attribute ``K`` replaced by another held-out slice's value (a deterministic derangement, see
  :func:`derangement`).

The paired difference ``e(c) − e(correct)`` removes the image-to-image and noise-to-noise spread that dominates each
loss on its own, so effects of a fraction of a percent are resolved on a few dozen slices. The slice is the unit of
replication: noise draws are averaged within a slice first, and standard errors are taken across slices.

Information estimate (nats per image). For the Gaussian channel ``z = √snr·x + ε`` the I-MMSE relation (Guo, Shamai
& Verdú 2005, "Mutual information and minimum mean-square error in Gaussian channels", Eq. 1) gives, as used for
diffusion models by Kong, Brekelmans & Ver Steeg ("Information-Theoretic Diffusion", ICLR 2023, Eq. 3 and Sec. 3.2),

    I(x; c) = ½ ∫₀^∞ [mmse(snr) − mmse(snr | c)] d snr,      mmse in x-space, summed over the image's dimensions.

A DDPM step ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` is that channel with ``snr_t = ᾱ_t / (1−ᾱ_t)`` (divide by √(1−ᾱ_t)), and
the x-error of the implied estimate is ``‖x_0 − x̂_0‖² = ‖ε − ε̂‖² / snr``. With ``λ = log snr`` (``d snr = snr dλ``)

    I(x; c) = ½ ∫ [E‖ε − ε̂(x_t, t)‖² − E‖ε − ε̂(x_t, t, c)‖²] dλ          (errors summed over all 2·H·W values).

See :func:`information_weights` for the quadrature. What this is and is not: the model's own denoiser stands in for
the MMSE estimator, so the number is the difference of the model's two denoising bounds — how many nats of
``−log p(x)`` the model's conditioning buys it — over the λ range of its timesteps, not the true mutual information
of the data (a model that ignores a useful attribute reports 0; a model that misuses one can report a negative value).
``null − correct`` is the total information the model takes from its conditioning; ``drop:K − correct`` is the
*unique* information of ``K`` given the other attributes; ``mismatch:K − correct`` is a cost of wrong metadata (in
nats, an expected log-likelihood ratio under the model), not an information.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.files import atomic_write_text, write_json
from utils.metadata import is_missing
from utils.samplers import DiffusionSchedule, make_cfg_eps_fn

#: Record keys that hold the same value (the CSV's ``slice`` is the stats files' ``slice_number``).
_ALIASES: dict[str, tuple[str, ...]] = {"slice_number": ("slice",), "slice": ("slice_number",)}
#: Numerical attributes a counterfactual strip sweeps by default, and those swept on a log scale.
SWEEP_KEYS: tuple[str, ...] = ("TE", "TR", "TI")
_LOG_SWEEP_KEYS = {"TR", "TE", "TI"}
DEFAULT_BANDS: tuple[int, ...] = (0, 100, 300, 600, 1000)


class ReportError(RuntimeError):
    """The measurement failed (e.g. a non-finite loss): no report is written."""


@dataclass
class ReportSettings:
    """What the report measures (every field is written to ``report.json``).

    Attributes:
        num_slices: held-out slices, spread evenly over the dataset (all when it has fewer).
        num_noise: paired noise draws per slice (each at every timestep of the grid).
        timesteps: explicit timestep grid; ``None``: ``num_timesteps`` points evenly spaced in log-SNR over the
            schedule (see :func:`timestep_grid`).
        num_timesteps: size of the default grid.
        t_bands: band edges in t; bands are ``[edge_i, edge_{i+1})``, plus the whole grid ("all").
        keys: attributes to drop / mismatch; ``None``: the model's own (its metadata keys, else the prompt fields).
        seed: base seed of the noise (each slice's draws are seeded by ``(seed, file, slice)``).
        batch_size: images per network forward.
        counterfactual_t: timestep of the counterfactual strips.
        counterfactual_values: values per strip.
        counterfactual_index: which selected slice the strips show.
        counterfactual_keys: numerical attributes to sweep; ``None``: those of TE, TR, TI the model reads.
        z_threshold: ``|z|`` at and above which a gap counts as detected in the verdicts.
        save_png: write ``loss_gap.png`` and the strips.
    """

    num_slices: int = 20
    num_noise: int = 8
    timesteps: list[int] | None = None
    num_timesteps: int = 16
    t_bands: list[int] = field(default_factory=lambda: list(DEFAULT_BANDS))
    keys: list[str] | None = None
    seed: int = 0
    batch_size: int = 64
    counterfactual_t: int = 500
    counterfactual_values: int = 7
    counterfactual_index: int = 0
    counterfactual_keys: list[str] | None = None
    z_threshold: float = 3.0
    save_png: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` naming the offending setting."""
        if self.num_slices < 2:
            raise ValueError(f"--num_slices must be >= 2 (standard errors need two slices), got {self.num_slices}")
        if self.num_noise < 1 or self.num_timesteps < 2 or self.batch_size < 1 or self.counterfactual_values < 2:
            raise ValueError("--num_noise and --batch_size must be >= 1, --num_timesteps and --counterfactual_values "
                             ">= 2")
        if self.timesteps is not None and len(set(self.timesteps)) < 1:
            raise ValueError("--timesteps needs at least one value")
        if len(self.t_bands) < 2 or any(a >= b for a, b in zip(self.t_bands[:-1], self.t_bands[1:])):
            raise ValueError(f"--t_bands must be at least two increasing edges, got {self.t_bands}")
        if self.z_threshold <= 0:
            raise ValueError(f"--z_threshold must be > 0, got {self.z_threshold}")


@dataclass(frozen=True)
class Condition:
    """One condition of the comparison.

    Attributes:
        name: ``"correct"``, ``"null"``, ``"drop:K"`` or ``"mismatch:K"``.
        kind: ``"correct"``, ``"null"``, ``"drop"`` or ``"mismatch"``.
        key: the attribute (drop / mismatch), else ``None``.
    """

    name: str
    kind: str
    key: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# timesteps and the information quadrature
# ---------------------------------------------------------------------------------------------------------------------

def log_snr(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> np.ndarray:
    """``λ_t = log(ᾱ_t / (1 − ᾱ_t))`` at the given timesteps, float64 ``[n]``."""
    acp = alphas_cumprod.detach().to("cpu", torch.float64).numpy()[np.asarray(timesteps, dtype=np.int64)]
    return np.log(acp) - np.log1p(-acp)


def timestep_grid(alphas_cumprod: torch.Tensor, num: int) -> list[int]:
    """``num`` timesteps (ascending, unique) evenly spaced in log-SNR from ``t = 0`` to ``t = T − 1``.

    Even spacing in λ suits the information integral (its variable) and still puts points in every t band of the
    linear schedule (T = 1000, ``num = 16``: 6 points below t = 100, 2 in [100, 300), 2 in [300, 600), 6 above).
    """
    acp = alphas_cumprod.detach().to("cpu", torch.float64)
    lam_all = log_snr(acp, range(acp.shape[0]))  # decreasing in t
    targets = np.linspace(lam_all[0], lam_all[-1], int(num))
    idx = {int(np.argmin(np.abs(lam_all - v))) for v in targets}
    return sorted(idx)


def information_weights(lam: np.ndarray) -> np.ndarray:
    """Trapezoid weights ``w`` with ``∫ f dλ ≈ Σ_k w_k f(λ_k)`` over ``[min λ, max λ]`` of the grid.

    Deterministic quadrature rather than importance sampling: the grid is shared by every slice and condition, so the
    per-slice estimates are paired exactly like the losses and their spread across slices is the whole error bar.
    The integral is truncated to the model's λ range (``t = 0`` … ``T − 1``); the tails beyond contribute little as
    both errors approach the same limit there. A single timestep gives zero weights (no integral).

    Args:
        lam: ``[n]`` log-SNR values, any order, distinct.

    Returns:
        ``[n]`` float64 weights in the order of ``lam``.
    """
    lam = np.asarray(lam, dtype=np.float64)
    w = np.zeros_like(lam)
    if lam.size < 2:
        return w
    order = np.argsort(lam)
    sl = lam[order]
    gaps = np.diff(sl)
    ws = np.zeros_like(sl)
    ws[:-1] += gaps / 2
    ws[1:] += gaps / 2
    w[order] = ws
    return w


# ---------------------------------------------------------------------------------------------------------------------
# attributes, mismatches
# ---------------------------------------------------------------------------------------------------------------------

def model_kind(conditioner: Any) -> str:
    """``"unconditional"``, ``"text"``, ``"metadata"`` or ``"text+metadata"``."""
    if getattr(conditioner, "is_unconditional", False):
        return "unconditional"
    text, meta = getattr(conditioner, "text", None) is not None, getattr(conditioner, "metadata", None) is not None
    return "text+metadata" if text and meta else "metadata" if meta else "text"


def model_attributes(conditioner: Any) -> list[str]:
    """The attributes a model can read (``ConditionBuilder.readable_keys``: metadata keys, then prompt fields)."""
    return list(conditioner.readable_keys())


def _value(record: Mapping[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None:
        for alias in _ALIASES.get(key, ()):
            if record.get(alias) is not None:
                return record[alias]
    return value


def _present(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True  # an empty pathology list is a value ("none"), unlike None ("unknown")
    return not is_missing(value)


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ("list", tuple(sorted(str(v) for v in value)))
    if isinstance(value, (int, float)):
        return ("num", float(value))
    return ("str", str(value).strip())


def derangement(values: Sequence[Any]) -> tuple[list[int | None], str | None]:
    """For each slice, the slice whose value it borrows in a mismatch, so that the value differs where possible.

    Slices with a present value are sorted by value (ties by position) and each takes the value ``m`` places further
    on, cyclically, where ``m`` is the size of the largest group of equal values: when no value holds more than half
    of the slices, every slice then gets a different value. Slices left with their own value (a majority value) and
    slices without a value get ``None`` (excluded from that mismatch).

    Args:
        values: one attribute's value per slice (``None``/NaN = missing).

    Returns:
        ``(source, why)``: ``source[i]`` is the index of the slice whose value slice ``i`` receives, or ``None``;
        ``why`` says why no slice could be mismatched (all missing, all equal), else ``None``.
    """
    present = [i for i, v in enumerate(values) if _present(v)]
    source: list[int | None] = [None] * len(values)
    if not present:
        return source, "all values missing"
    keys = {i: _canonical(values[i]) for i in present}
    counts: dict[Any, int] = {}
    for k in keys.values():
        counts[k] = counts.get(k, 0) + 1
    if len(counts) < 2:
        return source, "all values equal"
    order = sorted(present, key=lambda i: (keys[i], i))
    n, shift = len(order), max(counts.values())
    for pos, i in enumerate(order):
        j = order[(pos + shift) % n]
        source[i] = j if keys[j] != keys[i] else None
    return source, None


def with_value(record: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``record`` with ``key`` (and its alias, e.g. ``slice``/``slice_number``) set to ``value``."""
    out = dict(record)
    value = list(value) if isinstance(value, (list, tuple)) else value
    out[key] = value
    for alias in _ALIASES.get(key, ()):
        if alias in out:
            out[alias] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the paired losses of one slice
# ---------------------------------------------------------------------------------------------------------------------

def _tokens(conditioner: Any, kind: str, record: Mapping[str, Any], key: str | None) -> torch.Tensor:
    """Condition tokens ``[1, L, D]`` of one condition (prompts rebuilt from the record by the builder)."""
    if kind == "null":
        return conditioner.unconditional([dict(record)])
    drop = [key] if kind == "drop" else None
    return conditioner.build([dict(record)], None, drop_keys=drop)


def slice_noise(filename: str, slice_idx: int, seed: int, num: int, shape: Sequence[int]) -> torch.Tensor:
    """The ``num`` noise draws ``[num, *shape]`` (float32, CPU) of one slice, seeded by ``(seed, file, slice)``.

    The draws do not depend on the device, the batch or the model, so two models are compared on the same noise.
    """
    from utils.masks import sample_seed

    gen = torch.Generator(device="cpu")
    gen.manual_seed(sample_seed(filename, slice_idx, seed))
    return torch.randn((num, *shape), generator=gen, dtype=torch.float32)


@torch.no_grad()
def paired_errors(
    unet: torch.nn.Module,
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    tokens: Sequence[torch.Tensor | None],
    timesteps: Sequence[int],
    noise: torch.Tensor,
    batch_size: int = 64,
) -> tuple[np.ndarray, int]:
    """Denoising errors of one image under several conditions, same noise and timesteps for all.

    Conditions whose tokens are bit-identical (e.g. every condition of an unconditional model, or dropping an
    attribute the slice does not have) are evaluated once and share the result, so their gaps are exactly zero.

    Args:
        unet: noise predictor ``unet(x[B,2,H,W], t[B], encoder_hidden_states=[B,L,D]).sample`` (ε or v; v is turned
            into ε with the schedule, as the samplers do).
        schedule: the model's :class:`DiffusionSchedule` (ᾱ and prediction type).
        x0: the clean image ``[2, H, W]`` float32.
        tokens: per condition ``[1, L, D]`` tokens, or ``None`` (not evaluated: NaN rows).
        timesteps: ``T'`` timesteps.
        noise: ``[J, 2, H, W]`` noise draws.
        batch_size: images per forward.

    Returns:
        ``(err, forwards)``: ``err`` float64 ``[C, T', J]``, mean over the ``2·H·W`` values of ``(ε − ε̂)²``; and the
        number of images run through the network.
    """
    device = x0.device
    acp = schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
    ts = torch.as_tensor(list(timesteps), dtype=torch.long, device=device)
    n_t, n_j = ts.numel(), noise.shape[0]
    eps = noise.to(device)
    a = acp[ts].view(n_t, 1, 1, 1, 1)
    x_t = (a.sqrt() * x0[None, None] + (1 - a).sqrt() * eps[None]).reshape(n_t * n_j, *x0.shape)
    t_flat = ts.repeat_interleave(n_j)
    eps_flat = eps.repeat(n_t, 1, 1, 1)

    unique: list[torch.Tensor] = []
    which: list[int | None] = []
    for tok in tokens:
        if tok is None:
            which.append(None)
            continue
        for u, ref in enumerate(unique):
            if ref.shape == tok.shape and torch.equal(ref, tok):
                which.append(u)
                break
        else:
            unique.append(tok)
            which.append(len(unique) - 1)

    per_unique = torch.empty(len(unique), n_t * n_j, dtype=torch.float64)
    work = [(u, k) for u in range(len(unique)) for k in range(n_t * n_j)]
    # Balanced chunks: no trailing batch of one image (a one-token, one-image batch trips the UNet's GroupNorm).
    n_chunks = max(1, math.ceil(len(work) / batch_size))
    bounds = np.linspace(0, len(work), n_chunks + 1).round().astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        chunk = work[start:stop]
        u_idx = torch.tensor([u for u, _ in chunk], device=device)
        k_idx = torch.tensor([k for _, k in chunk], device=device)
        cond = torch.cat([unique[u] for u, _ in chunk]).to(device)
        eps_fn = make_cfg_eps_fn(unet, cond, None, 1.0, alphas_cumprod=schedule)
        eps_hat = eps_fn(x_t[k_idx], t_flat[k_idx])
        err = (eps_hat.double() - eps_flat[k_idx].double()).square().flatten(1).mean(dim=1).cpu()
        per_unique[u_idx.cpu(), k_idx.cpu()] = err
    out = np.full((len(tokens), n_t, n_j), np.nan)
    for c, u in enumerate(which):
        if u is not None:
            out[c] = per_unique[u].view(n_t, n_j).numpy()
    return out, len(work)


# ---------------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------------

def _z(mean: float, se: float) -> float:
    if not math.isfinite(mean):
        return float("nan")
    if se > 0:
        return mean / se
    return 0.0 if mean == 0 else math.copysign(math.inf, mean)


def _mean_se(values: np.ndarray) -> tuple[float, float, int]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se, int(v.size)


def bands_of(timesteps: Sequence[int], edges: Sequence[int]) -> list[tuple[str, np.ndarray, int | None, int | None]]:
    """``(label, mask over timesteps, lo, hi)`` for each non-empty band ``[lo, hi)`` and then ``("all", …)``."""
    ts = np.asarray(timesteps)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (ts >= lo) & (ts < hi)
        if mask.any():
            out.append((f"[{lo},{hi})", mask, int(lo), int(hi)))
    out.append(("all", np.ones(ts.size, dtype=bool), None, None))
    return out


def summarize_condition(
    cond_loss: np.ndarray, correct_loss: np.ndarray, timesteps: Sequence[int], weights: np.ndarray,
    edges: Sequence[int], numel: int,
) -> dict[str, Any]:
    """Per-band gaps and information of one condition against ``correct``.

    Args:
        cond_loss, correct_loss: ``[N, T']`` per-slice losses (mean over noise draws first); rows of NaN are slices
            the condition does not apply to (skipped).
        timesteps: the ``T'`` timesteps.
        weights: ``[T']`` quadrature weights in λ (:func:`information_weights`).
        edges: band edges in t.
        numel: values per image (``2·H·W``): the information sums the per-value errors.

    Returns:
        ``{"bands": [...], "per_t": [...], "information": {...}}`` (see ``docs/metadata_report.md``).
    """
    valid = np.isfinite(cond_loss).all(axis=1)
    diff = cond_loss[valid] - correct_loss[valid]
    corr = correct_loss[valid]
    cond = cond_loss[valid]
    info_slices = 0.5 * numel * (diff * weights[None]).sum(axis=1) if diff.size else np.zeros(0)
    bands = []
    for label, mask, lo, hi in bands_of(timesteps, edges):
        d_mean, d_se, n = _mean_se(diff[:, mask].mean(axis=1) if diff.size else np.zeros(0))
        c_mean = float(corr[:, mask].mean()) if corr.size else float("nan")
        k_mean = float(cond[:, mask].mean()) if cond.size else float("nan")
        i_mean, i_se, _ = _mean_se(0.5 * numel * (diff[:, mask] * weights[None, mask]).sum(axis=1)
                                   if diff.size else np.zeros(0))
        bands.append({
            "band": label, "t_lo": lo, "t_hi": hi, "num_timesteps": int(mask.sum()), "num_slices": n,
            "correct_loss": c_mean, "condition_loss": k_mean, "diff": d_mean, "se": d_se,
            "rel_diff_pct": 100.0 * d_mean / c_mean if c_mean else float("nan"),
            "rel_se_pct": 100.0 * d_se / c_mean if c_mean else float("nan"), "z": _z(d_mean, d_se),
            "info_nats": i_mean, "info_se": i_se,
        })
    per_t = []
    for k, t in enumerate(timesteps):
        d_mean, d_se, n = _mean_se(diff[:, k] if diff.size else np.zeros(0))
        c_mean = float(corr[:, k].mean()) if corr.size else float("nan")
        per_t.append({"t": int(t), "diff": d_mean, "se": d_se, "correct_loss": c_mean,
                      "rel_diff_pct": 100.0 * d_mean / c_mean if c_mean else float("nan"),
                      "rel_se_pct": 100.0 * d_se / c_mean if c_mean else float("nan"), "z": _z(d_mean, d_se)})
    i_mean, i_se, n = _mean_se(info_slices)
    return {"num_slices": int(valid.sum()), "bands": bands, "per_t": per_t,
            "information": {"nats": i_mean, "se": i_se, "z": _z(i_mean, i_se), "num_slices": n}}


def _strongest(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The band with the largest finite z (most positive), or ``None``."""
    bands = [b for b in entry["bands"] if b["z"] is not None and not math.isnan(b["z"])]
    return max(bands, key=lambda b: b["z"]) if bands else None


def _band_text(band: Mapping[str, Any]) -> str:
    if band["t_lo"] is None:
        return "over all t"
    return f"at t in [{band['t_lo']}, {band['t_hi']})"


def verdict(null_entry: Mapping[str, Any], kind: str, threshold: float) -> tuple[bool, str]:
    """``(reads, line)``: whether the null gap is detected (``z >= threshold`` in some band) and a plain sentence."""
    if kind == "unconditional":
        return False, "reads its metadata: no detectable gap (the model has no condition input)"
    best = _strongest(null_entry)
    if best is None:
        return False, "reads its metadata: no detectable gap (no finite z)"
    z = best["z"]
    if z >= threshold:
        zt = "inf" if math.isinf(z) else f"{z:.1f}"
        return True, (f"reads its metadata: yes (null gap z={zt} {_band_text(best)}, "
                      f"{best['rel_diff_pct']:+.2f}% of the loss)")
    return False, f"reads its metadata: no detectable gap (largest null-gap z={z:.1f} {_band_text(best)})"


# ---------------------------------------------------------------------------------------------------------------------
# counterfactual strips
# ---------------------------------------------------------------------------------------------------------------------

def sweep_values(key: str, lo: float, hi: float, num: int) -> list[float]:
    """``num`` values over ``[lo, hi]``: geometric for TR/TE/TI with ``lo > 0`` (they span decades), else linear."""
    if key in _LOG_SWEEP_KEYS and lo > 0:
        return [float(v) for v in np.geomspace(lo, hi, num)]
    return [float(v) for v in np.linspace(lo, hi, num)]


def numeric_range(key: str, conditioner: Any, stats: Mapping[str, Any] | None,
                  records: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """``(min, max)`` of a numerical attribute: the embedder's range, else the stats file's, else the slices'."""
    meta = getattr(conditioner, "metadata", None)
    if meta is not None and key in (meta.config.numerical or {}):
        lo, hi = meta.config.numerical[key]
        return float(lo), float(hi)
    if stats is not None and isinstance(stats.get(key), Mapping):
        return float(stats[key]["min"]), float(stats[key]["max"])
    values = []
    for r in records:
        v = _value(r, key)
        if _present(v) and not isinstance(v, (list, tuple)):
            try:
                values.append(float(v))
            except (TypeError, ValueError):
                return None
    return (min(values), max(values)) if values else None


@torch.no_grad()
def counterfactual_x0(
    unet: torch.nn.Module, conditioner: Any, schedule: DiffusionSchedule, x0: torch.Tensor,
    record: Mapping[str, Any], key: str, values: Sequence[float], t: int, noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂₀ at timestep ``t`` of one image while ``key`` takes each value, same noise for all.

    ``x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`` (Ho et al. 2020, Eq. 4 solved for x₀).

    Returns:
        ``(sweep, own)``: complex ``[V, H, W]`` for the values, and complex ``[H, W]`` with the slice's own record.
    """
    device = x0.device
    records = [with_value(record, key, v) for v in values] + [dict(record)]
    cond = torch.cat([conditioner.build([r], None) for r in records]).to(device)
    a = schedule.alphas_cumprod.to(device=device, dtype=torch.float32)[t]
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise.to(device))[None].expand(len(records), -1, -1, -1)
    tt = torch.full((len(records),), int(t), dtype=torch.long, device=device)
    eps_hat = make_cfg_eps_fn(unet, cond, None, 1.0, alphas_cumprod=schedule)(x_t, tt)
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    x0_hat = torch.complex(x0_hat[:, 0], x0_hat[:, 1]).cpu()
    return x0_hat[:-1], x0_hat[-1]


def save_strip(path: Path, truth: torch.Tensor, own: torch.Tensor, sweep: torch.Tensor, key: str,
               values: Sequence[float], own_value: Any, t: int) -> None:
    """A row of magnitude panels: the slice, x̂₀ with its own record, then x̂₀ for each swept value."""
    from utils.figures import Panel, panel_figure, save_figure

    panels = [truth.abs(), own.abs()] + [s.abs() for s in sweep]
    own_txt = f"{float(own_value):g}" if _present(own_value) and not isinstance(own_value, (list, tuple)) else "—"
    titles = ["slice |x0|", f"x̂0, own {key}={own_txt}"] + [f"{key}={v:.4g}" for v in values]
    # One grey scale for every panel (so brightness compares across values), robust to a few outlier pixels.
    vmax = float(torch.quantile(torch.stack(panels).flatten().float(), 0.995)) or 1.0
    row = [Panel(img.numpy(), title, vmax=vmax) for img, title in zip(panels, titles)]
    fig = panel_figure([row], f"x̂0 at t={t}, same noise, {key} swept", panel_inches=1.9)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def save_gap_plot(path: Path, conditions: Mapping[str, Mapping[str, Any]], title: str) -> None:
    """``loss_gap.png``: relative gap (condition − correct, % of the correct loss) against t, ±1 SE bands.

    Left: the null condition and each attribute dropped; right: the null condition and each attribute mismatched.
    """
    from utils.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind, label in ((axes[0], "drop", "attribute dropped"), (axes[1], "mismatch", "attribute mismatched")):
        for name, entry in conditions.items():
            if entry["kind"] not in ("null", kind):
                continue
            ts = np.array([p["t"] for p in entry["per_t"]], float)
            d = np.array([np.nan if p["rel_diff_pct"] is None else p["rel_diff_pct"] for p in entry["per_t"]], float)
            se = np.array([np.nan if p["rel_se_pct"] is None else p["rel_se_pct"] for p in entry["per_t"]], float)
            style = {"color": "k", "lw": 2.0} if entry["kind"] == "null" else {"lw": 1.2}
            line, = ax.plot(ts, d, marker="o", ms=3, label=name, **style)
            ax.fill_between(ts, d - se, d + se, alpha=0.2, color=line.get_color())
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("timestep t")
        ax.set_title(f"null and {label}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("loss gap, % of the correct loss (±1 SE)")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------------

def select_indices(num_items: int, num: int) -> list[int]:
    """``num`` dataset indices spread evenly over ``[0, num_items)`` (all of them when there are fewer)."""
    if num >= num_items:
        return list(range(num_items))
    return sorted({int(i) for i in np.linspace(0, num_items - 1, num).round()})


def _fmt_cell(band: Mapping[str, Any]) -> str:
    rel, z = band["rel_diff_pct"], band["z"]
    if rel is None or (isinstance(rel, float) and math.isnan(rel)):
        return "n/a"
    zt = "inf" if math.isinf(z) else "nan" if math.isnan(z) else f"{z:.1f}"
    return f"{rel:+.2f}% (z {zt})"


def text_table(result: Mapping[str, Any]) -> str:
    """A plain-text table: per condition, the relative gap and z per band, and the information in nats."""
    labels = [b["band"] for b in next(iter(result["conditions"].values()))["bands"]]
    head = ["condition", *[f"t {lab}" if lab != "all" else "all t" for lab in labels], "nats/image"]
    rows = [head]
    for name, entry in result["conditions"].items():
        info = entry["information"]
        nats = "n/a" if not math.isfinite(info["nats"]) else f"{info['nats']:+.3g} ± {info['se']:.2g}"
        rows.append([name, *[_fmt_cell(b) for b in entry["bands"]], nats])
    for name, why in result["skipped"].items():
        rows.append([name, *(["skipped"] * len(labels)), why])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _csv_text(result: Mapping[str, Any]) -> str:
    cols = ["condition", "kind", "key", "band", "t_lo", "t_hi", "num_timesteps", "num_slices", "correct_loss",
            "condition_loss", "diff", "se", "rel_diff_pct", "z", "info_nats", "info_se"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, float):
            return "" if not math.isfinite(v) else repr(v)
        return v

    for name, entry in result["conditions"].items():
        for b in entry["bands"]:
            row = {"condition": name, "kind": entry["kind"], "key": entry["key"], **b}
            writer.writerow([cell(row.get(c)) for c in cols])
    return buf.getvalue()


def run_metadata_report(
    unet: torch.nn.Module,
    conditioner: Any,
    schedule: DiffusionSchedule,
    dataset: Any,
    settings: ReportSettings,
    output_dir: str | Path | None,
    model_info: Mapping[str, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Measure the paired loss gaps and information estimates of a model on held-out slices and write the report.

    Args:
        unet: the model's UNet (eval mode).
        conditioner: its :class:`models.conditioning.ConditionBuilder` (eval mode).
        schedule: its :class:`DiffusionSchedule`.
        dataset: an :class:`utils.data.MRISliceDataset` (held-out slices; maps not needed).
        settings: what to measure.
        output_dir: where ``report.json``, ``report.csv``, ``loss_gap.png`` and ``counterfactual_{key}.png`` go
            (``None``: write nothing).
        model_info: written to the report as ``model`` (e.g. the model folder).
        stats: the ``metadata_stats.json`` dict (ranges of the counterfactual sweeps when the model has no embedder).
        device: where the network runs.
        progress: show a tqdm bar over slices.
        log: called with the printed lines (table, verdict).

    Returns:
        The report dict (as written to ``report.json``).

    Raises:
        ValueError: bad settings (timesteps outside the schedule, unknown attributes, too few slices).
    """
    settings.check()
    t_start = time.perf_counter()
    device = torch.device(device)
    num_t = schedule.num_train_timesteps
    timesteps = sorted(set(int(t) for t in settings.timesteps)) if settings.timesteps else \
        timestep_grid(schedule.alphas_cumprod, settings.num_timesteps)
    if timesteps[0] < 0 or timesteps[-1] >= num_t:
        raise ValueError(f"--timesteps must lie in [0, {num_t}), got {timesteps}")
    if not 0 <= settings.counterfactual_t < num_t:
        raise ValueError(f"--counterfactual_t must lie in [0, {num_t}), got {settings.counterfactual_t}")
    lam = log_snr(schedule.alphas_cumprod, timesteps)
    weights = information_weights(lam)
    kind = model_kind(conditioner)
    if settings.keys is not None:
        keys = list(conditioner.check_drop_keys(settings.keys))  # raises for an attribute the model cannot read
    else:
        keys = model_attributes(conditioner)

    indices = select_indices(len(dataset), settings.num_slices)
    if len(indices) < 2:
        raise ValueError(f"the dataset has {len(dataset)} slice(s); the report needs at least 2")
    samples = [dataset[i] for i in indices]
    records = [dict(s.record) for s in samples]

    conditions: list[Condition] = [Condition("correct", "correct"), Condition("null", "null")]
    skipped: dict[str, str] = {}
    sources: dict[str, list[int | None]] = {}
    for key in keys:
        values = [_value(r, key) for r in records]
        if not any(_present(v) for v in values):
            skipped[f"drop:{key}"] = skipped[f"mismatch:{key}"] = "all values missing"
            continue
        conditions.append(Condition(f"drop:{key}", "drop", key))
        src, why = derangement(values)
        if why is not None:
            skipped[f"mismatch:{key}"] = why
        else:
            conditions.append(Condition(f"mismatch:{key}", "mismatch", key))
            sources[key] = src

    n_c, n_s, n_j = len(conditions), len(samples), settings.num_noise
    losses = np.full((n_c, n_s, len(timesteps)), np.nan)
    forwards = 0
    from tqdm.auto import tqdm

    bar = tqdm(samples, desc="slices", disable=not progress)
    for i, sample in enumerate(bar):
        x0 = sample.image.to(device=device, dtype=torch.float32)
        toks: list[torch.Tensor | None] = []
        for cond in conditions:
            record = records[i]
            if cond.kind == "mismatch":
                j = sources[cond.key][i]
                if j is None:
                    toks.append(None)
                    continue
                record = with_value(record, cond.key, _value(records[j], cond.key))
            toks.append(_tokens(conditioner, cond.kind, record, cond.key))
        noise = slice_noise(sample.filename, sample.slice_idx, settings.seed, n_j, tuple(x0.shape))
        err, n_fwd = paired_errors(unet, schedule, x0, toks, timesteps, noise, settings.batch_size)
        evaluated = [c for c, tok in enumerate(toks) if tok is not None]
        if not np.isfinite(err[evaluated]).all():
            bad = [conditions[c].name for c in evaluated if not np.isfinite(err[c]).all()]
            raise ReportError(f"non-finite denoising loss on {sample.filename} slice {sample.slice_idx} under "
                              f"{bad}: the model (or the slice) is broken; no report written")
        forwards += n_fwd
        losses[:, i, :] = err.mean(axis=2)  # noise draws averaged within the slice: the slice is the unit
    bar.close()

    numel = int(np.prod(samples[0].image.shape))
    correct = losses[0]
    entries: dict[str, Any] = {}
    for c, cond in enumerate(conditions[1:], start=1):
        entry = summarize_condition(losses[c], correct, timesteps, weights, settings.t_bands, numel)
        entries[cond.name] = {"kind": cond.kind, "key": cond.key, **entry}
        if cond.kind == "mismatch":
            entries[cond.name]["sources"] = [None if s is None else indices[s] for s in sources[cond.key]]
    reads, line = verdict(entries["null"], kind, settings.z_threshold)
    attribute_verdicts = {}
    for key in keys:
        found = {}
        for what in ("drop", "mismatch"):
            entry = entries.get(f"{what}:{key}")
            best = _strongest(entry) if entry else None
            found[what] = None if best is None else {"z": best["z"], "band": best["band"],
                                                     "rel_diff_pct": best["rel_diff_pct"]}
        detected = any(v is not None and v["z"] >= settings.z_threshold for v in found.values())
        attribute_verdicts[key] = {"detected": detected, **found}

    result: dict[str, Any] = {
        "what": "paired denoising-loss gaps (condition - correct) and I-MMSE information estimates "
                "(Guo, Shamai & Verdu 2005; Kong, Brekelmans & Ver Steeg 2023); see docs/metadata_report.md",
        "model": dict(model_info or {}),
        "model_kind": kind,
        "prediction_type": schedule.prediction_type,
        "settings": asdict(settings),
        "attributes": keys,
        "timesteps": timesteps,
        "log_snr": lam.tolist(),
        "quadrature": "trapezoid in log-SNR over the timestep grid",
        "values_per_image": numel,
        "slices": [{"index": idx, "filename": s.filename, "slice_idx": int(s.slice_idx), "anatomy": s.anatomy}
                   for idx, s in zip(indices, samples)],
        "correct_loss_per_t": [float(np.mean(correct[:, k])) for k in range(len(timesteps))],
        "conditions": entries,
        "skipped": skipped,
        "reads_metadata": reads,
        "verdict": line,
        "attribute_verdicts": attribute_verdicts,
        "network_images": forwards,
    }

    cf_keys = settings.counterfactual_keys
    if cf_keys is None:
        cf_keys = [k for k in SWEEP_KEYS if k in keys]
    counterfactuals: dict[str, Any] = {}
    ci = min(max(settings.counterfactual_index, 0), n_s - 1)
    for key in cf_keys:
        rng = numeric_range(key, conditioner, stats, records)
        if rng is None or not rng[0] < rng[1]:
            counterfactuals[key] = {"skipped": "no numerical range"}
            continue
        values = sweep_values(key, rng[0], rng[1], settings.counterfactual_values)
        sample = samples[ci]
        x0 = sample.image.to(device=device, dtype=torch.float32)
        noise = slice_noise(sample.filename, sample.slice_idx, settings.seed + 1, 1, tuple(x0.shape))[0]
        sweep, own = counterfactual_x0(unet, conditioner, schedule, x0, records[ci], key, values,
                                       settings.counterfactual_t, noise)
        span = float((sweep[-1] - sweep[0]).abs().square().sum().sqrt() / own.abs().square().sum().sqrt().clamp_min(
            1e-12))
        counterfactuals[key] = {"slice": indices[ci], "t": settings.counterfactual_t, "values": values,
                                "own_value": _value(records[ci], key),
                                "rel_change_min_to_max": span}
        if output_dir is not None and settings.save_png:
            truth = torch.complex(sample.image[0], sample.image[1])
            save_strip(Path(output_dir) / f"counterfactual_{key}.png", truth, own, sweep, key, values,
                       _value(records[ci], key), settings.counterfactual_t)
            counterfactuals[key]["png"] = f"counterfactual_{key}.png"
    result["counterfactuals"] = counterfactuals
    result["time_s"] = time.perf_counter() - t_start

    table = text_table(result)
    name = str((model_info or {}).get("finetune_folder") or (model_info or {}).get("pretrained_model_name_or_path")
               or "model")
    log(f"metadata report: {name} ({kind}, {n_s} slices x {n_j} noise draws x {len(timesteps)} timesteps)")
    log("gap = condition - correct, % of the correct loss (z = gap / SE over slices); information in nats per image")
    log(table)
    log(line)
    result["table"] = table
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if settings.save_png:
            save_gap_plot(out / "loss_gap.png", entries, f"{name}: {line}")
        write_json(out / "report.json", result)
        atomic_write_text(out / "report.csv", _csv_text(result))
    return result
