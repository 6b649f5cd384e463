"""The main job on the embedded default: simulate -> preprocess -> train -> information report -> reconstruct -> report.

Every stage runs the project's real command-line scripts as subprocesses (exactly what a user types), so the demo
exercises the same code paths as real use. Stages whose outputs exist are skipped, so an interrupted demo resumes
(reconstructions resume only when their run fingerprint matches, see :func:`reconstruct`).

The models share the UNet (``configs/unet/compact.json``), the number of steps, the batch size, the learning rate,
the seed and the null-condition rate (10 %, see ``DemoConfig.cfg_null_prob``); they differ only in what conditions
them:

* ``unconditioned``: one constant token (no metadata);
* ``text``: the ContextMRI prompt through a CLIP text transformer. No pretrained CLIP weights exist offline; the
  encoder is a small, randomly initialised CLIP text tower (width 128) that stays *frozen*; its tokens enter the UNet
  through the UNet's own input projection (``encoder_hid_proj``, 128 -> 128), which trains with the UNet
  (``DemoConfig.text_encoder``; the README gives the measurement behind this choice: an encoder trained from scratch
  with the UNet learnt to map every prompt to nearly the same tokens);
* ``t5`` (study only): the same prompt through a tiny T5 encoder (width 48), frozen at random initialisation; the
  48 -> 128 text projection trains;
* ``fine-grained``: typed metadata tokens (Metadata Matters), no text;
* ``fine-grained+ood`` (``--with_ood``, study): the same, trained with the cardiac set (``train_mri_ood.py``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    output_dir: Path = Path("demo_output")
    contrasts: tuple[str, ...] = ("AXT1", "AXT2", "AXFLAIR", "AXT1POST")  # balanced: 1 series type per subject
    volumes_per_contrast: int = 8  # subjects per contrast; one of each is held out for validation
    num_slices: int = 5
    matrix: str = "96x48"  # oversampled readout x phase encode -> 48 x 48 images (CPU budget)
    num_coils: str = "4"
    crop_size: int = 48
    cardiac_volumes: int = 2
    unet_config: str = "compact"  # configs/unet/{name}.json: ~0.9 M parameters, 2.6x cheaper per step than small.json
    train_steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"  # after 20 warm-up steps
    cfg_prob: float = 0.1
    # Null-condition rate. Under --cfg_strategy joint a metadata drop (cfg_prob) and, for the text model, an emptied
    # prompt (prompt_cfg_prob = cfg_prob) already *are* the sampler's null condition bit for bit
    # (docs/conditioning.md), so every conditioned model sees the null input in 10 % of its samples, as ContextMRI
    # and the earlier demo runs did. The training default --cfg_null_prob 0.1 would add a second draw on top (19 %).
    cfg_null_prob: float = 0.0
    # The text baseline: "frozen" = random CLIP tower frozen, projection trained (the demo's); "scratch" = encoder
    # trained with the UNet at the UNet's learning rate (the demo before issue 13); "scratch_lr" = trained at
    # text_encoder_lr.
    text_encoder: str = "frozen"
    text_encoder_lr: float = 1e-2
    recon_steps: int = 50
    gamma: float = 50.0  # DDS data-consistency weight; the data are noiseless (y = A x_true), so weigh them strongly
    clip_x0: float | None = 1.5  # |x0_hat| limit in DDS for every diffusion model (see utils/samplers.py)
    ensemble_size: int = 4
    accelerations: tuple[float, ...] = (4.0, 8.0)
    mask_type: str = "uniform1d"
    center_fraction: float | None = None  # None: the script's default (0.08 at 4x, 0.04 at 8x)
    # Noisy measurements (y = M(F S x + n), complex noise of std noise_sigma relative to the normalised image): extra
    # rows at noise_accelerations, reconstructed with the weaker data weight noise_gamma (noisy data must not be
    # trusted as strongly as exact ones). None: no noisy rows.
    noise_sigma: float | None = 0.05
    noise_gamma: float = 5.0
    noise_accelerations: tuple[float, ...] = (8.0,)
    # Raw-data rows (issue 14): the held-out volumes reconstructed from the simulator's raw, noisy k-space through
    # recon_complex_multi.py --raw_dir (ESPIRiT maps from the ACS lines only, scale and σ estimated from the data, DDS
    # γ lowered from σ by the raw path's noise rule) and scored against reconstruction_rss, beside the re-simulated
    # --data_root path on the same slices and line patterns. Empty raw_accelerations: no raw rows.
    raw_accelerations: tuple[float, ...] = (4.0,)
    # 6 of the 48 phase-encode lines (4 in --quick's 32). The default centre fractions leave 4 ACS lines at 4x (maps
    # from them made CS fall to 15 dB on a held-out volume, below zero-filling) and 2 at 8x (< 4: ESPIRiT refuses);
    # a 48-line matrix has no 8x mask with a usable ACS block beside outer lines (8x = 6 lines in all).
    raw_center_fraction: float = 0.125
    raw_methods: tuple[str, ...] = ("unconditioned", "text", "fine-grained")  # the diffusion models on the raw path
    raw_gamma_rule: str = "noise"
    # Information report (metadata_report.py) of each conditioned model: paired denoising-loss gaps on held-out slices.
    report_slices: int = 20
    report_noise: int = 4
    report_timesteps: tuple[int, ...] = (50, 200, 500, 800)
    report_keys: tuple[str, ...] | None = ("contrast", "TR", "TE")  # None: every attribute the model reads
    max_val_slices: int = 20
    seed: int = 0
    parallel: int = 3  # scripts side by side: small models scale poorly over threads; 3 x 1 thread beat 1 x 2
    threads: int = 1
    methods: tuple[str, ...] = ("unconditioned", "text", "fine-grained")


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


def _run(args: list[str], cfg: DemoConfig, log_name: str) -> None:
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
            _run(["make_synthetic_data.py", "--format", "fastmri", "--output_dir", raw / f"brain_{acq}",
                  "--num_volumes", cfg.volumes_per_contrast, "--num_slices", cfg.num_slices, "--matrix", cfg.matrix,
                  "--num_coils", cfg.num_coils, "--acquisitions", acq, "--val_fraction",
                  1.0 / cfg.volumes_per_contrast, "--seed", cfg.seed + 1000 * i], cfg, f"simulate_brain_{acq}")
            for split in ("train", "val"):
                (raw / "brain" / split).mkdir(parents=True, exist_ok=True)
                for h5 in (raw / f"brain_{acq}" / split).glob("*.h5"):
                    target = raw / "brain" / split / h5.name
                    if not target.exists():
                        os.symlink(h5, target)
    if not (raw / "cmrx" / "MultiCoil").is_dir():
        _run(["make_synthetic_data.py", "--format", "cmrx", "--layout", "2023", "--output_dir", raw / "cmrx",
              "--num_volumes", cfg.cardiac_volumes, "--num_slices", "2", "--num_slices_lax", "1", "--num_frames", "4",
              "--matrix", cfg.matrix, "--accelerations", "4", "--seed", cfg.seed], cfg, "simulate_cardiac")


def preprocess(cfg: DemoConfig) -> None:
    raw, root = cfg.output_dir / "raw", cfg.output_dir / "fastmri"
    for split in ("train", "val"):
        if not (root / f"metadata_brain_{split}.csv").is_file():
            _run(["pre_processing_final.py", "--input_dir", raw / "brain" / split, "--output_root", root,
                  "--crop_size", cfg.crop_size, "--num_workers", "2", "--no_progress",
                  *(["--train"] if split == "train" else [])], cfg, f"preprocess_brain_{split}")
    if not (root / "metadata_cardiology_train.csv").is_file():
        _run(["pre_process_cmrx.py", "--input_dir", raw / "cmrx", "--output_dir", root, "--crop_size",
              cfg.crop_size], cfg, "preprocess_cardiac")
    if not (cfg.output_dir / "metadata_stats.json").is_file():
        _run(["make_metadata_stats.py", root / "metadata_brain_train.csv", "--output",
              cfg.output_dir / "metadata_stats.json"], cfg, "stats")
    if not (cfg.output_dir / "metadata_stats_ood.json").is_file():
        _run(["make_metadata_stats.py", root / "metadata_brain_train.csv", root / "metadata_cardiology_train.csv",
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
    raise ValueError(f"text_encoder must be frozen, scratch or scratch_lr, got {cfg.text_encoder!r}")


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
    _run(common + extra, cfg, f"train_{method}")
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
    from utils.files import write_json
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
    _run(args, cfg, f"report_{method}")
    write_json(report_dir / "source.json", source)
    return json.loads(done.read_text())


def information_line(method: str, report: dict) -> str:
    """One line per model: the null-vs-correct loss gap per t band (z), the information estimate and the verdict."""
    null = report["conditions"]["null"]
    bands = [b for b in null["bands"] if b["band"] != "all"]

    def cell(b: dict) -> str:
        if b["z"] is None or b["rel_diff_pct"] is None:
            return f"t {b['band']}: n/a"
        return f"t {b['band']}: {b['rel_diff_pct']:+.2f} % (z {b['z']:.1f})"

    info = null["information"]
    nats = "n/a" if info["nats"] is None else f"{info['nats']:+.2f} ± {info['se'] or float('nan'):.2f} nats/image"
    attrs = []
    for key, v in report.get("attribute_verdicts", {}).items():
        m = v.get("mismatch") or v.get("drop")
        if m is not None and m["z"] is not None:
            attrs.append(f"{key} {'mismatch' if v.get('mismatch') else 'drop'} z {m['z']:.1f}")
    return (f"{method}: null − correct loss {'; '.join(cell(b) for b in bands)}; information {nats}; "
            f"strongest per attribute: {', '.join(attrs) or 'n/a'} — {report['verdict']}")


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
    _run(["recon_complex_multi.py", "--data_root", root, "--load_dir_meta_brain", root / "metadata_brain_val.csv",
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


# ----------------------------------------------------------------------------------------------------------------------
# raw k-space vs the re-simulated path (issue 14: how much the inverse crime flatters the numbers)
# ----------------------------------------------------------------------------------------------------------------------

#: What each path measures and scores against (the table says it on every row).
RAW_PATH = "raw: noisy raw k-space (--raw_dir) → reconstruction_rss"
RESIM_PATH = "re-simulated: y = M F(S x), noise-free (--data_root) → MVUE"


def heldout_raw_files(cfg: DemoConfig, val_items: Sequence) -> tuple[list[Path], int]:
    """The held-out raw files the comparison reconstructs, and how many dataset slices they make.

    The raw path reconstructs whole files; the re-simulated path takes the first ``end`` dataset slices. So the
    comparison uses the longest prefix of ``val_items`` (the demo's held-out slices) made only of complete volumes:
    both paths then see exactly the same slices.

    Args:
        val_items: the demo's held-out slices in dataset order (``filename``, ``slice_idx``).

    Returns:
        ``(files, end)``: the raw ``.h5`` files (``raw/brain/val/{filename}.h5``) and the number of dataset slices
        they cover (``--end_idx`` of the matched re-simulated runs); ``([], 0)`` when no volume is complete.
    """
    import h5py

    val_dir = cfg.output_dir / "raw" / "brain" / "val"
    counts: dict[str, int] = {}
    for item in val_items:
        counts.setdefault(item.filename, 0)
        counts[item.filename] += 1
    files, end = [], 0
    for name, n in counts.items():  # dataset order: the slices of a file are contiguous
        path = val_dir / f"{name}.h5"
        if not path.is_file():
            break
        with h5py.File(path, "r") as f:
            total = int(f["kspace"].shape[0])
        if n != total:
            break
        files.append(path)
        end += n
    return files, end


def reconstruct_raw(cfg: DemoConfig, acc: float, tag: str, extra: list, raw_dir: Path) -> Path:
    """Run ``recon_complex_multi.py --raw_dir`` into ``recon/raw/{mask}/acc_{R}/{tag}`` (resumed by fingerprint)."""
    save = cfg.output_dir / "recon"
    _run(["recon_complex_multi.py", "--raw_dir", raw_dir, "--mask_type", cfg.mask_type, "--acc_factor", acc,
          "--center_fraction", cfg.raw_center_fraction, "--save_dir", save, "--tag", tag,
          "--batch_size", cfg.num_slices, "--num_steps", cfg.recon_steps, "--gamma", cfg.gamma,
          "--gamma_rule", cfg.raw_gamma_rule, "--seed", cfg.seed, *extra], cfg, f"recon_raw_{tag}_x{acc:g}")
    return save / "raw" / cfg.mask_type / f"acc_{acc:g}" / tag


def _row_keys(folder: Path) -> set[tuple[str, int]]:
    """``(file, slice)`` of every per-slice row of a run folder (both paths write ``rows/{file}/{idx:03d}.json``)."""
    return {(p.parent.name, int(p.stem)) for p in (folder / "rows").glob("*/*.json")}


def paired_volume_difference(raw_summary: dict, resim_summary: dict) -> dict[str, Any]:
    """Per-volume paired difference raw − re-simulated of the fastMRI PSNR / SSIM / NMSE.

    Both summaries hold ``volumes`` rows (``filename``, ``fastmri_*``); the fastMRI protocol is volume-wise, so the
    volume is the unit of pairing.

    Returns:
        ``{"num_volumes", "psnr"|"ssim"|"nmse": {"raw", "resim": mean ± std over the paired volumes, "mean_diff",
        "se" (of the mean difference; None for one volume), "raw_lower" (volumes where raw is lower)}}``.

    Raises:
        ValueError: the runs do not score the same volumes (a comparison on other slices would mislead).
    """
    def scored(summary: dict) -> dict[str, dict]:  # --data_root marks a scored volume "scored", --raw_dir "done"
        return {v["filename"]: v for v in summary["volumes"]
                if v.get("fastmri_psnr") is not None and not v.get("failed_slices")
                and v.get("status", "scored") in ("scored", "done")}

    raw, resim = scored(raw_summary), scored(resim_summary)
    if not raw or raw.keys() != resim.keys():
        raise ValueError(f"raw and re-simulated runs score different volumes: {sorted(raw)} vs {sorted(resim)}")
    names = sorted(raw)
    out: dict[str, Any] = {"num_volumes": len(names), "volumes": names}
    for metric in ("psnr", "ssim", "nmse"):
        a = np.array([raw[n][f"fastmri_{metric}"] for n in names], dtype=float)
        b = np.array([resim[n][f"fastmri_{metric}"] for n in names], dtype=float)
        d = a - b
        out[metric] = {"raw": {"mean": float(a.mean()), "std": float(a.std())},
                       "resim": {"mean": float(b.mean()), "std": float(b.std())},
                       "mean_diff": float(d.mean()),
                       "se": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None,
                       "raw_lower": int((d < 0).sum())}
    return out


def raw_vs_resimulated(cfg: DemoConfig, models: dict[str, Path], val_items: Sequence,
                       timings: dict[str, float]) -> list[dict[str, Any]]:
    """Reconstruct the held-out volumes from their raw k-space and, on the same slices and line patterns, through the
    re-simulated path; returns one comparison entry per (R, method).

    The line pattern of a slice is drawn from (file, slice) on both paths over the same 48 (``W``) columns, so the two
    paths use the same pattern; on the raw path the zero-padded columns outside the acquired band are not measured
    (they hold no data), which is part of what the re-simulation hides.

    Returns:
        ``[{"method", "label", "acc_factor", "raw_dir", "resim_dir", "raw_acceleration", "resim_acceleration",
        "raw_gamma", "paired": paired_volume_difference(...)}]`` (empty without complete held-out volumes).
    """
    if not cfg.raw_accelerations:
        return []
    files, end = heldout_raw_files(cfg, val_items)
    if not files:
        print("raw rows skipped: the held-out slices hold no complete volume", flush=True)
        return []
    raw_dir = cfg.output_dir / "raw" / "heldout_compared"  # exactly the compared volumes (symlinks)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.glob("*.h5"):
        if stale.name not in {f.name for f in files} or not stale.exists():  # not compared, or a broken link
            stale.unlink()
    for f in files:
        link = raw_dir / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    margs = model_args(cfg, models)
    methods = [m for m in cfg.raw_methods if m in models]
    runs = [("zero_filled", "zero-filled", ["--method", "zero_filled"]), ("cs", "CS L1-wavelet", ["--method", "cs"])]
    runs += [(m, LABELS[m], margs[m]) for m in methods]
    same_as_main = cfg.raw_center_fraction == cfg.center_fraction and end == min(len(val_items), cfg.max_val_slices)
    entries = []
    for acc in cfg.raw_accelerations:
        name = f"6. raw k-space vs re-simulated x{acc:g} (centre fraction {cfg.raw_center_fraction:g})"
        with Stage(name, timings):
            with ThreadPoolExecutor(cfg.parallel) as pool:
                # the slow (diffusion) runs first, so the cheap ones fill the gaps
                order = sorted(runs, key=lambda r: r[0] in ("zero_filled", "cs"))
                raw_f = {tag: pool.submit(reconstruct_raw, cfg, acc, tag, extra, raw_dir) for tag, _, extra in order}
                resim_tag = {tag: tag if same_as_main else f"{tag}_cf{cfg.raw_center_fraction:g}" for tag, _, _ in runs}
                resim_f = {tag: pool.submit(reconstruct, cfg, acc, resim_tag[tag], extra, cfg.raw_center_fraction, end)
                           for tag, _, extra in order}
                raw_dirs = {tag: fut.result() for tag, fut in raw_f.items()}
                resim_dirs = {tag: fut.result() for tag, fut in resim_f.items()}
        for tag, label, _ in runs:
            rd, sd = raw_dirs[tag], resim_dirs[tag]
            if _row_keys(rd) != _row_keys(sd):
                raise RuntimeError(f"{rd} and {sd} hold different slices; the raw-vs-re-simulated rows would compare "
                                   "other data")
            raw_s = json.loads((rd / "summary.json").read_text())
            resim_s = json.loads((sd / "summary.json").read_text())
            entries.append({
                "method": tag, "label": label, "acc_factor": acc, "raw_dir": str(rd), "resim_dir": str(sd),
                "num_slices": raw_s["num_slices"],
                "raw_acceleration": (raw_s.get("acceleration") or {}).get("mean"),
                "resim_acceleration": (resim_s.get("acceleration") or {}).get("mean"),
                "raw_gamma": (raw_s.get("gamma") or {}).get("mean") if tag not in ("zero_filled", "cs") else None,
                "raw_sigma": (raw_s.get("sigma") or {}).get("mean"),
                "raw_time_s": (raw_s.get("time_s") or {}).get("mean"),
                "resim_time_s": (resim_s.get("time_s") or {}).get("mean"),
                "paired": paired_volume_difference(raw_s, resim_s),
            })
    return entries


def raw_comparison_lines(cfg: DemoConfig, entries: Sequence[dict[str, Any]]) -> list[str]:
    """The results section of :func:`raw_vs_resimulated`: two labelled rows per method and the paired difference."""
    if not entries:
        return []
    first = entries[0]
    p = first["paired"]
    gamma_text = (f"DDS γ {cfg.gamma:g} lowered per slice from the estimated σ (--gamma_rule noise)"
                  if cfg.raw_gamma_rule == "noise" else f"DDS γ {cfg.gamma:g}")
    lines = [
        f"**Raw k-space vs. the re-simulated path (inverse crime)**: the same {p['num_volumes']} held-out volumes "
        f"({first['num_slices']} slices) and the same {cfg.mask_type} line patterns (seeded from file and slice; "
        f"centre fraction {cfg.raw_center_fraction:g}, so ESPIRiT has ACS lines to work with). *Raw*: "
        "recon_complex_multi.py --raw_dir on the simulator's noisy k-space (2x readout oversampling, zero-padded "
        "phase-encode columns outside the acquired band, which are never measured), coil maps from the ACS lines "
        f"only, scale and σ estimated from "
        f"the data, {gamma_text}; target: the file's reconstruction_rss. *Re-simulated*: --data_root, y = M F(S x) "
        f"from the preprocessed MVUE slice with its fully sampled maps, noise-free, DDS γ {cfg.gamma:g}; target: the "
        "MVUE magnitude. Both: fastMRI protocol (magnitude, volume-wise, data_range = max of the target volume), "
        "mean ± std over volumes; Δ = raw − re-simulated per volume (mean ± standard error; 'raw lower' counts the "
        "volumes where the raw path scores lower). R (achieved): raw over the acquired columns, re-simulated over "
        "all columns.",
        "",
        "| method | path: measurement → target | R (achieved) | PSNR [dB] | SSIM | NMSE | Δ PSNR [dB] | Δ SSIM | "
        "raw lower (PSNR) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        q = e["paired"]
        n = q["num_volumes"]

        def cells(side: str) -> str:
            return " | ".join(f"{q[m][side]['mean']:{f}} ± {q[m][side]['std']:{f}}"
                              for m, f in (("psnr", ".2f"), ("ssim", ".4f"), ("nmse", ".4f")))

        def delta(metric: str, fmt: str) -> str:
            se = q[metric]["se"]
            return f"{q[metric]['mean_diff']:{fmt}}" + ("" if se is None else f" ± {se:{fmt[1:]}}")

        lines.append(f"| {e['label']} | {RESIM_PATH} | {e['acc_factor']:g} ({_f(e['resim_acceleration'])}) | "
                     f"{cells('resim')} | | | |")
        lines.append(f"| {e['label']} | {RAW_PATH} | {e['acc_factor']:g} ({_f(e['raw_acceleration'])}) | "
                     f"{cells('raw')} | {delta('psnr', '+.2f')} | {delta('ssim', '+.4f')} | "
                     f"{q['psnr']['raw_lower']}/{n} |")
    gammas = [e["raw_gamma"] for e in entries if e["raw_gamma"] is not None]
    sigma = entries[0]["raw_sigma"]
    if gammas or sigma is not None:
        lines += ["", f"Raw path: estimated noise σ {_f(sigma, '.3g')} (per real/imaginary part, raw k-space units)"
                      + (f"; mean DDS γ after the noise rule {min(gammas):.1f}–{max(gammas):.1f}" if gammas else "")
                      + "."]
    return lines


def raw_comparison_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison as flat rows (``results_raw.csv``): one per (R, method, path)."""
    rows = []
    for e in entries:
        q = e["paired"]
        for side, path in (("resim", RESIM_PATH), ("raw", RAW_PATH)):
            rows.append({
                "method": e["label"], "path": path, "acc_factor": e["acc_factor"],
                "achieved_acceleration": e[f"{side}_acceleration"], "num_volumes": q["num_volumes"],
                "num_slices": e["num_slices"],
                **{f"fastmri_{m}_{k}": q[m][side][k] for m in ("psnr", "ssim", "nmse") for k in ("mean", "std")},
                **({f"delta_{m}_{k}": q[m][k] for m in ("psnr", "ssim", "nmse") for k in ("mean_diff", "se")}
                   if side == "raw" else {}),
                "raw_lower_psnr": q["psnr"]["raw_lower"] if side == "raw" else None,
                "time_per_slice_s": e[f"{side}_time_s"],
            })
    return rows


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage and write ``results.md``, ``results.csv``, ``results.json``, ``results_raw.csv`` (the raw vs
    re-simulated comparison, :func:`raw_vs_resimulated`) and ``figure_x{R}.png``."""
    from utils.data import MRISliceDataset
    from utils.report import figure_grid, load_result, paired_comparison, results_table, uncertainty_calibration

    cfg.output_dir = Path(cfg.output_dir).resolve()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    models = prepare_and_train(cfg, timings)
    reports = report_all(cfg, models, timings)

    results, sensitivity, calibration, paired = [], {}, {}, {}
    val = MRISliceDataset(cfg.output_dir / "fastmri", [cfg.output_dir / "fastmri" / "metadata_brain_val.csv"],
                          split="val", crop_size=cfg.crop_size)
    val_items = [val[i] for i in range(min(len(val), cfg.max_val_slices))]
    stages = [(acc, None) for acc in cfg.accelerations]
    if cfg.noise_sigma is not None:
        stages += [(acc, cfg.noise_sigma) for acc in cfg.noise_accelerations]
    for acc, sigma in stages:
        noisy = sigma is not None
        name = f"x{acc:g}" + (f" noisy σ {sigma:g}" if noisy else "")
        with Stage(f"5. reconstruct {name}" + (f" (gamma {cfg.noise_gamma:g})" if noisy else ""), timings):
            rows, dirs = reconstruct_all(cfg, acc, models, sigma, ensemble=not noisy)
        sfx = "_noisy" if noisy else ""
        for label, tag in rows:
            results.append(load_result(label, acc, dirs[tag]))
        for model in MISMATCH:
            if model + sfx in dirs and f"{model}_mismatch{sfx}" in dirs:
                good = load_result(model, acc, dirs[model + sfx]).summary["fastmri_psnr"]["mean"]
                bad = load_result(model, acc, dirs[f"{model}_mismatch{sfx}"]).summary["fastmri_psnr"]["mean"]
                sensitivity[f"{model} {name}"] = {"correct_psnr": good, "mismatched_psnr": bad,
                                                  "drop_db": None if good is None or bad is None else good - bad}
        if "fine-grained" + sfx in dirs:
            for other, label in (("unconditioned", "unconditioned"), ("text", "text"), ("t5", "T5"), ("cs", "CS"),
                                 ("fine-grained_mismatch", "itself with mismatched metadata")):
                if other + sfx in dirs:
                    paired[f"{name} vs {label}"] = paired_comparison(dirs["fine-grained" + sfx], dirs[other + sfx])
        if "text" + sfx in dirs and "unconditioned" + sfx in dirs:
            paired[f"{name}: text vs unconditioned"] = paired_comparison(dirs["text" + sfx],
                                                                         dirs["unconditioned" + sfx])
        if noisy:
            continue
        if "fine-grained_ens" in dirs:
            calibration[f"x{acc:g}"] = uncertainty_calibration(dirs["fine-grained_ens"], val_items)
        shown = {SHORT[m]: dirs[m] for m in models}
        if "fine-grained_ens" in dirs:
            shown["fg ensemble"] = dirs["fine-grained_ens"]
        shown["CS"] = dirs["cs"]
        item = val_items[len(val_items) // 2]
        figure_grid(cfg.output_dir / f"figure_x{acc:g}.png", item, dirs["zero_filled"], shown,
                    std_dir=dirs.get("fine-grained_ens"),
                    title=f"{item.filename} slice {item.slice_idx} ({item.record.get('contrast')}), "
                          f"{cfg.mask_type} x{acc:g}")

    raw_entries = raw_vs_resimulated(cfg, models, val_items, timings)
    table, rows = results_table(results)
    info_lines = [information_line(m, r) for m, r in reports.items()]
    stage_times = ", ".join(f"{name.split(' (')[0]}: {secs:.0f} s" for name, secs in timings.items())
    total = time.perf_counter() - t_all
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, torch CPU, fp32"
    try:
        load = ", load average at the end {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*os.getloadavg())
    except OSError:
        load = ""
    text_how = {"frozen": "random CLIP text tower frozen, projection trained",
                "scratch": "CLIP text tower trained from scratch with the UNet",
                "scratch_lr": f"CLIP text tower trained from scratch at lr {cfg.text_encoder_lr:g}"}[cfg.text_encoder]
    noise_text = ("" if cfg.noise_sigma is None else
                  f" Noisy rows: complex k-space noise σ {cfg.noise_sigma:g} (relative to the normalised image), "
                  f"DDS gamma {cfg.noise_gamma:g}, at x{', x'.join(f'{a:g}' for a in cfg.noise_accelerations)}.")
    lines = [
        f"Demo on simulated brain data ({len(cfg.contrasts)} contrasts x {cfg.volumes_per_contrast} subjects x "
        f"{cfg.num_slices} slices, one subject per contrast held out, {cfg.crop_size}x"
        f"{cfg.crop_size}, {cfg.max_val_slices} held-out slices), {cfg.mask_type} masks, DDS {cfg.recon_steps} steps "
        f"(eta 0.8, gamma {cfg.gamma:g}, 5 CG, |x0_hat| clipped at {cfg.clip_x0}), every model: "
        f"configs/unet/{cfg.unet_config}.json, {cfg.train_steps} steps x batch {cfg.batch_size}, "
        f"lr {cfg.learning_rate:g} ({cfg.lr_scheduler}), seed {cfg.seed}, null condition in {cfg.cfg_prob:g} of the "
        f"samples (cfg_prob / prompt_cfg_prob {cfg.cfg_prob:g}, joint; cfg_null_prob {cfg.cfg_null_prob:g}); "
        f"text model: {text_how}.{noise_text}",
        "Metrics: fastMRI protocol (magnitude, volume-wise, data_range = max of the volume), mean ± std over volumes.",
        "", table, "",
        *raw_comparison_lines(cfg, raw_entries), *([""] if raw_entries else []),
        f"**Information report** (metadata_report.py on {cfg.report_slices} held-out slices x {cfg.report_noise} "
        f"noise draws at t = {', '.join(str(t) for t in cfg.report_timesteps)}: paired denoising loss with the null "
        f"condition minus with the correct metadata, % of the loss, z = gap / SE over slices; information = I-MMSE "
        f"estimate over those t; per attribute ({', '.join(cfg.report_keys or ('all',))}) the largest z of "
        "replacing it with another slice's value; the unconditioned model has no condition input):", "",
        *[f"- {line}" for line in info_lines],
        "",
        "**Metadata sensitivity** (PSNR with correct vs. mismatched contrast/sequence/TR/TE/TI/flip angle):", "",
        "| model | correct [dB] | mismatched [dB] | drop [dB] |", "|---|---|---|---|",
        *[f"| {k} | {_f(v['correct_psnr'])} | {_f(v['mismatched_psnr'])} | {_f(v['drop_db'], '+.2f')} |"
          for k, v in sensitivity.items()],
        "",
        "**Paired per-slice comparison** (fine-grained minus the other method unless named, PSNR under the ContextMRI "
        "per-slice protocol on the same slices and masks; mean ± standard error, and the slices where the first is "
        "higher):",
        "", "| comparison | mean difference [dB] | first higher |", "|---|---|---|",
        *[f"| {k} | {v['mean_diff']:+.2f} ± {v['se']:.2f} | {v['wins']}/{v['num_slices']} |"
          for k, v in paired.items()],
        "",
        "**Uncertainty calibration** (Spearman rank correlation of the ensemble's per-pixel std with the per-pixel "
        "absolute error, inside the object, mean ± std over slices):", "",
        *[f"- {k}: {v['spearman_mean']:.3f} ± {v['spearman_std']:.3f} ({v['num_slices']} slices)"
          for k, v in calibration.items()],
        "", f"Machine: {machine}{load}. Total wall time {total / 60:.1f} min ({stage_times}); scripts ran "
            f"{cfg.parallel} at a time with {cfg.threads} thread(s) each, so the s / slice column includes that "
            "sharing.",
    ]
    report = "\n".join(lines)
    from utils.files import atomic_write_text, write_json

    atomic_write_text(cfg.output_dir / "results.md", report + "\n")
    import pandas as pd

    atomic_write_text(cfg.output_dir / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    if raw_entries:
        atomic_write_text(cfg.output_dir / "results_raw.csv",
                          pd.DataFrame(raw_comparison_rows(raw_entries)).to_csv(index=False))
    write_json(cfg.output_dir / "results.json",
               {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "rows": rows,
                "information": {m: {"line": information_line(m, r), "verdict": r["verdict"],
                                    "reads_metadata": r["reads_metadata"], "null": r["conditions"]["null"]}
                                for m, r in reports.items()},
                "sensitivity": sensitivity, "paired": paired, "calibration": calibration,
                "raw_vs_resimulated": raw_entries, "timings_s": timings,
                "machine": machine})
    print("\n" + report)
    print(f"\nresults: {cfg.output_dir / 'results.md'} (+ results.csv, results.json, "
          f"{'results_raw.csv, ' if raw_entries else ''}figure_x*.png, reports/)")
    return cfg.output_dir


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else f"{value:{fmt}}"
