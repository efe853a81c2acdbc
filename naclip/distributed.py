"""torchrun support shared by ``naclip segment`` and ``naclip eval``: the one home of the rank / world /
device rules.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`setup` joins the process group (NCCL when
the device is CUDA, else gloo) and gives each rank the GPU of its ``LOCAL_RANK`` (``cuda:<LOCAL_RANK>``,
whatever index ``--device`` named); multi-node runs get their ranks from torchrun as usual. Outside torchrun
nothing is initialised and the rank is 0 of 1.
"""

from __future__ import annotations

import os

__all__ = ["rank_world", "setup", "teardown"]


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device_arg: str | None) -> tuple[int, int, str]:
    """Initialise torch.distributed under torchrun (``WORLD_SIZE > 1``); returns ``(rank, world, device)``
    with ``device`` = ``device_arg`` or ``cuda`` when available, else ``cpu`` (``cuda:<LOCAL_RANK>`` for a
    CUDA device under torchrun)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):  # one GPU per rank: the local rank's, whatever index --device named
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def teardown() -> None:
    """Leave the process group if one is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
