"""The fast preset and the NFE-quality benchmark: the preset is what the committed benchmark measured, the benchmark's
selection rule and pairing are right, and the benchmark script runs end to end on tiny data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks import bench_nfe_quality as bench
from tests.training_helpers import write_tiny_dataset
from utils.samplers import DC_SAMPLERS, PRESETS

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "nfe_quality.json"
CROP = 32


def _strict_json(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ----------------------------------------------------------------------------------------------------------------------
# the committed benchmark and the preset


def test_fast_preset_is_what_the_committed_benchmark_measured():
    result = _strict_json(RESULT)
    fast = result["fast_preset"]
    assert fast["preset"] == PRESETS["fast"]
    assert PRESETS["fast"]["sampler"] in DC_SAMPLERS
    # The committed choice follows the rule from the committed points (nothing hand-edited in between) ...
    assert bench.choose_fast(result["points"], fast["max_nfe"], fast["within_db"]) == fast
    point = next(p for p in result["points"] if bench.preset_of(p) == fast["preset"])
    assert point["nfe"] == fast["nfe"] <= 25
    assert fast["paired_psnr_diff"] == point["paired_psnr_diff"]
    assert fast["reached"] == (point["paired_psnr_diff"]["mean"] >= -0.2)
    # ... the reference is 100-step DDS with 100 evaluations, and it is paired with itself at exactly zero.
    ref = next(p for p in result["points"] if p["sampler"] == "dds" and p["steps"] == 100)
    assert ref["nfe"] == 100 and ref["paired_psnr_diff"] == {"mean": 0.0, "se": 0.0}
    # The tuning slices are not the reported ones.
    assert not set(result["tuning_slices"]) & set(result["reported_slices"])
    assert all(p["num_slices"] == len(result["reported_slices"]) for p in result["points"])


def test_readme_quotes_the_committed_preset_and_gap():
    result = _strict_json(RESULT)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Fast reconstruction", 1)[1].split("\n## ", 1)[0]
    fast = result["fast_preset"]
    gap = f"{fast['paired_psnr_diff']['mean']:+.2f} ± {fast['paired_psnr_diff']['se']:.2f}"
    assert gap in section
    assert f"--preset fast" in section and "benchmarks/results/nfe_quality.png" in section
    for flag, key in (("--num_steps", "num_steps"), ("--eta", "eta"), ("--gamma", "gamma")):
        assert re.search(rf"{flag} {PRESETS['fast'][key]:g}\b", section), flag


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
