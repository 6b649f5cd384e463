"""Time the simulation of one full-size fastMRI brain volume (16 slices, 16 coils, 640×320) and print it.

Usage: ``python benchmarks/bench_simulation.py [--slices 16 --coils 16 --matrix 640x320 --repeats 1]``. The first
volume of a process also pays for loading the MNI templates (reported separately).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.simulation.brain_phantom import load_mni_tissues  # noqa: E402
from utils.simulation.fastmri_writer import FastMRIConfig, simulate_fastmri_volume  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--coils", type=int, default=16)
    p.add_argument("--matrix", default="640x320")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    h, w = (int(v) for v in args.matrix.split("x"))
    t0 = time.perf_counter()
    load_mni_tissues()
    print(f"MNI template load (once per process): {time.perf_counter() - t0:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        config = FastMRIConfig(Path(tmp), num_slices=args.slices, matrix=(h, w), num_coils=(args.coils,), seed=0)
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = simulate_fastmri_volume(config, r)
            dt = time.perf_counter() - t0
            size = res.path.stat().st_size / 2**20
            print(f"fastMRI brain volume {args.slices} slices x {args.coils} coils x {h}x{w}: {dt:.2f} s "
                  f"(h5 {size:.0f} MiB + ground-truth sidecar, {res.protocol.acq.acquisition})")  # fmt: skip


if __name__ == "__main__":
    main()
