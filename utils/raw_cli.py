"""``recon_complex_multi.py --raw_dir``: the command line of raw-acquisition reconstruction
(:mod:`utils.raw_reconstruction`), kept out of the script so the script's ``--data_root`` path stays as it is.

Exit status: 0 when every slice succeeded, 1 when a slice failed (non-finite output), 2 for bad arguments or
unreadable input files (one line, no traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.cli import option
from utils.recon_options import GAMMA_RULES, OUTSIDE_MODES, sampler_values


@dataclass
class RawOptions:
    """The ``--raw_dir`` options (every other option of ``recon_complex_multi.py`` is shared with ``--data_root``)."""

    raw_dir: str | None = option(
        None, "fastMRI multi-coil h5 file or folder of them: validation files (full k-space, undersampled with "
        "--mask_type/--acc_factor) or test/challenge files (their own mask is used)", group="raw",
        default_text="none: --data_root mode")
    metadata_csv: str | None = option(
        None, "CSV (filename, slice, any metadata column) overriding/adding the header's values per slice", group="raw")
    gamma_rule: str = option("fixed", "DDS γ: --gamma as is, or lowered per slice from the estimated noise σ "
                             "(1/γ_eff = 1/γ + 2σ²/s², docs/raw_reconstruction.md)", choices=GAMMA_RULES,
                             group="raw")
    prior_error_std: float = option(0.1, "s of the 'noise' γ rule (the prior's error, on the normalised scale)",
                                    group="raw")
    outside: str = option("lsq", "the field of view outside the prior's window: regularised least squares, or empty",
                          choices=OUTSIDE_MODES, group="raw")


def raw_main(args: Any, given: Collection[str], prog: str) -> int:
    """Run a ``--raw_dir`` reconstruction from the parsed command line ``args``; returns the exit status.

    Args:
        args: the parsed options of ``recon_complex_multi.py``.
        given: the option names the command line (or its ``--config`` file) set explicitly: ``--mask_type`` /
            ``--acc_factor`` left at their defaults mean "each test file's own mask".
        prog: the script name for messages.
    """
    def fail(message: str, code: int = 2) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return code

    from accelerate import PartialState

    from utils.distributed import multi_process_cpu_launch

    from utils.raw_data import list_raw_files, load_metadata_overrides, open_raw_volume

    state = PartialState(cpu=multi_process_cpu_launch())
    if args.data_root is not None:
        return fail("give --raw_dir or --data_root, not both")
    try:
        files = list_raw_files(args.raw_dir)
        overrides = load_metadata_overrides(args.metadata_csv) if args.metadata_csv else None
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err).splitlines()[0])
    volumes = []
    for path in files:
        try:
            volumes.append(open_raw_volume(path, overrides))
        except (OSError, ValueError) as err:
            return fail(f"{path}: not a readable fastMRI or CMRxRecon multi-coil file ({str(err).splitlines()[0]})")
    all_test = all(v.kind == "test" for v in volumes)
    mask_type = args.mask_type if ("mask_type" in given or not all_test) else None
    acc = args.acc_factor if ("acc_factor" in given or not all_test) else None

    from utils.raw_reconstruction import (
        RAW_RESULT_ENTRIES, RawReconSettings, raw_data_identity, raw_out_dir, run_raw_reconstruction, summarize_raw,
        validate_volumes,
    )  # fmt: skip
    from utils.run_identity import RunMismatchError, clear_results, prepare_out_dir, run_fingerprint

    plan = None
    if args.method == "diffusion":
        from utils.diffusion_recon import resolve_model_plan

        try:
            plan = resolve_model_plan(args.pretrained_model_name_or_path, args.pretrained_model_type,
                                      args.finetune_folder, args.metadata_stats)  # fmt: skip
        except ValueError as err:
            return fail(str(err).splitlines()[0])
        if args.enable_condition_emb and not plan.metadata_stats:
            return fail("--enable_condition_emb needs --metadata_stats")
    try:
        settings = RawReconSettings(
            **sampler_values(args), method=args.method, mask_type=mask_type, acc_factor=acc,
            center_fraction=args.center_fraction, gamma_rule=args.gamma_rule, prior_error_std=args.prior_error_std,
            num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, outside=args.outside,
            mixed_precision=args.mixed_precision, tag=args.tag,
            image_size=None if plan is None or not plan.train_size else (plan.train_size, plan.train_size),
        )  # fmt: skip
        validate_volumes(volumes, settings, test_mask_type=args.mask_type if "mask_type" in given else None,
                         test_acc_factor=args.acc_factor if "acc_factor" in given else None)  # fmt: skip
    except ValueError as err:
        return fail(str(err).splitlines()[0])

    model_id = stats = None
    if plan is not None:
        from utils.diffusion_recon import model_identity

        model_id = model_identity(plan)
        stats = plan.metadata_stats if args.enable_condition_emb else None
    fingerprint = run_fingerprint(settings.result_settings(), model=model_id, stats=stats,
                                  data=raw_data_identity(volumes),
                                  info={"raw_dir": str(Path(args.raw_dir).resolve()),
                                        "metadata_csv": args.metadata_csv})  # fmt: skip
    out = raw_out_dir(args.save_dir, settings, fingerprint)
    refusal = None
    if state.is_main_process:
        try:
            if prepare_out_dir(out, fingerprint, overwrite=args.overwrite, create=False) == "overwritten":
                clear_results(out, RAW_RESULT_ENTRIES)
            prepare_out_dir(out, fingerprint, overwrite=args.overwrite)
            from dataclasses import asdict

            from utils.files import write_json

            if not (out / "settings.json").is_file():
                write_json(out / "settings.json", asdict(settings))
        except RunMismatchError as err:
            refusal = str(err)
    state.wait_for_everyone()
    if refusal is not None:
        return fail(refusal)

    diffusion = None
    if plan is not None:
        from utils.diffusion_recon import reconstructor_from_args

        try:
            diffusion = reconstructor_from_args(plan, args, state.device)
        except ValueError as err:
            return fail(str(err).splitlines()[0])
    from utils.distributed import exclusive_lock, shard_items

    mine = shard_items(volumes, args.num_shards, args.shard_index)  # this machine's volumes; processes split them
    try:
        run_raw_reconstruction(mine, settings, out, diffusion=diffusion, device=state.device,
                               process_index=state.process_index, num_processes=state.num_processes)  # fmt: skip
    except ValueError as err:  # e.g. too few ACS lines for ESPIRiT in a file
        return fail(str(err).splitlines()[0], code=1)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    with exclusive_lock(out / ".summary.lock"):  # shards finishing together: the last one sees every shard's rows
        summary = summarize_raw(out, volumes, allow_incomplete=True, assemble={v.stem for v in mine})
    print(f"{out.name}  raw  {settings.mask_type or 'file masks'}"
          f"{'' if settings.acc_factor is None else f' x{settings.acc_factor:g}'}  "
          f"({summary['num_volumes']} volumes, {summary['num_slices']} slices)")  # fmt: skip
    cmrx_keys = [k for k in ("cmrx_psnr", "cmrx_ssim", "cmrx_nmse") if k in summary]  # CMRxRecon ranking region
    for key in ("fastmri_psnr", "fastmri_ssim", "fastmri_nmse", *cmrx_keys, "acceleration", "sigma", "time_s", "nfe"):
        stat = summary.get(key)
        text = "n/a (no target)" if stat is None else f"{stat['mean']:.4g} ± {stat['std']:.4g}"
        print(f"  {key:16s} {text}")
    if not summary["complete"]:
        print(f"  INCOMPLETE: {summary['num_volumes_incomplete']} of {summary['num_volumes_expected']} volume(s) lack "
              f"{summary['num_slices_missing']} slice(s) (another shard not finished?); they are not in the means")
    print(f"reconstructions: {out / 'reconstructions'}")
    return 1 if summary["failed_slices"] else 0
