"""Write simulated MRI data in the exact real formats: fastMRI brain h5 or CMRxRecon cine .mat (v7.3).

The image contrast of every file is computed from the acquisition parameters its metadata reports (signal equations
with 1.5 T / 3 T tissue values), so this data measures whether a model uses the metadata. Physics: ``utils/simulation``.

Examples:
    python make_synthetic_data.py --format fastmri --output_dir data/fastmri_brain --num_volumes 8 --val_fraction 0.25
    python make_synthetic_data.py --format fastmri --output_dir /tmp/tiny --num_volumes 2 --num_slices 4 \\
        --matrix 64x32 --num_coils 4,8 --seed 1
    python make_synthetic_data.py --format fastmri --output_dir /tmp/tiny --num_volumes 1 --num_slices 2 \\
        --matrix 64x32 --num_coils 4 --challenge_accelerations 4 8     # + test-format copies
    python make_synthetic_data.py --format cmrx --layout 2024 --output_dir data/cmrx --num_volumes 2 --num_frames 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from utils.simulation.acquisition import BRAIN_ACQUISITIONS
from utils.simulation.cmrx_writer import CMRxConfig, generate_cmrx_dataset
from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset


def _matrix(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 640x320), got {text!r}") from err
    return h, w


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("fastmri", "cmrx"), required=True)
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--num_volumes", type=int, default=1, help="volumes (fastMRI) or subjects (CMRxRecon)")
    p.add_argument("--num_slices", type=int, default=None, help="slices per volume (fastMRI 16, CMRx SAX 10)")
    p.add_argument("--matrix", type=_matrix, default=None,
                   help="HxW: oversampled readout x phase encode (fastMRI 640x320, CMRx 512x246)")  # fmt: skip
    p.add_argument("--num_coils", type=_int_list, default=None,
                   help="coil count, or a comma list drawn from per volume (fastMRI 16, CMRx 10)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_fraction", type=float, default=None, help="split subjects into train/val (default: flat)")
    p.add_argument("--no_ground_truth", action="store_true", help="skip the ground_truth/ sidecars")
    g = p.add_argument_group("fastMRI")
    g.add_argument("--anatomy", choices=("brain",), default="brain")
    g.add_argument("--acquisitions", type=_str_list, default=None,
                   help=f"restrict to these labels ({','.join(BRAIN_ACQUISITIONS)}); default: real frequencies")  # fmt: skip
    g.add_argument("--vendors", type=_str_list, default=("SIEMENS",), help="SIEMENS,GE,Philips (fastMRI: SIEMENS)")
    g.add_argument("--field_strengths", type=lambda s: tuple(float(v) for v in s.split(",")), default=(1.5, 3.0))
    g.add_argument("--lesion_prob", type=float, default=0.3, help="subjects with white-matter hyperintensities")
    g.add_argument("--snr", type=float, default=None, help="SNR at 1.5 T (fastMRI 40; CMRx 25)")
    g.add_argument("--protocol_csv", type=str, default=None, help="metadata CSV to draw protocols from")
    g.add_argument("--challenge_accelerations", type=int, nargs="*", default=[],
                   help="also write fastMRI test-format copies (masked kspace + mask + attributes, no target) at these "
                        "rates, under {output_dir}/challenge_acc{R}/")  # fmt: skip
    g.add_argument("--challenge_mask_type", default="equispaced_fraction",
                   choices=["random", "equispaced", "equispaced_fraction", "magic", "magic_fraction"])
    g.add_argument("--challenge_center_fraction", type=float, default=None,
                   help="fully sampled centre fraction of the test-format copies (default: fastMRI's for the rate)")
    g = p.add_argument_group("CMRxRecon")
    g.add_argument("--layout", choices=("2023", "2024"), default="2023")
    g.add_argument("--num_frames", type=int, default=12)
    g.add_argument("--num_slices_lax", type=int, default=3)
    g.add_argument("--accelerations", type=_int_list, default=(4, 8, 10))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_volumes < 1:
        raise SystemExit("--num_volumes must be >= 1")
    if args.acquisitions is not None:
        unknown = set(args.acquisitions) - set(BRAIN_ACQUISITIONS)
        if unknown:
            raise SystemExit(f"unknown acquisitions {sorted(unknown)}; choose from {BRAIN_ACQUISITIONS}")
    t0 = time.perf_counter()
    try:
        if args.format == "fastmri":
            config = FastMRIConfig(
                output_dir=args.output_dir, num_volumes=args.num_volumes, num_slices=args.num_slices or 16,
                matrix=args.matrix or (640, 320), num_coils=args.num_coils or (16,), seed=args.seed,
                acquisitions=args.acquisitions, vendors=args.vendors, field_strengths=args.field_strengths,
                lesion_prob=args.lesion_prob, snr=args.snr or 40.0, val_fraction=args.val_fraction,
                ground_truth=not args.no_ground_truth, protocol_table=args.protocol_csv,
                challenge_accelerations=tuple(args.challenge_accelerations),
                challenge_mask_type=args.challenge_mask_type, challenge_center_fraction=args.challenge_center_fraction,
            )  # fmt: skip
            generate_fastmri_dataset(config)
        else:
            if args.num_coils is not None and len(args.num_coils) != 1:
                raise SystemExit("--num_coils takes a single value for cmrx")
            config = CMRxConfig(
                output_dir=args.output_dir, layout=args.layout, num_volumes=args.num_volumes,
                num_slices_sax=args.num_slices or 10, num_slices_lax=args.num_slices_lax,
                num_frames=args.num_frames, matrix=args.matrix or (512, 246),
                num_coils=(args.num_coils or (10,))[0], seed=args.seed, accelerations=args.accelerations,
                val_fraction=args.val_fraction, snr=args.snr or 25.0, ground_truth=not args.no_ground_truth,
            )  # fmt: skip
            generate_cmrx_dataset(config)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"done in {time.perf_counter() - t0:.1f}s -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
