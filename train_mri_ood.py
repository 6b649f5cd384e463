#!/usr/bin/env python
"""``train_mri.py`` plus out-of-distribution cardiac slices whose diffusion timesteps lie in ``[--ood_t_min, 1000)``.

    python train_mri_ood.py --pretrained_model_name_or_path MRI_checkpoint --pretrained_model_type fastmri \
        --data_root ./fastmri --mri_metadata_dir_brain ./metadata_brain_train.csv --cardio_data_root ./fastmri \
        --mri_metadata_dir_cardio ./metadata_cardiology_train.csv --use_ood --enable_condition_emb \
        --metadata_stats ./metadata_stats_ood.json --cfg_prob 0.5

Every flag of ``train_mri.py`` applies; see ``--help``.
"""

import sys

from utils.training import OODTrainConfig
from utils.training import main as train_main


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (also the ``mri-train-ood`` console command); returns the exit status."""
    return train_main(OODTrainConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
