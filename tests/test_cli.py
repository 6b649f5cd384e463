"""The one command-line idiom (utils/cli.py): dataclass -> argparse, lists, aliases, ``--config FILE``, and every
script's ``--help``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from utils import cli
from utils.cli import option
from utils.training.config import OODTrainConfig, TrainConfig, build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]

TRAIN = ["--unet_config", "tiny", "--mri_metadata_dir_brain", "b.csv", "--text_encoder_type", "none",
         "--enable_condition_emb", "--metadata_stats", "s.json"]


@dataclass
class _Settings:
    """A small settings class exercising every kind of field."""

    input_dir: Path = option(help="input folder")
    output_dir: Path = option(Path("out"), "output folder", aliases=("--output_root", "--save_dir"))
    resolution: int = option(320, "image side", unit="px", aliases=("--crop_size",))
    views: list[str] | None = option(None, "views", choices=("sax", "lax", "t1"))
    bands: list[int] = option([0, 100], "band edges")
    keys: list[str] = option([], "keys", allow_empty=True)
    weight: float = option(0.5, "a weight")
    overwrite: bool = option(False, "recompute")


def _exit_code(fn, *args, capsys=None) -> tuple[int, str]:
    with pytest.raises(SystemExit) as err:
        fn(*args)
    return err.value.code, (capsys.readouterr().err if capsys else "")


# ------------------------------------------------------------------------------------------------------ the helper
def test_defaults_types_and_required(capsys):
    s = cli.parse(_Settings, ["--input_dir", "in"])
    assert s == _Settings(input_dir=Path("in"))
    assert s.bands == [0, 100] and s.bands is not _Settings(input_dir=Path("x")).bands  # lists are not shared
    code, err = _exit_code(cli.parse, _Settings, [], capsys=capsys)
    assert code == 2 and "--input_dir" in err and len(err.strip().splitlines()) == 1
    for bad in (["--resolution", "abc"], ["--no_such_flag"]):
        code, err = _exit_code(cli.parse, _Settings, ["--input_dir", "in", *bad], capsys=capsys)
        assert code == 2 and bad[0] in err and len(err.strip().splitlines()) == 1, err  # one line, no usage block


def test_space_and_comma_lists_are_equal():
    base = ["--input_dir", "in"]
    spaced = cli.parse(_Settings, [*base, "--views", "sax", "lax", "--bands", "1", "2", "3"])
    commas = cli.parse(_Settings, [*base, "--views", "sax,lax", "--bands", "1,2,3"])
    mixed = cli.parse(_Settings, [*base, "--views", "sax,", "lax", "--bands", "1,2", "3"])
    assert spaced == commas == mixed
    assert spaced.views == ["sax", "lax"] and spaced.bands == [1, 2, 3]
    assert cli.parse(_Settings, [*base, "--keys"]).keys == []  # allow_empty: the flag alone is an empty list


def test_list_choices_are_checked_per_element(capsys):
    code, err = _exit_code(cli.parse, _Settings, ["--input_dir", "in", "--views", "sax,lux"], capsys=capsys)
    assert code == 2 and "lux" in err


def test_aliases_give_the_same_settings():
    ref = cli.parse(_Settings, ["--input_dir", "in", "--output_dir", "o", "--resolution", "32"])
    for out_flag in ("--output_root", "--save_dir"):
        assert cli.parse(_Settings, ["--input_dir", "in", out_flag, "o", "--crop_size", "32"]) == ref


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"input_dir": "a", "resolution": 64, "views": ["sax"], "overwrite": True,
                                "version": 3, "hash": "ab12"}))  # version/hash: recorded, not settings
    parsed = cli.parse_with_sources(_Settings, ["--config", str(path), "--resolution", "32"])
    assert parsed.config == _Settings(input_dir=Path("a"), resolution=32, views=["sax"], overwrite=True)
    assert parsed.given == {"resolution"} and parsed.from_file == {"input_dir", "resolution", "views", "overwrite"}
    path.write_text(json.dumps({"input_dir": "a", "crop_size": 48, "bands": "5,6"}))  # alias key, comma string
    assert cli.parse(_Settings, ["--config", str(path)]) == _Settings(input_dir=Path("a"), resolution=48, bands=[5, 6])


@pytest.mark.parametrize("content, words", [
    ({"input_dir": "a", "resolutoin": 3, "colour": 1}, ["colour", "resolutoin"]),
    ({"input_dir": "a", "resolution": "big"}, ["resolution", "integer"]),
    ({"input_dir": "a", "views": ["sax", "lux"]}, ["views"]),
    ([1, 2], ["JSON object"]),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path, capsys, content, words):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    code, err = _exit_code(cli.parse, _Settings, ["--config", str(path)], capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words), err


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, err = _exit_code(cli.parse, _Settings, ["--config", str(tmp_path / "none.json")], capsys=capsys)
    assert code == 2 and "none.json" in err


def test_help_states_every_default():
    text = cli.build_parser(_Settings).format_help()
    assert "(default: 320)" in text and "[px]" in text and "(default: 0 100)" in text and "(required)" in text
    assert "--output_root" in text and "--crop_size" in text


def test_hand_added_arguments_ride_along():
    parser = cli.build_parser(_Settings)
    parser.add_argument("--num_shards", type=int, default=1)
    parsed = cli.parse_with_sources(_Settings, ["--input_dir", "in", "--num_shards", "3"], parser)
    assert parsed.extras == {"num_shards": 3} and parsed.config.num_shards == 3


# ------------------------------------------------------------------------------------------------------ training
def test_training_config_round_trip_reproduces_the_run(tmp_path):
    """A saved run_config.json passed back with --config gives the same config; the command line overrides it."""
    argv = [*TRAIN, "--max_train_steps", "7", "--use_ema", "--cfg_strategy", "independent", "--resolution", "32",
            "--seed", "3"]
    run = parse_config(argv)
    run.save(tmp_path / "run_config.json")
    again = parse_config(["--config", str(tmp_path / "run_config.json")])
    assert again == run and again != TrainConfig()
    changed = parse_config(["--config", str(tmp_path / "run_config.json"), "--seed", "4"])
    assert changed.seed == 4 and dataclasses.replace(changed, seed=3) == run


def test_training_alias_and_reference_names_agree():
    ref = parse_config([*TRAIN, "--resolution", "32", "--mri_metadata_dir_knee", "k.csv",
                        "--validation_metadata_brain", "v.csv"])
    house = parse_config([*TRAIN, "--crop_size", "32", "--metadata_csv_knee", "k.csv",
                          "--val_metadata_csv_brain", "v.csv"])
    assert house == ref


def test_ood_run_config_is_refused_by_the_in_distribution_script(tmp_path, capsys):
    parse_config([*TRAIN, "--use_ood", "--mri_metadata_dir_cardio", "c.csv"], OODTrainConfig).save(tmp_path / "r.json")
    code, err = _exit_code(parse_config, ["--config", str(tmp_path / "r.json")], capsys=capsys)
    assert code == 2 and "use_ood" in err and "mri_metadata_dir_cardio" in err


def test_training_parser_defaults_are_the_dataclass_defaults():
    args = vars(build_parser(OODTrainConfig).parse_args([]))
    args.pop("config")
    assert args == {f.name: f.default for f in dataclasses.fields(OODTrainConfig)}


# ------------------------------------------------------------------------------------------------------ every script
SCRIPTS = ("train_mri", "train_mri_ood", "pre_processing_final", "pre_process_cmrx", "recon_complex_multi", "demo",
           "metadata_report", "make_synthetic_data", "make_metadata_stats")


def _option_entries(help_text: str) -> list[str]:
    """The option entries of a ``--help`` text (an entry and its wrapped continuation lines joined)."""
    entries: list[str] = []
    lines = help_text.splitlines()
    for line in lines[lines.index("options:"):]:  # the script's docstring (examples) comes before
        stripped = line.strip()
        if line.startswith("  ") and stripped.startswith("-") and not line.startswith("   " + " " * 30):
            entries.append(stripped)
        elif entries and line.startswith(" " * 20) and stripped:
            entries[-1] += " " + stripped
        elif not stripped or not line.startswith(" "):
            entries.append("") if entries and entries[-1] else None
    return [e for e in entries if e]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_help_exits_0_and_states_every_default(name, capsys):
    """``--help`` of each real script (in-process: one torch import for all): exit 0, and each option either is a
    flag or states its default (or that it is required); every option has help text."""
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as err:
        module.main(["--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    assert "--config FILE" in text
    parser = build_parser(OODTrainConfig if name == "train_mri_ood" else TrainConfig) if name.startswith(
        "train_mri") else module.build_parser()
    flags = {s for a in parser._actions if a.nargs == 0 for s in a.option_strings}
    entries = _option_entries(text)
    assert len(entries) >= len(parser._actions) - 1, entries  # every action has an entry (positional: own section)
    for entry in entries:
        name_part = entry.split()[0].rstrip(",")
        if name_part in flags:
            continue
        assert "(default:" in entry or "(required)" in entry, f"{name}: {entry}"
    for action in parser._actions:
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"


def test_real_recon_script_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "recon_complex_multi.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--num_steps" in proc.stdout and "(default: 100)" in proc.stdout


# ------------------------------------------------------------------------------------------------------ reconstruction
RECON = ["--data_root", "x", "--load_dir_meta_brain", "y.csv"]


def test_sampler_settings_and_defaults_exist_once():
    import inspect

    from utils.diffusion_recon import DiffusionReconstructor
    from utils.raw_reconstruction import RawReconSettings
    from utils.recon_options import SAMPLER_DEFAULTS, SamplerSettings, sampler_field_names
    from utils.recon_settings import ReconSettings
    from utils.samplers import PRESETS

    import recon_complex_multi

    names = sampler_field_names()
    assert {"num_steps", "eta", "gamma", "cg_iter", "cs_lambda", "clip_x0", "guidance_scale"} <= set(names)
    for cls in (ReconSettings, RawReconSettings, recon_complex_multi.ReconOptions):
        assert issubclass(cls, SamplerSettings)
        assert {n: getattr(cls(), n) for n in names} == dataclasses.asdict(SAMPLER_DEFAULTS)
    signature = inspect.signature(DiffusionReconstructor)
    for name in ("sampler", "num_steps", "eta", "gamma", "cg_iter", "dps_step", "guidance_scale", "clip_x0"):
        assert signature.parameters[name].default == getattr(SAMPLER_DEFAULTS, name), name
    from utils.samplers.presets import RAW_ONLY_PRESET_KEYS, sampler_kwargs

    raw_only = set(RAW_ONLY_PRESET_KEYS)  # --raw_dir's γ rule: options of the raw path, not sampler arguments
    assert raw_only <= {f.name for f in dataclasses.fields(RawReconSettings)}
    assert raw_only <= set(recon_complex_multi.ReconOptions.__dataclass_fields__)
    for preset in PRESETS.values():
        assert set(preset) - raw_only <= set(names)
        assert not raw_only & set(sampler_kwargs(preset)) and "sampler" not in sampler_kwargs(preset)


def test_recon_settings_json_round_trip(tmp_path):
    """A run's settings.json passed back with --config gives the same ReconSettings the run had."""
    import recon_complex_multi
    from utils.recon_settings import ReconSettings
    from utils.recon_options import sampler_values

    argv = [*RECON, "--num_steps", "7", "--eta", "0.3", "--drop_metadata_keys", "TE", "TR", "--no_png",
            "--metadata_override", "TE=12.5", "--guidance_scale", "2", "--uncond_drop_keys", "TE", "--tag", "t"]
    a = recon_complex_multi.parse_args(argv)

    def settings(o):
        from recon_complex_multi import _overrides

        return ReconSettings(**sampler_values(o), method=o.method, mask_type=o.mask_type, acc_factor=o.acc_factor,
                             center_fraction=o.center_fraction, noise_sigma=o.noise_sigma,
                             metadata_override=_overrides(o.metadata_override), num_samples=o.num_samples,
                             seed=o.seed, batch_size=o.batch_size, save_png=not o.no_png, tag=o.tag)

    run = settings(a)
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(run)))
    again = recon_complex_multi.parse_args([*RECON, "--config", str(tmp_path / "settings.json")])
    assert settings(again) == run and again.num_steps == 7 and again.no_png
    override = recon_complex_multi.parse_args([*RECON, "--config", str(tmp_path / "settings.json"), "--eta", "0.9"])
    assert override.eta == 0.9 and override.num_steps == 7


