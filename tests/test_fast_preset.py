"""The fast preset and the NFE-quality benchmark: the preset is what the committed benchmark measured (the result
``bench.PRESET_SOURCE`` names: the raw path's wide-grid run ``nfe_quality_raw_wide.json``; the other committed runs
are checked too), the benchmark's selection rule, staged tuning and pairing are right, and the
benchmark script runs end to end on tiny data on both paths."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import bench_nfe_quality as bench
from tests.training_helpers import write_tiny_dataset
from utils.samplers import DC_SAMPLERS, PRESETS

REPO = Path(__file__).resolve().parents[1]
RESULT = bench.PRESET_SOURCE  # the committed result the preset comes from
COMMITTED = [bench.RESULTS / n for n in ("nfe_quality.json", "nfe_quality_raw.json", "nfe_quality_raw_wide.json")
             if (bench.RESULTS / n).is_file()]
CROP = 32


def _strict_json(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ----------------------------------------------------------------------------------------------------------------------
# the committed benchmark and the preset


def test_fast_preset_is_what_the_committed_benchmark_measured():
    assert RESULT in COMMITTED, f"PRESET_SOURCE {RESULT} is not committed"
    result = _strict_json(RESULT)
    fast = result["fast_preset"]
    assert fast["preset"] == PRESETS["fast"]
    assert PRESETS["fast"]["sampler"] in DC_SAMPLERS


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_benchmark_follows_its_rules(path):
    result = _strict_json(path)
    fast = result["fast_preset"]
    # The committed choice follows the rule from the committed points (nothing hand-edited in between) ...
    assert bench.choose_fast(result["points"], fast["max_nfe"], fast["within_db"]) == fast
    point = next(p for p in result["points"] if bench.preset_of(p) == fast["preset"])
    assert point["nfe"] == fast["nfe"] <= 25
    assert fast["paired_psnr_diff"] == point["paired_psnr_diff"]
    assert fast["reached"] == (point["paired_psnr_diff"]["mean"] >= -0.2)
    # ... the reference is 100-step DDS with 100 evaluations, and it is paired with itself at exactly zero.
    ref = next(p for p in result["points"] if p["sampler"] == "dds" and p["steps"] == 100)
    assert ref["nfe"] == 100 and ref["paired_psnr_diff"] == {"mean": 0.0, "se": 0.0}
    # The tuning slices are not the reported ones (raw path: not even the same subjects).
    assert not set(result["tuning_slices"]) & set(result["reported_slices"])
    if result.get("mode") == "raw":
        assert not {n.split(":")[0] for n in result["tuning_slices"]} & {n.split(":")[0] for n in
                                                                         result["reported_slices"]}
    assert all(p["num_slices"] == len(result["reported_slices"]) for p in result["points"])
    # Every point is its tuning's best run.
    for p in result["points"]:
        tuned = result["tuning"][f"{p['sampler']}@{p['steps']}"]
        assert tuned["tune_psnr"] == max(r["tune_psnr"] for r in tuned["grid"] if r["tune_psnr"] is not None)
        assert (p["eta"], p["gamma"]) == (tuned["eta"], tuned["gamma"])


def test_readme_quotes_the_committed_preset_and_gap():
    result = _strict_json(RESULT)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Fast reconstruction", 1)[1].split("\n## ", 1)[0]
    fast = result["fast_preset"]
    gap = f"{fast['paired_psnr_diff']['mean']:+.2f} ± {fast['paired_psnr_diff']['se']:.2f}"
    assert gap in section
    # the section shows the curve (or names the JSON) of the result the preset comes from
    assert "--preset fast" in section
    assert re.search(rf"benchmarks/results/{re.escape(RESULT.stem)}\.(png|json)", section), RESULT.name
    for flag, key in (("--num_steps", "num_steps"), ("--eta", "eta"), ("--gamma", "gamma")):
        assert re.search(rf"{flag} {PRESETS['fast'][key]:g}\b", section), flag
    if "gamma_rule" in PRESETS["fast"]:  # a preset from the raw path may carry the γ rule
        assert f"--gamma_rule {PRESETS['fast']['gamma_rule']}" in section
        assert re.search(rf"--prior_error_std {PRESETS['fast']['prior_error_std']:g}\b", section)


# ----------------------------------------------------------------------------------------------------------------------
# selection rule, statistics


def _point(sampler: str, steps: int, diff: float, eta: float = 0.0, gamma: float = 5.0) -> dict:
    return {"sampler": sampler, "steps": steps, "nfe": steps, "eta": eta, "gamma": gamma, "cg_iter": 5,
            "paired_psnr_diff": {"mean": diff, "se": 0.1}, "psnr": {"mean": 30 + diff, "se": 0.5},
            "ssim": {"mean": 0.9, "se": 0.01}}


def test_choose_fast_takes_the_fewest_evaluations_within_the_margin_else_the_best_cheap_one():
    points = [_point("dds", 100, 0.0), _point("dds", 25, -0.1), _point("dds", 15, -0.15),
              _point("dpmpp2m", 15, -0.05), _point("dds", 10, -0.5), _point("ddim0", 20, 0.1)]
    fast = bench.choose_fast(points, 25)
    assert fast["reached"] and fast["nfe"] == 15
    assert fast["preset"] == {"sampler": "dpmpp2m", "num_steps": 15, "eta": 0.0, "gamma": 5.0, "cg_iter": 5}
    # none within 0.2 dB at <= 25 NFE: the best cheap one, marked as not reached
    far = [_point("dds", 100, 0.0), _point("dds", 25, -0.9), _point("ddim0", 20, -0.4, gamma=50.0)]
    fast = bench.choose_fast(far, 25)
    assert not fast["reached"] and fast["preset"]["sampler"] == "dds" and fast["preset"]["eta"] == 0.0
    assert fast["preset"]["gamma"] == 50.0 and fast["nfe"] == 20
    with pytest.raises(RuntimeError):
        bench.choose_fast([_point("dds", 100, 0.0)], 25)


def test_mean_se_and_spread():
    s = bench.mean_se([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and math.isclose(s["se"], 1.2909944487358056 / 2)
    assert bench.mean_se([3.0]) == {"mean": 3.0, "se": 0.0}
    picked = bench.spread(12, 3, [f"f{i // 3}" for i in range(12)])  # 4 files x 3 slices: one slice per file first
    assert len(picked) == 3 and len({i // 3 for i in picked}) == 3


def test_staged_tuning_finds_the_best_setting_and_records_every_run():
    """Stage A (η × γ), B (CG iterations × γ neighbours), C (γ rule): on a known score surface the search ends at its
    maximum, ddim0 reuses DDS's η = 0 runs, and the grid holds every distinct run once."""
    calls = []

    def run(s):  # best: η 0.5, γ 100 (2nd of 3), 10 CG iterations, noise rule with s = 0.2
        calls.append(bench.run_key(s))
        score = -abs(s["eta"] - 0.5) - abs(math.log10(s["gamma"] / 100)) - abs(s["cg_iter"] - 10) / 10
        score += {None: 0.0, 0.1: -0.5, 0.2: 0.3}[s["prior_error_std"]]
        return {"psnr": np.array([score, score + 1.0]), "ssim": np.zeros(2), "nfe": s["steps"]}

    run.num_slices = 2
    a = SimpleNamespace(etas=[0.0, 0.5, 1.0], gammas=[5.0, 100.0, 1000.0], cg_iters=[5, 10, 20],
                        prior_error_stds=[0.1, 0.2])
    tuned, tuner = bench.tune(run, [("dds", 4), ("ddim0", 4)], a)
    best = tuned["dds@4"]
    assert (best["eta"], best["gamma"], best["cg_iter"], best["gamma_rule"], best["prior_error_std"]) == (
        0.5, 100.0, 10, "noise", 0.2)
    stages = [r["stage"] for r in best["grid"]]
    assert stages.count("A") == 9 and stages.count("B") == 6 and stages.count("C") == 2
    assert best["tune_psnr"] == max(r["tune_psnr"] for r in best["grid"]) == pytest.approx(0.8)
    ddim0 = tuned["ddim0@4"]
    assert ddim0["eta"] == 0.0 and ddim0["cg_iter"] == 10 and ddim0["prior_error_std"] == 0.2
    assert len(calls) == len(set(calls))  # nothing run twice: ddim0's stage A is DDS's η = 0 column
    assert tuner.slice_steps == 4 * 2 * len(calls)
    assert bench.preset_of({**best, "sampler": "dds"}) == {
        "sampler": "dds", "num_steps": 4, "eta": 0.5, "gamma": 100.0, "cg_iter": 10, "gamma_rule": "noise",
        "prior_error_std": 0.2}


