"""The training loop of ``train_mri.py`` / ``train_mri_ood.py`` on accelerate (CPU, one GPU, several GPUs or nodes).

Reads top to bottom: build (with every input check) -> prepare -> resume -> loop (accumulate, clip, step, EMA, log,
checkpoint, validate) -> export the inference snapshot.

Trust: a run refuses an output folder that holds another run (``utils.training.run_folder``), resumes only an
intact checkpoint of itself, stops at the first non-finite loss or gradient norm (all processes together, before
anything is learnt, checkpointed or exported from it), and publishes its model atomically with a sha256 record.

Reproducibility: model init uses ``--seed``; the data order of epoch ``e`` depends only on ``(seed, e)``; the noise,
timesteps and condition dropout of a micro-batch come from a generator seeded by ``(seed, epoch, batch, process)``.
A resumed run therefore repeats the uninterrupted run exactly, whatever the global RNG did in between.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file

from utils.distributed import multi_process_cpu_launch
from utils.training.checkpointing import (
    TrainingState,
    checkpoint_dir,
    mark_complete,
    prune_checkpoints,
    read_training_state,
    resolve_resume_checkpoint,
    write_checkpoint_config,
)
from utils.training.config import ConfigError, NonFiniteLossError, TrainConfig
from utils.training.data_loading import TrainBatch, build_training_data, make_dataloader, updates_per_epoch
from utils.training.diffusion import PREDICTION_TYPES, add_noise, prediction_target, sample_timesteps, step_generator
from utils.training.ema import EMA
from utils.training.export import save_inference_snapshot
from utils.training.model import ConditionedDenoiser, build_components
from utils.training.run_folder import check_output_dir, clear_run

logger = logging.getLogger(__name__)

TRAINABLE_WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"


@dataclass
class StepInfo:
    """What a ``step_callback`` receives after every micro-batch (tests use it to check the OOD restriction)."""

    global_step: int
    epoch: int
    batch_index: int
    loss: float
    timesteps: torch.Tensor
    is_ood: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------------------------------

def training_loss(
    model: torch.nn.Module,
    batch: TrainBatch,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    ood_t_min: int | None = None,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM loss of one micro-batch: MSE to ε (Ho et al. 2020, Eq. 14) or to v (Salimans & Ho 2022).

    Args:
        model: the (possibly DDP-wrapped) :class:`ConditionedDenoiser`.
        batch: images ``[B, 2, H, W]`` on the model's device, records, prompts, ``is_ood``.
        alphas_cumprod: ᾱ ``[T]``.
        generator: CPU generator for timesteps, noise and condition dropout (drawn in this order).
        ood_t_min: restrict OOD samples to ``t >= ood_t_min`` (None: no OOD handling).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (see :func:`prediction_target`).

    Returns:
        ``(loss, timesteps)``: scalar fp32 MSE and the ``[B]`` timesteps used.
    """
    x0 = batch.images
    b = x0.shape[0]
    num_t = alphas_cumprod.shape[0]
    ood_mask = batch.is_ood.cpu() if ood_t_min is not None else None
    t = sample_timesteps(b, num_t, generator, ood_mask=ood_mask, ood_t_min=ood_t_min or 0, device=x0.device)
    if ood_mask is not None and bool(ood_mask.any()) and int(t[ood_mask.to(t.device)].min()) < ood_t_min:
        raise RuntimeError(f"OOD sample drew a timestep below --ood_t_min {ood_t_min}")  # guards the contract
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    out = model(x_t, t, batch.records, batch.prompts, generator=generator)
    return F.mse_loss(out.float(), prediction_target(x0, noise, t, alphas_cumprod, prediction_type)), t


# ---------------------------------------------------------------------------------------------------------------------
# resume state: only trainable weights (+ EMA) as safetensors; optimizer/scheduler/RNG by accelerate
# ---------------------------------------------------------------------------------------------------------------------

