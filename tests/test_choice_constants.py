"""Constants feed the command lines' choices (issue 15 item 7): every ``choices`` of a script's options dataclass,
of the training config and of the benchmark parsers *is* the named constant of the module that implements the choice
(identity, not equality: a tuple re-spelt with the same values would drift the day one of the two changes), the
implementing modules validate against the same objects, and every touched script's ``--help`` still exits 0."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

import models.choices as mc
from utils.masks import FASTMRI_TYPES, MASK_TYPES
from utils.preprocessing.names import SPLITS
from utils.recon_options import (
    GAMMA_RULES, ON_MISSING_POLICIES, OUTSIDE_MODES, PRECISIONS, RECON_METHODS, RECON_SAMPLERS,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]


def _expected() -> dict[tuple[str, str], dict[str, Any]]:
    """(module, options class) -> {field: the constant its ``choices`` must be}. Imported lazily (torch)."""
    from make_synthetic_data import FORMATS, SIMULATED_FASTMRI_ANATOMIES
    from utils.demo_config import TEXT_ENCODERS
    from utils.preprocessing.fastmri import FASTMRI_ANATOMIES
    from utils.preprocessing.slices import ESPIRIT_BACKENDS
    from utils.simulation.acquisition import BRAIN_ACQUISITIONS
    from utils.simulation.cmrx_writer import CMRX_LAYOUTS
    from utils.training.config import LR_SCHEDULERS

    model = {"pretrained_model_type": mc.RELEASED_MODEL_TYPES}
    raw = {"gamma_rule": GAMMA_RULES, "outside": OUTSIDE_MODES}
    train = {**model, "text_encoder_type": mc.TEXT_ENCODER_KINDS, "prediction_type": mc.PREDICTION_TYPES,
             "lr_scheduler": LR_SCHEDULERS, "mixed_precision": PRECISIONS, "cfg_strategy": mc.CFG_STRATEGIES}
    return {
        ("recon_complex_multi", "ReconOptions"): {
            **model, **raw, "sampler": RECON_SAMPLERS, "mixed_precision": PRECISIONS, "split": SPLITS,
            "on_missing": ON_MISSING_POLICIES, "mask_type": MASK_TYPES, "method": RECON_METHODS,
            "preset": None},  # None: sorted(utils.samplers.PRESETS), checked by value below
        ("metadata_report", "ReportOptions"): {**model, "split": SPLITS, "on_missing": ON_MISSING_POLICIES},
        ("pre_processing_final", "FastMRIPreprocessOptions"): {"espirit_backend": ESPIRIT_BACKENDS,
                                                               "anatomy": FASTMRI_ANATOMIES},
        ("pre_process_cmrx", "CardiacPreprocessOptions"): {"espirit_backend": ESPIRIT_BACKENDS, "split": SPLITS},
        ("make_synthetic_data", "SynthOptions"): {
            "format": FORMATS, "anatomy": SIMULATED_FASTMRI_ANATOMIES, "acquisitions": BRAIN_ACQUISITIONS,
            "challenge_mask_type": FASTMRI_TYPES, "layout": CMRX_LAYOUTS},
        ("make_fake_checkpoint", "FakeCheckpointOptions"): {"model_types": mc.RELEASED_MODEL_TYPES},
        ("make_metadata_stats", "StatsOptions"): {},
        ("demo", "DemoOptions"): {"text_encoder": TEXT_ENCODERS},
        ("utils.training.config", "TrainConfig"): train,
        ("utils.training.config", "OODTrainConfig"): train,
    }


def test_every_options_dataclass_choice_is_its_constant():
    """Walk the scripts' option dataclasses (fields of the base classes included): the fields with choices are
    exactly the listed ones, and each one's choices is the constant itself."""
    from utils.samplers import PRESETS

    for (module_name, class_name), expected in _expected().items():
        cls = getattr(importlib.import_module(module_name), class_name)
        with_choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if f.metadata.get("choices")}
        assert set(with_choices) == set(expected), (
            f"{module_name}.{class_name}: fields with choices {sorted(with_choices)} != listed {sorted(expected)} "
            "(a new choice: name its constant, and list it here)")
        for name, constant in expected.items():
            if constant is None:
                assert with_choices[name] == tuple(sorted(PRESETS)), (module_name, name)
                continue
            assert with_choices[name] is constant, (
                f"{module_name}.{class_name}.{name}: choices {with_choices[name]} is a copy, not the constant "
                f"{constant} (import the constant instead of spelling the tuple)")


def test_every_script_module_has_its_options_class_listed():
    """No script's options dataclass escapes the walk above: every top-level script whose parser comes from
    :func:`utils.cli.build_parser` is listed."""
    listed = {m for m, _ in _expected()}
    scripts = {p.stem for p in ROOT.glob("*.py") if "cli.build_parser(" in p.read_text(encoding="utf-8")}
    assert scripts and scripts <= listed, sorted(scripts - listed)


