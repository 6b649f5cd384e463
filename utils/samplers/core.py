"""What every sampler's loop shares: timesteps and ᾱ pairs, per-sample generators and noise, network calls in fp32,
counters, and the physics run with autocast off (:class:`SamplingLoop`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from utils.channels import channels_to_complex
from utils.samplers.schedule import DiffusionSchedule, alphas_cumprod_of, resolve_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Generators = Sequence[torch.Generator] | torch.Generator | None


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per batch element (e.g. ``range(seed, seed + N)`` for an ensemble)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def generator_list(generators: Generators, batch: int, device: torch.device) -> list[torch.Generator]:
    if generators is None:
        # A fresh, OS-seeded generator: non-reproducible, but the global RNG stays untouched.
        g = torch.Generator(device=device)
        g.seed()
        return [g] * batch
    if isinstance(generators, torch.Generator):
        return [generators] * batch
    generators = list(generators)
    if len(generators) != batch:
        raise ValueError(f"need one generator per batch element ({batch}), got {len(generators)}")
    return generators



def randn_images(
    generators: list[torch.Generator], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Complex ``[B, H, W]`` noise; real and imaginary parts are independent N(0, 1), one generator per sample."""
    real_dtype = torch.empty((), dtype=dtype).real.dtype
    z = [torch.randn((2, *shape), generator=g, device=g.device, dtype=real_dtype).to(device) for g in generators]
    return channels_to_complex(torch.stack(z))


@dataclass
class SamplerStats:
    """Counters a sampler fills in place (pass ``stats=SamplerStats()``).

    Attributes:
        num_steps: sampling steps taken.
        eps_calls: calls of ``eps_fn``.
        nfe: network evaluations per sample — ``eps_calls × eps_fn.evals_per_call`` (2 per step under CFG with
            ``w > 1``, the convention used when comparing DDS, DPS and score-MRI).
        network_forwards: batched network forward passes — ``eps_calls × eps_fn.forwards_per_call`` (CFG batches
            both passes into one forward of size 2B).
        wall_s: wall time of the whole sampler call.
        eps_s: wall time spent inside ``eps_fn`` (host-side; on a GPU, asynchronous kernels make this a lower bound).
    """

    num_steps: int = 0
    eps_calls: int = 0
    nfe: int = 0
    network_forwards: int = 0
    wall_s: float = 0.0
    eps_s: float = 0.0


def call_eps(eps_fn: EpsFn, x_ch: torch.Tensor, t: torch.Tensor, stats: SamplerStats) -> torch.Tensor:
    """Evaluate the network in the caller's autocast context and return fp32 ``[B, 2, H, W]``."""
    start = time.perf_counter()
    eps = eps_fn(x_ch, t)
    stats.eps_s += time.perf_counter() - start
    stats.eps_calls += 1
    stats.nfe += int(getattr(eps_fn, "evals_per_call", 1))
    stats.network_forwards += int(getattr(eps_fn, "forwards_per_call", 1))
    if eps.shape != x_ch.shape:
        raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x_ch.shape)}")
    return eps.to(x_ch.dtype)