# ----------------------------------------------------------------------------------------------------------------------
# the script on tiny data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Val + train slices (32x32, 2 coils) and a random-weight metadata-conditioned model with its stats."""
    from tests.test_faults_recon import _make_model
    from utils.preprocessing.stats import write_stats_from_csvs

    root = tmp_path_factory.mktemp("fast_preset")
    torch.set_num_threads(1)
    val = write_tiny_dataset(root / "data", "brain", split="val", num_files=2, slices_per_file=2, crop=CROP,
                             coils=2, seed=3)
    train = write_tiny_dataset(root / "data", "brain", split="train", num_files=3, slices_per_file=2, crop=CROP,
                               coils=2, seed=4)
    write_stats_from_csvs([train], root / "stats.json")
    model = _make_model(root / "model", unconditional=False, enable_condition_emb=True,
                        metadata_stats=str(root / "stats.json"),
                        unet_config=str(REPO / "configs" / "unet" / "tiny.json"))
    return root, val, train, model


def test_benchmark_script_end_to_end_on_tiny_data(tiny):
    root, val, train, model = tiny
    out = root / "out"
    args = ["--finetune_folder", model, "--data_root", root / "data", "--csv", val, "--tune_csv", train,
            "--metadata_stats", root / "stats.json", "--num_slices", "3", "--num_tune", "2", "--steps", "2", "4",
            "--alt_steps", "2", "--etas", "0", "1", "--gammas", "1", "20", "--reference_steps", "4",
            "--fast_max_nfe", "2", "--threads", "1", "--json", out / "r.json", "--png", out / "r.png"]
    result = bench.main([str(a) for a in args])
    assert _strict_json(out / "r.json") == json.loads(json.dumps(result))
    assert (out / "r.png").stat().st_size > 1000
    points = {(p["sampler"], p["steps"]): p for p in result["points"]}
    assert set(points) == {("dds", 2), ("dds", 4), ("ddim0", 2), ("dpmpp2m", 2)}
    for (sampler, steps), p in points.items():
        assert p["nfe"] == steps and p["num_slices"] == 3
        tuned = result["tuning"][f"{sampler}@{steps}"]
        grid = tuned["grid"]
        assert len(grid) == (4 if sampler == "dds" else 2)
        assert tuned["tune_psnr"] == max(r["tune_psnr"] for r in grid)  # the best of the grid was kept
        if sampler != "dds":
            assert p["eta"] == 0.0
    # ddim0's grid is DDS's η = 0 column (run once, same numbers)
    dds2 = {(r["eta"], r["gamma"]): r["tune_psnr"] for r in result["tuning"]["dds@2"]["grid"]}
    for r in result["tuning"]["ddim0@2"]["grid"]:
        assert r["tune_psnr"] == dds2[(0.0, r["gamma"])]
    ref = points[("dds", 4)]
    assert ref["paired_psnr_diff"] == {"mean": 0.0, "se": 0.0}
    other = points[("dds", 2)]
    diffs = [a - b for a, b in zip(other["per_slice_psnr"], ref["per_slice_psnr"])]
    assert math.isclose(other["paired_psnr_diff"]["mean"], sum(diffs) / 3, abs_tol=1e-9)
    assert result["fast_preset"]["nfe"] == 2
    assert not set(result["tuning_slices"]) & set(result["reported_slices"])
    assert result["config"]["noise_sigma"] == 0.02 and "noisy" in result["config"]["measurements"]


