#!/usr/bin/env python
"""Reconstruct undersampled validation slices with a (metadata-)conditioned diffusion prior or a baseline.

Example (the README's step 3; ``--config {results folder}/settings.json`` repeats a run's settings)::

    python recon_complex_multi.py --pretrained_model_name_or_path ./MRI_checkpoint \\
        --load_dir_meta_brain ./fastmri/metadata_brain_val.csv --data_root ./fastmri --enable_condition_emb \\
        --finetune_folder ./output/metadata --metadata_stats ./metadata_stats.json --mask_type uniform1d \\
        --acc_factor 4 --save_dir ./results

Results go to {save_dir}/{mask_type}/acc_{R}/{tag}/, where tag is --tag or a readable name plus a short hash of every
setting that changes a result (e.g. dds_steps100_w1_n1-3fa9c2d1); run.json in the folder holds that fingerprint. A
run resumes a folder only when the fingerprint matches; an explicit --tag whose folder holds another run is refused
(exit 2, naming the differing settings) unless --overwrite.

Shard a set over processes/GPUs with ``accelerate launch recon_complex_multi.py ...`` (each process takes every n-th
slice), or run separate jobs (machines, SLURM array tasks) into the same --save_dir with --num_shards N
--shard_index I (each takes every N-th slice; docs/cluster.md) or with --start_idx/--end_idx ranges: the summary is
rebuilt from the rows on disk and marks volumes whose slices are not all done as incomplete, so the last shard to
finish writes the whole run's summary. Exit status: 0 when every reconstructed slice succeeded, 1 when any slice
failed (non-finite input or output; listed in summary.json), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import cli
from utils.cli import option
from utils.data_hints import missing_csv_hint
from utils.distributed import SHARD_GROUP, ShardOptions, exclusive_lock, exit_on_bad_shards, shard_items
from utils.masks import MASK_TYPES
from utils.preprocessing.names import SPLITS
from utils.raw_cli import RawOptions
from utils.recon_options import (
    ON_MISSING_POLICIES, PRECISIONS, RECON_METHODS, ModelOptions, SamplerSettings, sampler_values,
)  # fmt: skip
from utils.samplers import PRESETS

PROG = "recon_complex_multi.py"

_GROUPS = {"model": "model", "data": "data (preprocessed slices: --data_root)", "measurement": "measurement",
           "method": "method", "output": "output", "raw": "raw acquisitions (--raw_dir, instead of --data_root)",
           SHARD_GROUP: SHARD_GROUP}
_FAST = ", ".join(f"--{k} {v}" for k, v in PRESETS["fast"].items())


@dataclass
class ReconOptions(ModelOptions, SamplerSettings, RawOptions, ShardOptions):
    """Every option of ``recon_complex_multi.py`` (``--data_root`` and ``--raw_dir`` modes)."""

    pretrained_model_name_or_path: str | None = option(
        None, "released MRI_checkpoint folder (local)", group="model",
        default_text="for a --finetune_folder: the run's own")
    metadata_stats: str | None = option(None, "metadata_stats.json the model was trained with", group="model",
                                        default_text="the --finetune_folder run's own, if it exists")
    mixed_precision: str = option("no", "network precision; data consistency always runs in fp32/complex64",
                                  choices=PRECISIONS, group="model")
    data_root: str | None = option(None, "root holding {anatomy}_mvue_{crop}_{split}/", group="data",
                                   default_text="none; required unless --raw_dir is given")
    load_dir_meta_brain: str | None = option(None, "brain metadata CSV", aliases=("--metadata_csv_brain",),
                                             group="data")
    load_dir_meta_knee: str | None = option(None, "knee metadata CSV", aliases=("--metadata_csv_knee",), group="data")
    load_dir_meta_cardio: str | None = option(None, "cardiac metadata CSV", aliases=("--metadata_csv_cardio",),
                                              group="data")
    split: str = option("val", "split folder of the slices ({anatomy}_mvue_{crop}_{split}/)", choices=SPLITS,
                        group="data")
    crop_size: int | None = option(None, "image side of the data; must equal the size the model was trained at",
                                   unit="px", aliases=("--resolution",), group="data",
                                   default_text="the --finetune_folder run's resolution, else 320")
    start_idx: int = option(0, "first dataset index to reconstruct", group="data")
    end_idx: int | None = option(None, "one past the last dataset index", group="data", default_text="the end")
    on_missing: str = option("error", "rows without slice/map files: stop with an error, or skip them with a warning",
                             choices=ON_MISSING_POLICIES, group="data")
    mask_type: str = option("uniform1d", "undersampling mask", choices=MASK_TYPES, group="measurement")
    acc_factor: float = option(4.0, "nominal acceleration R > 1", group="measurement")
    center_fraction: float | None = option(None, "fully sampled centre fraction in (0, 1)", group="measurement",
                                           default_text="0.08 at 4x, 0.04 at 8x, else 0.32/R")
    noise_sigma: float = option(
        0.0, "complex Gaussian noise added to the simulated k-space, y = M(F S x + n), n ~ CN(0, σ²): real and "
        "imaginary parts each have std σ/√2 (E|n|² = σ²), relative to the normalised images (99th percentile of "
        "|x| = 1); seeded per (file, slice), the same for every method", group="measurement")
    method: str = option("diffusion", "the diffusion prior or a baseline", choices=RECON_METHODS, group="method")
    preset: str | None = option(None, f"named sampler settings (utils.samplers.PRESETS; options given explicitly "
                                f"win): 'fast' = {_FAST} (benchmarks/bench_nfe_quality.py, README 'Fast "
                                "reconstruction')", choices=sorted(PRESETS), group="method")
    metadata_override: list[str] = option([], "replace metadata values (e.g. a mismatched contrast) to test metadata "
                                          "sensitivity", metavar="KEY=VALUE", allow_empty=True, split_commas=False,
                                          group="method")
    mismatch_metadata: bool = option(False, "give every slice the protocol of another contrast (does the model use "
                                     "its metadata?)", group="method")
    num_samples: int = option(1, "ensemble size (complex mean scored, std map saved)", group="method")
    seed: int = option(0, "base seed of the per-slice noise generators", group="method")
    batch_size: int = option(1, "slices per network forward (not part of the run's identity: per-slice seeds)",
                             group="method")
    save_dir: str = option("./results", "results root: {save_dir}/{mask_type}/acc_{R}/{tag}/",
                           aliases=("--output_dir",), group="output")
    tag: str | None = option(None, "name of the method's output folder", group="output",
                             default_text="readable settings + a short hash of them")
    overwrite: bool = option(False, "replace the results of another run in the --tag folder (matching results are "
                             "resumed)", group="output")
    no_png: bool = option(False, "write no PNG figures (arrays and metrics only)", group="output")

    #: What a saved settings.json records that is no option: the prior's image size (from the model).
    CONFIG_RECORDED_KEYS = frozenset({"image_size"})

    @classmethod
    def config_from_saved(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A run's ``settings.json`` (``--data_root``: :class:`utils.recon_settings.ReconSettings`; ``--raw_dir``:
        :class:`utils.raw_reconstruction.RawReconSettings`) as options of this command line.

        Raises:
            ValueError: the file sets a raw setting that has no option here to a value other than its default.
        """
        if "save_png" in data:
            save_png = data.pop("save_png")
            if not isinstance(save_png, bool):
                raise ValueError(f"save_png: expected true or false, got {save_png!r}")
            data.setdefault("no_png", not save_png)
        if isinstance(data.get("metadata_override"), dict):
            data["metadata_override"] = [f"{k}={_override_text(v)}" for k, v in data["metadata_override"].items()]
        for key in ("mask_type", "acc_factor"):  # raw runs of test files record None: each file's own mask
            if key in data and data[key] is None:
                del data[key]
        options = {f for f in cls.__dataclass_fields__}
        fixed = [k for k in data if k not in options and k in _raw_only_defaults()]
        for key in fixed:  # raw settings without an option: only their defaults can be reproduced
            if data[key] != _raw_only_defaults()[key]:
                raise ValueError(f"{key} = {data[key]!r} has no option in this command line (only its default "
                                 f"{_raw_only_defaults()[key]!r} can be run)")
            del data[key]
        return data


