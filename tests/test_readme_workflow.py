"""The README's commands cannot drift from the code.

1. The real-data workflow: every command of that section parses with its script's own parser (every flag exists,
   every value is accepted), and the chain connects: each step reads what an earlier step wrote (CSVs, stats, model
   folder), stats come from train CSVs, and every trained anatomy has a preprocessed val split (parsing only, ~1 s).
2. Every command line of every ```bash block of README.md is extracted and RUN, in README order, in one tmp folder
   (the README's relative paths land there) on tiny inputs, through each script's own ``main``:

   * input placeholders (``/path/to/...``, ``/data/...``) become tiny folders (:data:`INPUTS`): 64x32 4-coil fastMRI
     files (brain, and the same files under knee names), one simulated CMRxRecon subject; ``MRI_checkpoint`` is a
     tiny fake of the released layout (``models.tiny_assets.make_fake_released_checkpoint``) written where the README
     expects it;
   * each script gets the documented tiny-size flags of :data:`TINY` appended (later flags win): 32 px, one
     training step, 2 sampler steps, one worker;
   * ``[--optional flags]`` are left out of the run; each flag in them must appear in the script's ``--help``;
   * training commands outside the workflow section run with ``--dry_run`` (every input checked, nothing trained:
     the workflow section trains the same scripts for real);
   * parse-only, with the reason, are only :data:`PARSE_ONLY` (the fastMRI simulator: ~8 s CPU even at 64x32,
     run by tests/test_simulation.py); environment set-up lines (clone, make, venv, pip, ``accelerate config``) are
     not run, and any other kind of line fails the test until it is classified here;
   * ``accelerate launch`` lines: accelerate's own parser accepts the launch options, and a multi-node line must be
     the one tests/test_shards.py runs (:data:`tests.test_shards.MULTI_NODE_COMMAND`).

   Every run must exit 0. ~30-60 s of CPU on the project's 2-core machine (three tiny trainings dominate).

Also: no file of the repository points at developer notes outside it.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
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


# ---------------------------------------------------------------------------------------------------------------------
# every README command, run on tiny data
# ---------------------------------------------------------------------------------------------------------------------

#: README placeholder input folders -> tiny folders of the fixture (relative to the run folder).
INPUTS = {
    "/path/to/fastmri/brain_multicoil_train": "raw/brain_train",
    "/path/to/fastmri/brain_multicoil_val": "raw/brain_val",
    "/path/to/fastmri/knee_multicoil_train": "raw/knee_train",
    "/path/to/fastmri/knee_multicoil_val": "raw/knee_val",
    "/path/to/cmrxrecon_data": "raw/cmrx",
    "/data/fastmri/multicoil_train": "raw/brain_train",
    "/data/CMRxRecon2023": "raw/cmrx",
}
_ESPIRIT = ["--espirit_calib_width", "16", "--espirit_kernel_width", "5"]
_TRAIN_TINY = ["--resolution", "32", "--max_train_steps", "1", "--train_batch_size", "2", "--dataloader_num_workers",
               "0", "--report_to", "none"]
#: Flags appended to every README command of a script: tiny sizes and short runs (the last value of a flag wins).
TINY = {
    "pre_processing_final.py": ["--crop_size", "32", "--num_workers", "1", "--no_progress", *_ESPIRIT],
    "pre_process_cmrx.py": ["--crop_size", "32", "--no_progress", *_ESPIRIT],
    "make_metadata_stats.py": [],
    "train_mri.py": _TRAIN_TINY,
    "train_mri_ood.py": _TRAIN_TINY,
    "recon_complex_multi.py": ["--crop_size", "32", "--num_steps", "2", "--no_png"],
    "metadata_report.py": ["--crop_size", "32", "--num_slices", "2", "--num_noise", "1", "--num_timesteps", "2",
                           "--no_png", "--no_progress"],
    "make_synthetic_data.py": ["--num_volumes", "2", "--matrix", "64x32", "--num_slices", "1", "--num_coils", "2",
                               "--num_slices_lax", "1", "--num_frames", "2"],
}
#: (script, a value of its argv) -> why the command is only parsed.
PARSE_ONLY = {
    ("make_synthetic_data.py", "fastmri"): "the MNI brain simulation costs ~8 s CPU even at 64x32 "
                                           "(tests/test_simulation.py runs it)",
}
#: Environment set-up lines: not run (they clone, install, or run the whole demo / suite).
SETUP = ("git", "make", "cd")


@dataclass
class ReadmeCommand:
    """One command line of a README bash block."""

    line: str  # as written (continuations joined)
    section: str  # the ``## `` heading it is under
    argv: list[str]  # without ``python`` and without the optional ``[...]`` groups
    optional: list[str]  # the flags inside ``[...]`` groups


def readme_commands(text: str | None = None) -> list[ReadmeCommand]:
    """Every command line of every bash block of README.md, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8") if text is None else text
    out = []
    for match in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        heads = re.findall(r"^## (.+)$", text[: match.start()], flags=re.M)
        section = heads[-1] if heads else ""
        for line in re.sub(r"\\\n\s*", " ", match.group(1)).splitlines():
            groups = re.findall(r"\[([^\[\]]*)\]", line.split("#")[0])
            argv = shlex.split(re.sub(r"\[[^\[\]]*\]", " ", line), comments=True)
            if not argv:
                continue
            if argv[0].startswith("python") and len(argv) > 1 and argv[1].endswith(".py"):
                argv = argv[1:]
            optional = [tok for g in groups for tok in g.split() if tok.startswith("--")]
            out.append(ReadmeCommand(line.strip(), section, argv, optional))
    return out


