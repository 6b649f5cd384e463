"""Fault injection on the reconstruction side: the real ``recon_complex_multi.py`` on tiny data, reproducing the
everyday mistakes of issue 12 and asserting the right behaviour.

- other settings into the same ``--save_dir``: a new folder (default names carry a hash), or a refusal naming the
  differing settings (explicit ``--tag``), never the old numbers;
- a NaN slice / a NaN reconstruction: reported, counted as failed, exit status 1, ``summary.json`` strict JSON;
- bad arguments: one line, exit 2, no output folder;
- shards run separately: incomplete volumes marked until every shard is done, then the one-process summary;
- a LoRA run trained on the ``skm-tea`` base: that base is used unless a contradicting flag is given (refused);
- ``--noise_sigma``: the measured noise has the asked-for std and is the same for every method.

Most runs call the script's ``main()`` in-process (same code, no interpreter start-up); the checks that are about the
process itself (exit status, one stderr line, no traceback, shards launched separately) run it as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.training_helpers import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "recon_complex_multi.py")
CROP = 32


def _strict_json(path: Path) -> dict:
    """Parse as strict JSON: a NaN/Infinity token fails the test."""
    def refuse(token: str):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _errors(stderr: str) -> list[str]:
    """The stderr lines other than the script's notes (what it resolved from the run's config)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("recon_complex_multi.py: note:")]


