"""Preprocessing throughput: our pipeline (1 and 2 workers) against the reference's way, in one run.

Reference way (ContextMRI / Metadata Matters): a serial loop over files and slices, sigpy ``EspiritCalib`` with its
default parameters (calib 24, thresh 0.02, kernel 6, crop 0.95, max_iter 100) on the full oversampled grid, MVUE,
centre crop, 99th-percentile normalisation, ``np.save``.
Ours: ``utils.preprocessing.run_preprocessing`` (exact ESPIRiT on the kept pixels, atomic writes, metadata CSV) with
``--num_workers`` 1 and 2.

Every process runs single-threaded (OMP/OpenBLAS/torch threads = 1, set before numpy is imported): parallelism comes
from worker processes only, and the serial runs compare like with like on a shared machine.

Maps agreement: per slice, |correlation| between our maps and the reference maps over the pixels inside the object
(reference maps nonzero and the MVUE above 5% of its maximum); images: relative L2 difference of the MVUEs.

Example::

    python benchmarks/bench_preprocessing.py --num_volumes 4 --num_slices 4 --num_coils 12 --reference_volumes 1
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.coils import center_crop, espirit_maps, mvue, normalize_percentile  # noqa: E402
from utils.fastmri_io import FastMRIFile  # noqa: E402
from utils.preprocessing.fastmri import PreprocessConfig, run_preprocessing  # noqa: E402
from utils.preprocessing.slices import coil_images  # noqa: E402


def reference_loop(files: list[Path], out_dir: Path, crop: int) -> tuple[float, dict[tuple[str, int], np.ndarray]]:
    """The reference's way; returns (seconds, maps per slice for the comparison)."""
    maps_out: dict[tuple[str, int], np.ndarray] = {}
    t0 = time.perf_counter()
    for path in files:
        with FastMRIFile.open(path) as f:
            for i in range(f.num_slices):
                k = f.read_slice(i)
                maps = espirit_maps(k)  # sigpy defaults, full grid
                img = mvue(coil_images(k), maps)
                img, _ = normalize_percentile(center_crop(img, (crop, crop)))
                maps_c = center_crop(maps, (crop, crop))
                d = out_dir / "slice" / path.stem
                d.mkdir(parents=True, exist_ok=True)
                np.save(d / f"{i:03d}.npy", img.astype(np.complex64))
                m = out_dir / "mps" / path.stem
                m.mkdir(parents=True, exist_ok=True)
                np.save(m / f"{i:03d}.npy", maps_c.astype(np.complex64))
                maps_out[(path.stem, i)] = maps_c
    return time.perf_counter() - t0, maps_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_volumes", type=int, default=4)
    p.add_argument("--num_slices", type=int, default=4)
    p.add_argument("--num_coils", type=int, default=12)
    p.add_argument("--matrix", default="640x320")
    p.add_argument("--crop_size", type=int, default=320)
    p.add_argument("--reference_volumes", type=int, default=1,
                   help="run the (slow) reference on the first N volumes only; rates are per slice; 0 = all)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from utils.simulation.fastmri_writer import FastMRIConfig, generate_fastmri_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        h, w = (int(v) for v in args.matrix.split("x"))
        t0 = time.perf_counter()
        gen_cfg = FastMRIConfig(output_dir=work / "h5", num_volumes=args.num_volumes, num_slices=args.num_slices,
                                matrix=(h, w), num_coils=(args.num_coils,), seed=0)  # fmt: skip
        generate_fastmri_dataset(gen_cfg, log=None)
        files = sorted((work / "h5").glob("*.h5"))
        n = args.num_volumes * args.num_slices
        print(f"data: {len(files)} volumes x {args.num_slices} slices, {h}x{w}, {args.num_coils} coils "
              f"(generated in {time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}, "
              f"cpus {os.cpu_count()}")  # fmt: skip

        ref_files = files[: args.reference_volumes] if args.reference_volumes else files
        n_ref = len(ref_files) * args.num_slices
        t_ref, ref_maps = reference_loop(ref_files, work / "ref", args.crop_size)
        ref_rate = n_ref / t_ref
        results = {"reference_serial_sigpy_default": {"slices": n_ref, "seconds": t_ref, "slices_per_s": ref_rate}}
        for workers in (1, 2):
            out = work / f"ours_{workers}"
            cfg = PreprocessConfig(input_dir=work / "h5", output_root=out, split="val", crop_size=args.crop_size,
                                   num_workers=workers)  # fmt: skip
            t1 = time.perf_counter()
            summary = run_preprocessing(cfg, show_progress=False)
            dt = time.perf_counter() - t1
            assert summary.ok and summary.slices_written == n, summary.format()
            results[f"ours_{workers}_worker"] = {
                "slices": n, "seconds": dt, "slices_per_s": n / dt, "speedup": (n / dt) / ref_rate
            }

        corrs, img_diffs = [], []
        ds = work / "ours_1" / f"brain_mvue_{args.crop_size}_val"
        for (stem, i), ref in ref_maps.items():
            ours = np.load(ds / "mps" / stem / f"{i:03d}.npy")
            ref_img = np.load(work / "ref" / "slice" / stem / f"{i:03d}.npy")
            our_img = np.load(ds / "slice" / stem / f"{i:03d}.npy")
            inside = ((np.abs(ref) ** 2).sum(0) > 0.5) & (np.abs(ref_img) > 0.05 * np.abs(ref_img).max())
            a, b = ref[:, inside], ours[:, inside]
            corrs.append(float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))))
            img_diffs.append(float(np.linalg.norm(our_img - ref_img) / np.linalg.norm(ref_img)))
        results["maps_abs_correlation_min"] = min(corrs)
        results["image_rel_diff_max"] = max(img_diffs)

    print(f"{'run':<34}{'slices':>7}{'seconds':>9}{'slices/s':>10}{'speedup':>9}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:<34}{r['slices']:>7}{r['seconds']:>9.1f}{r['slices_per_s']:>10.3f}"
                  f"{r.get('speedup', 1.0):>8.2f}x")  # fmt: skip
    print(f"maps |correlation| inside the object, min over slices: {results['maps_abs_correlation_min']:.6f}")
    print(f"MVUE images, max relative L2 difference ours vs reference: {results['image_rel_diff_max']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
