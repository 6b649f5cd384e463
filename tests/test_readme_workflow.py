"""The README's real-data workflow cannot drift from the code: every command of that section parses with its script's
own parser (every flag exists, every value is accepted), and the chain connects: each step reads what an earlier step
wrote (CSVs, stats, model folder), stats come from train CSVs, and every trained anatomy has a preprocessed val split.

Also: no file of the repository points at developer notes outside it. Parsing only (no data, no model): ~1 s after
the imports.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## The workflow on real data"


def _section_commands() -> list[list[str]]:
    """The ``python SCRIPT ...`` commands of the README section's bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "accelerate":  # accelerate launch [its options] script.py ...
                argv = argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
            elif argv and argv[0].startswith("python"):
                argv = argv[1:]
            if argv:
                commands.append(argv)
    return commands


def _norm(path: str | os.PathLike) -> str:
    return os.path.normpath(str(path))


def _parse(script: str, args: list[str]):
    """Parse with the script's own parser; argparse exits 2 on an unknown flag or a bad value."""
    if script in ("train_mri.py", "train_mri_ood.py"):
        from utils.training.config import OODTrainConfig, TrainConfig, parse_config

        return parse_config(args, OODTrainConfig if script == "train_mri_ood.py" else TrainConfig)
    module = importlib.import_module(script.removesuffix(".py"))
    return module.parse_args(args)


@dataclass
class Chain:
    """What the steps so far wrote: CSV path -> split, stats files, data roots, training output folders."""

    csvs: dict[str, str] = field(default_factory=dict)
    stats: set[str] = field(default_factory=set)
    roots: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    trained_anatomies: set[str] = field(default_factory=set)

    def read_csv(self, path: str, split: str, what: str) -> None:
        assert _norm(path) in self.csvs, f"{what} reads {path}, which no earlier step writes ({sorted(self.csvs)})"
        assert self.csvs[_norm(path)] == split, f"{what} reads {path}: a {self.csvs[_norm(path)]} CSV, not {split}"


def _follow(chain: Chain, script: str, a) -> None:
    """Check what the step reads against ``chain``, then add what it writes."""
    if script == "pre_processing_final.py":
        split = "train" if a.train else "val"
        for anatomy in ([a.anatomy] if a.anatomy else ["brain", "knee"]):
            chain.csvs[_norm(a.output_root / f"metadata_{anatomy}_{split}.csv")] = split
        chain.roots.add(_norm(a.output_root))
    elif script == "pre_process_cmrx.py":
        chain.csvs[_norm(a.output_dir / f"metadata_cardiology_{a.split}.csv")] = a.split
        chain.roots.add(_norm(a.output_dir))
    elif script == "make_metadata_stats.py":
        for csv in a.csvs:
            chain.read_csv(csv, "train", "make_metadata_stats.py")  # stats never from validation data
        chain.stats.add(_norm(a.output))
    elif script in ("train_mri.py", "train_mri_ood.py"):
        assert _norm(a.data_root) in chain.roots, f"{script} --data_root {a.data_root} is no preprocessing output"
        for anatomy, csv in (("brain", a.mri_metadata_dir_brain), ("knee", a.mri_metadata_dir_knee),
                             ("cardiology", getattr(a, "mri_metadata_dir_cardio", None))):
            if csv is not None:
                chain.read_csv(csv, "train", f"{script} ({anatomy})")
                chain.trained_anatomies.add(anatomy)
        if a.metadata_stats is not None:
            assert _norm(a.metadata_stats) in chain.stats, f"{script} --metadata_stats {a.metadata_stats} is not written"
        chain.models.add(_norm(a.output_dir))
    elif script == "recon_complex_multi.py":
        assert _norm(a.data_root) in chain.roots, f"recon --data_root {a.data_root} is no preprocessing output"
        for csv in (a.load_dir_meta_brain, a.load_dir_meta_knee, a.load_dir_meta_cardio):
            if csv is not None:
                chain.read_csv(csv, a.split, "recon_complex_multi.py")
        if a.finetune_folder is not None:
            assert _norm(a.finetune_folder) in chain.models, f"recon --finetune_folder {a.finetune_folder} is no " \
                f"training --output_dir ({sorted(chain.models)})"
        if a.metadata_stats is not None:
            assert _norm(a.metadata_stats) in chain.stats
    else:
        pytest.fail(f"README command of an unknown script: {script}")


def test_readme_workflow_flags_exist_and_the_chain_connects():
    commands = _section_commands()
    scripts = [argv[0] for argv in commands]
    assert {"pre_processing_final.py", "make_metadata_stats.py", "train_mri.py", "recon_complex_multi.py"} <= set(scripts)
    chain = Chain()
    for argv in commands:
        script, args = argv[0], argv[1:]
        assert (ROOT / script).is_file(), script
        try:
            parsed = _parse(script, args)
        except SystemExit as err:  # argparse's way of refusing a flag
            pytest.fail(f"README: `{shlex.join(argv)}` is refused by {script}'s parser (exit {err.code})")
        _follow(chain, script, parsed)
    # Training validates on (and recon reads) the val CSVs: every trained fastMRI anatomy has one.
    for anatomy in chain.trained_anatomies - {"cardiology"}:
        assert any(p.endswith(f"metadata_{anatomy}_val.csv") and s == "val" for p, s in chain.csvs.items()), anatomy


def test_chain_check_catches_a_disconnected_step():
    """The checker itself: a training CSV no step wrote (the old README's ./metadata_brain_train.csv) fails."""
    chain = Chain()
    _follow(chain, "pre_processing_final.py", _parse("pre_processing_final.py",
                                                     ["--input_dir", "in", "--output_root", "./fastmri", "--train"]))
    wrong = _parse("train_mri.py", ["--pretrained_model_name_or_path", "ckpt", "--data_root", "./fastmri",
                                    "--mri_metadata_dir_brain", "./metadata_brain_train.csv"])
    with pytest.raises(AssertionError, match="no earlier step writes"):
        _follow(chain, "train_mri.py", wrong)
    with pytest.raises(SystemExit):
        _parse("recon_complex_multi.py", ["--espirit_device", "0"])


def test_no_file_points_outside_the_repository():
    pattern = r"REFERENCE\.md|HOUSE_STYLE|\.\./shared"
    result = subprocess.run(["git", "grep", "-n", "-E", pattern, "--", "*.py", "*.md", "*.toml", "*.cfg", "*.txt",
                             "Makefile", ":!tests/test_readme_workflow.py"],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.stdout == "", f"references to files outside the repository:\n{result.stdout}"
