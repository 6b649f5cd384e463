"""demo.py's command line (``DemoOptions`` through utils/cli.py): help and defaults, argument checks before any work,
``--config`` round trip of the ``settings.json`` it writes, and the same ``DemoConfig`` / ``StudyConfig`` as the
hand-written argparse it replaced. The demo itself is never run here (``run_demo`` / ``run_study`` are replaced)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import demo
import utils.demo
import utils.study
from utils.demo_config import DemoConfig
from utils.study import StudyConfig

ROOT = Path(__file__).resolve().parents[1]

#: What the old ``parse_args`` set for ``--quick`` (copied from demo.py before the change, not from demo.QUICK).
OLD_QUICK = dict(volumes_per_contrast=2, num_slices=2, train_steps=4, recon_steps=5, contrasts=("AXT1", "AXT2"),
                 ensemble_size=2, max_val_slices=2, batch_size=2, matrix="64x32", crop_size=32, report_slices=2,
                 report_noise=1, report_timesteps=(50, 500))


def _help_entries(capsys) -> dict[str, str]:
    """``--help`` as {option name: its entry with the help text unwrapped}."""
    with pytest.raises(SystemExit) as err:
        demo.parse_options(["--help"])
    assert err.value.code == 0
    entries: dict[str, str] = {}
    name = None
    for line in capsys.readouterr().out.splitlines():
        start = re.match(r"  (-h|--\w+)", line)
        if start:
            name = start.group(1).lstrip("-")
            entries[name] = line.strip()
        elif name and line.startswith(" " * 10):
            entries[name] += " " + line.strip()
        else:
            name = None  # a section title or the description
    return entries


def test_help_lists_every_option_with_help_and_default(capsys) -> None:
    entries = _help_entries(capsys)
    defaults = {"output_dir": "demo_output; with --study: study_output", "volumes_per_contrast": "8",
                "num_slices": "5", "seed": "0", "train_steps": "1000", "text_encoder": "frozen",
                "text_encoder_lr": "0.01", "recon_steps": "50", "ensemble_size": "4", "max_val_slices": "20",
                "raw_accelerations": "4", "raw_center_fraction": "0.125", "seeds": "0 1 2"}
    flags = {"with_ood", "no_noise", "quick", "study"}
    assert set(entries) == set(defaults) | flags | {"h", "config"}  # every option of the old parser, no more
    for name, value in defaults.items():
        assert entries[name].endswith(f"(default: {value})"), entries[name]
    for name in set(defaults) | flags:  # a help text beside the flag and its value name
        assert len(entries[name].split()) > 4, entries[name]
    assert entries["text_encoder"].startswith("--text_encoder {frozen,scratch,scratch_lr}")
    assert "settings.json" in entries["config"]


@pytest.mark.parametrize("argv, message", [
    (["--raw_accelerations", "1"], "--raw_accelerations must be > 1"),
    (["--raw_center_fraction", "1.5"], "--raw_center_fraction in (0, 1)"),
    (["--volumes_per_contrast", "1"], "--volumes_per_contrast >= 2"),
    (["--train_steps", "0"], "--train_steps >= 1"),
    (["--study", "--seeds", "1", "1"], "--seeds must be distinct"),
    (["--quick", "--train_steps", "50"], "--quick sets --train_steps"),  # --quick would silently override it
    (["--text_encoder", "clip"], "invalid choice"),
    (["--seed", "x"], "invalid int value"),
])
def test_bad_values_exit_2_with_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message) -> None:
    ran = []
    monkeypatch.setattr(utils.demo, "run_demo", ran.append)
    monkeypatch.setattr(utils.study, "run_study", ran.append)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        demo.main(["--output_dir", str(out), *argv])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo.py: error: ") and message in lines[0], lines
    assert not out.exists() and not ran


def test_bad_value_from_the_shell_is_one_line_without_traceback(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "demo.py", "--output_dir", str(out), "--raw_accelerations", "0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "demo.py: error: --raw_accelerations must be > 1 and --raw_center_fraction in (0, 1)"]
    assert not out.exists()


def test_defaults_and_quick_map_onto_the_old_configs() -> None:
    assert demo.parse_args([]) == DemoConfig()
    quick = demo.parse_args(["--quick"])
    assert quick == DemoConfig(**OLD_QUICK)
    assert quick.noise_sigma == 0.05 and quick.raw_accelerations == (4.0,) and quick.report_keys == ("contrast", "TR",
                                                                                                      "TE")
    cfg = demo.parse_args(["--with_ood", "--no_noise", "--raw_accelerations", "--text_encoder", "scratch_lr",
                           "--text_encoder_lr", "0.5", "--seed", "3", "--output_dir", "elsewhere"])
    assert cfg == DemoConfig(output_dir=Path("elsewhere"), seed=3, text_encoder="scratch_lr", text_encoder_lr=0.5,
                             noise_sigma=None, raw_accelerations=(),
                             methods=("unconditioned", "text", "fine-grained", "fine-grained+ood"))
    study = demo.parse_args(["--study", "--quick", "--seeds", "0", "1"])
    assert study == StudyConfig(output_dir=Path("study_output"), seeds=(0, 1),
                                demo=DemoConfig(**OLD_QUICK, report_keys=None))
    assert demo.parse_args(["--study", "--output_dir=mine", "--seeds", "4,5"]) == StudyConfig(
        output_dir=Path("mine"), seeds=(4, 5), demo=DemoConfig(output_dir=Path("mine"), report_keys=None))


def _strict_json(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("argv", [
    ["--quick", "--with_ood", "--raw_accelerations", "4", "6", "--seed", "2", "--text_encoder", "scratch"],
    ["--study", "--quick", "--seeds", "3", "1", "--no_noise", "--raw_accelerations"],
])
def test_saved_settings_repeat_the_run_and_the_command_line_overrides_them(tmp_path, monkeypatch, argv) -> None:
    ran = []
    monkeypatch.setattr(utils.demo, "run_demo", ran.append)
    monkeypatch.setattr(utils.study, "run_study", ran.append)
    out = tmp_path / "out"
    assert demo.main(["--output_dir", str(out), *argv]) == 0
    saved = out / demo.SETTINGS_FILE
    settings = _strict_json(saved)
    assert settings["output_dir"] == str(out) and settings["quick"] is True
    assert demo.main(["--config", str(saved)]) == 0  # the same run again, from the file alone
    assert len(ran) == 2 and ran[0] == ran[1] and ran[0] == demo.parse_args(["--output_dir", str(out), *argv])
    again = demo.parse_args(["--config", str(saved), "--seed", "7", "--raw_center_fraction", "0.25"])
    expected = demo.parse_args(["--output_dir", str(out), *argv, "--seed", "7", "--raw_center_fraction", "0.25"])
    assert again == expected and again != ran[0]


def test_config_refuses_unknown_keys_and_bad_values(tmp_path, capsys) -> None:
    bad = tmp_path / "settings.json"
    bad.write_text(json.dumps({"version": 1, "train_steps": 10, "num_stepz": 3}))
    with pytest.raises(SystemExit) as err:
        demo.parse_options(["--config", str(bad)])
    assert err.value.code == 2 and "num_stepz" in capsys.readouterr().err
    bad.write_text(json.dumps({"raw_center_fraction": 2.0}))  # the same checks as on the command line
    with pytest.raises(SystemExit) as err:
        demo.parse_options(["--config", str(bad)])
    assert err.value.code == 2 and "--raw_center_fraction in (0, 1)" in capsys.readouterr().err
    bad.write_text(json.dumps({"seeds": "0,1", "study": True, "train_steps": 10}))  # hand-written: commas accepted
    assert demo.parse_args(["--config", str(bad)]) == StudyConfig(
        seeds=(0, 1), demo=DemoConfig(train_steps=10, report_keys=None))


def test_a_refused_run_leaves_the_folders_settings_and_a_finished_one_replaces_them(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"

    def refuse(config):  # what a stage does on a folder built with other training settings
        raise RuntimeError("holds a model trained with other settings")

    monkeypatch.setattr(utils.demo, "run_demo", lambda config: None)
    assert demo.main(["--output_dir", str(out), "--quick"]) == 0
    first = _strict_json(out / demo.SETTINGS_FILE)
    monkeypatch.setattr(utils.demo, "run_demo", refuse)
    with pytest.raises(RuntimeError):
        demo.main(["--output_dir", str(out), "--quick", "--seed", "3"])
    assert _strict_json(out / demo.SETTINGS_FILE) == first  # the folder's own options, not the refused run's
    monkeypatch.setattr(utils.demo, "run_demo", lambda config: None)
    assert demo.main(["--output_dir", str(out), "--quick", "--seed", "3"]) == 0
    assert _strict_json(out / demo.SETTINGS_FILE)["seed"] == 3
