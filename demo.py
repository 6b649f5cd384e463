#!/usr/bin/env python
"""The main job on physics-simulated data, end to end on a CPU (~20 min expected on 2 idle cores; 58.5 min measured
on a shared, loaded 2-core machine).

Simulates a small brain set (fastMRI h5, split by subject) and a small cardiac set (CMRxRecon .mat), preprocesses them
with the real scripts, trains an unconditioned, a text-conditioned (ContextMRI-style, random frozen CLIP tower) and a
fine-grained metadata model at equal budget, measures how much each conditioned model reads its condition
(metadata_report.py), reconstructs held-out slices at 4x and 8x (and 8x with noisy measurements) with the same masks
for every method, reconstructs the held-out volumes once more from their raw, noisy k-space (recon_complex_multi.py
--raw_dir: ACS-only coil maps, measured scale and noise, scored against reconstruction_rss) beside the re-simulated
path on the same slices (how much the inverse crime flatters the numbers), and prints the results table with an
information line per model, a metadata-sensitivity check, a paired per-slice comparison and an uncertainty-calibration
check. Interrupted runs resume; {output_dir}/settings.json records the options, so
``python demo.py --config {output_dir}/settings.json`` repeats (or resumes) the run.

    python demo.py --output_dir demo_output
    python demo.py --output_dir /tmp/quick --quick      # a 3-minute smoke run (numbers meaningless)
    python demo.py --study                              # the multi-seed study (utils/study.py), ~75-90 min
    python demo.py --study --quick --seeds 0 1 --output_dir /tmp/study_quick   # its smoke run
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import cli
from utils.cli import option
from utils.demo_config import TEXT_ENCODERS, DemoConfig
from utils.study import StudyConfig

PROG = "demo.py"
#: The options' own file in the output folder: ``--config`` reads it back.
SETTINGS_FILE = "settings.json"
SETTINGS_VERSION = 1


def _default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls`` (the library's configs own the demo's defaults)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


_D = DemoConfig  # short, for the defaults below

#: What ``--quick`` sets on the :class:`DemoConfig` (tiny sizes: checks the pipeline, not the claim). The first six
#: are options too: a non-default value of one of them beside ``--quick`` is refused (``--quick`` would override it).
QUICK: dict[str, Any] = {
    "volumes_per_contrast": 2, "num_slices": 2, "train_steps": 4, "recon_steps": 5, "ensemble_size": 2,
    "max_val_slices": 2, "contrasts": ("AXT1", "AXT2"), "batch_size": 2, "matrix": "64x32", "crop_size": 32,
    "report_slices": 2, "report_noise": 1, "report_timesteps": (50, 500),
}

_GROUPS = {None: "options", "data": "simulated data", "training": "training (every model, equal budget)",
           "reconstruction": "reconstruction", "raw": "raw k-space vs. re-simulated rows", "run": "what to run"}


@dataclass
class DemoOptions:
    """Every option of ``demo.py`` (mapped onto :class:`utils.demo_config.DemoConfig` / ``StudyConfig``)."""

    output_dir: Path | None = option(
        None, "output folder (stages found finished there are reused)",
        default_text=f"{_default(_D, 'output_dir')}; with --study: {_default(StudyConfig, 'output_dir')}")
    volumes_per_contrast: int = option(_default(_D, "volumes_per_contrast"),
                                       "simulated subjects per contrast, one of each held out (>= 2)", group="data")
    num_slices: int = option(_default(_D, "num_slices"), "slices per simulated volume", group="data")
    seed: int = option(_default(_D, "seed"), "seed of the data, the training and the reconstructions", group="data")
    train_steps: int = option(_default(_D, "train_steps"), "optimiser steps of every model (>= 1)", group="training")
    text_encoder: str = option(_default(_D, "text_encoder"),
                               "text baseline: random CLIP tower frozen + projection trained, trained from scratch "
                               "with the UNet, or trained from scratch at --text_encoder_lr", choices=TEXT_ENCODERS,
                               group="training")
    text_encoder_lr: float = option(_default(_D, "text_encoder_lr"),
                                    "learning rate of the text encoder with --text_encoder scratch_lr",
                                    group="training")
    with_ood: bool = option(False, "also train the fine-grained model with the cardiac set (train_mri_ood.py); adds "
                                   "~1/3 time", group="training")
    recon_steps: int = option(_default(_D, "recon_steps"), "DDS sampler steps of every diffusion reconstruction",
                              group="reconstruction")
    ensemble_size: int = option(_default(_D, "ensemble_size"),
                                "samples of the fine-grained ensemble (its std map is the uncertainty)",
                                group="reconstruction")
    max_val_slices: int = option(_default(_D, "max_val_slices"), "held-out slices reconstructed (the first ones)",
                                 group="reconstruction")
    no_noise: bool = option(False, "leave out the noisy-measurement rows", group="reconstruction")
    raw_accelerations: list[float] = option(
        list(_default(_D, "raw_accelerations")),
        "rates (> 1) of the raw-k-space rows (held-out volumes through recon_complex_multi.py --raw_dir, beside the "
        "re-simulated path on the same slices); given with no value: no raw rows", allow_empty=True, group="raw")
    raw_center_fraction: float = option(_default(_D, "raw_center_fraction"),
                                        "centre fraction in (0, 1) of the raw-vs-re-simulated rows (their ACS lines "
                                        "give the coil maps)", group="raw")
    quick: bool = option(False, "tiny sizes (2 contrasts x 2 subjects x 2 slices, 32x32, 4 training steps, 5 "
                                "sampler steps): checks the pipeline, not the claim", group="run")
    study: bool = option(False, "the powered study instead of the demo (utils/study.py): 5 models x --seeds, noisy "
                                "8x with a small centre fraction, pooled paired differences with 95 %% intervals and "
                                "verdicts; expected ~75-90 min on 2 idle cores", group="run")
    seeds: list[int] = option(list(_default(StudyConfig, "seeds")), "--study: distinct seeds (>= 2 for an interval)",
                              group="run")

    def resolved_output_dir(self) -> Path:
        """The output folder: ``--output_dir``, else the demo's or the study's default."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(_default(StudyConfig, "output_dir") if self.study else _default(_D, "output_dir"))

    def problem(self) -> str | None:
        """The first bad combination of values (one line for the user), or ``None``."""
        if any(r <= 1 for r in self.raw_accelerations) or not 0 < self.raw_center_fraction < 1:
            return "--raw_accelerations must be > 1 and --raw_center_fraction in (0, 1)"
        if self.quick:
            names = {f.name for f in dataclasses.fields(self)}
            overridden = [f"--{k}" for k in QUICK if k in names and getattr(self, k) != _default(DemoOptions, k)]
            if overridden:
                return f"--quick sets {', '.join(overridden)} itself; leave out --quick or those options"
        elif self.train_steps < 1 or self.volumes_per_contrast < 2:
            return "need --train_steps >= 1 and --volumes_per_contrast >= 2 (one subject per contrast is held out)"
        if self.study and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            return "--seeds must be distinct"
        return None

    def demo_config(self) -> DemoConfig:
        """The :class:`DemoConfig` of these options (the demo's own, or the per-seed template of the study)."""
        output_dir = Path(self.output_dir) if self.output_dir is not None else _default(_D, "output_dir")
        cfg = DemoConfig(output_dir=output_dir, train_steps=self.train_steps,
                         volumes_per_contrast=self.volumes_per_contrast, num_slices=self.num_slices,
                         recon_steps=self.recon_steps, ensemble_size=self.ensemble_size,
                         max_val_slices=self.max_val_slices, seed=self.seed, text_encoder=self.text_encoder,
                         text_encoder_lr=self.text_encoder_lr, raw_accelerations=tuple(self.raw_accelerations),
                         raw_center_fraction=self.raw_center_fraction)
        if self.no_noise:
            cfg.noise_sigma = None
        if self.with_ood:
            cfg.methods = (*cfg.methods, "fine-grained+ood")
        if self.quick:
            for key, value in QUICK.items():
                setattr(cfg, key, value)
        if self.study:
            cfg.report_keys = None  # the study reports every attribute a model reads
        return cfg

    def config(self) -> DemoConfig | StudyConfig:
        """What to run: the demo's :class:`DemoConfig`, or with ``--study`` a ``StudyConfig``."""
        cfg = self.demo_config()
        if self.study:
            return StudyConfig(output_dir=self.resolved_output_dir(), seeds=tuple(self.seeds), demo=cfg)
        return cfg

    def settings(self) -> dict[str, Any]:
        """These options as the JSON object of ``settings.json`` (``--config`` reads it back)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["output_dir"] = str(self.resolved_output_dir())
        return {"version": SETTINGS_VERSION, **out}


def build_parser():
    """The parser of :class:`DemoOptions` (with ``--config FILE``)."""
    return cli.build_parser(DemoOptions, prog=PROG, description=__doc__, group_titles=_GROUPS,
                            config_help=f"a run's {SETTINGS_FILE} (or any JSON of these options): its options, with "
                                        "those given on the command line overriding them")


def parse_options(argv: list[str] | None = None) -> DemoOptions:
    """The checked options of a command line; bad arguments exit 2 with one line, before anything is written."""
    options = cli.parse(DemoOptions, argv, build_parser())
    problem = options.problem()
    if problem:
        cli.fail(PROG, problem)
    return options


def parse_args(argv: list[str] | None = None) -> DemoConfig | StudyConfig:
    """What a command line runs: a :class:`DemoConfig`, or with ``--study`` a ``StudyConfig``."""
    return parse_options(argv).config()


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    config = options.config()
    from utils.files import write_json

    out = options.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    settings, path = options.settings(), out / SETTINGS_FILE
    # Written first only into a new folder (so that an interrupted first run resumes with --config); a folder's file is
    # replaced only once a run with other options has finished: a run the stages refuse (a model trained with other
    # settings) leaves the options that built the folder in place.
    if not path.is_file():
        write_json(path, settings)
    if isinstance(config, StudyConfig):
        from utils.study import run_study

        run_study(config)
    else:
        from utils.demo import run_demo

        run_demo(config)
    write_json(path, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
