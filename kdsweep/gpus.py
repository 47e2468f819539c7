"""The GPUs this process sees, named as ``CUDA_VISIBLE_DEVICES`` takes them.

A child process given ``CUDA_VISIBLE_DEVICES=<id>`` sees that one GPU as ``cuda:0``. When this
process was itself started with ``CUDA_VISIBLE_DEVICES`` set, its ``cuda:i`` is the i-th entry
of that list, not GPU i of the machine, so the ids handed on must come from the list.
"""

from __future__ import annotations

import glob
import os

# Device nodes a GPU driver creates (NVIDIA's, in containers too; ROCm's kernel driver for AMD GPUs).
# Without any of them no GPU can be used, and importing torch only to count none costs a
# second or more in every `kdsweep run`.
_DRIVER_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd")


def gpu_driver_present() -> bool:
    """Whether this machine has a GPU driver's device nodes (cheap: no torch import)."""
    return any(glob.glob(pattern) for pattern in _DRIVER_NODES)


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process can use (empty on a machine without CUDA), as ``CUDA_VISIBLE_DEVICES`` entries."""
    if not gpu_driver_present():
        return []
    import torch

    count = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in inherited.split(",") if entry.strip()][:count]