def _override_text(value: Any) -> str:
    """A typed metadata value of a saved ``metadata_override`` as the ``KEY=VALUE`` text the CLI parses."""
    if value is None:
        return ""
    if isinstance(value, list):  # pathology labels; [] = explicit "no finding"
        return ", ".join(map(str, value)) if value else "no finding"
    return str(value)


def _raw_only_defaults() -> dict[str, Any]:
    """The :class:`RawReconSettings` fields that no option sets, with their defaults."""
    import dataclasses

    from utils.raw_reconstruction import RawReconSettings

    options = set(ReconOptions.__dataclass_fields__) | set(ReconOptions.CONFIG_RECORDED_KEYS)
    return {f.name: f.default for f in dataclasses.fields(RawReconSettings) if f.name not in options}


def build_parser() -> argparse.ArgumentParser:
    """The parser of :class:`ReconOptions` (with ``--config settings.json``; ``--num_shards/--shard_index`` from
    :class:`utils.distributed.ShardOptions`: separate jobs (machines) into one --save_dir)."""
    return cli.build_parser(ReconOptions, prog=PROG, description=__doc__, group_titles=_GROUPS,
                            config_help="a run's settings.json (or any JSON of these options): its settings, with "
                            "the options given here overriding them")


def _with_preset(from_file: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults < file < preset < command line (a preset named in the file sits below the file's own values)."""
    if given.get("preset"):
        return {**from_file, **PRESETS[given["preset"]], **given}
    if from_file.get("preset"):
        return {**PRESETS[from_file["preset"]], **from_file, **given}
    return {**from_file, **given}


def parse_command_line(argv: list[str] | None = None) -> cli.Parsed:
    """The options, what was set explicitly (command line or ``--config``) and the sharding extras."""
    return cli.parse_with_sources(ReconOptions, argv, build_parser(), layers=_with_preset)


def parse_args(argv: list[str] | None = None) -> ReconOptions:
    """The options of a command line (``--preset`` applied; explicitly given options win)."""
    return parse_command_line(argv).config


class ArgumentProblem(Exception):
    """A bad argument: reported as one line, exit status 2."""


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def check_args(args: ReconOptions) -> None:
    """Everything that can be checked from the command line and the file system alone (no data, no model).

    Raises:
        ArgumentProblem: the first bad argument.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ArgumentProblem(message)

    need(_finite(args.acc_factor) and args.acc_factor > 1, f"--acc_factor must be a finite number > 1, got "
                                                           f"{args.acc_factor}")
    need(args.center_fraction is None or (_finite(args.center_fraction) and 0 < args.center_fraction < 1),
         f"--center_fraction must lie in (0, 1), got {args.center_fraction}")
    need(_finite(args.noise_sigma) and args.noise_sigma >= 0, f"--noise_sigma must be a finite number >= 0, got "
                                                              f"{args.noise_sigma}")
    need(args.num_steps >= 1, f"--num_steps must be >= 1, got {args.num_steps}")
    need(args.num_samples >= 1, f"--num_samples must be >= 1, got {args.num_samples}")
    need(args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}")
    need(args.cg_iter >= 0, f"--cg_iter must be >= 0, got {args.cg_iter}")
    need(args.cs_iter >= 1, f"--cs_iter must be >= 1, got {args.cs_iter}")
    need(_finite(args.cs_lambda) and args.cs_lambda >= 0, f"--cs_lambda must be a finite number >= 0, got "
                                                          f"{args.cs_lambda}")
    need(_finite(args.eta) and args.eta >= 0, f"--eta must be a finite number >= 0, got {args.eta}")
    need(_finite(args.gamma) and args.gamma >= 0, f"--gamma must be a finite number >= 0, got {args.gamma}")
    need(_finite(args.dps_step) and args.dps_step > 0, f"--dps_step must be a finite number > 0, got {args.dps_step}")
    need(_finite(args.guidance_scale), f"--guidance_scale must be finite, got {args.guidance_scale}")
    need(args.clip_x0 is None or (_finite(args.clip_x0) and args.clip_x0 > 0),
         f"--clip_x0 must be a finite number > 0, got {args.clip_x0}")
    need(args.start_idx >= 0, f"--start_idx must be >= 0, got {args.start_idx}")
    need(args.end_idx is None or args.end_idx > args.start_idx,
         f"--end_idx ({args.end_idx}) must be larger than --start_idx ({args.start_idx})")
    need(args.crop_size is None or args.crop_size >= 1, f"--crop_size must be >= 1, got {args.crop_size}")
    need(args.tag is None or (args.tag.strip() and "/" not in args.tag and args.tag not in (".", "..")),
         f"--tag must be a plain folder name, got {args.tag!r}")
    need(Path(args.data_root).is_dir(), f"--data_root {args.data_root} is not a folder")
    csvs = [c for c in (args.load_dir_meta_brain, args.load_dir_meta_knee, args.load_dir_meta_cardio) if c]
    need(bool(csvs), "give at least one of --load_dir_meta_brain / --load_dir_meta_knee / --load_dir_meta_cardio")
    for c in csvs:
        need(Path(c).is_file(), f"metadata CSV not found: {c}{missing_csv_hint(c)}")
    if args.method == "diffusion":
        need(bool(args.finetune_folder or args.pretrained_model_name_or_path),
             "method 'diffusion' needs --finetune_folder and/or --pretrained_model_name_or_path")
        for flag in ("finetune_folder", "pretrained_model_name_or_path"):
            value = getattr(args, flag)
            need(value is None or Path(value).is_dir(), f"--{flag} {value} is not a folder")
        need(args.metadata_stats is None or Path(args.metadata_stats).is_file(),
             f"--metadata_stats {args.metadata_stats} not found")


def _overrides(items: list[str]) -> dict:
    from utils.metadata import record_from_row

    raw = {}
    for item in items:
        if "=" not in item:
            raise ArgumentProblem(f"--metadata_override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        raw[key] = value
    typed = record_from_row(raw)
    if "pathology" not in raw:
        typed.pop("pathology", None)
    return typed


def _check_embedder(plan, enable_condition_emb: bool) -> None:
    """The metadata-embedder checks of the model loader, done before any folder is claimed (the embedder is small)."""
    if plan.finetune_folder is None:
        if enable_condition_emb:
            raise ArgumentProblem("--enable_condition_emb needs --finetune_folder: the released model has no "
                                  "metadata embedder")
        return
    folder = Path(plan.finetune_folder) / "condition_embedder"
    if enable_condition_emb != folder.is_dir():
        raise ArgumentProblem(
            f"{plan.finetune_folder} was trained with metadata embeddings: pass --enable_condition_emb (and its "
            "--metadata_stats)" if folder.is_dir() else
            f"--enable_condition_emb given but {plan.finetune_folder} has no condition_embedder/")
    if enable_condition_emb:
        from models.condition_embedder import MetadataConditionEmbedder
        from utils.diffusion_recon import check_embedder_matches_stats

        try:
            check_embedder_matches_stats(MetadataConditionEmbedder.from_pretrained(folder), plan.metadata_stats)
        except (ValueError, OSError) as err:
            raise ArgumentProblem(" ".join(str(err).split())) from None


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parsed = parse_command_line(argv)
    args = parsed.config
    exit_on_bad_shards(args, PROG)
    if args.raw_dir is not None:  # --- raw acquisitions (issue 14): utils/raw_cli.py ---
        from utils.raw_cli import raw_main

        return raw_main(args, parsed.set_explicitly, PROG)
    try:
        if args.data_root is None:
            raise ArgumentProblem("give --data_root (preprocessed slices) or --raw_dir (raw k-space files)")
        return _main(args, argv)
    except ArgumentProblem as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2


def _main(args: ReconOptions, argv: list[str] | None) -> int:
    from utils.measurement import mask_problem

    check_args(args)
    plan = None
    if args.method == "diffusion":
        from utils.diffusion_recon import resolve_model_plan

        try:
            plan = resolve_model_plan(args.pretrained_model_name_or_path, args.pretrained_model_type,
                                      args.finetune_folder, args.metadata_stats)
        except ValueError as err:
            raise ArgumentProblem(str(err)) from None
        for line in plan.notes:
            _note(line)
        if args.enable_condition_emb and not plan.metadata_stats:
            raise ArgumentProblem("--enable_condition_emb needs --metadata_stats")
        _check_embedder(plan, args.enable_condition_emb)
    crop = args.crop_size
    if crop is None:
        crop = plan.train_size if plan is not None and plan.finetune_folder and plan.train_size else 320
    if plan is not None and plan.train_size is not None and plan.train_size != crop:
        raise ArgumentProblem(f"the model was trained at {plan.train_size}x{plan.train_size} but --crop_size is {crop}:"
                              f" reconstruct data of the model's size")
    problem = mask_problem(args.mask_type, args.acc_factor, args.center_fraction, (crop, crop))
    if problem:
        raise ArgumentProblem(problem)
    overrides = _overrides(args.metadata_override)
    csvs = [c for c in (args.load_dir_meta_brain, args.load_dir_meta_knee, args.load_dir_meta_cardio) if c]

    from utils.data import MRISliceDataset

    try:
        dataset = MRISliceDataset(args.data_root, csvs, split=args.split, crop_size=crop, load_maps=True,
                                  on_missing=args.on_missing)
    except FileNotFoundError as err:  # rows whose files are missing or of the wrong size: bad input
        lines = str(err).splitlines()
        if len(lines) == 1:  # a whole folder missing (wrong size or split): the message names the fix
            raise ArgumentProblem(lines[0]) from None
        raise ArgumentProblem(lines[0] + f" {lines[1].strip()}" + (" ..." if len(lines) > 2 else "") +
                              " (--on_missing skip drops them)") from None
    except ValueError as err:  # no slices at all
        print(f"{PROG}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    end = len(dataset) if args.end_idx is None else min(args.end_idx, len(dataset))
    indices = list(range(args.start_idx, end))
    if not indices:
        print(f"{PROG}: error: no slices in [{args.start_idx}, {end}) (dataset has {len(dataset)})", file=sys.stderr)
        return 1
    indices = shard_items(indices, args.num_shards, args.shard_index)  # this machine's share; processes split it

    from accelerate import PartialState

    from utils.distributed import multi_process_cpu_launch

    from utils.recon_settings import ReconSettings
    from utils.recon_summary import summarize, summary_lines
    from utils.reconstruction import run_reconstruction
    from utils.run_identity import RunMismatchError, data_identity, out_dir_for, prepare_out_dir, run_fingerprint

    state = PartialState(cpu=multi_process_cpu_launch())
    settings = ReconSettings(
        **sampler_values(args), method=args.method, mask_type=args.mask_type, acc_factor=args.acc_factor,
        center_fraction=args.center_fraction, noise_sigma=args.noise_sigma, metadata_override=overrides,
        mismatch_metadata=args.mismatch_metadata, num_samples=args.num_samples, seed=args.seed,
        mixed_precision=args.mixed_precision, batch_size=args.batch_size, save_png=not args.no_png, tag=args.tag,
    )
    model_id, stats = None, None
    if plan is not None:
        from utils.diffusion_recon import model_identity

        model_id = model_identity(plan)
        stats = plan.metadata_stats if args.enable_condition_emb else None
    fingerprint = run_fingerprint(
        settings, model=model_id, stats=stats, data=data_identity(dataset, csvs, args.split, crop),
        info={"data_root": str(Path(args.data_root).resolve()), "csvs": [str(Path(c).resolve()) for c in csvs],
              "finetune_folder": None if plan is None else plan.finetune_folder,
              "pretrained_model_name_or_path": None if plan is None else plan.base,
              "metadata_stats": stats},
    )
    out = out_dir_for(args.save_dir, settings, fingerprint, args.tag)
    refusal = None
    if state.is_main_process:
        try:
            prepare_out_dir(out, fingerprint, overwrite=args.overwrite, settings=settings)
        except RunMismatchError as err:
            refusal = str(err)
    state.wait_for_everyone()  # the folder is claimed (or refused) before any process writes into it
    if refusal is not None:
        raise ArgumentProblem(refusal)
    if not state.is_main_process:  # every process must agree on the run: same settings, model, data
        from utils.run_identity import fingerprint_differences, read_fingerprint

        claimed = read_fingerprint(out) or {}
        if claimed.get("hash") != fingerprint["hash"]:
            diffs = "; ".join(fingerprint_differences(claimed, fingerprint)[:5]) or "no run.json"
            raise ArgumentProblem(f"process {state.process_index}: {out}/run.json does not hold this run ({diffs}); "
                                  "see the main process's message")

    diffusion = None
    if plan is not None:
        from utils.diffusion_recon import reconstructor_from_args

        try:  # also: a drop key the model cannot read (neither a metadata token nor a prompt field) is a bad argument
            diffusion = reconstructor_from_args(plan, args, state.device)
        except ValueError as err:
            raise ArgumentProblem(str(err).splitlines()[0]) from None

    try:
        run_reconstruction(dataset, settings, args.save_dir, diffusion=diffusion, device=state.device,
                           process_index=state.process_index, num_processes=state.num_processes, indices=indices,
                           fingerprint=fingerprint, out_dir=out)
    except RunMismatchError as err:  # another process wrote a different run.json: the processes disagree
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    with exclusive_lock(out / ".summary.lock"):  # shards finishing together: the last one sees every shard's rows
        summary = summarize(out, dataset)
        _log_command(out, argv, indices, state.num_processes, (args.shard_index, args.num_shards))
    keys = ["fastmri_psnr", "fastmri_ssim", "fastmri_nmse", "contextmri_psnr", "contextmri_ssim", "time_s",
            "nfe", "acceleration"]
    print(f"{out.name}  {settings.mask_type} x{settings.acc_factor:g}  noise σ {settings.noise_sigma:g}  "
          f"({summary['num_volumes']} volumes, {summary['num_slices']} slices scored)")
    for line in summary_lines(summary):
        print(f"  {line}")
    for k in keys:
        stat = summary[k]
        text = "n/a" if stat["mean"] is None else f"{stat['mean']:.4f} ± {stat['std']:.4f}"
        print(f"  {k:16s} {text}")
    print(f"results: {out}")
    return 1 if summary["num_slices_failed"] else 0


def _log_command(out: Path, argv: list[str] | None, indices: list[int], num_processes: int,
                 shard: tuple[int, int] = (0, 1)) -> None:
    """Append this invocation to ``command.json`` (every run that wrote into the folder, not just the last)."""
    import json

    from utils.files import write_json

    path = out / "command.json"
    try:
        previous = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        previous = []
    if not isinstance(previous, list):  # older folders held one {"argv": ...} object
        previous = [previous]
    previous.append({"argv": sys.argv if argv is None else [sys.argv[0], *argv], "time": time.strftime("%FT%T%z"),
                     "indices": [indices[0], indices[-1] + 1] if indices else [], "num_processes": num_processes,
                     "shard": list(shard)})
    write_json(path, previous)


if __name__ == "__main__":
    sys.exit(main())
