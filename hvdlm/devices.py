"""Which device each node-local rank takes: one GPU per rank, never two ranks on one GPU; the CPU where none is
visible. Pure: numbers and device identities in, a `DeviceChoice` out, so that every node shape is tested without
a GPU.

Why a module of its own, directly in hvdlm/: the rank's program (hvdlm.training.device.pick_device asks
torch and the node's other ranks for the inputs, then applies the choice) and `hvdlm doctor` on a login node
(hvdlm.launch.doctor, which must not import torch) need the same answer. Below both, with the standard library
and hvdlm.errors alone, neither imports the other.

Why not simply `cuda:local_rank`: a node may run more ranks than it shows each rank GPUs. Either the scheduler
narrowed every rank to its own GPU (`srun --gpu-bind=single:1`, a per-rank CUDA_VISIBLE_DEVICES: each rank sees
one device, ordinal 0, a different physical GPU for each), and `cuda:local_rank` fails with "invalid device
ordinal"; or two ranks really would share a GPU (`make demo`'s 2 ranks on a 1-GPU workstation), which NCCL
refuses ("Duplicate GPU detected") and which would in any case halve each rank's memory. Counts alone cannot tell
these apart; the physical identities (UUIDs) of the devices each rank sees can, so the node's ranks exchange them.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from hvdlm.errors import InputError

# cuBLAS is deterministic only with a fixed workspace; it reads this once, when CUDA starts (PyTorch's
# "Reproducibility" notes). ":4096:8" is the larger of the two values NVIDIA documents.
CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass(frozen=True)
class DeviceChoice:
    """One rank's device, as choose_device picks it; `name` spells it as torch does."""

    kind: str  # "cuda" or "cpu"
    index: int | None  # the CUDA ordinal as this rank sees it (after CUDA_VISIBLE_DEVICES); None on CPU
    deterministic: bool  # torch.use_deterministic_algorithms(True)
    env: dict[str, str] = field(default_factory=dict)  # set (if unset) before CUDA starts

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def choose_device(
    local_rank: int,
    local_size: int,
    visible: int,
    deterministic: bool = False,
    *,
    views: Sequence[Sequence[str]] | None = None,
    gpus_required: bool = False,
) -> DeviceChoice:
    """The device of node-local rank `local_rank` of `local_size`, which sees `visible` CUDA devices.

    `views`, when known: for every local rank (in local-rank order), the identities (UUIDs) of the devices it sees,
    in ordinal order. With them, ranks narrowed to their own GPUs are told apart from ranks that would share one;
    without them, fewer visible GPUs than ranks is taken as sharing. `gpus_required`: no visible GPU is an error
    (a GPU job on a CPU-only machine) instead of the CPU.

    Raises InputError when two ranks would share a GPU, or a GPU is required and none is visible.
    """
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} is not in [0, {local_size})")
    env = dict(CUBLAS_DETERMINISTIC) if deterministic else {}
    if visible == 0:
        if gpus_required:
            raise InputError(
                f"this job asks for GPUs, but rank {local_rank} on {socket.gethostname()} sees none (torch finds no "
                "CUDA device: no GPU, no driver, a CPU-only torch, or CUDA_VISIBLE_DEVICES empty). Run it on GPU "
                "nodes (in Slurm: slurm.gpus_per_node > 0), install a CUDA build of torch, or run on CPUs."
            )
        return DeviceChoice("cpu", None, deterministic, env)
    if views is not None:
        if len(views) != local_size:
            raise ValueError(f"{len(views)} device views for {local_size} local ranks")
        index = _one_gpu_each(views)[local_rank]
    elif visible >= local_size:
        index = local_rank  # every rank sees the node's GPUs: one each, by local rank
    else:
        raise _sharing_error(local_size, visible)
    return DeviceChoice("cuda", index, deterministic, env)


def _one_gpu_each(views: Sequence[Sequence[str]]) -> list[int]:
    """For each local rank, an ordinal into its own view such that no two ranks get the same physical device.

    A bipartite matching (Kuhn's augmenting paths, ranks against device identities); each rank tries its
    local rank's ordinal first, so ranks that all see the same GPUs get cuda:local_rank, the usual mapping.
    """
    owner: dict[str, int] = {}  # device identity -> local rank holding it

    def preference(rank: int) -> list[int]:
        n = len(views[rank])
        return [(rank + k) % n for k in range(n)] if n else []

    def place(rank: int, seen: set[str]) -> bool:
        for ordinal in preference(rank):
            dev = views[rank][ordinal]
            if dev in seen:
                continue
            seen.add(dev)
            if dev not in owner or place(owner[dev], seen):
                owner[dev] = rank
                return True
        return False

    for rank in range(len(views)):
        if not views[rank]:
            raise InputError(
                f"local rank {rank} sees no GPU while other ranks on this node do (CUDA_VISIBLE_DEVICES differs "
                "between ranks?). Give every rank a GPU (srun --gpus-per-task=1 or --gpu-bind) or none."
            )
        if not place(rank, set()):
            distinct = len({d for v in views for d in v})
            raise _sharing_error(len(views), distinct)
    index = {rank: views[rank].index(dev) for dev, rank in owner.items()}
    return [index[rank] for rank in range(len(views))]


def _sharing_error(local_size: int, gpus: int) -> InputError:
    return InputError(
        f"{local_size} ranks run on {socket.gethostname()} but they can reach only {gpus} GPU(s), so two ranks would "
        "share a GPU, which NCCL refuses (one rank per GPU is how hvdlm runs). Start at most "
        f"{gpus} rank(s) per node (--np, or slurm.ntasks_per_node / slurm.gpus_per_node), give each rank its own GPU "
        "(srun --gpu-bind / CUDA_VISIBLE_DEVICES), or train on CPUs by hiding the GPUs (CUDA_VISIBLE_DEVICES=)."
    )
