"""How a script started by ``accelerate launch`` / ``torchrun`` learns that it must run as CPU processes."""

from __future__ import annotations

import os


def multi_process_cpu_launch() -> bool:
    """True when accelerate must be asked for CPU (gloo) processes: ``ACCELERATE_USE_CPU`` is set, or several
    processes were launched (``WORLD_SIZE > 1``) on a machine without a GPU-like device.

    Without ``cpu=True``, ``PartialState()`` / ``Accelerator()`` on such a machine silently fall back to one process
    each, so every process would do (train on, reconstruct) everything as rank 0 of 1.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())
