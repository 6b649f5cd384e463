"""Write a fake ``MRI_checkpoint/``: the released folder's layout with tiny random weights (it is not a model).

For trying the fine-tuning and LoRA path without the released weights: every script that takes
``--pretrained_model_name_or_path MRI_checkpoint`` accepts the folder (``fastmri/`` and ``skm-tea/`` UNets,
``scheduler/``, ``text_encoder/``, ``tokenizer/``; docs/formats.md). Its reconstructions are noise until trained; the
default UNet (``configs/unet/tiny.json``) works on 32x32 images, so preprocess with ``--crop_size 32``.

Example (simulated data, a LoRA fine-tune of a few steps on the CPU)::

    python make_fake_checkpoint.py --output_dir ./fake_checkpoint
    python make_synthetic_data.py --format fastmri --output_dir ./synth --num_volumes 2 --num_slices 4 \\
        --matrix 64x32 --num_coils 4 --val_fraction 0.5
    python pre_processing_final.py --input_dir ./synth/train --output_root ./synth_pp --crop_size 32 --train
    python train_mri.py --pretrained_model_name_or_path ./fake_checkpoint --data_root ./synth_pp \\
        --mri_metadata_dir_brain ./synth_pp/metadata_brain_train.csv --resolution 32 --use_lora --max_train_steps 2 \\
        --output_dir ./output/fake_lora
"""

# no ``from __future__ import annotations``: utils.cli reads the option types at run time
import sys
from dataclasses import dataclass
from pathlib import Path

from models.choices import RELEASED_MODEL_TYPES
from models.unet import resolve_unet_config
from utils import cli
from utils.cli import option

PROG = "make_fake_checkpoint.py"


@dataclass(kw_only=True)
class FakeCheckpointOptions:
    """Every option of ``make_fake_checkpoint.py``."""

    output_dir: Path = option(help="folder to write (must not exist, or be empty)")
    unet_config: str = option("tiny", "UNet architecture: a name in configs/unet/ (tiny, compact, small, config_mri) "
                              "or a UNet config JSON")
    text_hidden_size: int = option(32, "width of the random CLIP text encoder (a multiple of 4)")
    model_types: tuple[str, ...] = option(RELEASED_MODEL_TYPES, "UNet folders to write", choices=RELEASED_MODEL_TYPES)
    seed: int = option(0, "seed of the random weights")

    def __post_init__(self) -> None:
        if self.text_hidden_size < 4 or self.text_hidden_size % 4:
            raise ValueError(f"--text_hidden_size must be a positive multiple of 4, got {self.text_hidden_size}")
        out = Path(self.output_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            # never over a real checkpoint: the fake's files have the released names
            raise ValueError(f"--output_dir {out} exists and is not an empty folder; give a new folder")


def build_parser():
    """The parser of :class:`FakeCheckpointOptions` (with ``--config FILE``)."""
    return cli.build_parser(FakeCheckpointOptions, prog=PROG, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    opts = cli.parse(FakeCheckpointOptions, argv, build_parser())
    from models.tiny_assets import make_fake_released_checkpoint

    try:
        unet_config = resolve_unet_config(opts.unet_config)
    except (OSError, ValueError) as err:
        cli.fail(PROG, f"--unet_config {opts.unet_config}: {err}")
    try:  # the UNet is built before anything is written: a config diffusers refuses leaves no folder behind
        root = make_fake_released_checkpoint(opts.output_dir, unet_config, text_hidden_size=opts.text_hidden_size,
                                             model_types=tuple(opts.model_types), seed=opts.seed)
    except (KeyError, TypeError, ValueError) as err:
        cli.fail(PROG, f"--unet_config {opts.unet_config}: not a usable UNet2DConditionModel config ({err})")
    size = unet_config.get("sample_size")
    print(f"wrote a fake released checkpoint (random weights, not a model) to {root}: "
          f"{', '.join(opts.model_types)} UNets of {size}x{size} px, scheduler, text encoder, tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
