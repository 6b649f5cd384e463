"""The main job on the embedded default: simulate -> preprocess -> train three models -> reconstruct -> report.

Every stage runs the project's real command-line scripts as subprocesses (exactly what a user types), so the demo
exercises the same code paths as real use. Stages whose outputs exist are skipped, so an interrupted demo resumes.

The three models share the UNet (``configs/unet/compact.json``), the number of steps, the batch size, the learning rate,
the seed and the classifier-free dropout rate (0.1); they differ only in what conditions them:

* ``unconditioned``: one constant token (no metadata);
* ``text``: the ContextMRI prompt through a CLIP text transformer. No pretrained CLIP weights exist offline, so the
  encoder is a small CLIP text model trained from scratch together with the UNet (said so in the table);
* ``fine-grained``: typed metadata tokens (Metadata Matters), no text.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    recon_steps: int = 50
    gamma: float = 50.0  # DDS data-consistency weight; the data are noiseless (y = A x_true), so weigh them strongly
    clip_x0: float | None = 1.5  # |x0_hat| limit in DDS for every diffusion model (see utils/samplers.py)
    ensemble_size: int = 4
    accelerations: tuple[float, ...] = (4.0, 8.0)
    mask_type: str = "uniform1d"
    max_val_slices: int = 20
    seed: int = 0
    parallel: int = 3  # scripts side by side: small models scale poorly over threads; 3 x 1 thread beat 1 x 2
    threads: int = 1
    methods: tuple[str, ...] = ("unconditioned", "text", "fine-grained")
    log: list[str] = field(default_factory=list)


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

        from models.testing import tiny_clip_text_model, write_tiny_clip_tokenizer

        torch.manual_seed(cfg.seed)
        write_tiny_clip_tokenizer(folder / "tokenizer")
        from transformers import CLIPTokenizer

        vocab_size = len(CLIPTokenizer.from_pretrained(folder / "tokenizer"))
        tiny_clip_text_model(hidden_size=128, vocab_size=vocab_size, seed=cfg.seed).save_pretrained(
            folder / "text_encoder")
    return folder


def train(cfg: DemoConfig, method: str, text_folder: Path) -> Path:
    out = cfg.output_dir / "models" / method
    if (out / "run_config.json").is_file():
        return out
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
        extra = ["--text_encoder_type", "clip", "--text_encoder_path", text_folder, "--train_text_encoder",
                 "--prompt_cfg_prob", cfg.cfg_prob]
    elif method == "fine-grained":
        extra = ["--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats",
                 cfg.output_dir / "metadata_stats.json", "--cfg_prob", cfg.cfg_prob, "--cfg_strategy", "joint"]
    elif method == "fine-grained+ood":
        common[0] = "train_mri_ood.py"
        extra = ["--text_encoder_type", "none", "--enable_condition_emb", "--metadata_stats",
                 cfg.output_dir / "metadata_stats_ood.json", "--cfg_prob", cfg.cfg_prob, "--cfg_strategy", "joint",
                 "--use_ood", "--cardio_data_root", root, "--mri_metadata_dir_cardio",
                 root / "metadata_cardiology_train.csv"]
    else:
        raise ValueError(method)
    _run(common + extra, cfg, f"train_{method}")
    return out


def reconstruct(cfg: DemoConfig, acc: float, tag: str, extra: list) -> Path:
    """Run ``recon_complex_multi.py`` into ``recon/{mask}/acc_{R}/{tag}``.

    Always called: the script resumes a folder whose ``run.json`` fingerprint matches these settings (finished slices
    are skipped, so a repeated demo costs only the model loading) and refuses one that holds other settings, so a
    changed demo setting can never reuse stale numbers.
    """
    root = cfg.output_dir / "fastmri"
    save = cfg.output_dir / "recon"
    out = save / cfg.mask_type / f"acc_{acc:g}" / tag
    _run(["recon_complex_multi.py", "--data_root", root, "--load_dir_meta_brain", root / "metadata_brain_val.csv",
          "--crop_size", cfg.crop_size, "--mask_type", cfg.mask_type, "--acc_factor", acc, "--save_dir", save,
          "--tag", tag, "--end_idx", cfg.max_val_slices, "--batch_size", cfg.max_val_slices, "--num_steps",
          cfg.recon_steps, "--gamma", cfg.gamma, "--seed", cfg.seed, *extra], cfg, f"recon_{tag}_x{acc:g}")
    return out


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage and write ``results.md``, ``results.csv``, ``results.json`` and ``figure_x{R}.png``."""
    from utils.data import MRISliceDataset
    from utils.report import figure_grid, load_result, paired_comparison, results_table, uncertainty_calibration

    cfg.output_dir = Path(cfg.output_dir).resolve()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with Stage("1. simulate brain (fastMRI h5) and cardiac (CMRxRecon .mat) data", timings):
        simulate(cfg)
    with Stage("2. preprocess with pre_processing_final.py / pre_process_cmrx.py", timings):
        preprocess(cfg)
    text_folder = make_text_encoder(cfg)
    with Stage(f"3. train {', '.join(cfg.methods)} ({cfg.train_steps} steps each, {cfg.parallel} at a time)", timings):
        with ThreadPoolExecutor(cfg.parallel) as pool:
            futures = {m: pool.submit(train, cfg, m, text_folder) for m in cfg.methods}
            models = {m: f.result() for m, f in futures.items()}

    stats = cfg.output_dir / "metadata_stats.json"
    results, sensitivity, calibration, paired = [], {}, {}, {}
    for acc in cfg.accelerations:
        with Stage(f"4. reconstruct x{acc:g}", timings):
            runs = [("zero-filled", "zero_filled", ["--method", "zero_filled"]),
                    ("CS L1-wavelet", "cs", ["--method", "cs"])]
            clip = ["--clip_x0", cfg.clip_x0] if cfg.clip_x0 is not None else []
            model_args = {
                "unconditioned": ["--finetune_folder", models.get("unconditioned"), *clip],
                "text": ["--finetune_folder", models.get("text"), *clip],
                "fine-grained": ["--finetune_folder", models.get("fine-grained"), "--enable_condition_emb",
                                 "--metadata_stats", stats, *clip],
                "fine-grained+ood": ["--finetune_folder", models.get("fine-grained+ood"), "--enable_condition_emb",
                                     "--metadata_stats", cfg.output_dir / "metadata_stats_ood.json", *clip],
            }
            labels = {"unconditioned": "unconditioned", "text": "text (ContextMRI-style, encoder from scratch)",
                      "fine-grained": "fine-grained metadata",
                      "fine-grained+ood": "fine-grained + cardiac OOD data (train_mri_ood.py)"}
            for method in cfg.methods:
                runs.append((labels[method], method, model_args[method]))
            if "fine-grained" in cfg.methods:
                runs.append((f"fine-grained ensemble (N={cfg.ensemble_size})", "fine-grained_ens",
                             model_args["fine-grained"] + ["--num_samples", cfg.ensemble_size]))
                runs.append(("fine-grained, mismatched metadata", "fine-grained_mismatch",
                             model_args["fine-grained"] + ["--mismatch_metadata"]))
            if "text" in cfg.methods:
                runs.append(("text, mismatched metadata", "text_mismatch", model_args["text"] + ["--mismatch_metadata"]))
            dirs = {}
            with ThreadPoolExecutor(cfg.parallel) as pool:
                futures = {tag: pool.submit(reconstruct, cfg, acc, tag, extra) for _, tag, extra in runs}
                for tag, fut in futures.items():
                    dirs[tag] = fut.result()
            for label, tag, extra in runs:
                if not tag.endswith("_mismatch"):
                    results.append(load_result(label, acc, dirs[tag]))
            for model in ("fine-grained", "text"):
                if model in dirs and f"{model}_mismatch" in dirs:
                    good = load_result(model, acc, dirs[model]).summary["fastmri_psnr"]["mean"]
                    bad = load_result(model, acc, dirs[f"{model}_mismatch"]).summary["fastmri_psnr"]["mean"]
                    sensitivity[f"{model} x{acc:g}"] = {"correct_psnr": good, "mismatched_psnr": bad,
                                                        "drop_db": good - bad}
            if "fine-grained" in dirs:
                for other, label in (("unconditioned", "unconditioned"), ("text", "text"), ("cs", "CS"),
                                     ("fine-grained_mismatch", "itself with mismatched metadata")):
                    if other in dirs:
                        paired[f"x{acc:g} vs {label}"] = paired_comparison(dirs["fine-grained"], dirs[other])
            val = MRISliceDataset(cfg.output_dir / "fastmri", [cfg.output_dir / "fastmri" / "metadata_brain_val.csv"],
                                  split="val", crop_size=cfg.crop_size)
            val_items = [val[i] for i in range(min(len(val), cfg.max_val_slices))]
            if "fine-grained_ens" in dirs:
                calibration[f"x{acc:g}"] = uncertainty_calibration(dirs["fine-grained_ens"], val_items)
            shown = {labels[m].split(" (")[0]: dirs[m] for m in cfg.methods}
            if "fine-grained_ens" in dirs:
                shown["fg ensemble"] = dirs["fine-grained_ens"]
            shown["CS"] = dirs["cs"]
            item = val_items[len(val_items) // 2]
            figure_grid(cfg.output_dir / f"figure_x{acc:g}.png", item, dirs["zero_filled"], shown,
                        std_dir=dirs.get("fine-grained_ens"),
                        title=f"{item.filename} slice {item.slice_idx} ({item.record.get('contrast')}), "
                              f"{cfg.mask_type} x{acc:g}")

    table, rows = results_table(results)
    stage_times = ", ".join(f"{name.split(' (')[0]}: {secs:.0f} s" for name, secs in timings.items())
    total = time.perf_counter() - t_all
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, torch CPU, fp32"
    lines = [
        f"Demo on simulated brain data ({len(cfg.contrasts)} contrasts x {cfg.volumes_per_contrast} subjects x "
        f"{cfg.num_slices} slices, one subject per contrast held out, {cfg.crop_size}x"
        f"{cfg.crop_size}, {cfg.max_val_slices} held-out slices), {cfg.mask_type} masks, DDS {cfg.recon_steps} steps "
        f"(eta 0.8, gamma {cfg.gamma:g}, 5 CG, |x0_hat| clipped at {cfg.clip_x0}), every model: "
        f"configs/unet/{cfg.unet_config}.json, {cfg.train_steps} steps x batch {cfg.batch_size}, "
        f"lr {cfg.learning_rate:g} ({cfg.lr_scheduler}), seed {cfg.seed}.",
        "Metrics: fastMRI protocol (magnitude, volume-wise, data_range = max of the volume), mean ± std over volumes.",
        "", table, "",
        "**Metadata sensitivity** (PSNR with correct vs. mismatched contrast/sequence/TR/TE/TI/flip angle):", "",
        "| model | correct [dB] | mismatched [dB] | drop [dB] |", "|---|---|---|---|",
        *[f"| {k} | {v['correct_psnr']:.2f} | {v['mismatched_psnr']:.2f} | {v['drop_db']:+.2f} |"
          for k, v in sensitivity.items()],
        "",
        "**Paired per-slice comparison** (fine-grained minus the other method, PSNR under the ContextMRI per-slice "
        "protocol on the same slices and masks; mean ± standard error, and the slices where fine-grained is higher):",
        "", "| comparison | mean difference [dB] | fine-grained higher |", "|---|---|---|",
        *[f"| {k} | {v['mean_diff']:+.2f} ± {v['se']:.2f} | {v['wins']}/{v['num_slices']} |"
          for k, v in paired.items()],
        "",
        "**Uncertainty calibration** (Spearman rank correlation of the ensemble's per-pixel std with the per-pixel "
        "absolute error, inside the object, mean ± std over slices):", "",
        *[f"- {k}: {v['spearman_mean']:.3f} ± {v['spearman_std']:.3f} ({v['num_slices']} slices)"
          for k, v in calibration.items()],
        "", f"Machine: {machine}. Total wall time {total / 60:.1f} min ({stage_times}); scripts ran {cfg.parallel} at "
            f"a time with {cfg.threads} thread(s) each, so the s / slice column includes that sharing.",
    ]
    report = "\n".join(lines)
    (cfg.output_dir / "results.md").write_text(report + "\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(cfg.output_dir / "results.csv", index=False)
    (cfg.output_dir / "results.json").write_text(json.dumps(
        {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "rows": rows,
         "sensitivity": sensitivity, "paired": paired, "calibration": calibration, "timings_s": timings,
         "machine": machine},
        indent=2, default=str))
    print("\n" + report)
    print(f"\nresults: {cfg.output_dir / 'results.md'} (+ results.csv, results.json, figure_x*.png)")
    return cfg.output_dir