def _is_setup(argv: list[str]) -> bool:
    return (argv[0] in SETUP or argv[:3] == ["python3", "-m", "venv"] or argv[0].endswith("/pip")
            or (argv[0].endswith("accelerate") and argv[1:2] == ["config"]))


def _substitute(argv: list[str]) -> list[str]:
    out = []
    for tok in argv:
        if tok.startswith(("/path/", "/data/")):
            assert tok in INPUTS, f"README placeholder {tok} has no tiny stand-in: add it to INPUTS"
            tok = INPUTS[tok]
        out.append(tok)
    return out


def _help_text(script: str, capsys) -> str:
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return capsys.readouterr().out


@pytest.fixture
def tiny_inputs(tmp_path, monkeypatch) -> Path:
    """The README's inputs, tiny, under ``tmp_path`` (also the working folder of the runs)."""
    from models.tiny_assets import make_fake_released_checkpoint
    from tests._synthetic import generate_cmrx
    from tests.test_faults_preprocessing import make_file

    for split, indices in (("train", (0, 1)), ("val", (2,))):
        for i in indices:
            brain = make_file(tmp_path / f"raw/brain_{split}", i, num_slices=2)
            (tmp_path / f"raw/knee_{split}").mkdir(parents=True, exist_ok=True)
            shutil.copy(brain, tmp_path / f"raw/knee_{split}" / f"file100000{i}.h5")  # knee: by the file name
    generate_cmrx(tmp_path / "raw/cmrx", "2023")
    make_fake_released_checkpoint(tmp_path / "MRI_checkpoint")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_in_process(script: str, argv: list[str], capsys) -> tuple[int, str]:
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        rc = module.main(argv)
    except SystemExit as err:  # argparse refusals
        rc = err.code
    captured = capsys.readouterr()
    return (0 if rc is None else rc), captured.out + captured.err


def test_every_readme_command_runs_on_tiny_data(tiny_inputs, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ran, parsed, setup = [], [], []
    try:
        for cmd in readme_commands():
            argv = cmd.argv
            if _is_setup(argv):
                setup.append(cmd.line)
                continue
            if argv[0] == "accelerate":
                _check_accelerate_line(cmd)
                parsed.append(cmd.line)
                continue
            script = argv[0]
            assert script in TINY, f"README command of a script this test does not know: {cmd.line}"
            assert (ROOT / script).is_file(), script
            if cmd.optional:
                text = _help_text(script, capsys)
                for flag in cmd.optional:
                    assert flag in text, f"README: `{cmd.line}`: {flag} is not an option of {script}"
            args = _substitute(argv[1:])
            reason = next((why for (s, value), why in PARSE_ONLY.items() if s == script and value in args), None)
            if reason is not None:
                module = importlib.import_module(script.removesuffix(".py"))
                try:
                    module.parse_args(args)
                except SystemExit as err:
                    pytest.fail(f"README: `{cmd.line}` is refused by {script}'s parser (exit {err.code})")
                parsed.append(cmd.line)
                continue
            extra = list(TINY[script])
            if script.startswith("train_mri") and cmd.section != SECTION.removeprefix("## "):
                extra.append("--dry_run")
            rc, output = _run_in_process(script, [*args, *extra], capsys)
            assert rc == 0, f"README: `{cmd.line}` exited {rc} on tiny data:\n{output[-3000:]}"
            ran.append(cmd.line)
    finally:
        torch.set_num_threads(threads)
    # what the workflow promised is there: CSVs of both splits, stats, the trained model, a scored reconstruction
    root = tiny_inputs
    for name in ("metadata_brain_train.csv", "metadata_brain_val.csv", "metadata_knee_train.csv",
                 "metadata_knee_val.csv", "metadata_cardiology_train.csv"):
        assert (root / "fastmri" / name).is_file(), name
    assert (root / "metadata_stats.json").is_file() and (root / "output" / "metadata" / "weights.sha256.json").is_file()
    summaries = list((root / "results").rglob("summary.json"))
    assert summaries, "the reconstruction step wrote no summary"
    import json

    assert all(json.loads(p.read_text())["complete"] for p in summaries)
    assert len(ran) >= 10 and setup, (ran, parsed, setup)


def _check_accelerate_line(cmd: ReadmeCommand) -> None:
    """accelerate's parser accepts the launch options; the multi-node line is the one tests/test_shards.py runs."""
    from accelerate.commands.launch import launch_command_parser

    placeholders = {"$RANK": "0", "$HOST": "127.0.0.1"}  # what the multi-node command leaves to the user
    argv = [placeholders.get(a, a) for a in (cmd.argv[2:] if cmd.argv[1:2] == ["launch"] else cmd.argv[1:])]
    try:
        launch_command_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"README: `{cmd.line}`: accelerate launch refuses its options (exit {err.code})")
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    module = importlib.import_module(argv[script].removesuffix(".py"))
    try:
        module.parse_args(argv[script + 1 :])
    except SystemExit as err:
        pytest.fail(f"README: `{cmd.line}` is refused by {argv[script]}'s parser (exit {err.code})")
    if "--num_machines" in argv:
        from tests.test_shards import MULTI_NODE_COMMAND

        assert shlex.split(cmd.line, comments=True) == shlex.split(MULTI_NODE_COMMAND), \
            f"README's multi-node command differs from the one tests/test_shards.py runs:\n{cmd.line}"


