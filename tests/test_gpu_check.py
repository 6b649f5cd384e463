"""The prepared GPU check runs its whole code path on a CPU (tiny model), and reports finite figures."""

from __future__ import annotations

import math

from benchmarks.gpu_check import main


def test_gpu_check_code_path_on_cpu(tmp_path):
    figures = main(["--tiny", "--device", "cpu", "--train_steps", "2", "--batch", "2", "--dds_steps", "3",
                    "--coils", "4", "--precision", "fp32", "--json", str(tmp_path / "f.json")])
    assert figures["dds_nfe"] == 3
    for key in ("train_s_per_step", "train_samples_per_s", "dds_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0
    assert (tmp_path / "f.json").is_file()