def _register_state_hooks(accelerator: Accelerator, model: ConditionedDenoiser, ema: EMA | None) -> None:
    """Save/restore only the trainable weights and the EMA (frozen text encoder/base UNet are rebuilt, not copied)."""
    names = [n for n, _ in model.trainable_named_parameters()]

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            params = dict(model.trainable_named_parameters())
            save_file({n: params[n].detach().cpu().contiguous() for n in names},
                      str(Path(output_dir) / TRAINABLE_WEIGHTS))
            if ema is not None:
                save_file({n: s.cpu().contiguous() for n, s in zip(names, ema.shadow)},
                          str(Path(output_dir) / EMA_WEIGHTS), metadata={"num_updates": str(ema.num_updates),
                                                                         "decay": str(ema.decay)})
        while weights:  # accelerate would otherwise write the full model (text encoder included)
            weights.pop()

    def load_hook(models, input_dir):
        state = load_file(str(Path(input_dir) / TRAINABLE_WEIGHTS))
        if set(state) != set(names):
            missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
            raise ValueError(f"checkpoint {input_dir} does not match the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]} (resume with the same model flags)")
        params = dict(model.trainable_named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(state[n])
        if ema is not None:
            ema_file = Path(input_dir) / EMA_WEIGHTS
            if not ema_file.is_file():
                raise ValueError(f"--use_ema but {ema_file} is missing (the checkpoint was written without EMA)")
            from safetensors import safe_open

            with safe_open(str(ema_file), framework="pt") as f:
                meta = f.metadata() or {}
            ema_state = load_file(str(ema_file))
            ema.load_state_dict({"decay": float(meta.get("decay", ema.decay)), "num_updates": int(meta["num_updates"]),
                                 "shadow": [ema_state[n] for n in names]})
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, state: TrainingState) -> Path:
    """``checkpoint-{step}``: prune first (so the limit holds), save, then mark complete."""
    path = checkpoint_dir(config.output_dir, state.global_step)
    if accelerator.is_main_process:
        prune_checkpoints(config.output_dir, config.checkpoints_total_limit, incoming_step=state.global_step)
        if path.exists():  # a stale save of the same step (e.g. after resuming from an earlier one)
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checkpoint_config(path, config.to_dict())
        mark_complete(path, state)  # last: hashes every file of the checkpoint
    return path


# ---------------------------------------------------------------------------------------------------------------------
# decisions every process must share
# ---------------------------------------------------------------------------------------------------------------------

def _decide_on_main(accelerator: Accelerator, decide: Callable[[], object]) -> object:
    """Run ``decide`` on the main process only and hand its result (or its error) to every process.

    Why: the output folder is inspected, cleared and its checkpoints hashed once; another process reading it at the
    same time could see a half-cleared folder and choose differently (then hang at the next collective).
    """
    result, error, is_config, failure = None, None, False, None
    if accelerator.is_main_process:
        try:
            result = decide()
        except ConfigError as err:
            error, is_config = str(err), True
        except Exception as err:  # shared below, then re-raised as it is on the main process
            error, failure = f"{type(err).__name__}: {err}", err
    if accelerator.num_processes > 1:
        box = [result, error, is_config]
        broadcast_object_list(box, from_process=0)
        result, error, is_config = box
    if failure is not None:
        raise failure
    if error is not None:
        raise ConfigError(error) if is_config else RuntimeError(f"the main process failed: {error}")
    return result


def prepare_output_dir(accelerator: Accelerator, config: TrainConfig) -> Path | None:
    """Check that ``--output_dir`` holds no other run (clear it under ``--overwrite_output_dir``) and pick the
    checkpoint to resume from; returns it (``None``: start at step 0).

    Raises:
        ConfigError: on every process, naming the differing settings or the unusable checkpoint.
    """
    current = config.to_dict()

    def decide() -> str | None:
        if check_output_dir(config.output_dir, current, config.overwrite_output_dir, config.resume_from_checkpoint):
            if config.dry_run:
                print(f"--dry_run: would remove the previous run in {config.output_dir}")
            else:
                removed = clear_run(config.output_dir, config.logging_dir)
                print(f"--overwrite_output_dir: removed the previous run from {config.output_dir} "
                      f"({', '.join(removed)})")
        path = resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint, current)
        return None if path is None else str(path)

    resume = _decide_on_main(accelerator, decide)
    return None if resume is None else Path(resume)


