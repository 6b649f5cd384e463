"""Unit tests of the training plumbing that need no data: config/CLI, EMA, timesteps, data order, rotation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from utils.training.checkpointing import (
    TrainingState,
    list_checkpoints,
    mark_complete,
    prune_checkpoints,
    resolve_resume_checkpoint,
)
from utils.training.config import ConfigError, OODTrainConfig, TrainConfig, build_parser, parse_config
from utils.training.diffusion import add_noise, sample_timesteps, step_generator
from utils.training.ema import EMA
from utils.training.data_order import MixtureSampler, TaggedConcatDataset, mixture_sources

BASE = ["--unet_config", "tiny", "--mri_metadata_dir_brain", "b.csv", "--text_encoder_type", "none",
        "--enable_condition_emb", "--metadata_stats", "s.json"]


# ----------------------------------------------------------------------------------------------------------- config
def test_parser_defaults_equal_dataclass_defaults():
    for cls in (TrainConfig, OODTrainConfig):
        args = vars(build_parser(cls).parse_args([]))
        assert args.pop("config") is None  # --config FILE (utils/cli.py): no file by default
        assert args == {f.name: f.default for f in dataclasses.fields(cls)}


def test_reference_defaults():
    c = TrainConfig()
    assert (c.learning_rate, c.max_grad_norm, c.ema_decay, c.prompt_cfg_prob, c.lora_rank) == (1e-4, 1.0, 0.999, 0.1, 4)
    assert OODTrainConfig().ood_t_min == 750


def test_parse_types_and_round_trip(tmp_path):
    c = parse_config(BASE + ["--max_train_steps", "7", "--lora_alpha", "8", "--use_ema", "--cfg_strategy",
                             "independent"])
    assert c.max_train_steps == 7 and isinstance(c.max_train_steps, int)
    assert c.lora_alpha == 8.0 and c.use_ema and c.cfg_strategy == "independent"
    c.save(tmp_path / "run.json")
    assert TrainConfig.load(tmp_path / "run.json") == c


def test_either_csv_alone_is_enough():
    parse_config(["--unet_config", "tiny", "--mri_metadata_dir_knee", "k.csv", "--text_encoder_path", "x"])
    parse_config(["--unet_config", "tiny", "--mri_metadata_dir_brain", "b.csv", "--text_encoder_path", "x"])


@pytest.mark.parametrize("extra, message", [
    (["--cfg_prob", "1.5"], "--cfg_prob"),
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--use_lora"], "--use_lora"),
    (["--resume_from_checkpoint", "/no/such/dir"], "--resume_from_checkpoint"),
])
def test_bad_values_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE + extra)


def test_missing_inputs_listed_together():
    with pytest.raises(ConfigError) as err:
        parse_config(["--enable_condition_emb"])
    text = str(err.value)
    assert "--unet_config" in text and "--mri_metadata_dir_brain" in text and "--metadata_stats" in text


def test_ood_flags():
    with pytest.raises(ConfigError, match="--mri_metadata_dir_cardio"):
        parse_config(BASE + ["--use_ood"], OODTrainConfig)
    with pytest.raises(ConfigError, match="--ood_ratio"):
        parse_config(BASE + ["--use_ood", "--mri_metadata_dir_cardio", "c.csv", "--ood_ratio", "1.0"], OODTrainConfig)
    c = parse_config(BASE + ["--use_ood", "--mri_metadata_dir_cardio", "c.csv", "--ood_t_min", "600"], OODTrainConfig)
    assert c.is_ood and c.ood_t_min == 600


# -------------------------------------------------------------------------------------------------------------- EMA
def test_ema_matches_closed_form_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update([p])
    expected = ((0.9 * 0 + 0.1 * 1) * 0.9 + 0.1 * 2) * 0.9 + 0.1 * 3
    assert torch.allclose(ema.shadow[0], torch.full((3,), expected))
    other = EMA([torch.nn.Parameter(torch.ones(3))], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3 and other.decay == 0.9 and torch.equal(other.shadow[0], ema.shadow[0])
    with ema.averaged([p]):
        assert torch.allclose(p, torch.full((3,), expected))
    assert torch.equal(p.detach(), torch.full((3,), 3.0))
    with pytest.raises(ValueError):
        EMA([p], decay=1.0)


# -------------------------------------------------------------------------------------------------------- timesteps
def test_ood_timesteps_restricted_in_distribution_full_range():
    gen = step_generator(0, 1)
    mask = torch.arange(20000) % 3 == 0
    t = sample_timesteps(20000, 1000, gen, ood_mask=mask, ood_t_min=750)
    assert t.dtype == torch.long
    assert int(t[mask].min()) >= 750 and int(t[mask].max()) <= 999
    assert int(t[~mask].min()) < 20 and int(t[~mask].max()) > 980  # uniform over [0, 1000)
    # roughly uniform on the restricted range
    hist = torch.bincount(t[mask] - 750, minlength=250).float()
    assert hist.mean() > 20 and hist.std() / hist.mean() < 0.35
    with pytest.raises(ValueError):
        sample_timesteps(4, 1000, gen, ood_t_min=1000)


def test_step_generator_is_a_pure_function_of_its_keys():
    a = torch.rand(5, generator=step_generator(3, 10, 2))
    b = torch.rand(5, generator=step_generator(3, 10, 2))
    c = torch.rand(5, generator=step_generator(3, 10, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_add_noise_matches_ddpm_forward():
    x0, noise = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    acp = torch.linspace(0.99, 0.01, 10)
    t = torch.tensor([0, 9])
    xt = add_noise(x0, noise, t, acp)
    assert torch.allclose(xt[1], acp[9].sqrt() * x0[1] + (1 - acp[9]).sqrt() * noise[1])


# ------------------------------------------------------------------------------------------------------- data order
def test_mixture_sampler_deterministic_and_ratio():
    sources = mixture_sources([40, 100], [None, 0.2])
    assert [s.per_epoch for s in sources] == [40, 10]
    sampler = MixtureSampler(sources, seed=5)
    e0, e1 = sampler.epoch_indices(0), sampler.epoch_indices(1)
    assert e0 == MixtureSampler(sources, seed=5).epoch_indices(0) and e0 != e1
    for order in (e0, e1):
        assert sorted(i for i in order if i < 40) == list(range(40))  # every in-distribution item once
        assert sum(i >= 40 for i in order) == 10 and len(set(order)) == 50
    # the OOD source cycles: 10 epochs x 10 draws see all 100 items exactly once
    ood = [i for e in range(10) for i in sampler.epoch_indices(e) if i >= 40]
    assert sorted(ood) == list(range(40, 140))
    sampler.select_epoch(1)
    assert list(iter(sampler)) == e1


def test_tagged_concat_dataset():
    ds = TaggedConcatDataset([list("abc"), list("de")])
    assert len(ds) == 5 and ds[2] == ("c", 0) and ds[3] == ("d", 1)


# ------------------------------------------------------------------------------------------------------ checkpoints
def _fake_ckpt(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        mark_complete(path, TrainingState(global_step=step))
    return path


def test_rotation_prunes_before_saving(tmp_path):
    for step in (10, 20, 30, 100):
        _fake_ckpt(tmp_path, step)
    _fake_ckpt(tmp_path, 40, complete=False)  # an interrupted save goes first
    (tmp_path / "checkpoint-notanumber").mkdir()
    removed = prune_checkpoints(tmp_path, total_limit=2, incoming_step=110)
    assert {p.name for p in removed} == {"checkpoint-40", "checkpoint-10", "checkpoint-20", "checkpoint-30"}
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100]  # sorted numerically; room left for 110
    assert prune_checkpoints(tmp_path, None, incoming_step=120) == []


def test_resume_lookup(tmp_path):
    assert resolve_resume_checkpoint(tmp_path, "latest") is None
    _fake_ckpt(tmp_path, 5)
    _fake_ckpt(tmp_path, 50)
    _fake_ckpt(tmp_path, 60, complete=False)
    assert resolve_resume_checkpoint(tmp_path, "latest").name == "checkpoint-50"
    assert resolve_resume_checkpoint(tmp_path, "checkpoint-5").name == "checkpoint-5"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-60"))


# ------------------------------------------------------------------------------------------------------ run identity
def test_run_identity_ignores_bookkeeping_and_counts_the_rest():
    from utils.training.config import NON_IDENTITY_FIELDS, run_identity_differences

    base = TrainConfig(unet_config="tiny").to_dict()
    bookkeeping = dict(base, output_dir="elsewhere", checkpointing_steps=7, checkpoints_total_limit=2,
                       resume_from_checkpoint="latest", report_to="none", validation_steps=3)
    assert run_identity_differences(base, bookkeeping) == []
    assert run_identity_differences(base, dict(base, seed=1, cfg_prob=0.1)) == ["cfg_prob", "seed"]
    # run length: free under a constant schedule (a run may be continued), part of the identity under a decaying one
    assert run_identity_differences(base, dict(base, max_train_steps=99)) == []
    linear = dict(base, lr_scheduler="linear")
    assert run_identity_differences(linear, dict(linear, max_train_steps=99)) == ["max_train_steps"]
    # a key written before a field existed counts as its default; an unknown new key counts too
    old = {k: v for k, v in base.items() if k != "ema_decay"}
    assert run_identity_differences(old, base) == [] and run_identity_differences(old, dict(base, ema_decay=0.5))
    assert run_identity_differences(base, dict(base, some_new_field=1)) == ["some_new_field"]
    assert set(NON_IDENTITY_FIELDS) <= {f.name for f in dataclasses.fields(OODTrainConfig)}


def _ckpt_with_config(root, step, config, files=None):
    from utils.training.checkpointing import write_checkpoint_config

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainable.safetensors").write_bytes(b"weights")
    write_checkpoint_config(path, config)
    mark_complete(path, TrainingState(global_step=step))
    return path


def test_latest_skips_other_runs_and_damaged_checkpoints(tmp_path, caplog):
    run = TrainConfig(unet_config="tiny").to_dict()
    _ckpt_with_config(tmp_path, 5, run)
    damaged = _ckpt_with_config(tmp_path, 10, run)
    _ckpt_with_config(tmp_path, 20, dict(run, seed=1))
    (damaged / "trainable.safetensors").write_bytes(b"weightz")  # same size, other bytes
    with caplog.at_level("WARNING"):
        assert resolve_resume_checkpoint(tmp_path, "latest", run).name == "checkpoint-5"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-20: a checkpoint of another run (--seed 42 (there: 1))" in text
    assert "damaged checkpoint" in text and "checkpoint-10" in text and "trainable.safetensors" in text
    with pytest.raises(ConfigError, match="another run.*--seed"):
        resolve_resume_checkpoint(tmp_path, "checkpoint-20", run)
    with pytest.raises(ConfigError, match="damaged checkpoint.*trainable.safetensors"):
        resolve_resume_checkpoint(tmp_path, "checkpoint-10", run)


def test_output_dir_of_unknown_or_other_run_refused_unless_overwrite(tmp_path):
    from utils.training.run_folder import check_output_dir, clear_run

    run = TrainConfig(unet_config="tiny").to_dict()
    assert check_output_dir(tmp_path / "new", run, overwrite=False, resume=None) is False
    (tmp_path / "notes.txt").write_text("mine")  # not a run: ignored, never removed
    assert check_output_dir(tmp_path, run, overwrite=False, resume=None) is False
    _fake_ckpt(tmp_path, 3)  # an old-style checkpoint: no run_config.json anywhere
    with pytest.raises(ConfigError, match="settings are unknown: checkpoint-3"):
        check_output_dir(tmp_path, run, overwrite=False, resume="latest")
    assert check_output_dir(tmp_path, run, overwrite=True, resume="latest") is True
    assert clear_run(tmp_path) == ["checkpoint-3"] and (tmp_path / "notes.txt").is_file()
    _ckpt_with_config(tmp_path, 4, run)
    assert check_output_dir(tmp_path, dict(run, output_dir="x"), overwrite=False, resume="latest") is False
    assert check_output_dir(tmp_path, run, overwrite=True, resume="latest") is False  # same run: resumed, kept
    assert check_output_dir(tmp_path, run, overwrite=True, resume=None) is True  # asked to start over
