"""Which device a rank trains on: one GPU per rank, never two ranks on one GPU; the CPU where no GPU is visible.

`choose_device` is pure (numbers and device identities in, a `DeviceChoice` out) so that every case is tested
without a GPU; `pick_device` asks torch (and the node's other ranks) for those inputs and applies the choice.

Why not simply `cuda:local_rank`: a node may run more ranks than it shows each rank GPUs. Either the scheduler
narrowed every rank to its own GPU (`srun --gpu-bind=single:1`, a per-rank CUDA_VISIBLE_DEVICES: each rank sees
one device, ordinal 0, a different physical GPU for each), and `cuda:local_rank` fails with "invalid device
ordinal"; or two ranks really would share a GPU (`make demo`'s 2 ranks on a 1-GPU workstation), which NCCL
refuses ("Duplicate GPU detected") and which would in any case halve each rank's memory. Counts alone cannot tell
these apart; the physical identities (UUIDs) of the devices each rank sees can, so the node's ranks exchange them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from hvdlm.errors import InputError

# cuBLAS is deterministic only with a fixed workspace; it reads this once, when CUDA starts (PyTorch's
# "Reproducibility" notes). ":4096:8" is the larger of the two values NVIDIA documents.
CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass(frozen=True)
class DeviceChoice:
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


def device_uuids() -> tuple[str, ...]:
    """The identities of the CUDA devices this process sees, in ordinal order (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return ()
    ids = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        # The UUID names the physical GPU whatever CUDA_VISIBLE_DEVICES calls it; the PCI address is the fallback.
        uuid = getattr(props, "uuid", None)
        bus = (
            getattr(props, "pci_domain_id", 0),
            getattr(props, "pci_bus_id", None),
            getattr(props, "pci_device_id", 0),
        )
        ids.append(str(uuid) if uuid is not None else f"pci:{bus}" if bus[1] is not None else f"ordinal:{i}")
    return tuple(ids)


def pick_device(
    local_rank: int,
    local_size: int,
    deterministic: bool = False,
    comm=None,
    gpus_required: bool = False,
    use_gpus: bool = True,
):
    """Choose this rank's device (see `choose_device`), make it current, and return it as a torch.device.

    `comm`: an mpi4py communicator spanning the job (e.g. MPI.COMM_WORLD). Collective over it when given: the
    ranks of each node exchange the identities of the GPUs they see, which tells ranks narrowed to their own GPU
    from ranks that would share one. Without it, fewer GPUs than ranks on a node is refused. `use_gpus` False:
    the CPU, whatever is visible (train.device = "cpu").
    """
    import torch

    if deterministic:
        for name, value in CUBLAS_DETERMINISTIC.items():
            os.environ.setdefault(name, value)  # before CUDA starts (device_uuids below starts it)
    uuids = device_uuids() if use_gpus else ()
    views = None
    if comm is not None:
        from mpi4py import MPI

        # The node's ranks in world-rank order: how Horovod (and Open MPI) number local ranks.
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        try:
            views = node.allgather(uuids)
            local_rank, local_size = node.Get_rank(), node.Get_size()
        finally:
            node.Free()
    choice = choose_device(local_rank, local_size, len(uuids), deterministic, views=views, gpus_required=gpus_required)
    if choice.deterministic:
        torch.use_deterministic_algorithms(True)
    if choice.kind == "cuda":
        # Horovod: its NCCL ops run on the current device; set it before hvd's first GPU collective.
        torch.cuda.set_device(choice.index)
        return torch.device("cuda", choice.index)
    return torch.device("cpu")


def to_device(batch: tuple, device) -> tuple:
    """A host batch (inputs, targets) on the device: through pinned memory on GPUs, so the copy is asynchronous and
    the host goes on preparing the next micro-batch while the device computes; on the CPU as it is."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(batch)
