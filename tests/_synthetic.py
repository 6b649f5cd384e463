"""Tiny simulated inputs shared by the preprocessing/dataset tests (the project's generator, small sizes)."""

from __future__ import annotations

from pathlib import Path

FASTMRI_MATRIX = (96, 48)
FASTMRI_CROP = 48
FAST_ESPIRIT_ARGS = ["--espirit_calib_width", "16", "--espirit_kernel_width", "5"]


def generate_fastmri(output_dir: Path, num_volumes: int = 2, num_slices: int = 3, seed: int = 1) -> list:
    """Simulated fastMRI brain h5 files (fully sampled phase encode, lesions in every subject) + ground truth."""
    from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset

    cfg = FastMRIConfig(
        output_dir=output_dir,
        num_volumes=num_volumes,
        num_slices=num_slices,
        matrix=FASTMRI_MATRIX,
        num_coils=(4,),
        seed=seed,
        pe_fraction=(1.0, 1.0),
        lesion_prob=1.0,
    )
    return generate_fastmri_dataset(cfg, log=None)


def generate_cmrx(output_dir: Path, layout: str, seed: int = 0) -> None:
    """Simulated CMRxRecon cine (one subject: 2 SAX slices, 1 LAX slice, 3 frames, 64x32, 10 coils, R=4)."""
    from utils.simulation.cmrx_writer import CMRxConfig, generate_cmrx_dataset

    cfg = CMRxConfig(output_dir=output_dir, layout=layout, num_volumes=1, num_slices_sax=2, num_slices_lax=1,
                     num_frames=3, matrix=(64, 32), seed=seed, accelerations=(4,),
                     task2_patterns=("ktGaussian",))  # fmt: skip
    generate_cmrx_dataset(cfg, log=None)
