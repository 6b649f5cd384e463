"""The prepared GPU check runs its whole code path on a CPU (tiny model), and reports finite figures."""

from __future__ import annotations

import json
import math

from benchmarks.gpu_check import main
from utils.samplers import PRESETS


def test_gpu_check_code_path_on_cpu(tmp_path):
    figures = main(["--tiny", "--device", "cpu", "--train_steps", "2", "--batch", "2", "--dds_steps", "3",
                    "--coils", "4", "--precision", "fp32", "--sweep_batches", "1", "2", "--sweep_steps", "2",
                    "--json", str(tmp_path / "f.json")])
    assert figures["dds_nfe"] == 3
    for key in ("train_s_per_step", "train_samples_per_s", "dds_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0
    assert json.loads((tmp_path / "f.json").read_text()) == json.loads(json.dumps(figures))
    # the fast preset runs in full (its own sampler and steps), the sweep covers the asked-for batch sizes
    assert figures["preset"]["nfe"] == PRESETS["fast"]["num_steps"] and figures["preset"]["s_per_slice"] > 0
    assert [row["batch"] for row in figures["batch_sweep"]] == [1, 2]
    for row in figures["batch_sweep"]:
        assert row["nfe_measured"] == 2 and row["slices_per_s_at_100_steps"] > 0 and row["peak_mib_per_slice"] >= 0
