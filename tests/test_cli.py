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
    code, err = _exit_code(cli.parse, _Settings, ["--input_dir", "in", "--resolution", "abc"], capsys=capsys)
    assert code == 2 and "--resolution" in err


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