def test_implementing_modules_share_the_constants():
    """The heavy modules that implement a choice re-export the light constant (one object, one definition) and
    validate against it (the dataset, both reconstruction settings, the CMRxRecon simulator)."""
    import models.condition_embedder
    import models.text_encoders
    import models.unet
    import utils.preprocessing.layout
    import utils.samplers
    from utils.raw_reconstruction import RawReconSettings
    from utils.simulation.cmrx_writer import CMRX_LAYOUTS, CMRxConfig

    assert models.unet.RELEASED_MODEL_TYPES is mc.RELEASED_MODEL_TYPES
    assert models.text_encoders.TEXT_ENCODER_KINDS is mc.TEXT_ENCODER_KINDS
    assert models.condition_embedder.CFG_STRATEGIES is mc.CFG_STRATEGIES
    assert utils.samplers.PREDICTION_TYPES is mc.PREDICTION_TYPES
    assert utils.preprocessing.layout.SPLITS is SPLITS
    for rule in GAMMA_RULES:
        assert RawReconSettings(gamma_rule=rule).gamma_rule == rule
    for mode in OUTSIDE_MODES:
        assert RawReconSettings(outside=mode).outside == mode
    with pytest.raises(ValueError, match="gamma_rule"):
        RawReconSettings(gamma_rule="sigma")
    with pytest.raises(ValueError, match="outside"):
        RawReconSettings(outside="none")
    from utils.data import MRISliceDataset
    from utils.recon_settings import ReconSettings

    with pytest.raises(ValueError, match="split"):
        MRISliceDataset("unused", "unused.csv", split="test")  # checked before any file is read
    with pytest.raises(ValueError, match="on_missing"):
        MRISliceDataset("unused", "unused.csv", on_missing="drop")
    for method in RECON_METHODS:
        assert RawReconSettings(method=method).method == method
    with pytest.raises(ValueError, match="method"):
        ReconSettings(method="oracle")
    with pytest.raises(ValueError, match="sampler"):
        ReconSettings(sampler="ddim")
    for layout in CMRX_LAYOUTS:
        assert CMRxConfig(output_dir="unused", layout=layout).layout == layout
    with pytest.raises(ValueError, match="layout"):
        CMRxConfig(output_dir="unused", layout="2025")


#: Benchmark parsers (plain argparse): module -> {dest: the constant its choices must be}.
_BENCH = {
    "benchmarks.bench_nfe_quality": {"split": SPLITS, "tune_split": SPLITS, "outside": OUTSIDE_MODES},
    "benchmarks.bench_training": {"mixed_precision": PRECISIONS, "text": "bench_training.TEXT_ENCODERS"},
    "benchmarks.bench_throughput": {"precision": "NETWORK_PRECISIONS"},
    "benchmarks.gpu_check": {"precision": "NETWORK_PRECISIONS"},
}


class _Captured(Exception):
    """Stops a benchmark's parse_args once its parser is built (the test reads the parser, runs nothing)."""


@pytest.mark.parametrize("module_name", sorted(_BENCH))
def test_benchmark_choices_are_the_constants_and_help_works(module_name, monkeypatch, capsys):
    import benchmarks

    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as err:
        module.parse_args(["--help"])
    assert err.value.code == 0 and "usage:" in capsys.readouterr().out

    captured: dict[str, argparse.ArgumentParser] = {}

    def grab(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        captured["parser"] = self
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Captured):
        module.parse_args([])
    choices = {a.dest: a.choices for a in captured["parser"]._actions}
    for dest, constant in _BENCH[module_name].items():
        if isinstance(constant, str):  # a benchmark's own constant: benchmarks.X or benchmarks.<module>.X
            owner, _, attr = constant.rpartition(".")
            constant = getattr(importlib.import_module(f"benchmarks.{owner}") if owner else benchmarks, attr)
        assert choices[dest] is constant, f"{module_name} --{dest}: {choices[dest]} is not the constant {constant}"


#: ``choices=`` followed by a literal tuple/list of strings: a tuple spelt at the call site.
_LITERAL_CHOICES = re.compile(r"choices\s*=\s*[\(\[]\s*[\"']")


def test_no_choices_spelt_as_a_literal_anywhere():
    """Source scan of the project (tests excluded: they define toy options): no ``choices=("a", "b")``."""
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        # prune the virtual environment, outputs and the tests (which define toy options) before descending
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d not in ("tests", "demo_output", "build")]
        for file in (f for f in files if f.endswith(".py")):
            path = Path(folder) / file
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _LITERAL_CHOICES.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", ["make_fake_checkpoint"])
def test_help_of_scripts_not_in_test_cli(name, capsys):
    """``--help`` of the scripts tests/test_cli.py does not run (its list: the other top-level scripts)."""
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as err:
        module.main(["--help"])
    assert err.value.code == 0 and "--model_types" in capsys.readouterr().out