def full_precision(device: torch.device):
    """Disable autocast for the physics (FFTs, CG, updates)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


def per_sample(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar, or a ``[B]`` tensor reshaped to broadcast against ``like`` ``[B, ...]``."""
    if isinstance(v, torch.Tensor) and v.ndim > 0:
        return v.to(like.device, like.real.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return float(v)


def init_x(
    x_T: torch.Tensor | None, y: torch.Tensor, gens: list[torch.Generator], shape: tuple[int, int]
) -> torch.Tensor:
    """The starting state x_T, complex ``[B, H, W]`` in ``y``'s dtype: ``x_T`` as given (checked), else drawn."""
    b = y.shape[0]
    if x_T is None:
        return randn_images(gens, shape, y.dtype, y.device)
    if not x_T.is_complex() or tuple(x_T.shape) != (b, *shape):
        raise ValueError(f"x_T must be complex [{b}, {shape[0]}, {shape[1]}], got {x_T.dtype} {tuple(x_T.shape)}")
    return x_T.to(y.device, y.dtype)



@dataclass(frozen=True)
class Step:
    """One step of a sampling sequence.

    Attributes:
        index: ``i``, 0 for the first (noisiest) step.
        t: the timestep.
        a_t: ᾱ_t.
        a_prev: ᾱ of the next timestep of the sequence ("t−1"), or None at the last step (then ᾱ_{t−1} := 1 and
            every sampler returns its denoised estimate).
        t_batch: ``t`` as a ``[B]`` long tensor on the samples' device (the network's input).
    """

    index: int
    t: int
    a_t: float
    a_prev: float | None
    t_batch: torch.Tensor

    @property
    def last(self) -> bool:
        return self.a_prev is None


class SamplingLoop:
    """The setup and bookkeeping every sampler shares (one place for timesteps, generators, noise and counters).

    Args:
        y: measured k-space ``[B, C, H, W]`` complex; fixes the batch, image size ``(H, W)``, device and dtype.
        alphas_cumprod: ᾱ ``[T]`` or a :class:`DiffusionSchedule` (whose ``steps_offset`` shifts the timesteps).
        num_steps: number of ``"leading"`` timesteps when ``timesteps`` is None.
        timesteps: explicit strictly decreasing timesteps, or None.
        generators: one generator per sample, one shared generator, or None (fresh, OS-seeded).
        stats: the :class:`SamplerStats` to fill (a new one when None); its ``wall_s`` starts counting here.

    Usage::

        loop = SamplingLoop(y, alphas_cumprod, num_steps=..., timesteps=..., generators=..., stats=...)
        x = loop.initial(x_T)
        for step in loop.steps():          # counts stats.num_steps
            eps_ch = loop.eps(eps_fn, complex_to_channels(x), step)
            ...
        return loop.finish(x)              # adds the wall time
    """

    def __init__(
        self,
        y: torch.Tensor,
        alphas_cumprod: torch.Tensor | DiffusionSchedule,
        *,
        num_steps: int,
        timesteps: Sequence[int] | torch.Tensor | None,
        generators: Generators,
        stats: SamplerStats | None,
    ) -> None:
        self.stats = SamplerStats() if stats is None else stats
        self._start = time.perf_counter()
        self.acp = alphas_cumprod_of(alphas_cumprod)
        self.timesteps = resolve_timesteps(alphas_cumprod, self.acp, num_steps, timesteps)
        self.y = y
        self.batch = int(y.shape[0])
        self.shape = (int(y.shape[-2]), int(y.shape[-1]))
        self.device = y.device
        self.generators = generator_list(generators, self.batch, self.device)

    def initial(self, x_T: torch.Tensor | None) -> torch.Tensor:
        """x_T, complex ``[B, H, W]`` (see :func:`init_x`)."""
        return init_x(x_T, self.y, self.generators, self.shape)

    def steps(self) -> Iterator[Step]:
        """The steps in order; ``stats.num_steps`` grows by one when the caller finishes a step."""
        ts = self.timesteps
        for i, t in enumerate(ts):
            a_prev = float(self.acp[ts[i + 1]]) if i + 1 < len(ts) else None
            t_batch = torch.full((self.batch,), t, dtype=torch.long, device=self.device)
            yield Step(i, t, float(self.acp[t]), a_prev, t_batch)
            self.stats.num_steps += 1

    def noise(self) -> torch.Tensor:
        """Fresh complex ``[B, H, W]`` noise z (real and imaginary parts N(0, 1)), one generator per sample."""
        return randn_images(self.generators, self.shape, self.y.dtype, self.device)

    def eps(self, eps_fn: EpsFn, x_ch: torch.Tensor, step: Step) -> torch.Tensor:
        """ε_θ(x_t, t) as fp32 ``[B, 2, H, W]``, counted in ``stats``."""
        return call_eps(eps_fn, x_ch, step.t_batch, self.stats)

    def physics(self):
        """Context for FFTs, CG and updates: autocast off (see :func:`full_precision`)."""
        return full_precision(self.device)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Add the wall time of the whole call to ``stats`` and return ``x``."""
        self.stats.wall_s += time.perf_counter() - self._start
        return x
