"""The GPUs this process sees, named as ``CUDA_VISIBLE_DEVICES`` takes them.

A child process given ``CUDA_VISIBLE_DEVICES=<id>`` sees that one GPU as ``cuda:0``. When this
process was itself started with ``CUDA_VISIBLE_DEVICES`` set, its ``cuda:i`` is the i-th entry
of that list, not GPU i of the machine, so the ids handed on must come from the list.
"""

from __future__ import annotations

import os


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process can use (empty on a machine without CUDA), as ``CUDA_VISIBLE_DEVICES`` entries."""
    import torch

    count = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in inherited.split(",") if entry.strip()][:count]
