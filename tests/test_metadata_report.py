"""The metadata information report: exact pairing, the ε-space loss, the quadrature, and a constructed known answer.

Known answer: a tiny metadata model is trained (``utils.training``, ``configs/unet/tiny.json``) on images whose
contrast is set by TE alone (the inner and outer tissue swap brightness as TE goes 20 -> 60 -> 100 ms), with a flip
angle drawn independently of the image. The report must find TE (drop gap large and positive, the null gap
positive) and must not find a value effect of the flip angle (its mismatch gap within noise of zero).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.metadata_report import (
    ReportSettings,
    derangement,
    information_weights,
    log_snr,
    paired_errors,
    run_metadata_report,
    timestep_grid,
)

REPO = Path(__file__).resolve().parents[1]
TE_VALUES = (20.0, 60.0, 100.0)
STATS = {"TE": {"min": 20.0, "max": 100.0}, "flip_angle": {"min": 10.0, "max": 90.0}}


def _contrast_image(rng: np.random.Generator, size: int, te: float) -> np.ndarray:
    """A head with an inner disk; TE alone sets which tissue is bright (the disk's size and place jitter a little)."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    head = (xx / 0.85) ** 2 + (yy / 0.95) ** 2 < 1
    cy, cx = rng.uniform(-0.05, 0.05, 2)
    inner = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(0.4, 0.5) ** 2
    w = (te - 20.0) / 80.0
    img = np.where(inner & head, 1.0 - 0.8 * w, np.where(head, 0.2 + 0.8 * w, 0.0))
    return img.astype(np.complex64)


def write_te_dataset(root: Path, split: str, num_files: int, slices_per_file: int, seed: int, size: int = 16) -> Path:
    """Slices (project layout, no maps) + metadata CSV; TE drawn from 3 values, flip angle uniform in [10, 90]."""
    from utils.preprocessing.layout import dataset_dir, slice_paths
    from utils.preprocessing.metadata_csv import FASTMRI_CSV_COLUMNS, write_metadata_csv

    rng = np.random.default_rng(seed)
    ds = dataset_dir(root, "brain", size, split)
    rows = []
    for f in range(num_files):
        name = f"te_{split}_{f:03d}"
        for s in range(slices_per_file):
            te = float(TE_VALUES[rng.integers(len(TE_VALUES))])
            fa = float(np.round(rng.uniform(10.0, 90.0), 1))
            img_path, _ = slice_paths(ds, name, s)
            img_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(img_path, _contrast_image(rng, size, te))
            rows.append({"anatomy": "brain", "filename": name, "slice": s, "TE": te, "flip_angle": fa,
                         "pathology": []})
    csv_path = root / f"metadata_brain_{split}.csv"
    write_metadata_csv(csv_path, rows, FASTMRI_CSV_COLUMNS)
    return csv_path


def _stats_file(root: Path) -> Path:
    path = root / "metadata_stats.json"
    path.write_text(json.dumps(STATS))
    return path


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------------------------------

def test_derangement_changes_every_value_unless_one_value_is_a_majority():
    values = [20.0, 20.0, 60.0, 100.0, None, 60.0, 100.0, 20.0]
    src, why = derangement(values)
    assert why is None
    assert src[4] is None  # no value: not mismatched
    for i, j in enumerate(src):
        if values[i] is not None:
            assert j is not None and values[j] != values[i] and values[j] is not None
    # a permutation of the slices that have a value
    assert sorted(j for j in src if j is not None) == [i for i, v in enumerate(values) if v is not None]
    src, _ = derangement([1.0, 1.0, 1.0, 2.0])  # 1.0 holds 3 of 4 slices: at most 2 slices can change
    assert sum(j is not None for j in src) == 2
    assert derangement([5.0, 5.0])[1] == "all values equal"
    assert derangement([None, float("nan")])[1] == "all values missing"
    src, why = derangement([["Edema"], [], ["Edema"], []])  # label lists; [] ("none") is a value
    assert why is None and all(j is not None for j in src)


def test_trapezoid_weights_integrate_linear_functions_exactly():
    from diffusers import DDPMScheduler

    acp = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    ts = timestep_grid(acp, 16)
    assert ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts)) and len(ts) >= 12
    lam = log_snr(acp, ts)
    assert np.all(np.diff(lam) < 0)  # λ decreases with t
    w = information_weights(lam)
    lo, hi = lam.min(), lam.max()
    assert w.sum() == pytest.approx(hi - lo)
    assert (w * (3 * lam + 1)).sum() == pytest.approx(1.5 * (hi**2 - lo**2) + (hi - lo))
    assert np.all(information_weights(lam[:1]) == 0)


