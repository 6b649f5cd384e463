"""The reconstruction runner and ``recon_complex_multi.py``: baselines, resume, ensembles, sharding, script smoke."""

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

from utils.channels import channels_to_complex, complex_to_channels
from utils.diffusion_recon import DiffusionReconstructor
from utils.recon_settings import ReconSettings
from utils.recon_summary import summarize
from utils.reconstruction import run_reconstruction
from utils.samplers import DiffusionSchedule

REPO = Path(__file__).resolve().parents[1]
H = W = 32


def _dataset(num_files: int = 2, num_slices: int = 2) -> list[SimpleNamespace]:
    import sigpy.mri as mr

    maps = mr.birdcage_maps((4, H, W)).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    yy, xx = np.mgrid[:H, :W]
    items = []
    for f in range(num_files):
        for s in range(num_slices):
            body = ((yy - 16) ** 2 / (90 + 15 * s) + (xx - 16) ** 2 / 60) < 1
            img = (body * (1 + 0.4 * np.sin(xx / 3 + f) * np.cos(yy / 4))).astype(np.complex64)
            items.append(SimpleNamespace(
                image=complex_to_channels(torch.from_numpy(img)[None])[0], maps=torch.from_numpy(maps),
                filename=f"file_{f}", slice_idx=s, record={"contrast": "T2", "TE": 100.0}, prompt="brain, T2",
            ))
    return items


def test_cs_beats_zero_filled_and_summaries_are_written(tmp_path):
    data = _dataset()
    results = {}
    for method in ("zero_filled", "cs"):
        settings = ReconSettings(method=method, mask_type="uniform1d", acc_factor=4, batch_size=2, save_png=False)
        out = run_reconstruction(data, settings, tmp_path, progress=False)
        results[method] = summarize(out, data)
        assert {"summary.json", "summary.csv", "slices.csv", "settings.json"} <= set(os.listdir(out))
        assert results[method]["num_volumes"] == 2 and results[method]["num_slices"] == 4
        assert results[method]["acceleration"]["mean"] == pytest.approx(4.0, abs=0.1)
    assert results["cs"]["fastmri_psnr"]["mean"] > results["zero_filled"]["fastmri_psnr"]["mean"] + 1.0
    assert results["cs"]["fastmri_nmse"]["mean"] < results["zero_filled"]["fastmri_nmse"]["mean"]


def test_every_method_sees_the_same_mask(tmp_path):
    data = _dataset(1, 1)
    rows = []
    for method in ("zero_filled", "cs"):
        out = run_reconstruction(data, ReconSettings(method=method, save_png=False), tmp_path, progress=False)
        rows.append(json.loads((out / "rows" / "file_0" / "000.json").read_text()))
    assert rows[0]["acceleration"] == rows[1]["acceleration"]
    assert rows[0]["num_center_lines"] == rows[1]["num_center_lines"]


def test_resume_skips_finished_slices(tmp_path):
    data = _dataset()
    settings = ReconSettings(method="zero_filled", save_png=False)
    out = run_reconstruction(data, settings, tmp_path, progress=False)
    kept = out / "recon" / "file_0" / "000.npy"
    stamp = kept.stat().st_mtime_ns
    (out / "rows" / "file_1" / "001.json").unlink()  # as if the run had been killed before this slice
    (out / "recon" / "file_1" / "001.npy").unlink()
    run_reconstruction(data, settings, tmp_path, progress=False)
    assert kept.stat().st_mtime_ns == stamp  # finished slice untouched
    assert (out / "recon" / "file_1" / "001.npy").is_file()
    assert summarize(out, data)["num_slices"] == 4


class _OracleUNet(torch.nn.Module):
    """ε from the known ground truth: ε = (x_t − √ᾱ_t x0)/√(1−ᾱ_t). Counts forwards."""

    def __init__(self, x0: torch.Tensor, acp: torch.Tensor) -> None:
        super().__init__()
        self.x0 = complex_to_channels(x0)
        self.acp = acp
        self.calls = 0

    def forward(self, x, t, encoder_hidden_states=None):
        self.calls += 1
        a = self.acp[t].view(-1, 1, 1, 1).to(x.dtype)
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1)
        return SimpleNamespace(sample=(x - a.sqrt() * x0) / (1 - a).sqrt())


class _NullConditioner(torch.nn.Module):
    def build(self, records, prompts=None, drop_all=False, drop_keys=None, generator=None):
        return torch.zeros(len(records), 1, 4)

    def unconditional(self, records=None, batch_size=None):
        return torch.zeros(len(records), 1, 4)


def test_diffusion_ensemble_of_identical_samples_has_zero_std_and_recovers_truth(tmp_path):
    data = _dataset(1, 1)
    x0 = channels_to_complex(data[0].image[None])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - betas, 0)
    unet = _OracleUNet(x0, acp)
    recon = DiffusionReconstructor(unet, _NullConditioner(), DiffusionSchedule(acp), num_steps=10, eta=0.0)
    settings = ReconSettings(method="diffusion", num_steps=10, eta=0.0, num_samples=3, save_png=True)
    out = run_reconstruction(data, settings, tmp_path, diffusion=recon, progress=False)
    std = np.load(out / "std" / "file_0" / "000.npy")
    assert np.abs(std).max() < 1e-5
    rec = np.load(out / "recon" / "file_0" / "000.npy")
    assert np.linalg.norm(rec - x0[0].numpy()) / np.linalg.norm(x0[0].numpy()) < 1e-3
    row = json.loads((out / "rows" / "file_0" / "000.json").read_text())
    assert row["nfe"] == 3 * 10 and unet.calls == 30
    assert (out / "png" / "file_0_000.png").stat().st_size > 0