def _all_finite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every process (one tiny all-reduce, so all processes agree)."""
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return not bool(bad.item())


def _non_finite_error(accelerator: Accelerator, what: str, value: torch.Tensor, step: int, epoch: int,
                      batch_index: int, batch: TrainBatch, last_checkpoint: Path | None) -> NonFiniteLossError:
    """The error every process raises when a loss/gradient norm went non-finite; collects each process's batch.

    Collective (``gather_object``): call it on every process, right after :func:`_all_finite` said False.
    """
    local = {
        "process": accelerator.process_index,
        "value": float(value.detach().float().reshape(-1)[0]),
        "items": [f"{f} slice {s}" for f, s in zip(batch.filenames, batch.slices or [None] * len(batch))],
        "non_finite_images": [f"{f} slice {s}" for f, s, img in
                              zip(batch.filenames, batch.slices or [None] * len(batch), batch.images)
                              if not bool(torch.isfinite(img).all())],
    }
    infos = gather_object([local]) if accelerator.num_processes > 1 else [local]
    bad = [i for i in infos if not math.isfinite(i["value"])] or infos
    values = ", ".join(f"{i['value']}" + (f" on process {i['process']}" if len(infos) > 1 else "") for i in bad)
    items = [item for i in bad for item in i["items"]]
    images = [item for i in infos for item in i["non_finite_images"]]
    message = (f"non-finite {what} ({values}) at optimiser step {step} (epoch {epoch}, batch {batch_index}); "
               f"the batch held: {', '.join(items)}")
    if images:
        message += f"; non-finite pixel values in: {', '.join(images)}"
    message += (". Training stopped: nothing was learnt, checkpointed or exported from this state (last good "
                f"checkpoint: {last_checkpoint or 'none'}). Fix the input (or lower --learning_rate) and rerun "
                "with --resume_from_checkpoint latest")
    return NonFiniteLossError(message, report=accelerator.is_main_process)


# ---------------------------------------------------------------------------------------------------------------------
# main entry
# ---------------------------------------------------------------------------------------------------------------------

def make_accelerator(config: TrainConfig) -> Accelerator:
    project = ProjectConfiguration(project_dir=config.output_dir,
                                   logging_dir=str(Path(config.output_dir) / config.logging_dir))
    # Unused parameters: a metadata key dropped for the whole batch skips its MLP.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.enable_condition_emb)
    report_to = None if config.report_to in ("none", "", None) else config.report_to
    return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                       mixed_precision=config.mixed_precision, log_with=report_to, project_config=project,
                       kwargs_handlers=[ddp], cpu=multi_process_cpu_launch())


def _tracker_config(config: TrainConfig) -> dict:
    """Scalars only (tensorboard's hparams reject None and lists)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()}


def train(config: TrainConfig, step_callback: Callable[[StepInfo], None] | None = None) -> Path:
    """Run training as configured; returns the output folder (holding the inference snapshot).

    Args:
        config: the resolved run config (already checked by ``check_config``).
        step_callback: called on every process after every micro-batch with a :class:`StepInfo`.
    """
    accelerator = make_accelerator(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    resume = prepare_output_dir(accelerator, config)  # before any heavy work: a refused folder costs nothing
    if accelerator.is_main_process and not config.dry_run:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)  # model init (from scratch, new embedder and projection); identical on every process

    components = build_components(config)
    data = build_training_data(config, components.metadata_stats)
    scheduler = components.scheduler
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"the scheduler predicts {prediction_type!r}; training supports {PREDICTION_TYPES}")
    num_t = int(scheduler.config.num_train_timesteps)
    is_ood = config.is_ood
    if is_ood and not 0 <= config.ood_t_min < num_t:
        raise ConfigError(f"--ood_t_min {config.ood_t_min} must lie in [0, {num_t})")
    if config.dry_run:
        if accelerator.is_main_process:
            print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
            print(f"training slices per epoch: {len(data.sampler)}; sources: {data.source_names}")
        return Path(config.output_dir)

    model = components.model
    model.train()
    named = model.trainable_named_parameters()
    params = [p for _, p in named]
    if not params:
        raise ConfigError("nothing to train")
    # --text_encoder_lr: the text encoder's own weights (not its projection) in a second group with their own rate.
    text_prefix = "conditioner.text.encoder."
    if config.text_encoder_lr is not None:
        groups = [{"params": [p for n, p in named if not n.startswith(text_prefix)]},
                  {"params": [p for n, p in named if n.startswith(text_prefix)], "lr": config.text_encoder_lr}]
        if not groups[1]["params"]:
            raise ConfigError("--text_encoder_lr: the model has no trainable text-encoder weights")
        optim_params: list = [g for g in groups if g["params"]]
    else:
        optim_params = params
    optimizer = torch.optim.AdamW(optim_params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    dataloader = make_dataloader(data, config)

    # Steps: accelerate shards the batches over processes, so an epoch has len(dataloader) / num_processes batches here.
    batches_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes)
    steps_per_epoch = updates_per_epoch(batches_per_epoch, config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    # The prepared scheduler steps once per process per optimiser step.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)

    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    batches_per_epoch = len(dataloader)  # the sharded loader is the truth
    unwrapped: ConditionedDenoiser = accelerator.unwrap_model(model)
    ema = None
    if config.use_ema:
        ema = EMA([p for _, p in unwrapped.trainable_named_parameters()], decay=config.ema_decay)
    _register_state_hooks(accelerator, unwrapped, ema)
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device, torch.float32)

    state = TrainingState(num_processes=accelerator.num_processes)
    if resume is not None:
        accelerator.print(f"resuming from {resume}")
        accelerator.load_state(str(resume))
        state = read_training_state(resume)
        if state.num_processes != accelerator.num_processes:
            # The position inside the epoch counts per-process batches: restart the epoch rather than guess.
            logger.warning("checkpoint written by %d process(es), resuming with %d: restarting epoch %d",
                           state.num_processes, accelerator.num_processes, state.epoch)
            state.batch_in_epoch = 0
        state.num_processes = accelerator.num_processes
        if state.batch_in_epoch >= batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    # run_config.json goes into every checkpoint and, with the model, into the export; none is written here, so a
    # folder whose training never finished holds nothing that looks like a model.
    if accelerator.is_main_process:
        if config.report_to not in ("none", ""):
            accelerator.init_trackers("train_mri_ood" if is_ood else "train_mri", config=_tracker_config(config))
    n_trainable = sum(p.numel() for p in params)
    accelerator.print(f"trainable parameters: {n_trainable:,}; {len(data.sampler)} slices/epoch; {batches_per_epoch} "
                      f"batches/epoch/process; {max_steps} optimiser steps; resume at step {state.global_step}")

    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    ood_t_min = config.ood_t_min if is_ood else None
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0
    t_start = time.perf_counter()
    done = state.global_step >= max_steps
    epoch = state.epoch
    last_checkpoint = resume
    check_grad_norm = accelerator.scaler is None  # fp16's scaler skips overflowing steps on its own
    try:  # the bar ends its line before any error message
        while not done:
            data.sampler.select_epoch(epoch)
            data.dataset.select_epoch(epoch)
            skip = state.batch_in_epoch if epoch == state.epoch else 0
            epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            for batch_index, batch in enumerate(epoch_loader, start=skip):
                gen = step_generator(config.seed, epoch, batch_index, accelerator.process_index)
                with accelerator.accumulate(model):
                    loss, timesteps = training_loss(model, batch, alphas_cumprod, gen, ood_t_min, prediction_type)
                    if not _all_finite(accelerator, loss):  # before backward: nothing is learnt from it
                        raise _non_finite_error(accelerator, "loss", loss, state.global_step + 1, epoch, batch_index,
                                                batch, last_checkpoint)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        if check_grad_norm and grad_norm is not None and not _all_finite(accelerator, grad_norm):
                            raise _non_finite_error(accelerator, "gradient norm", grad_norm, state.global_step + 1,
                                                    epoch, batch_index, batch, last_checkpoint)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                if step_callback is not None:
                    step_callback(StepInfo(state.global_step, epoch, batch_index, float(loss.detach()),
                                           timesteps.detach().cpu(), batch.is_ood.detach().cpu()))
                if not accelerator.sync_gradients:
                    continue

                state.global_step += 1
                state.epoch, state.batch_in_epoch = epoch, batch_index + 1
                if ema is not None:
                    ema.update(params)
                mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean")
                logs = {"train/loss": float(mean_loss), "train/lr": lr_scheduler.get_last_lr()[0],
                        "train/epoch": epoch}
                if is_ood:
                    logs["train/ood_fraction"] = float(batch.is_ood.float().mean())
                loss_sum.zero_()
                loss_count = 0
                progress.update(1)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                accelerator.log(logs, step=state.global_step)

                if state.global_step % config.checkpointing_steps == 0:
                    last_checkpoint = save_checkpoint(accelerator, config, state)
                if config.validation_steps and state.global_step % config.validation_steps == 0:
                    _validate(accelerator, config, unwrapped, ema, params, data.validation_items, alphas_cumprod,
                              state.global_step)
                if state.global_step >= max_steps:
                    done = True
                    break
            if state.epoch != epoch and not done:
                raise RuntimeError(f"epoch {epoch} produced no optimiser step (too few batches per process?)")
            epoch += 1
    finally:
        progress.close()
    elapsed = time.perf_counter() - t_start
    accelerator.print(f"trained to step {state.global_step} in {elapsed:.1f} s")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(params)  # the inference snapshot holds the EMA weights
        save_inference_snapshot(unwrapped, scheduler, config, config.output_dir, state.global_step)
    accelerator.end_training()
    return Path(config.output_dir)


