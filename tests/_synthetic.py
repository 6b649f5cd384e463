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