def _one_dir(parent: Path, pattern: str) -> Path:
    """The single output folder matching ``pattern`` (default folders are a readable tag plus a short hash)."""
    found = sorted(parent.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """Generator -> pre_processing_final.py on a tiny validation set (real scripts)."""
    from tests._synthetic import FAST_ESPIRIT_ARGS, FASTMRI_CROP, generate_fastmri

    root = tmp_path_factory.mktemp("recon_e2e")
    generate_fastmri(root / "raw", num_volumes=2, num_slices=2)
    _run([sys.executable, str(REPO / "pre_processing_final.py"), "--input_dir", str(root / "raw"), "--output_root",
          str(root / "fastmri"), "--crop_size", str(FASTMRI_CROP), "--no_progress", *FAST_ESPIRIT_ARGS], root)
    return root, FASTMRI_CROP


def test_recon_script_zero_filled_and_cs(processed):
    root, crop = processed
    base = [sys.executable, str(REPO / "recon_complex_multi.py"), "--data_root", str(root / "fastmri"),
            "--load_dir_meta_brain", str(root / "fastmri" / "metadata_brain_val.csv"), "--crop_size", str(crop),
            "--save_dir", str(root / "results"), "--acc_factor", "4", "--no_png"]
    for method in ("zero_filled", "cs"):
        proc = _run(base + ["--method", method, "--cs_iter", "30"], root)
        assert "fastmri_psnr" in proc.stdout
    zf = json.loads((_one_dir(root / "results" / "uniform1d" / "acc_4", "zero_filled-*") / "summary.json").read_text())
    cs = json.loads((_one_dir(root / "results" / "uniform1d" / "acc_4", "cs-*") / "summary.json").read_text())
    assert cs["fastmri_psnr"]["mean"] > zf["fastmri_psnr"]["mean"]


def test_recon_script_rejects_bad_input(processed, tmp_path):
    root, crop = processed
    proc = subprocess.run(
        [sys.executable, str(REPO / "recon_complex_multi.py"), "--data_root", str(root / "fastmri"),
         "--load_dir_meta_brain", str(tmp_path / "missing.csv")],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "not found" in (proc.stderr + proc.stdout)


def test_two_process_run_matches_one_process(processed):
    """Sharded over 2 CPU processes (accelerate launch, gloo), the merged summary equals the 1-process one."""
    root, crop = processed
    args = ["--data_root", str(root / "fastmri"), "--load_dir_meta_brain",
            str(root / "fastmri" / "metadata_brain_val.csv"), "--crop_size", str(crop), "--method", "zero_filled",
            "--no_png", "--acc_factor", "8"]
    _run([sys.executable, str(REPO / "recon_complex_multi.py"), *args, "--save_dir", str(root / "one")], root)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          str(REPO / "recon_complex_multi.py"), *args, "--save_dir", str(root / "two")], root)
    one_dir = _one_dir(root / "one" / "uniform1d" / "acc_8", "zero_filled-*")
    two_dir = _one_dir(root / "two" / "uniform1d" / "acc_8", "zero_filled-*")
    assert one_dir.name == two_dir.name  # the same run identity in one process and in two
    one = json.loads((one_dir / "summary.json").read_text())
    two = json.loads((two_dir / "summary.json").read_text())
    for key in ("fastmri_psnr", "fastmri_ssim", "contextmri_psnr", "acceleration"):
        assert two[key]["mean"] == pytest.approx(one[key]["mean"], rel=1e-6)
    assert two["num_slices"] == one["num_slices"] == 4 and two["complete"] and one["complete"]
    # really sharded: the main process saw 2 processes (each reconstructed half of the slices)
    assert json.loads((two_dir / "command.json").read_text())[-1]["num_processes"] == 2


def test_a_tagged_folder_of_another_run_is_refused_then_overwritten_only_with_consent(tmp_path):
    from utils.run_identity import RunMismatchError, read_fingerprint

    data = _dataset(1, 2)
    first = ReconSettings(method="cs", cs_iter=5, save_png=False, tag="mine")
    out = run_reconstruction(data, first, tmp_path, progress=False)
    (out / "notes.txt").write_text("the user's own file")
    second = ReconSettings(method="cs", cs_iter=6, save_png=False, tag="mine")
    with pytest.raises(RunMismatchError, match=r"cs_iter: 5 -> 6"):
        run_reconstruction(data, second, tmp_path, progress=False)
    assert read_fingerprint(out)["settings"]["cs_iter"] == 5
    assert json.loads((out / "settings.json").read_text())["cs_iter"] == 5  # never rewritten over its results
    run_reconstruction(data, second, tmp_path, progress=False, overwrite=True)
    assert read_fingerprint(out)["settings"]["cs_iter"] == 6
    assert json.loads((out / "settings.json").read_text())["cs_iter"] == 6
    assert (out / "notes.txt").read_text() == "the user's own file"  # only what a run writes is cleared
    # results of an older version (no run.json) are of unknown settings: refused too
    (out / "run.json").unlink()
    with pytest.raises(RunMismatchError, match="without a run.json"):
        run_reconstruction(data, second, tmp_path, progress=False)