def test_benchmark_refuses_tuning_on_the_reported_slices(tiny):
    root, val, _, model = tiny
    with pytest.raises(bench.BenchError, match="separate split"):
        bench.main([str(a) for a in ["--finetune_folder", model, "--data_root", root / "data", "--csv", val,
                                     "--tune_csv", val, "--tune_split", "val"]])
    with pytest.raises(bench.BenchError, match="not a folder"):
        bench.main(["--finetune_folder", str(root / "missing"), "--data_root", str(root / "data")])


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory, tiny):
    """Two held-out raw noisy files (64x32 k-space, 2 coils, 2 slices, one contrast) written by the real simulator
    script, for the tiny model (32x32)."""
    import make_synthetic_data

    out = tmp_path_factory.mktemp("fast_preset_raw") / "val"
    assert make_synthetic_data.main(["--format", "fastmri", "--output_dir", str(out), "--num_volumes", "2",
                                     "--num_slices", "2", "--matrix", "64x32", "--num_coils", "2",
                                     "--acquisitions", "AXT2", "--seed", "11", "--no_ground_truth"]) == 0
    return out


def test_raw_mode_end_to_end_through_the_raw_path(tiny, tiny_raw):
    """``--raw_dir``: the reported files are scored as ``recon_complex_multi.py --raw_dir``'s own code reconstructs
    them, tuning runs on fresh simulated subjects (never the reported ones), and the tuned CG iterations and γ rule
    reach the points and the JSON."""
    from utils.metrics import psnr
    from utils.raw_data import open_raw_volume
    from utils.raw_reconstruction import RawReconSettings, run_raw_reconstruction

    root, _, _, model = tiny
    out = root / "out_raw"
    args = ["--raw_dir", tiny_raw, "--finetune_folder", model, "--metadata_stats", root / "stats.json",
            "--num_slices", "3", "--num_tune", "2", "--steps", "2", "--reference_steps", "2", "--alt_steps", "2",
            "--samplers", "dds", "dpmpp2m", "--etas", "1", "--gammas", "50", "--cg_iters", "2", "4",
            "--prior_error_stds", "0.1", "--center_fraction", "0.25", "--fast_max_nfe", "2", "--threads", "1",
            "--work_dir", root / "work", "--json", out / "r.json"]
    result = bench.main([str(a) for a in args])
    assert _strict_json(out / "r.json") == json.loads(json.dumps(result))
    assert (out / "r.png").stat().st_size > 1000 and result["mode"] == "raw"
    # 3 reported slices dealt over the 2 files; tuning: simulated subjects with other names
    stems = {q.stem for q in tiny_raw.glob("*.h5")}
    assert len(set(result["reported_slices"])) == 3 and len(set(result["tuning_slices"])) == 2
    assert all(n.split(":")[0] in stems and n.split(":")[1] in ("0", "1") for n in result["reported_slices"])
    reported_files = {n.split(":")[0] for n in result["reported_slices"]}
    assert len(reported_files) == 2 and not reported_files & {n.split(":")[0] for n in result["tuning_slices"]}
    assert result["tuning_set"]["source"] == "simulated" and result["tuning_set"]["contrasts"] == ["AXT2"]
    grid = result["tuning"]["dds@2"]["grid"]
    assert [r["stage"] for r in grid] == ["A", "B", "C"] and [r["cg_iter"] for r in grid][:2] == [2, 4]
    assert any(r["gamma_rule"] == "noise" for r in grid)
    # the reference point's PSNRs are what the raw reconstruction itself gives with the tuned setting
    ref = next(p for p in result["points"] if p["sampler"] == "dds")
    assert ref["paired_psnr_diff"] == {"mean": 0.0, "se": 0.0} and ref["cg_iter"] in (2, 4)
    assert ref["gamma_effective"]["max"] <= ref["gamma"]
    vols = {p.stem: open_raw_volume(p) for p in tiny_raw.glob("*.h5")}
    from benchmarks.bench_nfe_quality import load_model, parse_args, raw_reconstructor

    a = parse_args([str(x) for x in args])
    recon_model, _ = load_model(a, "cpu")
    name = result["reported_slices"][0]
    stem, idx = name.split(":")[0], int(name.split(":")[1])
    vol = vols[stem]
    s = {k: ref[k] for k in ("eta", "gamma", "cg_iter", "gamma_rule", "prior_error_std")}
    settings = RawReconSettings(method="diffusion", mask_type="uniform1d", acc_factor=4.0, center_fraction=0.25,
                                num_steps=2, eta=s["eta"], gamma=s["gamma"], gamma_rule=s["gamma_rule"],
                                prior_error_std=s["prior_error_std"] or 0.1, cg_iter=s["cg_iter"], clip_x0=1.5,
                                batch_size=2, image_size=(CROP, CROP))
    folder = root / "check"
    run_raw_reconstruction([vol], settings, folder, diffusion=raw_reconstructor(
        recon_model, {"sampler": "dds", "steps": 2, **s}, 1.5), progress=False)
    mag = np.load(folder / "slices" / stem / f"{idx:03d}.npz")["magnitude"]
    expected = psnr(vol.read_target()[idx], mag)
    assert ref["per_slice_psnr"][result["reported_slices"].index(name)] == pytest.approx(expected, abs=1e-4)


