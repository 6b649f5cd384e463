"""Fault injection on the training side (issue 12): mixed runs, damaged checkpoints, killed exports, flipped bytes,
NaN data. Real entry points on a tiny from-scratch model, 32x32 slices, two steps: ``train_mri.py`` in a subprocess
for the NaN stop (exit status, message, what is left on disk), ``utils.training.main`` (the script's ``main``, without
the ~15 s of imports a subprocess costs on 2 shared cores) otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 32x32 brain slices (one batch of 2) and a copy where slice 1 holds a NaN block."""
    from utils.preprocessing.layout import dataset_dir, slice_paths

    root = tmp_path_factory.mktemp("faults")
    good = write_tiny_dataset(root / "good", "brain", num_files=1, slices_per_file=2, crop=32)
    bad = write_tiny_dataset(root / "bad", "brain", num_files=1, slices_per_file=2, crop=32)
    image_path, _ = slice_paths(dataset_dir(root / "bad", "brain", 32, "train"), "file_brain_train_000", 1)
    image = np.load(image_path)
    image[4:8, 4:8] = np.nan
    np.save(image_path, image)
    return {"good": (root / "good", good), "bad": (root / "bad", bad)}


def _args(data, out, *extra, which="good") -> list[str]:
    root, csv = data[which]
    return ["--unet_config", "tiny", "--text_encoder_type", "none", "--unconditional", "--data_root", str(root),
            "--mri_metadata_dir_brain", str(csv), "--resolution", "32", "--train_batch_size", "2",
            "--dataloader_num_workers", "0", "--report_to", "none", "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--learning_rate", "1e-3", "--output_dir", str(out), *extra]


