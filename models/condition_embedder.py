"""Fine-grained metadata condition embedder ("Metadata Matters").

Every metadata attribute becomes one token:

* categorical keys (``stats[key]`` is a list, its vocabulary): embedding table -> MLP;
* multi-label keys (``pathology`` by default, also a list in the stats file): mean of the label embeddings -> MLP;
  an explicit "no finding" (an empty label list, or a cell such as ``"no finding"``/``"none"``) has its own learned
  row (the table's last), distinct from *unknown* (``None``, an empty cell: not annotated), which is "missing" and
  takes the empty embedding like any other missing value;
* numerical keys (``stats[key]`` is ``{"min", "max"}``): optional ``log1p`` -> clamp to ``[min, max]`` -> normalise
  to ``u in [0, 1]`` -> sinusoidal features with geometric frequencies from ``min_frequency`` to ``max_frequency`` rad
  (default 1 .. 1000) -> MLP.

Why the frequency range: the reference embeds ``u in [0, 1]`` with transformer-style frequencies ``<= 1`` rad, so
two clinically different values (TE 81 ms vs 86 ms) differ by a phase of ``~0.01`` rad in *every* component and the
features are nearly constant. Here each ``(sin, cos)`` pair at frequency ``f`` is scaled by ``(f / f_min) ** -0.5``
(``amplitude_exponent``): the squared feature distance is then ``sum_f 2 (1 - cos(f du)) f_min / f``, which grows
like ``|du|`` from ``1 / f_max`` to ``1 / f_min`` (a Brownian-motion kernel). So a 5 ms TE difference moves the
features by ~20 % of their largest distance (the reference: ~1-2 %), and distance grows monotonically with value
distance (equal amplitudes would resolve small differences too, but their distance saturates and oscillates).
The raw ``u`` is appended; the MLP can re-weight everything.

A learned per-key "empty" vector replaces the token of a missing value (``None``, NaN, absent key, unparsable
number), an unknown category/label (warned once per key and value), and a value dropped by classifier-free-guidance
dropout or at inference (``drop_keys`` / ``drop_all``). A learned separator token comes first and a LayerNorm is
applied to every token. Output: tokens ``[B, 1 + K, D]`` (separator, then one token per key in ``config.key_order``
order) and a pooled vector ``[B, D]`` (mean of the ``K`` key tokens).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.choices import CFG_STRATEGIES  # re-exported
from utils.metadata import is_missing, load_metadata_stats, parse_pathology_cell

#: Keys embedded after ``log1p`` by default: TR spans two decades (~40 to ~16000 ms), TE ~1.4 to ~130 ms and TI
#: 100 to 2500 ms, so on a linear scale short-TE/short-TR sequences would be squashed into a sliver of ``[0, 1]``.
DEFAULT_LOG_KEYS: tuple[str, ...] = ("TR", "TE", "TI")
#: Keys whose stats vocabulary is a label set (a record holds a list of labels) rather than a single category.
DEFAULT_MULTI_LABEL_KEYS: tuple[str, ...] = ("pathology",)


class MetadataEmbedding(NamedTuple):
    """Output of :class:`MetadataConditionEmbedder`.

    Attributes:
        tokens: ``[B, 1 + K, D]`` separator token then one token per key (``embedder.keys`` order).
        pooled: ``[B, D]`` mean of the ``K`` key tokens.
        dropped: ``[B, K]`` bool, keys replaced by the empty embedding because of CFG dropout, ``drop_keys`` or
            ``drop_all`` (missing/unknown values are not counted here).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    dropped: torch.Tensor


def geometric_frequencies(num_frequencies: int, min_frequency: float, max_frequency: float) -> torch.Tensor:
    """Angular frequencies spaced geometrically from ``min_frequency`` to ``max_frequency`` (rad per unit).

    Returns:
        ``[num_frequencies]`` float32.
    """
    if num_frequencies == 1:
        return torch.tensor([float(min_frequency)])
    exponents = torch.linspace(0.0, 1.0, num_frequencies, dtype=torch.float64)
    freqs = min_frequency * (max_frequency / min_frequency) ** exponents
    return freqs.float()