def _autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))


def _validate(accelerator, config, unwrapped, ema, params, items, alphas_cumprod, step) -> None:
    """Reconstruct the validation slices on the main process (EMA weights swapped in if any) and log them."""
    from contextlib import nullcontext

    from utils.training.validation import run_validation, save_validation_figure

    if accelerator.is_main_process and items:
        with ema.averaged(params) if ema is not None else nullcontext():
            result = run_validation(
                unwrapped.unet, unwrapped.conditioner, items, alphas_cumprod,
                mask_type=config.validation_mask_type, acc_factor=config.validation_acc_factor,
                num_steps=config.validation_inference_steps, autocast_dtype=_autocast_dtype(accelerator),
                device=accelerator.device, prediction_type=config.prediction_type,
            )
        accelerator.log({f"val/{k}_fastmri": v for k, v in result.metrics.items()}, step=step)
        accelerator.print(f"step {step} validation (fastMRI protocol, per slice): "
                          + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
        if result.grid is not None:
            save_validation_figure(result, Path(config.output_dir) / "validation" / f"step-{step:07d}.png",
                                   title=f"step {step}, {config.validation_mask_type} x{config.validation_acc_factor:g}")
            if config.report_to in ("tensorboard", "all"):
                try:
                    writer = accelerator.get_tracker("tensorboard", unwrap=True)
                    writer.add_image("val/grid", result.grid[None], global_step=step)
                except (ValueError, AttributeError) as err:  # tracker not active
                    logger.debug("no tensorboard image: %s", err)
    accelerator.wait_for_everyone()