def test_raw_mode_refusals(tiny, tiny_raw):
    root, _, _, model = tiny
    with pytest.raises(bench.BenchError, match="other files"):
        bench.main([str(a) for a in ["--raw_dir", tiny_raw, "--tune_raw_dir", tiny_raw, "--finetune_folder", model]])
    with pytest.raises(bench.BenchError, match="not both"):
        bench.main([str(a) for a in ["--raw_dir", tiny_raw, "--data_root", root / "data", "--finetune_folder", model]])
    with pytest.raises(bench.BenchError, match="raw path only"):
        bench.main([str(a) for a in ["--finetune_folder", model, "--data_root", root / "data", "--prior_error_stds",
                                     "0.1"]])


# ----------------------------------------------------------------------------------------------------------------------
# the --preset flag of recon_complex_multi.py


def test_recon_preset_flag_sets_the_preset_values_and_explicit_flags_win():
    import recon_complex_multi

    base = ["--data_root", "x", "--load_dir_meta_brain", "y.csv"]
    fast = PRESETS["fast"]
    args = recon_complex_multi.parse_args([*base, "--preset", "fast"])
    assert (args.sampler, args.num_steps, args.eta, args.gamma, args.cg_iter) == (
        fast["sampler"], fast["num_steps"], fast["eta"], fast["gamma"], fast["cg_iter"])
    args = recon_complex_multi.parse_args([*base, "--gamma", "7", "--preset", "fast"])
    assert args.gamma == 7.0 and args.num_steps == fast["num_steps"]
    plain = recon_complex_multi.parse_args(base)
    assert (plain.num_steps, plain.eta, plain.gamma) == (100, 0.8, 5.0)  # no preset: the reference's defaults
    # the raw path's γ rule of a preset reaches --raw_dir runs (and an explicit flag still wins)
    raw = ["--raw_dir", "r", "--finetune_folder", "m"]
    args = recon_complex_multi.parse_args([*raw, "--preset", "fast"])
    for key in ("gamma_rule", "prior_error_std"):
        assert getattr(args, key) == fast.get(key, getattr(plain, key)), key
    assert recon_complex_multi.parse_args([*raw, "--preset", "fast", "--gamma_rule", "fixed"]).gamma_rule == "fixed"
