"""End-to-end tests of train_mri.py / train_mri_ood.py on tiny data (tiny UNet, 32x32, a few steps).

Threads: the runs use one intra-op thread (``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)``); on 2 shared cores
two threads per process oversubscribe and run ~10x slower for a model this small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import write_tiny_dataset
from utils.training.config import ConfigError, OODTrainConfig, TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny released checkpoint, brain/knee/cardiac train sets, a brain val set and stats files."""
    from models.tiny_assets import make_fake_released_checkpoint
    from utils.preprocessing.stats import write_stats_from_csvs

    root = tmp_path_factory.mktemp("mri")
    csv = {
        "brain": write_tiny_dataset(root, "brain", num_files=2, slices_per_file=3),
        "knee": write_tiny_dataset(root, "knee", num_files=1, slices_per_file=2, seed=1),
        "cardiac": write_tiny_dataset(root, "cardiac", num_files=2, slices_per_file=4, seed=2),
        "val": write_tiny_dataset(root, "brain", split="val", num_files=1, slices_per_file=2, coils=3, seed=3),
    }
    write_stats_from_csvs([csv["brain"], csv["knee"]], root / "stats.json")
    write_stats_from_csvs([csv["brain"], csv["knee"], csv["cardiac"]], root / "stats_ood.json")
    ckpt = make_fake_released_checkpoint(root / "MRI_checkpoint")
    return {"root": root, "csv": csv, "ckpt": ckpt}


def _base_args(assets, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(assets["ckpt"]), "--data_root", str(assets["root"]),
            "--mri_metadata_dir_brain", str(assets["csv"]["brain"]), "--resolution", "32", "--train_batch_size", "2",
            "--dataloader_num_workers", "0", "--output_dir", str(out), "--report_to", "none", *extra]


def _env() -> dict:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": pythonpath,
            "TOKENIZERS_PARALLELISM": "false"}