def sinusoidal_features(
    u: torch.Tensor, frequencies: torch.Tensor, amplitude_exponent: float = 0.0
) -> torch.Tensor:
    """Sinusoidal features of normalised values, with ``u`` itself appended.

    Args:
        u: ``[B]`` values (normally in ``[0, 1]``).
        frequencies: ``[F]`` angular frequencies in rad per unit of ``u``.
        amplitude_exponent: each ``(sin, cos)`` pair is scaled by ``(f / min(f)) ** -amplitude_exponent``.

    Returns:
        ``[B, 2F + 1]``: ``a_f sin(f u)``, ``a_f cos(f u)`` for every ``f``, then ``u``.
    """
    freqs = frequencies.to(device=u.device, dtype=u.dtype)
    amps = (freqs / freqs.min()) ** (-amplitude_exponent)
    angles = u[:, None] * freqs[None, :]
    return torch.cat([amps * torch.sin(angles), amps * torch.cos(angles), u[:, None]], dim=1)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


def _module_name(key: str) -> str:
    # nn.ModuleDict names may not contain "." (and "" is invalid).
    return "k_" + key.replace(".", "_")


def _is_missing(value: Any) -> bool:
    # One definition of "missing" for the whole project (None, NaN, "", "n/a", "null", ...).
    return isinstance(value, (float, str, type(None))) and is_missing(value)


