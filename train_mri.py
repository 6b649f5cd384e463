#!/usr/bin/env python
"""Train the MRI diffusion prior (ContextMRI text conditioning and/or Metadata Matters metadata tokens).

    python train_mri.py --pretrained_model_name_or_path MRI_checkpoint --pretrained_model_type fastmri \
        --data_root ./fastmri --mri_metadata_dir_brain ./metadata_brain_train.csv --output_dir ./output
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_mri.py ...

``python train_mri.py --help`` lists every option; the loop lives in :mod:`utils.training`.
"""

import sys

from utils.training import TrainConfig
from utils.training import main as train_main


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (also the ``mri-train`` console command); returns the exit status."""
    return train_main(TrainConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
