"""The demo's stages: each runs the project's real command-line scripts as subprocesses (what a user types).

Stages 1-5 of :func:`utils.demo.run_demo` (and of the study, :mod:`utils.study`): simulate, preprocess, train, the
information report, reconstruct. A stage whose outputs exist is skipped, so an interrupted demo resumes: a finished
model is reused only when its ``run_config.json`` matches (:func:`train`), a report only when made from the same model
export with the same settings (:func:`metadata_report`), a reconstruction only when the script's run fingerprint
matches (:func:`reconstruct`). The commands built here are what those checks hash: change them and an existing
``demo_output`` no longer resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from utils.demo_config import TEXT_ENCODERS, DemoConfig
from utils.files import write_json
from utils.preprocessing.names import SPLITS

REPO = Path(__file__).resolve().parents[1]


class Stage:
    """Times a stage and prints what it does."""

    def __init__(self, name: str, timings: dict[str, float]) -> None:
        self.name, self.timings = name, timings

    def __enter__(self) -> Stage:
        print(f"\n=== {self.name}", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
        print(f"=== {self.name}: {self.timings[self.name]:.0f} s", flush=True)


def run_script(args: list[str], cfg: DemoConfig, log_name: str) -> None:
    """Run one of the project's scripts; its output goes to ``logs/{log_name}.log`` (the tail is shown on failure)."""
    log_dir = cfg.output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(cfg.threads),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, *args]
    print("$ " + " ".join(str(a) for a in cmd), flush=True)
    with open(log_dir / f"{log_name}.log", "w") as fh:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (log_dir / f"{log_name}.log").read_text()[-4000:]
        raise RuntimeError(f"step '{log_name}' failed (exit {proc.returncode}); end of its log:\n{tail}")


def simulate(cfg: DemoConfig) -> None:
    raw = cfg.output_dir / "raw"
    # One call per contrast so that every contrast has the same number of subjects (the real fastMRI brain set is
    # mostly T2); a different seed per call gives different subjects.
    for i, acq in enumerate(cfg.contrasts):
        if not (raw / f"brain_{acq}" / "val").is_dir():
            run_script(["make_synthetic_data.py", "--format", "fastmri", "--output_dir", raw / f"brain_{acq}",
                        "--num_volumes", cfg.volumes_per_contrast, "--num_slices", cfg.num_slices,
                        "--matrix", cfg.matrix, "--num_coils", cfg.num_coils, "--acquisitions", acq,
                        "--val_fraction", 1.0 / cfg.volumes_per_contrast, "--seed", cfg.seed + 1000 * i],
                       cfg, f"simulate_brain_{acq}")
            for split in SPLITS:
                (raw / "brain" / split).mkdir(parents=True, exist_ok=True)
                for h5 in (raw / f"brain_{acq}" / split).glob("*.h5"):
                    target = raw / "brain" / split / h5.name
                    if not target.exists():
                        os.symlink(h5, target)
    if not (raw / "cmrx" / "MultiCoil").is_dir():
        run_script(["make_synthetic_data.py", "--format", "cmrx", "--layout", "2023", "--output_dir", raw / "cmrx",
                    "--num_volumes", cfg.cardiac_volumes, "--num_slices", "2", "--num_slices_lax", "1",
                    "--num_frames", "4", "--matrix", cfg.matrix, "--accelerations", "4", "--seed", cfg.seed],
                   cfg, "simulate_cardiac")


def preprocess(cfg: DemoConfig) -> None:
    raw, root = cfg.output_dir / "raw", cfg.output_dir / "fastmri"
    for split in SPLITS:
        if not (root / f"metadata_brain_{split}.csv").is_file():
            run_script(["pre_processing_final.py", "--input_dir", raw / "brain" / split, "--output_root", root,
                        "--crop_size", cfg.crop_size, "--num_workers", "2", "--no_progress",
                        *(["--train"] if split == "train" else [])], cfg, f"preprocess_brain_{split}")
    if not (root / "metadata_cardiology_train.csv").is_file():
        run_script(["pre_process_cmrx.py", "--input_dir", raw / "cmrx", "--output_dir", root, "--crop_size",
                    cfg.crop_size], cfg, "preprocess_cardiac")
    if not (cfg.output_dir / "metadata_stats.json").is_file():
        run_script(["make_metadata_stats.py", root / "metadata_brain_train.csv", "--output",
                    cfg.output_dir / "metadata_stats.json"], cfg, "stats")
    if not (cfg.output_dir / "metadata_stats_ood.json").is_file():
        run_script(["make_metadata_stats.py", root / "metadata_brain_train.csv", root / "metadata_cardiology_train.csv",
                    "--output", cfg.output_dir / "metadata_stats_ood.json"], cfg, "stats_ood")