def _subprocess(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _main(args: list[str]) -> int:
    import recon_complex_multi

    return recon_complex_multi.main([str(a) for a in args])


def _make_model(folder: Path, **overrides) -> Path:
    """A (random-weight) training output folder written by the training code's own export."""
    from utils.training.config import TrainConfig
    from utils.training.export import save_inference_snapshot
    from utils.training.model import build_components

    fields = dict(unet_config=str(REPO / "configs" / "unet" / "compact.json"), text_encoder_type="none",
                  unconditional=True, resolution=CROP, seed=0)
    fields.update(overrides)
    config = TrainConfig(**fields)
    parts = build_components(config)
    save_inference_snapshot(parts.model, parts.scheduler, config, folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Validation data (2 volumes x 3 slices, 32x32, 2 coils) and a tiny metadata-conditioned model (random
    weights); its stats file is found through the run's run_config.json."""
    from utils.preprocessing.stats import write_stats_from_csvs

    root = tmp_path_factory.mktemp("faults_recon")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread; restored after the module
    csv = write_tiny_dataset(root / "data", "brain", split="val", num_files=2, slices_per_file=3, crop=CROP, coils=2,
                             seed=5)
    write_stats_from_csvs([csv], root / "stats.json")
    model = _make_model(root / "model", unconditional=False, enable_condition_emb=True,
                        metadata_stats=str(root / "stats.json"))
    base = ["--data_root", root / "data", "--load_dir_meta_brain", csv, "--no_png"]
    yield SimpleNamespace(root=root, data=root / "data", csv=csv, model=model, base=base,
                          diff=[*base, "--finetune_folder", model, "--enable_condition_emb"])
    torch.set_num_threads(threads)


def _dirs(save_dir: Path) -> list[Path]:
    return sorted(p for p in (save_dir / "uniform1d" / "acc_4").iterdir() if p.is_dir())


def test_other_settings_never_reuse_old_results(tiny, capsys):
    save = tiny.root / "identity"
    diff = [*tiny.diff, "--num_steps", "2", "--end_idx", "2", "--save_dir", save]
    assert _main(diff + ["--seed", "0"]) == 0
    first = _dirs(save)
    assert len(first) == 1 and first[0].name.startswith("dds_steps2_w1_n1-")
    assert _strict_json(first[0] / "run.json")["stats"]["name"] == "stats.json"  # the run's own stats file
    rows_before = {p: p.read_bytes() for p in (first[0] / "rows").rglob("*.json")}
    # each of these changes the result: each gets its own folder, nothing of the first run is reused or rewritten
    for extra in (["--seed", "1"], ["--gamma", "9"], ["--mismatch_metadata"]):
        assert _main(diff + extra) == 0
    folders = _dirs(save)
    assert len(folders) == 4 and len({p.name.split("-")[-1] for p in folders}) == 4
    assert {p: p.read_bytes() for p in (first[0] / "rows").rglob("*.json")} == rows_before
    seeds = {_strict_json(p / "run.json")["settings"]["seed"] for p in folders}
    assert seeds == {0, 1}
    # a setting that cannot change the result (batch size) resumes the same folder: nothing is recomputed
    stamp = {p: p.stat().st_mtime_ns for p in (first[0] / "recon").rglob("*.npy")}
    assert _main(diff + ["--seed", "0", "--batch_size", "2"]) == 0
    assert len(_dirs(save)) == 4
    assert {p: p.stat().st_mtime_ns for p in (first[0] / "recon").rglob("*.npy")} == stamp

    # explicit --tag: another fingerprint is refused, naming the differing settings; the folder is left as it was
    tagged = diff + ["--tag", "mine"]
    assert _main(tagged + ["--seed", "0"]) == 0
    run_json = (save / "uniform1d" / "acc_4" / "mine" / "run.json").read_bytes()
    capsys.readouterr()
    assert _main(tagged + ["--seed", "1", "--mismatch_metadata"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "seed: 0 -> 1" in err[0] and "mismatch_metadata: false -> true" in err[0]
    assert (save / "uniform1d" / "acc_4" / "mine" / "run.json").read_bytes() == run_json
    # --overwrite recomputes with the new settings: the same numbers as the default folder of those settings
    assert _main(tagged + ["--seed", "1", "--overwrite"]) == 0
    mine = save / "uniform1d" / "acc_4" / "mine"
    assert _strict_json(mine / "run.json")["settings"]["seed"] == 1
    seed1 = next(p for p in folders if _strict_json(p / "run.json")["settings"] == _strict_json(mine / "run.json")
                 ["settings"])
    for npy in (seed1 / "recon").rglob("*.npy"):
        np.testing.assert_allclose(np.load(mine / "recon" / npy.relative_to(seed1 / "recon")), np.load(npy),
                                   rtol=1e-5, atol=1e-5)


def test_every_result_setting_changes_the_fingerprint_and_no_other_does():
    from utils.recon_settings import ReconSettings
    from utils.run_identity import run_fingerprint

    base = ReconSettings(method="diffusion")
    ref = run_fingerprint(base)["hash"]
    changes = dict(seed=1, gamma=9.0, eta=0.5, cg_iter=3, num_steps=50, num_samples=2, guidance_scale=2.0,
                   drop_metadata_keys=["TE"], metadata_override={"contrast": "T1"}, mismatch_metadata=True,
                   noise_sigma=0.01, acc_factor=8.0, center_fraction=0.1, mask_type="gaussian1d", clip_x0=1.5,
                   mixed_precision="bf16", sampler="dps")
    hashes = {k: run_fingerprint(ReconSettings(**{**vars(base), k: v}))["hash"] for k, v in changes.items()}
    assert ref not in hashes.values() and len(set(hashes.values())) == len(changes)
    for k, v in dict(batch_size=4, save_png=False, tag="x", cs_lambda=0.1, dps_step=3.0,
                     center_fraction=0.08).items():  # 0.08 is the default at 4x: the same masks
        assert run_fingerprint(ReconSettings(**{**vars(base), k: v}))["hash"] == ref, k


def test_a_changed_model_is_a_different_run(tiny, tmp_path):
    save = tmp_path / "res"
    other = _make_model(tmp_path / "other_model", seed=1)
    args = [*tiny.base, "--num_steps", "1", "--end_idx", "3", "--save_dir", save, "--tag", "t"]
    assert _main(args + ["--finetune_folder", tiny.model, "--enable_condition_emb"]) == 0
    assert _main(args + ["--finetune_folder", other]) == 2  # same tag, other weights: refused


def test_nan_slice_is_reported_and_the_run_fails(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    csv = write_tiny_dataset(data, "brain", split="val", num_files=2, slices_per_file=3, crop=CROP, coils=2, seed=5)
    bad = data / "brain_mvue_32_val" / "slice" / "file_brain_val_000" / "001.npy"
    img = np.load(bad)
    img[4:8, 4:8] = np.nan
    np.save(bad, img)
    rc = _main(["--data_root", data, "--load_dir_meta_brain", csv, "--crop_size", CROP, "--method", "zero_filled",
                "--no_png", "--save_dir", tmp_path / "res"])
    stdout = capsys.readouterr().out
    assert rc == 1, stdout
    assert "FAILED: 1 slice(s)" in stdout and "file_brain_val_000 slice 1" in stdout
    out = _dirs(tmp_path / "res")[0]
    summary = _strict_json(out / "summary.json")
    assert summary["num_slices_failed"] == 1 and summary["num_volumes_failed"] == 1
    assert summary["num_volumes"] == 1 and summary["num_slices"] == 3  # only the intact volume is scored
    assert summary["volumes"][0]["status"] == "failed" and summary["volumes"][1]["status"] == "scored"
    row = _strict_json(out / "rows" / "file_brain_val_000" / "001.json")
    assert row["status"] == "failed" and row["failure"] == "input" and "non-finite" in row["reason"]
    assert row.get("contextmri_psnr") is None


def test_nan_reconstruction_is_flagged_not_dropped(tmp_path):
    """A method that returns NaN for one slice: the row says so and the summary counts it (runner level)."""
    from utils.channels import complex_to_channels
    from utils.recon_settings import ReconSettings
    from utils.recon_summary import summarize
    from utils.reconstruction import run_reconstruction

    rng = np.random.default_rng(0)
    maps = np.ones((1, 16, 16), np.complex64)
    items = [SimpleNamespace(image=complex_to_channels(torch.from_numpy(
        (rng.random((16, 16)) + 0.5).astype(np.complex64))[None])[0], maps=torch.from_numpy(maps),
        filename=f"f{f}", slice_idx=s, record={}, prompt="") for f in range(2) for s in range(2)]

    def diffusion(y, op, records, prompts, generators):
        x = op.adjoint(y)
        if len(y) == 1 and generators[0].initial_seed() % 2 == 0:  # deterministic: some slices fail
            x = x * float("nan")
        return x, 1

    from utils.masks import seed_from_name
    expected_bad = {(it.filename, it.slice_idx) for it in items if seed_from_name(it.filename, it.slice_idx) % 2 == 0}
    assert 0 < len(expected_bad) < 4
    settings = ReconSettings(method="diffusion", num_steps=1, save_png=False)
    out = run_reconstruction(items, settings, tmp_path, diffusion=diffusion, progress=False)
    summary = summarize(out, items)
    assert summary["num_slices_failed"] == len(expected_bad)
    assert {(f["filename"], f["slice"]) for f in summary["failed"]} == expected_bad
    assert all(f["failure"] == "output" for f in summary["failed"])
    scored = [v for v in summary["volumes"] if v["status"] == "scored"]
    assert summary["num_volumes"] == len(scored) == summary["fastmri_psnr"]["n"]
    _strict_json(out / "summary.json")


BAD_ARGS = [
    (["--acc_factor", "0"], "--acc_factor"),
    (["--acc_factor", "-4"], "--acc_factor"),
    (["--acc_factor", "nan"], "--acc_factor"),
    (["--acc_factor", "1"], "--acc_factor"),
    (["--acc_factor", "1000"], "leaves 0 of the 32"),
    (["--center_fraction", "2"], "--center_fraction"),
    (["--center_fraction", "0.6"], "exceeds"),
    (["--noise_sigma", "-1"], "--noise_sigma"),
    (["--num_steps", "0"], "--num_steps"),
    (["--num_samples", "0"], "--num_samples"),
    (["--mask_type", "equispaced", "--acc_factor", "4.5"], "integer"),
    (["--crop_size", "48"], "trained at 32x32"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGS)
def test_bad_arguments_one_line_exit_2_no_folder(tiny, tmp_path, capsys, extra, message):
    save = tmp_path / "res"
    args = [*tiny.diff, "--save_dir", save, *extra]
    assert _main(args) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert not save.exists()


def test_missing_inputs_and_empty_data(tiny, tmp_path, capsys):
    save = tmp_path / "res"
    zf = ["--method", "zero_filled", "--save_dir", save, "--crop_size", CROP]
    cases = [
        (["--data_root", tmp_path / "nowhere", "--load_dir_meta_brain", tiny.csv, *zf], "is not a folder"),
        (["--data_root", tiny.data, "--load_dir_meta_brain", tmp_path / "missing.csv", *zf], "not found"),
        ([*tiny.base, "--finetune_folder", tmp_path / "no_model", "--save_dir", save], "is not a folder"),
        ([*tiny.base, "--finetune_folder", tiny.model, "--save_dir", save], "pass --enable_condition_emb"),
        ([*tiny.diff, "--metadata_stats", tmp_path / "nope.json", "--save_dir", save], "not found"),
    ]
    for args, message in cases:
        assert _main(args) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0], err
    empty = tmp_path / "empty.csv"
    empty.write_text(tiny.csv.read_text().splitlines()[0] + "\n")  # the header only
    assert _main(["--data_root", tiny.data, "--load_dir_meta_brain", empty, *zf]) == 1
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and ("no rows" in err[0] or "no slices" in err[0]), err
    assert not save.exists()
    # the real process: exit status 2, one line on stderr, no traceback
    proc = _subprocess([*tiny.base, "--method", "zero_filled", "--acc_factor", "-4", "--save_dir", save])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not save.exists()


def test_shards_run_separately_mark_incomplete_volumes(tiny, tmp_path):
    """Shard 1 in its own process, shard 2 later: until both ran, the summary says a volume is incomplete."""
    zf = [*tiny.base, "--method", "zero_filled", "--crop_size", CROP]
    first = _subprocess([*zf, "--save_dir", tmp_path / "sharded", "--start_idx", "0", "--end_idx", "4"])
    assert first.returncode == 0, first.stderr
    assert "INCOMPLETE: 1 volume(s) lack rows for 2 slice(s)" in first.stdout
    out = _dirs(tmp_path / "sharded")[0]
    partial = _strict_json(out / "summary.json")
    assert partial["complete"] is False and partial["num_volumes"] == 1 and partial["num_slices"] == 3
    assert [v["complete"] for v in partial["volumes"]] == [True, False]
    assert partial["volumes"][1]["num_missing"] == 2 and partial["volumes"][1].get("fastmri_psnr") is None
    assert _main([*zf, "--save_dir", tmp_path / "sharded", "--start_idx", "4"]) == 0  # the other shard, later
    assert [p.name for p in _dirs(tmp_path / "sharded")] == [out.name]  # both shards agree on the run's identity
    merged = _strict_json(out / "summary.json")
    assert _main([*zf, "--save_dir", tmp_path / "one"]) == 0
    one = _strict_json(_dirs(tmp_path / "one")[0] / "summary.json")
    assert merged["complete"] is True and merged["num_volumes"] == one["num_volumes"] == 2
    for key in ("fastmri_psnr", "fastmri_ssim", "contextmri_psnr", "acceleration"):
        assert merged[key]["mean"] == pytest.approx(one[key]["mean"], rel=1e-9)
    assert len(_strict_json(out / "command.json")) == 2  # both invocations are recorded, neither overwritten


def test_lora_run_uses_its_own_base_model_type(tiny, tmp_path, capsys):
    from models.tiny_assets import make_fake_released_checkpoint
    from models.unet import build_unet
    from utils.diffusion_recon import load_reconstruction_model, resolve_model_plan

    released = make_fake_released_checkpoint(tmp_path / "MRI_checkpoint", unet_config=str(
        REPO / "configs" / "unet" / "compact.json"))
    torch.manual_seed(7)  # skm-tea gets other weights than fastmri
    build_unet(str(REPO / "configs" / "unet" / "compact.json")).save_pretrained(released / "skm-tea")
    lora = _make_model(tmp_path / "lora_run", unet_config=None, pretrained_model_name_or_path=str(released),
                       pretrained_model_type="skm-tea", use_lora=True, lora_rank=2)
    plan = resolve_model_plan(None, None, str(lora), None)
    assert plan.model_type == "skm-tea" and plan.is_lora
    unet, _, _ = load_reconstruction_model(plan.base, plan.model_type, plan.finetune_folder)
    from diffusers import UNet2DConditionModel

    skm = UNet2DConditionModel.from_pretrained(released / "skm-tea").conv_in.weight
    fastmri = UNet2DConditionModel.from_pretrained(released / "fastmri").conv_in.weight
    assert torch.equal(unet.conv_in.weight, skm) and not torch.equal(skm, fastmri)

    args = [*tiny.base, "--finetune_folder", lora, "--num_steps", "1", "--end_idx", "1",
            "--save_dir", tmp_path / "res"]
    capsys.readouterr()
    assert _main(args + ["--pretrained_model_type", "fastmri"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "skm-tea" in err[0] and "LoRA" in err[0]
    assert _main(args) == 0
    run = _strict_json(_dirs(tmp_path / "res")[0] / "run.json")
    assert run["model"]["model_type"] == "skm-tea"
    assert any(name.startswith("base/skm-tea/") for name in run["model"]["files"])


def test_noise_sigma_has_the_asked_for_std_and_is_the_same_for_every_method():
    from utils.channels import complex_to_channels
    from utils.measurement import simulate_measurement
    from utils.recon_settings import ReconSettings

    h = w = 64
    rng = np.random.default_rng(3)
    img = (rng.random((h, w)) + 1j * rng.random((h, w))).astype(np.complex64)
    maps = (rng.random((4, h, w)) + 1j * rng.random((4, h, w))).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    item = SimpleNamespace(image=complex_to_channels(torch.from_numpy(img)[None])[0], maps=torch.from_numpy(maps),
                           filename="file_x.h5", slice_idx=3)
    sigma = 0.05
    clean = simulate_measurement([item], ReconSettings(method="zero_filled", acc_factor=2))
    noisy = simulate_measurement([item], ReconSettings(method="zero_filled", acc_factor=2, noise_sigma=sigma))
    n = (noisy.y - clean.y)[0]
    lines = clean.mask[0, 0, 0] > 0
    measured, unmeasured = n[:, :, lines], n[:, :, ~lines]
    assert measured.numel() == 4 * h * 32 and torch.all(unmeasured == 0)
    assert float(measured.abs().pow(2).mean().sqrt()) == pytest.approx(sigma, rel=0.03)  # E|n|^2 = sigma^2
    assert float(measured.real.std()) == pytest.approx(sigma / np.sqrt(2), rel=0.04)
    assert float(measured.imag.std()) == pytest.approx(sigma / np.sqrt(2), rel=0.04)
    assert abs(float(measured.real.mean())) < 4 * sigma / np.sqrt(2 * measured.numel())
    # the noise depends on (file, slice) only: the same for another method, seed or sampler settings
    for other in (ReconSettings(method="cs", acc_factor=2, noise_sigma=sigma),
                  ReconSettings(method="diffusion", acc_factor=2, noise_sigma=sigma, seed=5, gamma=1, num_samples=3)):
        assert torch.equal(simulate_measurement([item], other).y, noisy.y)
    other_slice = SimpleNamespace(**{**vars(item), "slice_idx": 4})
    assert not torch.equal(simulate_measurement([other_slice], ReconSettings(
        method="zero_filled", acc_factor=2, noise_sigma=sigma)).y - simulate_measurement(
        [other_slice], ReconSettings(method="zero_filled", acc_factor=2)).y, n[None])
