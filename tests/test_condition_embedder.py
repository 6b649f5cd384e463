"""Tests for the fine-grained metadata condition embedder (models/condition_embedder.py)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from models.condition_embedder import (
    MetadataConditionEmbedder,
    geometric_frequencies,
    sinusoidal_features,
)

D = 32


@pytest.fixture(scope="module")
def stats(test_data_dir) -> dict:
    """The real brain+knee stats (schema: docs/formats.md, metadata CSV) plus our header keys."""
    s = json.loads((test_data_dir / "metadata_stats_brain_knee.json").read_text())
    s["field_strength"] = {"min": 1.5, "max": 3.0}
    s["vendor"] = ["SIEMENS", "GE MEDICAL SYSTEMS"]
    s["scanner_model"] = ["Aera", "Skyra", "Prisma_fit"]
    return s


def _record(**overrides) -> dict:
    rec = {
        "anatomy": "knee", "slice_number": 20.0, "contrast": "PDFS", "sequence": "TurboSpinEcho", "TR": 3120.0,
        "TE": 33.0, "TI": 100.0, "flip_angle": 140.0, "pathology": ["Meniscus tear"], "field_strength": 3.0,
        "vendor": "SIEMENS", "scanner_model": "Skyra",
    }
    rec.update(overrides)
    return rec


def _embedder(stats: dict, seed: int = 0, **kwargs) -> MetadataConditionEmbedder:
    torch.manual_seed(seed)
    return MetadataConditionEmbedder.from_stats(stats, D, **kwargs).eval()


def test_from_stats_types_and_shapes(stats):
    emb = _embedder(stats)
    assert emb.keys == sorted(stats)
    assert emb.kinds["pathology"] == "multi_label"
    assert emb.kinds["contrast"] == emb.kinds["vendor"] == "categorical"
    assert emb.kinds["TR"] == emb.kinds["field_strength"] == "numerical"
    out = emb([_record(), _record(anatomy="brain", contrast="AX FLAIR_FBB", pathology=[])])
    assert out.tokens.shape == (2, 1 + len(stats), D)
    assert out.pooled.shape == (2, D)
    assert out.dropped.shape == (2, len(stats)) and not out.dropped.any()
    assert torch.isfinite(out.tokens).all()
    # Separator first, identical for every sample; pooled = mean of the key tokens.
    torch.testing.assert_close(out.tokens[0, 0], out.tokens[1, 0])
    torch.testing.assert_close(out.pooled, out.tokens[:, 1:].mean(dim=1))


def test_missing_and_unknown_values_get_the_empty_embedding(stats):
    emb = _embedder(stats)
    empty = emb.empty_tokens()
    k = {key: i for i, key in enumerate(emb.keys)}
    rec = _record(TE=None, TR=float("nan"), flip_angle="n/a", contrast="T1 weird", pathology=["not a label"])
    del rec["vendor"]
    with pytest.warns(UserWarning, match="unknown"):
        out = emb([rec, _record()])
    for key in ("TE", "TR", "flip_angle", "contrast", "pathology", "vendor"):
        torch.testing.assert_close(out.tokens[0, 1 + k[key]], empty[k[key]], rtol=0, atol=0)
        assert not torch.allclose(out.tokens[1, 1 + k[key]], empty[k[key]])
    # Known keys of the same record are not affected.
    torch.testing.assert_close(out.tokens[0, 1 + k["anatomy"]], out.tokens[1, 1 + k["anatomy"]])
    # Warn once per key and value.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb([rec])


def test_multi_label_is_a_mean_and_empty_list_differs_from_missing(stats):
    emb = _embedder(stats)
    k = 1 + emb.keys.index("pathology")
    a, b = "Meniscus tear", "Joint effusion"
    with pytest.warns(UserWarning):
        out = emb([_record(pathology=[a]), _record(pathology=[a, a]), _record(pathology=[a, b]),
                   _record(pathology=[b, a]), _record(pathology=[a, "zzz"]), _record(pathology=[]),
                   _record(pathology=None), _record(pathology=(a,))])
    t = out.tokens[:, k]
    torch.testing.assert_close(t[0], t[1])  # mean, not sum
    torch.testing.assert_close(t[2], t[3])  # order-free
    torch.testing.assert_close(t[0], t[4])  # unknown labels ignored when others are known
    torch.testing.assert_close(t[0], t[7])  # tuples work like lists
    assert not torch.allclose(t[0], t[2])
    empty = emb.empty_tokens()[k - 1]
    torch.testing.assert_close(t[6], empty)  # None = missing
    assert not torch.allclose(t[5], empty)  # [] = "no pathology", its own learned row


def test_real_stats_with_empty_pathology_vocabulary(test_data_dir):
    """The released single-protocol stats: empty pathology list, degenerate numeric ranges (min == max)."""
    emb = MetadataConditionEmbedder.from_stats(test_data_dir / "metadata_stats_single_protocol.json", D).eval()
    k = 1 + emb.keys.index("pathology")
    rec = {"anatomy": "brain", "slice_number": 3, "contrast": "AX FLAIR_FBB", "sequence": "TurboSpinEcho",
           "TR": 9000, "TE": 81, "TI": 2500, "flip_angle": 150}
    with pytest.warns(UserWarning, match="Edema"):
        out = emb([{**rec, "pathology": ["Edema"]}, {**rec, "pathology": []}])
    assert out.tokens.shape == (2, 1 + 9, D) and torch.isfinite(out.tokens).all()
    torch.testing.assert_close(out.tokens[0, k], emb.empty_tokens()[k - 1])
    u, missing = emb.normalize("TR", [9000, 100, None])
    assert u.tolist()[:2] == [0.5, 0.5] and missing.tolist() == [False, False, True]


def test_normalisation_log_clamp(stats):
    emb = _embedder(stats)
    lo, hi = stats["TR"]["min"], stats["TR"]["max"]
    mid = math.sqrt((1 + lo) * (1 + hi)) - 1  # the log1p midpoint
    u, missing = emb.normalize("TR", [lo, hi, mid, 1.0, 1e6, "3000"])
    torch.testing.assert_close(u, torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, u[5].item()]))
    assert 0.5 < u[5] < 1.0 and not missing.any()
    u, _ = emb.normalize("flip_angle", [69.0, 124.5, 180.0])  # linear (not a log key)
    torch.testing.assert_close(u, torch.tensor([0.0, 0.5, 1.0]))


def test_numeric_resolution_beats_reference_embedding(stats):
    """TE 5 ms apart is clearly resolved, and distance grows with value distance; the reference's <= 1 rad
    frequencies give nearly constant features."""
    emb = _embedder(stats)
    ours = emb.frequencies()
    assert ours.min() == pytest.approx(1.0) and ours.max() == pytest.approx(1000.0)
    half = emb.config.num_frequencies
    reference = torch.exp(-math.log(10000.0) * torch.arange(half) / half)  # transformer-style, all <= 1 rad

    def features(values, freqs, amp):
        u, _ = emb.normalize("TE", values)
        return sinusoidal_features(u, freqs, amp)

    for te in (5.0, 33.0, 81.0, 110.0):
        f_ours = features([te, te + 5.0], ours, emb.config.amplitude_exponent)
        f_ref = features([te, te + 5.0], reference, 0.0)
        rel_ours = (f_ours[1] - f_ours[0]).norm() / f_ours[0].norm()
        rel_ref = (f_ref[1] - f_ref[0]).norm() / f_ref[0].norm()
        assert rel_ref < 0.07  # reference: nearly constant
        assert rel_ours > 0.15 and rel_ours > 5 * rel_ref

    # Monotone growth of feature distance with value distance (TE from 20 ms up to 120 ms).
    f = features([20.0 + d for d in range(0, 101)], ours, emb.config.amplitude_exponent)
    dist = (f[1:] - f[0]).norm(dim=1)
    assert (dist[1:] - dist[:-1]).min() > -1e-3 * dist.max()
    assert dist[-1] > 2 * dist[0]

    # Same through the full embedder (same random MLP weights, only the frequencies differ).
    torch.manual_seed(1)
    ref_emb = MetadataConditionEmbedder.from_stats(stats, D, min_frequency=1e-4, max_frequency=1.0,
                                                   amplitude_exponent=0.0).eval()
    ref_emb.load_state_dict(emb.state_dict())
    k = 1 + emb.keys.index("TE")
    recs = [_record(TE=81.0), _record(TE=86.0)]
    with torch.no_grad():
        d_ours = (emb(recs).tokens[0, k] - emb(recs).tokens[1, k]).norm()
        d_ref = (ref_emb(recs).tokens[0, k] - ref_emb(recs).tokens[1, k]).norm()
    assert d_ours > 10 * d_ref


def test_geometric_frequencies():
    f = geometric_frequencies(4, 1.0, 1000.0)
    torch.testing.assert_close(f, torch.tensor([1.0, 10.0, 100.0, 1000.0]))


@pytest.mark.parametrize("strategy", ["joint", "independent"])
def test_cfg_dropout_statistics(stats, strategy):
    p, batch = 0.3, 1000
    emb = _embedder(stats, cfg_prob=p, cfg_strategy=strategy).train()
    records = [_record(slice_number=float(i % 30)) for i in range(batch)]
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        out = emb(records, generator=g)
    dropped = out.dropped
    sigma = math.sqrt(p * (1 - p) / batch)
    if strategy == "joint":
        # one Bernoulli per sample: a row is all dropped or all kept
        row = dropped.all(dim=1)
        assert torch.equal(dropped.any(dim=1), row)
        assert abs(row.float().mean().item() - p) < 4 * sigma
    else:
        assert abs(dropped.float().mean().item() - p) < 4 * sigma / math.sqrt(len(emb.keys))
        for k in range(len(emb.keys)):
            assert abs(dropped[:, k].float().mean().item() - p) < 4 * sigma
        partial = dropped.any(dim=1) & ~dropped.all(dim=1)
        assert partial.float().mean() > 0.5
    # dropped entries are exactly the empty embedding
    empty = emb.empty_tokens()
    b, k = torch.nonzero(dropped, as_tuple=True)
    torch.testing.assert_close(out.tokens[b, 1 + k], empty[k], rtol=0, atol=0)
    # explicit generator: reproducible
    with torch.no_grad():
        again = emb(records, generator=torch.Generator().manual_seed(123)).dropped
    assert torch.equal(again, dropped)


def test_cfg_dropout_batch_size_one_and_eval_mode(stats):
    p, n = 0.5, 200
    emb = _embedder(stats, cfg_prob=p, cfg_strategy="joint", include_keys=["TE", "anatomy"]).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        drops = [emb([_record()], generator=g).dropped.all().item() for _ in range(n)]
    assert abs(sum(drops) / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    emb.eval()
    with torch.no_grad():
        assert not any(emb([_record()], generator=g).dropped.any().item() for _ in range(20))


def test_inference_drop_keys_and_drop_all(stats):
    emb = _embedder(stats)
    empty = emb.empty_tokens()
    recs = [_record(), _record(anatomy="brain", TE=81.0)]
    full = emb(recs).tokens
    part = emb(recs, drop_keys=["TE", "pathology"]).tokens
    for i, key in enumerate(emb.keys):
        if key in ("TE", "pathology"):
            torch.testing.assert_close(part[:, 1 + i], empty[i].expand(2, -1), rtol=0, atol=0)
        else:
            torch.testing.assert_close(part[:, 1 + i], full[:, 1 + i])
    unc = emb(recs, drop_all=True)
    torch.testing.assert_close(unc.tokens[:, 1:], empty.expand(2, -1, -1), rtol=0, atol=0)
    assert unc.dropped.all()
    with pytest.raises(KeyError):
        emb(recs, drop_keys=["not_a_key"])


def test_gradients_reach_every_trainable_part(stats):
    emb = _embedder(stats, cfg_prob=0.5, cfg_strategy="independent").train()
    out = emb([_record(), _record(TE=None)] * 4, generator=torch.Generator().manual_seed(0))
    (out.tokens.square().sum() + out.pooled.sum()).backward()
    assert emb.empty.grad is not None and emb.empty.grad.abs().sum() > 0
    assert emb.separator.grad is not None
    for name, mlp in emb.mlps.items():
        assert mlp[0].weight.grad is not None, name


def test_save_load_round_trip(stats, tmp_path):
    emb = _embedder(stats, cfg_prob=0.25, cfg_strategy="independent", sort_keys=False)
    emb.save_pretrained(tmp_path / "embedder")
    files = {p.name for p in (tmp_path / "embedder").iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= files
    loaded = MetadataConditionEmbedder.from_pretrained(tmp_path / "embedder")
    assert loaded.keys == emb.keys == list(stats)  # stats-file order kept
    assert loaded.cfg_prob == 0.25 and loaded.cfg_strategy == "independent"
    assert not loaded.training
    recs = [_record(), _record(anatomy="brain", pathology=[], TE=None)]
    with torch.no_grad():
        a, b = emb(recs), loaded(recs)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_invalid_configuration(stats):
    with pytest.raises(ValueError):
        MetadataConditionEmbedder.from_stats(stats, D, cfg_strategy="sometimes")
    with pytest.raises(ValueError):
        MetadataConditionEmbedder.from_stats({"TR": {"lo": 1}}, D)
    with pytest.raises(TypeError):
        _embedder(stats)(_record())


def test_every_parameter_gets_a_gradient_even_when_all_keys_are_dropped(stats):
    """DDP without find_unused_parameters needs every parameter in the graph at every step."""
    emb = _embedder(stats, cfg_prob=1.0, cfg_strategy="joint").train()
    out = emb([_record()])
    assert out.dropped.all()
    out.tokens.sum().backward()
    assert all(p.grad is not None for p in emb.parameters())