def make_text_encoder(cfg: DemoConfig) -> Path:
    """A small CLIP text model (random init, trained with the UNet) and an offline CLIP BPE tokenizer."""
    folder = cfg.output_dir / "text_encoder_scratch"
    if not (folder / "text_encoder" / "config.json").is_file():
        import torch

        from models.tiny_assets import tiny_clip_text_model, write_tiny_clip_tokenizer

        torch.manual_seed(cfg.seed)
        write_tiny_clip_tokenizer(folder / "tokenizer")
        from transformers import CLIPTokenizer

        vocab_size = len(CLIPTokenizer.from_pretrained(folder / "tokenizer"))
        tiny_clip_text_model(hidden_size=128, vocab_size=vocab_size, seed=cfg.seed).save_pretrained(
            folder / "text_encoder")
    return folder


def make_t5_encoder(cfg: DemoConfig) -> Path:
    """A tiny T5 encoder (random init, 2 layers, width 48) with an offline tokenizer, in one folder."""
    folder = cfg.output_dir / "t5_scratch"
    if not (folder / "config.json").is_file():
        import torch

        from models.tiny_assets import write_tiny_t5_folder

        torch.manual_seed(cfg.seed)
        write_tiny_t5_folder(folder, d_model=48)
    return folder


def text_args(cfg: DemoConfig) -> list:
    """Training flags of the text baseline chosen by ``cfg.text_encoder``."""
    if cfg.text_encoder == "frozen":
        return []
    if cfg.text_encoder == "scratch":
        return ["--train_text_encoder"]
    if cfg.text_encoder == "scratch_lr":
        return ["--train_text_encoder", "--text_encoder_lr", cfg.text_encoder_lr]
    raise ValueError(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {cfg.text_encoder!r}")


def train(cfg: DemoConfig, method: str, text_folder: Path) -> Path:
    out = cfg.output_dir / "models" / method
    root = cfg.output_dir / "fastmri"
    unet_config = REPO / "configs" / "unet" / f"{cfg.unet_config}.json"
    common = ["train_mri.py", "--unet_config", unet_config, "--data_root", root,
              "--mri_metadata_dir_brain", root / "metadata_brain_train.csv", "--resolution", cfg.crop_size,
              "--train_batch_size", cfg.batch_size, "--max_train_steps", cfg.train_steps,
              "--learning_rate", cfg.learning_rate, "--lr_warmup_steps", "20", "--lr_scheduler", cfg.lr_scheduler,
              "--seed", cfg.seed, "--output_dir", out, "--checkpointing_steps", 10**9, "--report_to", "tensorboard",
              "--dataloader_num_workers", "0", "--mixed_precision", "no"]
    if method == "unconditioned":
        extra = ["--text_encoder_type", "none", "--unconditional"]
    elif method == "text":
        extra = ["--text_encoder_type", "clip", "--text_encoder_path", text_folder, *text_args(cfg),
                 "--prompt_cfg_prob", cfg.cfg_prob, "--cfg_null_prob", cfg.cfg_null_prob]
    elif method == "t5":
        extra = ["--text_encoder_type", "t5", "--text_encoder_path", make_t5_encoder(cfg),
                 "--prompt_cfg_prob", cfg.cfg_prob, "--cfg_null_prob", cfg.cfg_null_prob]
    elif method == "fine-grained":
        extra = ["--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats",
                 cfg.output_dir / "metadata_stats.json", "--cfg_prob", cfg.cfg_prob, "--cfg_strategy", "joint",
                 "--cfg_null_prob", cfg.cfg_null_prob]
    elif method == "fine-grained+ood":
        common[0] = "train_mri_ood.py"
        extra = ["--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats",
                 cfg.output_dir / "metadata_stats_ood.json", "--cfg_prob", cfg.cfg_prob, "--cfg_strategy", "joint",
                 "--cfg_null_prob", cfg.cfg_null_prob, "--use_ood", "--cardio_data_root", root,
                 "--mri_metadata_dir_cardio", root / "metadata_cardiology_train.csv"]
    else:
        raise ValueError(method)
    if (out / "weights.sha256.json").is_file():  # the export's completion record, written last
        _check_same_run(out, [str(a) for a in common + extra])
        return out
    run_script(common + extra, cfg, f"train_{method}")
    return out


def _check_same_run(out: Path, args: list[str]) -> None:
    """Refuse to reuse a finished model trained with other settings (a stale model would fake the comparison)."""
    from utils.training.config import (OODTrainConfig, TrainConfig, describe_differences, parse_config,
                                       run_identity_differences)

    cls = OODTrainConfig if args[0] == "train_mri_ood.py" else TrainConfig
    current = parse_config(args[1:], cls).to_dict()
    stored = json.loads((out / "run_config.json").read_text())
    differing = run_identity_differences(stored, current)
    if differing:
        raise RuntimeError(f"{out} holds a model trained with other settings: "
                           f"{describe_differences(stored, current, differing)}; delete it or use another output dir")


def metadata_report(cfg: DemoConfig, method: str, model: Path, report_dir: Path) -> dict:
    """Run ``metadata_report.py`` on a conditioned model's held-out slices; returns its ``report.json``.

    A report is reused only when it was made from this very model export (its fingerprint) with these settings:
    ``source.json`` beside it records both, so a retrained model or a changed setting reruns the report.
    """
    from models.loading import export_fingerprint

    root = cfg.output_dir / "fastmri"
    args = ["metadata_report.py", "--finetune_folder", model, "--data_root", root, "--load_dir_meta_brain",
            root / "metadata_brain_val.csv", "--crop_size", cfg.crop_size, "--num_slices", cfg.report_slices,
            "--num_noise", cfg.report_noise, "--seed", cfg.seed, "--output_dir", report_dir, "--no_progress",
            "--timesteps", *cfg.report_timesteps]
    if cfg.report_keys:
        args += ["--keys", *cfg.report_keys]
    if method.startswith("fine-grained"):
        stats = "metadata_stats_ood.json" if method.endswith("+ood") else "metadata_stats.json"
        args += ["--enable_condition_emb", "--metadata_stats", cfg.output_dir / stats]
    source = {"model": str(model), "model_fingerprint": export_fingerprint(model), "args": [str(a) for a in args]}
    done = report_dir / "report.json"
    if done.is_file() and (report_dir / "source.json").is_file() and \
            json.loads((report_dir / "source.json").read_text()) == source:
        return json.loads(done.read_text())
    done.unlink(missing_ok=True)
    run_script(args, cfg, f"report_{method}")
    write_json(report_dir / "source.json", source)
    return json.loads(done.read_text())



def reconstruct(cfg: DemoConfig, acc: float, tag: str, extra: list, center_fraction: float | None | str = "cfg",
                end_idx: int | None = None) -> Path:
    """Run ``recon_complex_multi.py`` (the re-simulated ``--data_root`` path) into ``recon/{mask}/acc_{R}/{tag}``.

    ``center_fraction`` (default: ``cfg.center_fraction``) and ``end_idx`` (default: ``cfg.max_val_slices``) let the
    raw-vs-re-simulated comparison use its own centre fraction and exactly the raw run's slices.

    Always called: the script resumes a folder whose ``run.json`` fingerprint matches these settings (finished slices
    are skipped, so a repeated demo costs only the model loading) and refuses one that holds other settings, so a
    changed demo setting can never reuse stale numbers.
    """
    root = cfg.output_dir / "fastmri"
    save = cfg.output_dir / "recon"
    out = save / cfg.mask_type / f"acc_{acc:g}" / tag
    cf = cfg.center_fraction if center_fraction == "cfg" else center_fraction
    end = cfg.max_val_slices if end_idx is None else end_idx
    run_script(["recon_complex_multi.py", "--data_root", root, "--load_dir_meta_brain", root / "metadata_brain_val.csv",
                "--crop_size", cfg.crop_size, "--mask_type", cfg.mask_type, "--acc_factor", acc, "--save_dir", save,
                "--tag", tag, "--end_idx", end, "--batch_size", end, "--num_steps",
                cfg.recon_steps, "--gamma", cfg.gamma, "--seed", cfg.seed,
                *(["--center_fraction", cf] if cf is not None else []),
                *extra], cfg, f"recon_{tag}_x{acc:g}")
    return out


LABELS = {"unconditioned": "unconditioned", "text": "text (ContextMRI-style, CLIP tower random + frozen)",
          "t5": "text via T5 (tiny, random + frozen)", "fine-grained": "fine-grained metadata",
          "fine-grained+ood": "fine-grained + cardiac OOD data (train_mri_ood.py)"}
#: Short names (figures).
SHORT = {"unconditioned": "unconditioned", "text": "text", "t5": "T5", "fine-grained": "fine-grained",
         "fine-grained+ood": "fg + OOD"}
#: Models whose metadata input can be swapped (a mismatched-metadata run each).
MISMATCH = ("fine-grained", "text")


def model_args(cfg: DemoConfig, models: dict[str, Path]) -> dict[str, list]:
    """Reconstruction flags of each trained model."""
    clip = ["--clip_x0", cfg.clip_x0] if cfg.clip_x0 is not None else []
    out = {}
    for method, folder in models.items():
        out[method] = ["--finetune_folder", folder, *clip]
        if method.startswith("fine-grained"):
            stats = "metadata_stats_ood.json" if method.endswith("+ood") else "metadata_stats.json"
            out[method] += ["--enable_condition_emb", "--metadata_stats", cfg.output_dir / stats]
    return out


def prepare_and_train(cfg: DemoConfig, timings: dict[str, float]) -> dict[str, Path]:
    """Stages 1-3: simulate, preprocess, train every model of ``cfg.methods`` (skipped where done)."""
    with Stage("1. simulate brain (fastMRI h5) and cardiac (CMRxRecon .mat) data", timings):
        simulate(cfg)
    with Stage("2. preprocess with pre_processing_final.py / pre_process_cmrx.py", timings):
        preprocess(cfg)
    text_folder = make_text_encoder(cfg)
    with Stage(f"3. train {', '.join(cfg.methods)} ({cfg.train_steps} steps each, {cfg.parallel} at a time)", timings):
        with ThreadPoolExecutor(cfg.parallel) as pool:
            futures = {m: pool.submit(train, cfg, m, text_folder) for m in cfg.methods}
            return {m: f.result() for m, f in futures.items()}


def report_all(cfg: DemoConfig, models: dict[str, Path], timings: dict[str, float]) -> dict[str, dict]:
    """Stage 4: the information report of every conditioned model (``reports/{method}/``)."""
    conditioned = [m for m in models if m != "unconditioned"]
    with Stage(f"4. information report of {', '.join(conditioned)} (metadata_report.py)", timings):
        with ThreadPoolExecutor(cfg.parallel) as pool:
            futures = {m: pool.submit(metadata_report, cfg, m, models[m], cfg.output_dir / "reports" / m)
                       for m in conditioned}
            return {m: f.result() for m, f in futures.items()}


def reconstruct_all(cfg: DemoConfig, acc: float, models: dict[str, Path], noise_sigma: float | None = None,
                    ensemble: bool = True) -> tuple[list[tuple[str, str]], dict[str, Path]]:
    """Zero-filled, CS, every model, the fine-grained ensemble and the mismatched-metadata runs at one R.

    With ``noise_sigma`` the measurements carry complex noise and the diffusion models use ``cfg.noise_gamma``; tags
    get a ``_noisy`` suffix. Returns ``([(label, tag), ...] of the table rows, {tag: folder})``.
    """
    noise = [] if noise_sigma is None else ["--noise_sigma", noise_sigma]
    gamma = [] if noise_sigma is None else ["--gamma", cfg.noise_gamma]
    suffix = "" if noise_sigma is None else "_noisy"
    note = "" if noise_sigma is None else f", noisy σ {noise_sigma:g}"
    margs = model_args(cfg, models)
    runs = [("zero-filled", "zero_filled", ["--method", "zero_filled"]), ("CS L1-wavelet", "cs", ["--method", "cs"])]
    for method in models:
        runs.append((LABELS[method], method, margs[method] + gamma))
    if ensemble and "fine-grained" in models:
        runs.append((f"fine-grained ensemble (N={cfg.ensemble_size})", "fine-grained_ens",
                     margs["fine-grained"] + gamma + ["--num_samples", cfg.ensemble_size]))
    for method in MISMATCH:
        if method in models and (noise_sigma is None or method == "fine-grained"):  # noisy: the budget allows one
            runs.append((f"{method}, mismatched metadata", f"{method}_mismatch",
                         margs[method] + gamma + ["--mismatch_metadata"]))
    with ThreadPoolExecutor(cfg.parallel) as pool:
        futures = {tag + suffix: pool.submit(reconstruct, cfg, acc, tag + suffix, extra + noise)
                   for _, tag, extra in runs}
        dirs = {tag: fut.result() for tag, fut in futures.items()}
    rows = [(label + note, tag + suffix) for label, tag, _ in runs if not tag.endswith("_mismatch")]
    return rows, dirs