def test_recon_preset_sits_between_file_and_command_line(tmp_path):
    import recon_complex_multi
    from utils.samplers import PRESETS

    (tmp_path / "c.json").write_text(json.dumps({"num_steps": 3, "gamma": 1.0}))
    a = recon_complex_multi.parse_args([*RECON, "--config", str(tmp_path / "c.json"), "--preset", "fast",
                                        "--gamma", "7"])
    assert a.num_steps == PRESETS["fast"]["num_steps"] and a.gamma == 7.0


def test_recon_aliases_and_raw_settings_json(tmp_path, capsys):
    import recon_complex_multi
    from utils.raw_reconstruction import RawReconSettings

    ref = recon_complex_multi.parse_args([*RECON, "--save_dir", "o", "--crop_size", "32", "--cfg_scale", "2"])
    house = recon_complex_multi.parse_args(["--data_root", "x", "--metadata_csv_brain", "y.csv", "--output_dir", "o",
                                            "--resolution", "32", "--guidance_scale", "2"])
    assert house == ref
    raw = RawReconSettings(method="cs", cs_iter=40, gamma_rule="noise", image_size=(32, 32))
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(raw)))
    parsed = recon_complex_multi.parse_command_line(["--raw_dir", "r", "--config", str(tmp_path / "settings.json")])
    assert (parsed.config.method, parsed.config.cs_iter, parsed.config.gamma_rule) == ("cs", 40, "noise")
    assert "mask_type" not in parsed.set_explicitly  # None in the file: each test file's own mask
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(RawReconSettings(scale_rule="oracle"))))
    code, err = _exit_code(recon_complex_multi.parse_args, ["--config", str(tmp_path / "settings.json")],
                           capsys=capsys)
    assert code == 2 and "scale_rule" in err