def test_command_extraction_and_placeholders():
    """The extractor itself: continuations, optional groups, comments; an unknown placeholder fails loudly."""
    text = ("## Some section\n```bash\n# a comment\npython pre_processing_final.py --input_dir /data/x \\\n"
            "  --output_root ./f [--write_stats]   # tail comment\nmake test\n```\n")
    cmds = readme_commands(text)
    assert [c.argv for c in cmds] == [["pre_processing_final.py", "--input_dir", "/data/x", "--output_root", "./f"],
                                      ["make", "test"]]
    assert cmds[0].optional == ["--write_stats"] and cmds[0].section == "Some section"
    assert _is_setup(cmds[1].argv) and not _is_setup(cmds[0].argv)
    with pytest.raises(AssertionError, match="no tiny stand-in"):
        _substitute(cmds[0].argv)


# ---------------------------------------------------------------------------------------------------------------------
# hints for the two common mistakes
# ---------------------------------------------------------------------------------------------------------------------

def test_training_at_the_wrong_size_gives_one_line_naming_the_fix(tmp_path, capsys):
    """32x32 data trained without --resolution 32: one line naming --resolution 32, not one line per slice."""
    from tests.training_helpers import write_tiny_dataset

    csv = write_tiny_dataset(tmp_path, "brain", num_files=3, slices_per_file=3, crop=32)
    import train_mri

    rc = train_mri.main(["--unet_config", "tiny", "--text_encoder_type", "none", "--unconditional",
                         "--data_root", str(tmp_path), "--mri_metadata_dir_brain", str(csv), "--output_dir",
                         str(tmp_path / "out"), "--report_to", "none", "--dry_run"])
    err = capsys.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if "error" in line.lower()]
    assert rc != 0 and len(lines) == 1, err.out + err.err
    assert "--resolution 32" in lines[0] and "not 320" in lines[0] and "image file not found" not in lines[0]


def test_a_missing_split_names_the_preprocessing_command(tmp_path, capsys):
    """Reconstruction of a val split never preprocessed, and training without its train CSV, name the command."""
    from tests.training_helpers import write_tiny_dataset

    train_csv = write_tiny_dataset(tmp_path, "brain", num_files=1, slices_per_file=2, crop=32)
    import recon_complex_multi

    rc = recon_complex_multi.main(["--data_root", str(tmp_path), "--load_dir_meta_brain",
                                   str(tmp_path / "metadata_brain_val.csv"), "--method", "zero_filled"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "pre_processing_final.py --input_dir <folder of the brain val .h5 files>" in lines[0]
    assert f"--output_root {tmp_path}" in lines[0] and "--train" not in lines[0]
    # the CSV exists (e.g. copied) but its slices were never preprocessed at this split: the same command
    shutil.copy(train_csv, tmp_path / "elsewhere.csv")
    rc = recon_complex_multi.main(["--data_root", str(tmp_path), "--load_dir_meta_brain",
                                   str(tmp_path / "elsewhere.csv"), "--method", "zero_filled", "--crop_size", "32"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "no brain val split" in lines[0], lines
    assert "pre_processing_final.py --input_dir" in lines[0]

    import train_mri

    rc = train_mri.main(["--unet_config", "tiny", "--text_encoder_type", "none", "--unconditional",
                         "--data_root", str(tmp_path / "empty"), "--mri_metadata_dir_brain",
                         str(tmp_path / "empty" / "metadata_knee_train.csv"), "--resolution", "32", "--output_dir",
                         str(tmp_path / "out"), "--report_to", "none", "--dry_run"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc != 0 and "pre_processing_final.py --input_dir <folder of the knee train .h5 files>" in text, text
    assert "--train" in text