def _run_cli(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _train(argv, cls=TrainConfig, callback=None):
    from utils.training.loop import train

    return train(parse_config(argv, cls), step_callback=callback)


# --------------------------------------------------------------------------------------------------- script smoke run
def test_train_mri_script_writes_checkpoints_and_loadable_model(assets, tmp_path):
    out = tmp_path / "run"
    args = _base_args(assets, out, "--mri_metadata_dir_knee", str(assets["csv"]["knee"]), "--enable_condition_emb",
                      "--metadata_stats", str(assets["root"] / "stats.json"), "--cfg_strategy", "independent",
                      "--max_train_steps", "5", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                      "--use_ema", "--validation_steps", "5", "--num_validation_slices", "2",
                      "--validation_metadata_brain", str(assets["csv"]["val"]), "--validation_inference_steps", "2",
                      "--report_to", "tensorboard")
    proc = _run_cli([sys.executable, "train_mri.py", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rotation: checkpoint-2 pruned before checkpoint-4 was written
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    ckpt = out / "checkpoint-4"
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "training_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "training_state.json").read_text())["global_step"] == 4
    # trainable = UNet + metadata embedder + text projection; the frozen CLIP is not in the resume state
    names = set(load_file(str(ckpt / "trainable.safetensors")))
    assert any(n.startswith("unet.") for n in names) and any(n.startswith("conditioner.metadata.") for n in names)
    assert not any(n.startswith("conditioner.text.encoder") for n in names)
    # final layout
    for rel in ("unet/config.json", "condition_embedder/config.json", "scheduler/scheduler_config.json",
                "run_config.json"):
        assert (out / rel).is_file(), rel
    assert json.loads((out / "run_config.json").read_text())["max_train_steps"] == 5
    assert list((out / "validation").glob("step-*.png")) and list((out / "logs").rglob("events.out.tfevents*"))
    assert "validation (fastMRI protocol" in proc.stdout + proc.stderr

    from utils.samplers import make_cfg_eps_fn
    from models.loading import load_trained_model

    model = load_trained_model(out)
    assert model.conditioner.metadata is not None and model.conditioner.text is not None
    cond = model.conditioner.build([{"anatomy": "brain", "contrast": "T1"}], ["brain, Slice 1, T1"])
    eps = make_cfg_eps_fn(model.unet, cond, None, 1.0)(torch.randn(1, 2, 32, 32), torch.tensor([500]))
    assert eps.shape == (1, 2, 32, 32) and torch.isfinite(eps).all()


# -------------------------------------------------------------------------------------------------------------- resume
def test_resume_reproduces_uninterrupted_run(assets, tmp_path, one_thread):
    extra = ["--mri_metadata_dir_knee", str(assets["csv"]["knee"]), "--enable_condition_emb", "--metadata_stats",
             str(assets["root"] / "stats.json"), "--max_train_steps", "6", "--checkpointing_steps", "3",
             "--use_ema", "--ema_decay", "0.9", "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
             "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2", "--cfg_prob", "0.5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(_base_args(assets, full, *extra))
    # 8 slices -> 4 batches/epoch -> 2 steps/epoch: checkpoint-3 lies mid-epoch 1 (2 of its 4 batches consumed)
    state = json.loads((full / "checkpoint-3" / "training_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    cut.mkdir()
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")
    steps = []
    _train(_base_args(assets, cut, *extra, "--resume_from_checkpoint", "latest"),
           callback=lambda info: steps.append(info.global_step))
    assert steps and min(steps) == 3 and len(steps) == 6  # continued mid-epoch: 3 steps x 2 micro-batches
    for rel in ("checkpoint-6/trainable.safetensors", "checkpoint-6/ema.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "condition_embedder/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(full / rel)), load_file(str(cut / rel))
        assert a.keys() == b.keys()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= 1e-6, (rel, worst)
    opt_a = torch.load(full / "checkpoint-6" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(cut / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert opt_a["state"][0]["step"] == opt_b["state"][0]["step"] == 6
    assert torch.equal(opt_a["state"][0]["exp_avg_sq"], opt_b["state"][0]["exp_avg_sq"])
    sched_a = torch.load(full / "checkpoint-6" / "scheduler.bin", weights_only=True)
    sched_b = torch.load(cut / "checkpoint-6" / "scheduler.bin", weights_only=True)
    assert sched_a["last_epoch"] == sched_b["last_epoch"] and sched_a["_last_lr"] == sched_b["_last_lr"]


# ------------------------------------------------------------------------------------------------------------- overfit
def test_fixed_batch_overfit_loss_falls(assets, tmp_path, one_thread):
    root = tmp_path / "one"
    csv = write_tiny_dataset(root, "brain", num_files=1, slices_per_file=2, crop=16, seed=7)  # 2 slices = one batch
    losses = []
    argv = ["--unet_config", "tiny", "--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats",
            str(assets["root"] / "stats.json"), "--data_root", str(root), "--mri_metadata_dir_brain", str(csv),
            "--resolution", "16", "--train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none",
            "--output_dir", str(tmp_path / "out"), "--max_train_steps", "40", "--checkpointing_steps", "1000",
            "--learning_rate", "2e-3", "--cfg_prob", "0"]
    _train(argv, callback=lambda info: losses.append(info.loss))
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


# ---------------------------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_embedder(assets, tmp_path, one_thread):
    from models.unet import load_released_checkpoint
    from models.loading import load_trained_model

    out = tmp_path / "lora"
    _train(_base_args(assets, out, "--use_lora", "--lora_rank", "2", "--enable_condition_emb", "--metadata_stats",
                      str(assets["root"] / "stats.json"), "--max_train_steps", "2", "--checkpointing_steps", "2",
                      "--learning_rate", "1e-2"))
    names = set(load_file(str(out / "checkpoint-2" / "trainable.safetensors")))
    assert names and all("lora_" in n or n.startswith("conditioner.metadata.") or n.startswith("conditioner.text.proj")
                         for n in names)
    assert any("lora_" in n for n in names) and any("add_k_proj.lora" in n for n in names)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()

    base = load_released_checkpoint(assets["ckpt"], "fastmri", load_text_encoder=False).unet.state_dict()
    trained = load_trained_model(out, merge=False).unet
    changed_lora = 0
    for name, tensor in trained.state_dict().items():
        if "lora_" in name:
            changed_lora += int("lora_B" in name and tensor.abs().max() > 0)  # B starts at zero
            continue
        plain = name.replace(".base_layer", "")
        assert torch.equal(tensor, base[plain]), f"base weight {plain} changed"
    assert changed_lora > 0
    merged = load_trained_model(out).unet  # merged LoRA differs from the base where adapters act
    assert any(not torch.equal(v, base[k]) for k, v in merged.state_dict().items() if k in base)


# ----------------------------------------------------------------------------------------------------------------- OOD
def test_ood_timesteps_restricted_on_every_cardiac_sample(assets, tmp_path, one_thread):
    seen = []
    argv = _base_args(assets, tmp_path / "ood", "--cardio_data_root", str(assets["root"]), "--mri_metadata_dir_cardio",
                      str(assets["csv"]["cardiac"]), "--use_ood", "--ood_ratio", "0.5", "--ood_t_min", "750",
                      "--enable_condition_emb", "--metadata_stats", str(assets["root"] / "stats_ood.json"),
                      "--max_train_steps", "6", "--checkpointing_steps", "100")
    _train(argv, OODTrainConfig, callback=seen.append)
    t = torch.cat([s.timesteps for s in seen])
    ood = torch.cat([s.is_ood for s in seen])
    assert ood.sum() >= 4 and (~ood).sum() >= 4  # ratio 0.5: 6 brain + 6 cardiac per epoch
    assert int(t[ood].min()) >= 750 and int(t[ood].max()) < 1000
    assert json.loads((tmp_path / "ood" / "run_config.json").read_text())["use_ood"] is True


def test_ood_script_cli_help_and_bad_input():
    help_text = _run_cli([sys.executable, "train_mri_ood.py", "--help"]).stdout
    for flag in ("--cardio_data_root", "--mri_metadata_dir_cardio", "--use_ood", "--ood_ratio", "--ood_t_min",
                 "--enable_condition_emb", "--resume_from_checkpoint"):
        assert flag in help_text
    proc = _run_cli([sys.executable, "train_mri_ood.py", "--unet_config", "tiny", "--mri_metadata_dir_brain", "b.csv",
                     "--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats", "s.json",
                     "--use_ood"])
    assert proc.returncode == 2 and "--mri_metadata_dir_cardio" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------- bad input
def _no_step(info):
    raise AssertionError("a training step ran despite bad input")


def test_bad_inputs_fail_before_training(assets, tmp_path, one_thread):
    empty = tmp_path / "empty.csv"
    empty.write_text("anatomy,filename,slice\n")
    cases = [
        (["--mri_metadata_dir_knee", str(tmp_path / "missing.csv")], "--mri_metadata_dir_knee.*not found"),
        (["--mri_metadata_dir_knee", str(empty)], "--mri_metadata_dir_knee.*no rows"),
    ]
    stats = json.loads((assets["root"] / "stats.json").read_text())
    narrow = dict(stats, contrast=["T1"])  # the data has T2 as well
    (tmp_path / "narrow.json").write_text(json.dumps(narrow))
    cases.append((["--enable_condition_emb", "--metadata_stats", str(tmp_path / "narrow.json")],
                  "does not cover value.*'T2'"))
    extra_key = dict(stats, heart_rate={"min": 40, "max": 120})
    (tmp_path / "extra.json").write_text(json.dumps(extra_key))
    cases.append((["--enable_condition_emb", "--metadata_stats", str(tmp_path / "extra.json")],
                  "'heart_rate' is not a column"))
    for extra, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            _train(_base_args(assets, tmp_path / "bad", *extra, "--max_train_steps", "1"), callback=_no_step)

    wrong = tmp_path / "wrong"
    csv = write_tiny_dataset(wrong, "brain", num_files=1, slices_per_file=2, wrong_size_slice=True)
    argv = _base_args(assets, tmp_path / "bad", "--max_train_steps", "1")
    argv[argv.index("--data_root") + 1] = str(wrong)
    argv[argv.index("--mri_metadata_dir_brain") + 1] = str(csv)
    with pytest.raises(ConfigError, match=r"shape \(40, 40\), expected \(32, 32\)"):
        _train(argv, callback=_no_step)


# ----------------------------------------------------------------------------------------------------------------- DDP
def test_two_process_cpu_ddp_smoke(assets, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29533", "train_mri.py"]
    args = _base_args(assets, out, "--mri_metadata_dir_knee", str(assets["csv"]["knee"]), "--enable_condition_emb",
                      "--metadata_stats", str(assets["root"] / "stats.json"), "--max_train_steps", "2",
                      "--checkpointing_steps", "2", "--use_ema")
    proc = _run_cli(launcher + args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (out / "unet" / "config.json").is_file()
    assert "2 optimiser steps" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- export/load round trip
def test_t5_run_exports_what_load_trained_model_restores(assets, tmp_path, one_thread):
    from models.tiny_assets import write_tiny_t5_folder
    from models.loading import load_trained_model

    t5 = write_tiny_t5_folder(tmp_path / "t5", d_model=48)  # width 48 != UNet's 32: a trained projection
    out = tmp_path / "t5run"
    argv = _base_args(assets, out, "--text_encoder_type", "t5", "--text_encoder_path", str(t5),
                      "--gradient_checkpointing", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine",
                      "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "1e-2")
    argv[argv.index("--pretrained_model_name_or_path"):argv.index("--pretrained_model_name_or_path") + 2] = [
        "--unet_config", "tiny"]
    _train(argv)
    saved = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))  # no EMA: final == step-2 weights
    model = load_trained_model(out)
    assert model.conditioner.metadata is None and model.conditioner.text.kind == "t5"
    assert torch.equal(model.conditioner.text.proj.weight, saved["conditioner.text.proj.weight"])
    unet_state = model.unet.state_dict()
    assert all(torch.equal(unet_state[k[len("unet."):]], v) for k, v in saved.items() if k.startswith("unet."))


# ------------------------------------------------------------------------------------- demo baselines (issue 8 needs)
def test_unconditional_and_scratch_text_encoder_runs_export_and_reload(assets, tmp_path, one_thread):
    """The unconditioned baseline (one constant token) and a text baseline whose CLIP encoder trains from scratch:
    the encoder's weights change, are exported with the model, and the reloaded model reproduces the tokens."""
    from models.tiny_assets import tiny_clip_text_model, write_tiny_clip_tokenizer
    from models.loading import load_trained_model

    scratch = tmp_path / "scratch_text"
    write_tiny_clip_tokenizer(scratch / "tokenizer")
    tiny_clip_text_model(hidden_size=32).save_pretrained(scratch / "text_encoder")
    before = load_file(str(next((scratch / "text_encoder").glob("*.safetensors"))))

    out = _train(["--unet_config", str(REPO / "configs" / "unet" / "tiny.json"), "--data_root",
                  str(assets["root"]), "--mri_metadata_dir_brain", str(assets["csv"]["brain"]), "--resolution", "32",
                  "--train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none",
                  "--max_train_steps", "3", "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "text"),
                  "--text_encoder_type", "clip", "--text_encoder_path", str(scratch), "--train_text_encoder"])
    saved = load_file(str(next((out / "text_encoder").glob("*.safetensors"))))
    changed = [k for k in before if not torch.equal(before[k], saved[k])]
    assert changed, "the text encoder did not train"
    model = load_trained_model(out)
    ref = model.conditioner.build([{}], ["brain, Slice 2, T2"])
    again = load_trained_model(out).conditioner.build([{}], ["brain, Slice 2, T2"])
    assert torch.equal(ref, again)

    out_u = _train(["--unet_config", str(REPO / "configs" / "unet" / "tiny.json"), "--data_root",
                    str(assets["root"]), "--mri_metadata_dir_brain", str(assets["csv"]["brain"]), "--resolution", "32",
                    "--train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none",
                    "--max_train_steps", "2", "--output_dir", str(tmp_path / "uncond"), "--text_encoder_type", "none",
                    "--unconditional"])
    uncond = load_trained_model(out_u)
    assert uncond.conditioner.is_unconditional
    assert uncond.conditioner.build([{}, {}]).shape == (2, 1, uncond.unet.config.encoder_hid_dim)
    with pytest.raises(ConfigError):
        parse_config(["--unet_config", "tiny", "--mri_metadata_dir_brain", "x.csv", "--text_encoder_type", "none"])


def test_text_encoder_lr_gives_the_encoder_its_own_rate(assets, tmp_path, one_thread):
    """--text_encoder_lr: one AdamW step moves each weight by about its group's rate (Adam normalises the step), so
    the encoder's weights move by ~1e-1 while the UNet's move by ~1e-4; without the flag both move by ~1e-4."""
    from models.tiny_assets import tiny_clip_text_model, write_tiny_clip_tokenizer
    from models.loading import load_trained_model

    scratch = tmp_path / "scratch_text"
    write_tiny_clip_tokenizer(scratch / "tokenizer")
    tiny_clip_text_model(hidden_size=32).save_pretrained(scratch / "text_encoder")
    before = load_file(str(next((scratch / "text_encoder").glob("*.safetensors"))))
    base = ["--unet_config", str(REPO / "configs" / "unet" / "tiny.json"), "--data_root", str(assets["root"]),
            "--mri_metadata_dir_brain", str(assets["csv"]["brain"]), "--resolution", "32", "--train_batch_size", "2",
            "--dataloader_num_workers", "0", "--report_to", "none", "--max_train_steps", "1", "--learning_rate",
            "1e-4", "--adam_weight_decay", "0", "--seed", "3", "--text_encoder_type", "clip", "--text_encoder_path",
            str(scratch), "--train_text_encoder"]
    moved = {}
    unets = {}
    for name, extra in (("own", ["--text_encoder_lr", "1e-1"]), ("shared", [])):
        out = _train([*base, "--output_dir", str(tmp_path / name), *extra])
        saved = load_file(str(next((out / "text_encoder").glob("*.safetensors"))))
        moved[name] = max(float((saved[k] - before[k]).abs().max()) for k in before if k in saved)
        unets[name] = load_trained_model(out).unet.state_dict()
    assert 0.05 < moved["own"] <= 0.11, moved
    assert moved["shared"] <= 2e-4, moved
    # the UNet followed --learning_rate in both runs (same seed, same init): identical weights
    assert all(torch.allclose(unets["own"][k], unets["shared"][k], atol=1e-6) for k in unets["own"])

    for bad, why in ((["--text_encoder_lr", "0"], "must be > 0"),
                     (["--text_encoder_lr", "1e-2", "--text_encoder_type", "none", "--unconditional"],
                      "needs --train_text_encoder")):
        argv = ["--unet_config", "tiny", "--mri_metadata_dir_brain", "x.csv", *bad]
        if "none" not in bad:
            argv += ["--text_encoder_path", str(scratch), "--train_text_encoder"]
        with pytest.raises(ConfigError, match=why):
            parse_config(argv)


# ------------------------------------------------------------------------------------------------------- v-prediction
def test_v_prediction_run_saves_its_type_and_the_sampler_reads_it(assets, tmp_path, one_thread):
    """--prediction_type v_prediction: the exported scheduler says so, the reconstruction loader's schedule carries it,
    and the loss is the MSE to v (checked against an independent computation on one batch)."""
    from utils.diffusion_recon import load_reconstruction_model
    from utils.training.loop import training_loss

    out = _train(["--unet_config", str(REPO / "configs" / "unet" / "tiny.json"), "--data_root", str(assets["root"]),
                  "--mri_metadata_dir_brain", str(assets["csv"]["brain"]), "--resolution", "32",
                  "--train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none",
                  "--max_train_steps", "2", "--output_dir", str(tmp_path / "v"), "--text_encoder_type", "none",
                  "--unconditional", "--prediction_type", "v_prediction"])
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    unet, _, schedule = load_reconstruction_model(None, finetune_folder=str(out))
    assert schedule.prediction_type == "v_prediction"

    # The loss: the model's output against v = √ᾱ ε − √(1−ᾱ) x0, with the noise and timesteps the generator draws.
    from types import SimpleNamespace

    acp = schedule.alphas_cumprod.float()
    x0 = torch.randn(2, 2, 8, 8)
    batch = SimpleNamespace(images=x0, is_ood=torch.zeros(2, dtype=torch.bool), records=[{}, {}], prompts=["", ""])
    zero = lambda x_t, t, records, prompts, generator=None: torch.zeros_like(x_t)  # noqa: E731
    loss, t = training_loss(zero, batch, acp, torch.Generator().manual_seed(0), None, "v_prediction")
    # A zero output makes the loss mean(v²); rebuild v by drawing as training_loss does (timesteps, then noise).
    from utils.training.diffusion import sample_timesteps

    a = acp[t].view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    t2 = sample_timesteps(2, 1000, g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t2, t)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(loss, v.square().mean())
    with pytest.raises(ConfigError, match="prediction_type"):
        parse_config(["--pretrained_model_name_or_path", str(assets["ckpt"]), "--mri_metadata_dir_brain", "x.csv",
                      "--prediction_type", "v_prediction"])