def test_synthetic_data_lists_and_metadata_stats_output_dir(capsys):
    import make_metadata_stats
    import make_synthetic_data

    base = ["--format", "fastmri", "--output_dir", "o"]
    assert make_synthetic_data.parse_args([*base, "--num_coils", "4,8", "--matrix", "32x16"]) == \
        make_synthetic_data.parse_args([*base, "--num_coils", "4", "8", "--matrix", "32x16"])
    assert make_synthetic_data.parse_args([*base, "--num_coils", "4,8"]).num_coils == (4, 8)
    assert make_metadata_stats.parse_args(["a.csv", "--output_dir", "d"]).output == Path("d/metadata_stats.json")
    assert make_metadata_stats.parse_args(["a.csv"]).output == Path("metadata_stats.json")
    code, err = _exit_code(make_metadata_stats.parse_args, ["a.csv", "--output", "x", "--output_dir", "d"],
                           capsys=capsys)
    assert code == 2 and "not both" in err


def test_preprocessing_aliases_give_the_same_settings():
    import pre_process_cmrx
    import pre_processing_final

    ref = pre_processing_final.parse_args(["--input_dir", "i", "--output_root", "o", "--crop_size", "32"])
    assert pre_processing_final.parse_args(["--input_dir", "i", "--output_dir", "o", "--resolution", "32"]) == ref
    assert isinstance(ref.output_root, Path)
    ref = pre_process_cmrx.parse_args(["--input_dir", "i", "--output_dir", "o", "--views", "sax", "lax"])
    assert pre_process_cmrx.parse_args(["--input_dir", "i", "--output_root", "o", "--views", "sax,lax"]) == ref
