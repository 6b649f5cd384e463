"""Training plumbing shared by ``train_mri.py`` and ``train_mri_ood.py``: typed config + command line, data order,
DDPM objective, EMA, checkpoints, validation, the accelerate loop, and the inference snapshot (read back by
:func:`models.loading.load_trained_model`, outside this package, so inference never imports training)."""

from utils.training.config import ConfigError, OODTrainConfig, TrainConfig, build_parser, check_config, parse_config

__all__ = [
    "ConfigError",
    "OODTrainConfig",
    "TrainConfig",
    "build_parser",
    "check_config",
    "main",
    "parse_config",
    "train",
]


def train(config, step_callback=None):
    """Run a training (see :func:`utils.training.loop.train`); imported lazily so ``--help`` stays fast."""
    from utils.training.loop import train as _train

    return _train(config, step_callback=step_callback)


def main(config_cls=TrainConfig, argv=None) -> int:
    """Command-line entry of both training scripts: parse -> check -> train; bad input exits 2 with a message."""
    import sys

    from utils.training.config import NonFiniteLossError

    try:
        config = parse_config(argv, config_cls)
        train(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # failed work, not a bad argument
        if err.report:
            print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