def test_epsilon_and_v_models_are_compared_in_epsilon_space():
    """An oracle that outputs the true target (ε, or v) has zero ε-error; a wrong one has the expected error."""
    from utils.samplers import DiffusionSchedule

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 8, 8, generator=g)
    noise = torch.randn(3, 2, 8, 8, generator=g)
    ts = [0, 400, 999]
    for ptype in ("epsilon", "v_prediction"):
        from diffusers import DDPMScheduler

        sched = DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, prediction_type=ptype))
        acp = sched.alphas_cumprod.float()

        class Oracle(torch.nn.Module):
            def __init__(self, bias: float) -> None:
                super().__init__()
                self.bias = bias

            def forward(self, x, t, encoder_hidden_states):
                a = acp[t].view(-1, 1, 1, 1)
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
                out = eps if ptype == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
                # a constant offset of the output is, in ε space, an offset of bias (ε) or bias·√ᾱ (v)
                return type("Out", (), {"sample": out + self.bias})()

        tok = [torch.zeros(1, 1, 4)]
        err, n = paired_errors(Oracle(0.0), sched, x0, tok, ts, noise, batch_size=4)
        assert n == len(ts) * 3 and err.shape == (1, 3, 3)
        assert np.abs(err).max() < 1e-8
        err, _ = paired_errors(Oracle(0.1), sched, x0, tok, ts, noise, batch_size=4)
        expected = 0.01 if ptype == "epsilon" else 0.01 * acp[ts].double().numpy()
        np.testing.assert_allclose(err[0].mean(axis=1), np.broadcast_to(expected, (3,)), rtol=1e-3)


def _tiny_dataset(tmp_path: Path, n_files: int = 4):
    from utils.data import MRISliceDataset

    csv_path = write_te_dataset(tmp_path, "val", n_files, 2, seed=3)
    return MRISliceDataset(tmp_path, [csv_path], split="val", crop_size=16)