def _script(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "train_mri.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


def _main(args: list[str], callback=None) -> int:
    """``train_mri.py``'s entry in process (optionally with a step callback, through ``train``)."""
    from utils.training import main
    from utils.training.config import parse_config
    from utils.training.loop import train

    if callback is None:
        return main(argv=args)
    train(parse_config(args), step_callback=callback)
    return 0


def _unet_file(out: Path) -> Path:
    return out / "unet" / "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------- one run per output folder
def test_other_run_refused_naming_the_field_then_overwrite_replaces_it(data, tmp_path, one_thread, capsys):
    from models.loading import verify_export

    out = tmp_path / "run"
    assert _main(_args(data, out)) == 0
    first = load_file(str(_unet_file(out)))
    record = (out / "weights.sha256.json").read_text()

    capsys.readouterr()
    assert _main(_args(data, out, "--seed", "7", "--learning_rate", "2e-3")) == 2  # exit status of train_mri.py
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "differs in learning_rate, seed" in err and "--seed 7 (there: 42)" in err
    assert "--overwrite_output_dir" in err
    assert (out / "weights.sha256.json").read_text() == record  # the old run is untouched
    verify_export(out)

    # Not part of a run's identity (checkpoint frequency): the same run, resumed (already finished: re-exported).
    assert _main(_args(data, out, "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest")) == 0
    assert all(torch.equal(v, load_file(str(_unet_file(out)))[k]) for k, v in first.items())

    assert _main(_args(data, out, "--seed", "7", "--overwrite_output_dir")) == 0
    for step in (1, 2):
        assert json.loads((out / f"checkpoint-{step}" / "run_config.json").read_text())["seed"] == 7
    assert json.loads((out / "run_config.json").read_text())["seed"] == 7
    verify_export(out)
    second = load_file(str(_unet_file(out)))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # really the new run's weights


# ---------------------------------------------------------------------------------------------- damaged checkpoint
def test_truncated_latest_checkpoint_is_skipped_and_the_previous_one_used(data, tmp_path, one_thread, caplog):
    out = tmp_path / "run"
    assert _main(_args(data, out)) == 0
    reference = load_file(str(_unet_file(out)))
    weights = out / "checkpoint-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    steps = []
    with caplog.at_level("WARNING"):
        _main(_args(data, out, "--resume_from_checkpoint", "latest"), callback=lambda info: steps.append(info))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "checkpoint-2" in warnings[0] and "trainable.safetensors" in warnings[0]
    assert [s.global_step for s in steps] == [1]  # resumed after step 1 and redid step 2 only
    resumed = load_file(str(_unet_file(out)))  # deterministic: the same weights as the uninterrupted run
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    load_file(str(weights))  # rewritten whole


# ------------------------------------------------------------------------------------------------ killed export
class _Killed(Exception):
    pass


def test_export_killed_between_files_is_not_a_model(data, tmp_path, one_thread, monkeypatch):
    import utils.training.export as export
    from models.loading import IncompleteExportError, load_trained_model
    from utils.training.run_folder import seal_legacy_export

    out = tmp_path / "run"
    real_move = export._move_into_place
    moved = []

    def move_then_die(staged, target, name):
        if moved:
            raise _Killed(f"killed while moving {name}")
        moved.append(name)
        real_move(staged, target, name)

    monkeypatch.setattr(export, "_move_into_place", move_then_die)
    with pytest.raises(_Killed):
        _main(_args(data, out), callback=lambda info: None)
    monkeypatch.undo()
    assert moved == ["unet"] and _unet_file(out).is_file()  # the weights are there, the rest is not
    with pytest.raises(IncompleteExportError, match="incomplete export.*--resume_from_checkpoint latest"):
        load_trained_model(out)
    with pytest.raises(ValueError, match="not a complete export: missing run_config.json"):
        seal_legacy_export(out)
    # The same command with --resume_from_checkpoint latest finishes the export from the last checkpoint.
    assert _main(_args(data, out, "--resume_from_checkpoint", "latest")) == 0
    assert load_trained_model(out).unet is not None and not (out / ".export.tmp").exists()


def test_folder_without_record_is_refused_and_a_legacy_export_can_be_sealed(data, tmp_path, one_thread):
    import shutil

    from models.loading import IncompleteExportError, load_trained_model
    from utils.training.run_folder import main as run_folder_main

    out = tmp_path / "run"
    assert _main(_args(data, out)) == 0
    (out / "weights.sha256.json").unlink()  # what a model exported before records existed looks like
    with pytest.raises(IncompleteExportError, match="incomplete export"):
        load_trained_model(out)
    assert run_folder_main(["--seal", str(out)]) == 0  # the user vouches that it finished
    assert load_trained_model(out).unet is not None

    for name in ("unet", "scheduler", "run_config.json", "weights.sha256.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(IncompleteExportError, match="no exported model yet.*--resume_from_checkpoint latest"):
        load_trained_model(out)
    assert run_folder_main(["--seal", str(out)]) == 2  # nothing to seal: refused


# ----------------------------------------------------------------------------------------------------- flipped bytes
def _flip_after_header(path: Path, pattern: bytes = b"\xff" * 8) -> None:
    """Overwrite bytes in the middle of a safetensors file's data (the JSON header stays intact)."""
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    at = header_end + (len(raw) - header_end) // 2
    raw[at:at + len(pattern)] = pattern
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_exported_weights_give_one_clear_error(data, tmp_path, one_thread):
    from models.loading import CorruptExportError, load_trained_model

    out = tmp_path / "run"
    assert _main(_args(data, out)) == 0
    _flip_after_header(_unet_file(out), b"\x12\x34\x56\x78")
    load_file(str(_unet_file(out)))  # safetensors itself still reads it: only the hash can tell
    with pytest.raises(CorruptExportError) as err:
        load_trained_model(out)
    assert str(_unet_file(out)) in str(err.value) and "sha256" in str(err.value)
    assert "scheduler" not in str(err.value)  # only the damaged file is named


def test_released_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    from models.tiny_assets import make_fake_released_checkpoint
    from models.unet import load_released_checkpoint

    ckpt = make_fake_released_checkpoint(tmp_path / "MRI_checkpoint", model_types=("fastmri",))
    load_released_checkpoint(ckpt, "fastmri", load_text_encoder=False)  # intact: loads
    weights = next((ckpt / "fastmri").glob("*.safetensors"))
    _flip_after_header(weights)  # 8 bytes 0xff: at least one whole float32 NaN
    with pytest.raises(ValueError, match=r"damaged weights in .*fastmri: non-finite values in"):
        load_released_checkpoint(ckpt, "fastmri", load_text_encoder=False)


# ---------------------------------------------------------------------------------------------------- NaN in the data
def test_nan_image_stops_training_with_the_message_and_exports_nothing(data, tmp_path):
    out = tmp_path / "run"
    proc = _script(_args(data, out, which="bad"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
    assert "non-finite loss" in line and "optimiser step 1" in line
    assert "non-finite pixel values in: file_brain_train_000 slice 1" in line
    assert not list(out.glob("checkpoint-*"))  # checkpointing_steps 1: step 1 never completed
    for name in ("unet", "run_config.json", "weights.sha256.json", ".export.tmp"):
        assert not (out / name).exists(), name


def test_non_finite_gradient_norm_stops_before_the_step(data, tmp_path, one_thread, monkeypatch):
    from accelerate import Accelerator

    from utils.training.config import NonFiniteLossError

    calls = []

    def inf_norm(self, parameters, max_norm, norm_type=2):
        calls.append(max_norm)
        return torch.tensor(float("inf"))

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", inf_norm)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(inf\) at optimiser step 1"):
        _main(_args(data, out), callback=lambda info: None)
    assert calls and not list(out.glob("checkpoint-*")) and not (out / "unet").exists()