class MetadataConditionEmbedder(ModelMixin, ConfigMixin):
    """Typed per-attribute metadata embedder producing condition tokens.

    Saves/loads like a diffusers module: ``save_pretrained(dir)`` writes ``config.json`` plus
    ``diffusion_pytorch_model.safetensors``; ``MetadataConditionEmbedder.from_pretrained(dir)`` restores it.
    Build it from a stats file with :meth:`from_stats`.

    Args:
        key_order: token order; every key must appear in exactly one of ``categorical``, ``multi_label``, ``numerical``.
        categorical: key -> vocabulary (values are matched as ``str(value).strip()``).
        multi_label: key -> label vocabulary (may be empty: every label is then unknown).
        numerical: key -> ``[min, max]`` (raw units, before any log transform).
        embed_dim: token width ``D`` (the UNet's ``encoder_hid_dim``).
        hidden_dim: MLP hidden width and categorical table width; defaults to ``embed_dim``.
        num_frequencies: number of sinusoidal frequencies ``F`` for numerical keys.
        min_frequency: lowest angular frequency (rad over the unit interval).
        max_frequency: highest angular frequency (rad over the unit interval).
        amplitude_exponent: sinusoid amplitudes decay as ``(f / min_frequency) ** -amplitude_exponent``.
        log_keys: numerical keys embedded as ``log1p(value)`` (values below 0 are clamped to 0 first).
        cfg_prob: classifier-free-guidance dropout probability (training mode only).
        cfg_strategy: ``"joint"`` (one Bernoulli per sample drops every key) or ``"independent"`` (one per key).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        key_order: Sequence[str] = (),
        categorical: Mapping[str, Sequence[Any]] | None = None,
        multi_label: Mapping[str, Sequence[Any]] | None = None,
        numerical: Mapping[str, Sequence[float]] | None = None,
        embed_dim: int = 768,
        hidden_dim: int | None = None,
        num_frequencies: int = 32,
        min_frequency: float = 1.0,
        max_frequency: float = 1000.0,
        amplitude_exponent: float = 0.5,
        log_keys: Sequence[str] = DEFAULT_LOG_KEYS,
        cfg_prob: float = 0.0,
        cfg_strategy: str = "joint",
    ) -> None:
        super().__init__()
        categorical = dict(categorical or {})
        multi_label = dict(multi_label or {})
        numerical = dict(numerical or {})
        keys = list(key_order)
        if not keys:
            raise ValueError("MetadataConditionEmbedder needs at least one key")
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys: {keys}")
        typed = [set(categorical), set(multi_label), set(numerical)]
        for key in keys:
            if sum(key in t for t in typed) != 1:
                raise ValueError(f"key {key!r} must be in exactly one of categorical / multi_label / numerical")
        if set().union(*typed) - set(keys):
            raise ValueError(f"typed keys not listed in `key_order`: {sorted(set().union(*typed) - set(keys))}")
        if len({_module_name(k) for k in keys}) != len(keys):
            raise ValueError(f"keys collide after replacing '.' with '_': {keys}")
        if cfg_strategy not in CFG_STRATEGIES:
            raise ValueError(f"cfg_strategy must be one of {CFG_STRATEGIES}, got {cfg_strategy!r}")
        if not 0.0 <= cfg_prob <= 1.0:
            raise ValueError(f"cfg_prob must be in [0, 1], got {cfg_prob}")
        for key, bounds in numerical.items():
            if len(bounds) != 2 or float(bounds[0]) > float(bounds[1]):
                raise ValueError(f"numerical range for {key!r} must be [min, max] with min <= max, got {bounds}")

        hidden = hidden_dim or embed_dim
        self.keys: list[str] = keys
        self.kinds: dict[str, str] = {
            k: "categorical" if k in categorical else "multi_label" if k in multi_label else "numerical" for k in keys
        }
        # str(value).strip() -> index, so that numbers stored in a JSON vocabulary also match.
        self._vocab_index: dict[str, dict[str, int]] = {
            k: {str(v).strip(): i for i, v in enumerate(vocab)} for k, vocab in {**categorical, **multi_label}.items()
        }
        self._ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in numerical.items()}
        self._log_keys = set(log_keys) & set(numerical)
        self._warned: set[tuple[str, str]] = set()
        self.cfg_prob = float(cfg_prob)
        self.cfg_strategy = cfg_strategy
        self._frequencies = geometric_frequencies(num_frequencies, min_frequency, max_frequency)

        self.tables = nn.ModuleDict()
        self.mlps = nn.ModuleDict()
        for key in keys:
            name = _module_name(key)
            if key in categorical:
                # max(1, .): an empty vocabulary still gets a (never used) row so the module is well formed.
                self.tables[name] = nn.Embedding(max(1, len(categorical[key])), hidden)
                self.mlps[name] = _mlp(hidden, hidden, embed_dim)
            elif key in multi_label:
                # Last row = explicit "no finding" (empty label list), learned separately from unknown (missing).
                self.tables[name] = nn.Embedding(len(multi_label[key]) + 1, hidden)
                self.mlps[name] = _mlp(hidden, hidden, embed_dim)
            else:
                self.mlps[name] = _mlp(2 * num_frequencies + 1, hidden, embed_dim)
        self.empty = nn.Parameter(torch.randn(len(keys), embed_dim) * 0.02)
        self.separator = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.norm = nn.LayerNorm(embed_dim)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, Any] | str | Path,
        embed_dim: int,
        *,
        include_keys: Sequence[str] | None = None,
        exclude_keys: Sequence[str] = (),
        multi_label_keys: Sequence[str] = DEFAULT_MULTI_LABEL_KEYS,
        sort_keys: bool = True,
        **kwargs: Any,
    ) -> MetadataConditionEmbedder:
        """Build an embedder from a ``metadata_stats.json`` dict or path.

        Args:
            stats: key -> list (categorical vocabulary or, for ``multi_label_keys``, label vocabulary) or key ->
                ``{"min": float, "max": float}`` (numerical).
            embed_dim: token width ``D``.
            include_keys: keep only these keys (in this order when ``sort_keys`` is False).
            exclude_keys: drop these keys.
            multi_label_keys: list-valued keys whose records hold label lists.
            sort_keys: order tokens alphabetically (stable regardless of how the stats file was written);
                otherwise the stats file / ``include_keys`` order.
            **kwargs: forwarded to the constructor (``hidden_dim``, ``log_keys``, ``cfg_prob``, ...).
        """
        stats = load_metadata_stats(stats)  # validated: every value a list or finite {min <= max}
        keys = list(include_keys) if include_keys is not None else list(stats)
        missing = [k for k in keys if k not in stats]
        if missing:
            raise KeyError(f"keys not in stats: {missing}")
        keys = [k for k in keys if k not in set(exclude_keys)]
        if sort_keys:
            keys = sorted(keys)
        categorical: dict[str, list[Any]] = {}
        multi_label: dict[str, list[Any]] = {}
        numerical: dict[str, list[float]] = {}
        for key in keys:
            entry = stats[key]
            if isinstance(entry, list):
                (multi_label if key in multi_label_keys else categorical)[key] = list(entry)
            else:
                numerical[key] = [float(entry["min"]), float(entry["max"])]
        return cls(
            key_order=keys,
            categorical=categorical,
            multi_label=multi_label,
            numerical=numerical,
            embed_dim=embed_dim,
            **kwargs,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def num_tokens(self) -> int:
        """``1 + K``: separator plus one token per key."""
        return 1 + len(self.keys)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def frequencies(self) -> torch.Tensor:
        """``[F]`` angular frequencies used for numerical keys."""
        return self._frequencies.clone()

    def _warn_once(self, key: str, value: Any, what: str) -> None:
        tag = (key, str(value))
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(f"metadata {key!r}: {what} {value!r}; using the empty embedding", stacklevel=3)

    def normalize(self, key: str, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map raw numerical values of ``key`` to ``u in [0, 1]``.

        Args:
            key: a numerical key.
            values: ``B`` raw values (numbers, numeric strings, ``None`` or NaN).

        Returns:
            ``u`` ``[B]`` float32 (0 where missing) and ``missing`` ``[B]`` bool.
        """
        lo, hi = self._ranges[key]
        use_log = key in self._log_keys
        u = torch.zeros(len(values))
        missing = torch.zeros(len(values), dtype=torch.bool)
        for i, value in enumerate(values):
            if _is_missing(value):
                missing[i] = True
                continue
            try:
                x = float(value)
            except (TypeError, ValueError):
                self._warn_once(key, value, "non-numeric value")
                missing[i] = True
                continue
            if math.isnan(x):
                missing[i] = True
                continue
            x = min(max(x, lo), hi)
            a, b, v = (lo, hi, x)
            if use_log:
                a, b, v = (math.log1p(max(t, 0.0)) for t in (lo, hi, x))
            # A degenerate range (min == max, e.g. a single-protocol stats file) carries no information: u = 0.5.
            u[i] = 0.5 if b <= a else (v - a) / (b - a)
        return u, missing

    def _embed_key(
        self, key: str, values: Sequence[Any], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm token ``[B, D]`` of one key and its ``missing`` mask ``[B]`` (where the empty vector goes)."""
        name = _module_name(key)
        kind = self.kinds[key]
        batch = len(values)
        if kind == "numerical":
            u, missing = self.normalize(key, values)
            feats = sinusoidal_features(
                u.to(device=device, dtype=dtype), self._frequencies, self.config.amplitude_exponent
            )
            return self.mlps[name](feats), missing.to(device)

        index = self._vocab_index[key]
        table = self.tables[name]
        missing = torch.zeros(batch, dtype=torch.bool)
        if kind == "categorical":
            idx = torch.zeros(batch, dtype=torch.long)
            for i, value in enumerate(values):
                if _is_missing(value):
                    missing[i] = True
                elif str(value).strip() in index:
                    idx[i] = index[str(value).strip()]
                else:
                    self._warn_once(key, value, "unknown category")
                    missing[i] = True
            hidden = table(idx.to(device))
        else:  # multi-label: mean of the known label embeddings; [] ("no finding") -> its own row; None -> empty.
            none_row = len(index)
            weights = torch.zeros(batch, table.num_embeddings)
            for i, value in enumerate(values):
                # A CSV cell ("a, b", "", "no finding") is read like utils.metadata does; lists/tuples as they are.
                labels = parse_pathology_cell(value if isinstance(value, (str, float, type(None))) else list(value))
                if labels is None:  # not annotated: unknown, not "healthy"
                    missing[i] = True
                    continue
                if not labels:
                    weights[i, none_row] = 1.0
                    continue
                known = [index[label] for label in labels if label in index]
                for label in labels:
                    if label not in index:
                        self._warn_once(key, label, "unknown label")
                if not known:
                    missing[i] = True
                    continue
                for j in known:
                    weights[i, j] += 1.0 / len(known)
            hidden = weights.to(device=device, dtype=dtype) @ table.weight
        return self.mlps[name](hidden), missing.to(device)

    def _cfg_mask(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``[B, K]`` bool CFG-dropout mask (all False outside training or with ``cfg_prob == 0``)."""
        num_keys = len(self.keys)
        if not self.training or self.cfg_prob <= 0.0:
            return torch.zeros(batch, num_keys, dtype=torch.bool, device=device)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if self.cfg_strategy == "joint":
            draw = torch.rand(batch, 1, generator=generator, device=gen_device).expand(batch, num_keys)
        else:
            draw = torch.rand(batch, num_keys, generator=generator, device=gen_device)
        return (draw < self.cfg_prob).to(device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        records: Sequence[Mapping[str, Any]],
        drop_keys: Sequence[str] | None = None,
        drop_all: bool = False,
        generator: torch.Generator | None = None,
        drop_samples: torch.Tensor | None = None,
    ) -> MetadataEmbedding:
        """Embed a batch of metadata records.

        Args:
            records: ``B`` dicts keyed like the stats file (absent keys count as missing; extra keys are ignored).
            drop_keys: keys replaced by their empty embedding (inference-time attribute dropout).
            drop_all: replace every key (the unconditional embedding for classifier-free guidance); no CFG dropout
                is drawn then (the generator is not advanced).
            generator: RNG for CFG dropout (training mode with ``cfg_prob > 0`` only).
            drop_samples: ``[B]`` bool, samples whose every key is replaced (the training-time null condition drawn
                by :class:`models.conditioning.ConditionBuilder`), on top of the CFG dropout.

        Returns:
            :class:`MetadataEmbedding` with ``tokens [B, 1 + K, D]``, ``pooled [B, D]``, ``dropped [B, K]``.
        """
        if isinstance(records, Mapping):
            raise TypeError("records must be a list of dicts, not a single dict")
        batch = len(records)
        if batch == 0:
            raise ValueError("empty batch")
        unknown = set(drop_keys or ()) - set(self.keys)
        if unknown:
            raise KeyError(f"drop_keys not in the embedder: {sorted(unknown)} (keys: {self.keys})")
        device, dtype = self.empty.device, self.empty.dtype

        if drop_all:
            dropped = torch.ones(batch, len(self.keys), dtype=torch.bool, device=device)
        else:
            dropped = self._cfg_mask(batch, generator, device)
        if drop_samples is not None:
            rows = torch.as_tensor(drop_samples, dtype=torch.bool).reshape(-1).to(device)
            if rows.shape[0] != batch:
                raise ValueError(f"drop_samples has {rows.shape[0]} entries for a batch of {batch}")
            dropped = dropped | rows[:, None]
        if drop_keys and not drop_all:
            cols = torch.tensor([k in set(drop_keys) for k in self.keys], device=device)
            dropped = dropped | cols[None, :]

        tokens = []
        for k, key in enumerate(self.keys):
            empty = self.empty[k].expand(batch, -1)
            # Every MLP runs even when its key is dropped for the whole batch, so that all parameters take part in
            # every step (DistributedDataParallel without find_unused_parameters).
            emb, missing = self._embed_key(key, [r.get(key) for r in records], device, dtype)
            use_empty = (missing | dropped[:, k])[:, None]
            tokens.append(torch.where(use_empty, empty, emb))
        keys_tokens = self.norm(torch.stack(tokens, dim=1))
        separator = self.norm(self.separator).expand(batch, 1, -1)
        return MetadataEmbedding(
            tokens=torch.cat([separator, keys_tokens], dim=1), pooled=keys_tokens.mean(dim=1), dropped=dropped
        )

    def empty_tokens(self) -> torch.Tensor:
        """``[K, D]``: the (normalised) token each key takes when dropped or missing."""
        return self.norm(self.empty)
