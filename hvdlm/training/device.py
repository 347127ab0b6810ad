"""Which device a rank trains on: `pick_device` asks torch (and the node's other ranks) for the devices each rank
sees, and applies the choice hvdlm.devices.choose_device makes from them (pure, torch-free: `hvdlm doctor` makes
the same choice on a login node; that module says why it is not simply `cuda:local_rank`).
"""

from __future__ import annotations

import os

from hvdlm.devices import CUBLAS_DETERMINISTIC, choose_device


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
    share: bool = False,
):
    """Choose this rank's device (see `choose_device`), make it current, and return it as a torch.device.

    `comm`: an mpi4py communicator spanning the job (e.g. MPI.COMM_WORLD). Collective over it when given: the
    ranks of each node exchange the identities of the GPUs they see, which tells ranks narrowed to their own GPU
    from ranks that would share one. Without it, fewer GPUs than ranks on a node is refused. `use_gpus` False:
    the CPU, whatever is visible (train.device = "cpu"). `share` (train.share_gpu): ranks without a GPU of their
    own share one (hvdlm.devices.assign_gpus) instead of being refused.
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
    choice = choose_device(
        local_rank, local_size, len(uuids), deterministic, views=views, gpus_required=gpus_required, share=share
    )
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
