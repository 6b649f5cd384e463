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

# no ``from __future__ import annotations``: the options dataclass must also build when the script is loaded
# from its file without a sys.modules entry (tests/test_matlab_io.py does so)
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils import cli
from utils.cli import option
from utils.simulation.acquisition import BRAIN_ACQUISITIONS
from utils.masks import FASTMRI_TYPES
from utils.simulation.cmrx_writer import CMRX_LAYOUTS, CMRxConfig, generate_cmrx_dataset
from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset

PROG = "make_synthetic_data.py"
#: The real formats this script writes.
FORMATS = ("fastmri", "cmrx")
#: fastMRI anatomies the simulator has a phantom of.
SIMULATED_FASTMRI_ANATOMIES = ("brain",)


def _matrix(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 640x320), got {text!r}") from err
    return h, w


@dataclass(kw_only=True)
class SynthOptions:
    """Every option of ``make_synthetic_data.py``."""

    format: str = option(help="which real format to write", choices=FORMATS)
    output_dir: Path = option(help="output folder")
    num_volumes: int = option(1, "volumes (fastMRI) or subjects (CMRxRecon)")
    num_slices: int | None = option(None, "slices per volume", default_text="fastMRI 16, CMRx SAX 10")
    matrix: tuple[int, int] | None = option(None, "HxW: oversampled readout x phase encode", parse=_matrix,
                                            metavar="HxW", default_text="fastMRI 640x320, CMRx 512x246")
    num_coils: tuple[int, ...] | None = option(None, "coil count, or a list drawn from per volume",
                                               default_text="fastMRI 16, CMRx 10")
    seed: int = option(0, "seed of every random draw")
    val_fraction: float | None = option(None, "split subjects into train/val", default_text="flat, no split")
    no_ground_truth: bool = option(False, "skip the ground_truth/ sidecars")
    anatomy: str = option("brain", "fastMRI anatomy", choices=SIMULATED_FASTMRI_ANATOMIES, group="fastMRI")
    acquisitions: tuple[str, ...] | None = option(None, "restrict to these labels", choices=BRAIN_ACQUISITIONS,
                                                  group="fastMRI", default_text="real frequencies")
    vendors: tuple[str, ...] = option(("SIEMENS",), "SIEMENS, GE, Philips (fastMRI: SIEMENS)", group="fastMRI")
    field_strengths: tuple[float, ...] = option((1.5, 3.0), "field strengths drawn from", unit="T", group="fastMRI")
    lesion_prob: float = option(0.3, "subjects with white-matter hyperintensities", group="fastMRI")
    snr: float | None = option(None, "SNR at 1.5 T", group="fastMRI", default_text="fastMRI 40; CMRx 25")
    protocol_csv: str | None = option(None, "metadata CSV to draw protocols from", group="fastMRI")
    challenge_accelerations: list[int] = option(
        [], "also write fastMRI test-format copies (masked kspace + mask + attributes, no target) at these rates, "
        "under {output_dir}/challenge_acc{R}/", allow_empty=True, group="fastMRI")
    challenge_mask_type: str = option("equispaced_fraction", "mask of the test-format copies",
                                      choices=FASTMRI_TYPES, group="fastMRI")
    challenge_center_fraction: float | None = option(None, "fully sampled centre fraction of the test-format copies",
                                                     group="fastMRI", default_text="fastMRI's for the rate")
    layout: str = option("2023", "CMRxRecon release layout", choices=CMRX_LAYOUTS, group="CMRxRecon")
    num_frames: int = option(12, "cine frames", group="CMRxRecon")
    num_slices_lax: int = option(3, "long-axis slices", group="CMRxRecon")
    accelerations: tuple[int, ...] = option((4, 8, 10), "undersampled copies at these rates", group="CMRxRecon")


def build_parser() -> argparse.ArgumentParser:
    """The parser of :class:`SynthOptions` (with ``--config FILE``)."""
    return cli.build_parser(SynthOptions, prog=PROG, description=__doc__)


def parse_args(argv: list[str] | None = None) -> SynthOptions:
    """The options of a command line (``--config FILE`` first, then the command line)."""
    return cli.parse(SynthOptions, argv, build_parser())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_volumes < 1:
        print(f"{PROG}: error: --num_volumes must be >= 1, got {args.num_volumes}", file=sys.stderr)
        return 2
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