class _TokenBlind(torch.nn.Module):
    """A UNet that is fed identical (all-zero) condition tokens whatever it is given."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, encoder_hidden_states):
        return self.unet(x, t, encoder_hidden_states=torch.zeros_like(encoder_hidden_states))


def test_gaps_are_exactly_zero_for_an_unconditional_model_and_a_token_blind_one(tmp_path, one_thread):
    from models.condition_embedder import MetadataConditionEmbedder
    from models.conditioning import ConditionBuilder
    from models.unet import build_unet
    from utils.samplers import DiffusionSchedule

    torch.manual_seed(0)
    dataset = _tiny_dataset(tmp_path, n_files=2)
    unet = build_unet("tiny").eval()
    from diffusers import DDPMScheduler

    schedule = DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    settings = ReportSettings(num_slices=4, num_noise=2, timesteps=[5, 300, 900], batch_size=7, save_png=False,
                              counterfactual_keys=[])
    uncond = ConditionBuilder(None, None, null_dim=32).eval()
    res = run_metadata_report(unet, uncond, schedule, dataset, settings, None, progress=False, log=lambda s: None)
    assert res["model_kind"] == "unconditional" and res["attributes"] == []
    assert res["reads_metadata"] is False and "no detectable gap" in res["verdict"]
    for band in res["conditions"]["null"]["bands"]:
        assert band["diff"] == 0.0 and band["se"] == 0.0 and band["z"] == 0.0
    assert res["conditions"]["null"]["information"]["nats"] == 0.0

    embedder = MetadataConditionEmbedder.from_stats(STATS, embed_dim=32)
    meta = ConditionBuilder(None, embedder).eval()
    res = run_metadata_report(_TokenBlind(unet), meta, schedule, dataset, settings, tmp_path / "out",
                              progress=False, log=lambda s: None)
    assert set(res["conditions"]) == {"null", "drop:TE", "mismatch:TE", "drop:flip_angle", "mismatch:flip_angle"}
    for name, entry in res["conditions"].items():
        assert entry["num_slices"] == 4 or (entry["kind"] == "mismatch" and entry["num_slices"] >= 2), name
        for band in entry["bands"]:
            assert band["diff"] == 0.0 and band["z"] == 0.0, (name, band)
        assert entry["information"]["nats"] == 0.0
    # the same model reading its tokens does see a difference: the pairing is not what makes the gaps zero
    res2 = run_metadata_report(unet, meta, schedule, dataset, settings, None, progress=False, log=lambda s: None)
    assert any(b["diff"] != 0.0 for b in res2["conditions"]["null"]["bands"])
    assert _strict_json(tmp_path / "out" / "report.json")["verdict"] == res["verdict"]
    rows = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * len(res["conditions"]["null"]["bands"])


def test_a_non_finite_loss_stops_the_report_without_writing_one(tmp_path):
    from diffusers import DDPMScheduler

    from models.conditioning import ConditionBuilder
    from utils.metadata_report import ReportError
    from utils.samplers import DiffusionSchedule

    class NaNNet(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": torch.full_like(x, float("nan"))})()

    schedule = DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    settings = ReportSettings(num_slices=2, num_noise=1, timesteps=[10], save_png=False, counterfactual_keys=[])
    with pytest.raises(ReportError, match="non-finite"):
        run_metadata_report(NaNNet(), ConditionBuilder(None, None, null_dim=4).eval(), schedule,
                            _tiny_dataset(tmp_path, n_files=1), settings, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "report.json").exists()


def test_script_refuses_bad_input_with_one_line(tmp_path, capsys):
    import metadata_report

    assert metadata_report.main(["--data_root", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                                 "--finetune_folder", str(tmp_path)]) == 2
    assert "load_dir_meta" in capsys.readouterr().err
    csv_path = write_te_dataset(tmp_path, "val", 1, 2, seed=0)
    common = ["--data_root", str(tmp_path), "--load_dir_meta_brain", str(csv_path), "--crop_size", "16",
              "--output_dir", str(tmp_path / "o")]
    assert metadata_report.main(common + ["--finetune_folder", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert metadata_report.main(common + ["--finetune_folder", str(tmp_path), "--num_slices", "1"]) == 2
    assert "num_slices" in capsys.readouterr().err


def test_text_model_attributes_are_the_prompt_fields_and_dropping_one_changes_its_prompt(tmp_path, one_thread):
    """The released-layout (ContextMRI, CLIP prompt) path of the script: attributes the records lack are skipped, a
    dropped or mismatched field leaves or changes the prompt, so the (untrained) model's loss changes."""
    import metadata_report
    from models.tiny_assets import make_fake_released_checkpoint

    ckpt = make_fake_released_checkpoint(tmp_path / "MRI_checkpoint")
    csv_path = write_te_dataset(tmp_path, "val", 2, 2, seed=5)
    out = tmp_path / "report"
    assert metadata_report.main([
        "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(tmp_path), "--load_dir_meta_brain",
        str(csv_path), "--crop_size", "16", "--num_slices", "4", "--num_noise", "1", "--timesteps", "50", "600",
        "--output_dir", str(out), "--no_progress", "--counterfactual_values", "2", "--no_png"]) == 0
    rep = _strict_json(out / "report.json")
    assert rep["model_kind"] == "text"
    assert {"TE", "flip_angle", "anatomy", "slice_number"} <= set(rep["attributes"])
    assert rep["skipped"]["drop:TR"] == "all values missing"
    assert rep["skipped"]["mismatch:anatomy"] == "all values equal"
    for name in ("null", "drop:TE", "mismatch:TE", "drop:flip_angle"):
        assert rep["conditions"][name]["bands"][-1]["diff"] != 0.0, name
    assert rep["counterfactuals"]["TE"]["rel_change_min_to_max"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# the known answer
# ---------------------------------------------------------------------------------------------------------------------

def test_report_finds_the_attribute_that_sets_the_contrast_and_not_the_random_one(tmp_path, one_thread):
    import metadata_report
    from utils.training import main as train_main

    train_csv = write_te_dataset(tmp_path, "train", 32, 4, seed=0)
    val_csv = write_te_dataset(tmp_path, "val", 8, 2, seed=1)
    stats = _stats_file(tmp_path)
    model = tmp_path / "model"
    assert train_main(argv=[
        "--unet_config", str(REPO / "configs" / "unet" / "tiny.json"), "--data_root", str(tmp_path),
        "--mri_metadata_dir_brain", str(train_csv), "--resolution", "16", "--train_batch_size", "16",
        "--max_train_steps", "150", "--learning_rate", "3e-3", "--lr_warmup_steps", "5", "--lr_scheduler",
        "constant_with_warmup", "--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats",
        str(stats), "--cfg_prob", "0.3", "--cfg_strategy", "independent", "--seed", "0",
        "--dataloader_num_workers", "0", "--report_to", "none", "--checkpointing_steps", "100000",
        "--output_dir", str(model)]) == 0

    out = tmp_path / "report"
    assert metadata_report.main([
        "--finetune_folder", str(model), "--data_root", str(tmp_path), "--load_dir_meta_brain", str(val_csv),
        "--enable_condition_emb", "--metadata_stats", str(stats), "--crop_size", "16", "--num_slices", "12",
        "--num_noise", "3", "--num_timesteps", "8", "--output_dir", str(out), "--no_progress",
        "--counterfactual_values", "3"]) == 0
    rep = _strict_json(out / "report.json")
    for name in ("report.csv", "loss_gap.png", "counterfactual_TE.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert rep["model"]["finetune_folder"] == str(model) and rep["attributes"] == ["TE", "flip_angle"]
    cond = rep["conditions"]

    def max_z(name: str) -> float:
        return max(b["z"] for b in cond[name]["bands"])

    print(rep["table"])
    assert rep["reads_metadata"] is True and rep["verdict"].startswith("reads its metadata: yes")
    assert max_z("null") > 3 and max_z("drop:TE") > 3 and max_z("mismatch:TE") > 3
    assert cond["drop:TE"]["information"]["nats"] > 0 and cond["null"]["information"]["nats"] > 0
    # The random attribute's value does not matter: its mismatch gap over all t and its information are within noise
    # of zero. (Its *drop* gap need not be: a briefly trained model still reacts to the token's presence; see
    # docs/metadata_report.md. It stays far below TE's.)
    fa = cond["mismatch:flip_angle"]
    assert abs(fa["bands"][-1]["z"]) < 3 and abs(fa["information"]["z"]) < 3, fa["bands"][-1]
    te_info = cond["drop:TE"]["information"]["nats"]
    assert cond["drop:flip_angle"]["information"]["nats"] < 0.5 * te_info
    assert cond["mismatch:TE"]["information"]["nats"] > 10 * abs(fa["information"]["nats"])
    assert rep["attribute_verdicts"]["TE"]["detected"] is True
    # the counterfactual strip: sweeping TE changes the denoised estimate a lot
    cf = rep["counterfactuals"]["TE"]
    assert cf["values"][0] == pytest.approx(20.0) and cf["values"][-1] == pytest.approx(100.0)
    assert cf["rel_change_min_to_max"] > 0.1
    assert math.isfinite(rep["time_s"])
