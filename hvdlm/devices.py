"""Which device each node-local rank takes: one GPU per rank, never two ranks on one GPU (unless the job says
train.share_gpu and needs no NCCL communicator); the CPU where none is visible. Pure: numbers and device identities
in, a `DeviceChoice` out, so that every node shape is tested without a GPU.

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

Sharing on purpose (train.share_gpu): NCCL is what refuses two ranks on one GPU, and only Horovod's GPU collectives
build NCCL communicators. A layout with one replica (dp = 1: tensor or pipeline parallelism only) sends its own
collectives over MPI (mpi4py) and steps torch's optimizer, so its ranks can share a GPU: a check of TP or PP on a
one-GPU machine, or a small workstation. `check_share_gpu` refuses the layouts that would need NCCL.

FP8 (train.precision = "fp8"): `fp8_refusal` says why a device cannot train in it (torch-free, like the rest).
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
    share: bool = False,
) -> DeviceChoice:
    """The device of node-local rank `local_rank` of `local_size`, which sees `visible` CUDA devices.

    `views`, when known: for every local rank (in local-rank order), the identities (UUIDs) of the devices it sees,
    in ordinal order. With them, ranks narrowed to their own GPUs are told apart from ranks that would share one;
    without them, fewer visible GPUs than ranks is taken as sharing. `gpus_required`: no visible GPU is an error
    (a GPU job on a CPU-only machine) instead of the CPU. `share` (train.share_gpu): ranks that cannot have a GPU
    each share them instead (see assign_gpus).

    Raises InputError when two ranks would share a GPU (and `share` is off), or a GPU is required and none is
    visible.
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
    index = assign_gpus(local_size, visible, views, share)[local_rank]
    return DeviceChoice("cuda", index, deterministic, env)


def assign_gpus(
    local_size: int, visible: int, views: Sequence[Sequence[str]] | None = None, share: bool = False
) -> list[int]:
    """The CUDA ordinal of every local rank of a node (see choose_device for `views`).

    One GPU each wherever the node has enough (share or not). Otherwise, with `share`, the ranks take the GPUs in
    turn: local rank r takes ordinal r mod (the GPUs r sees), so 2 ranks on a 1-GPU host both take cuda:0 and
    4 ranks on 2 GPUs take 0, 1, 0, 1; ranks narrowed to one GPU each keep theirs (ordinal 0). Without `share`,
    two ranks on one GPU are refused.
    """
    if views is not None:
        if len(views) != local_size:
            raise ValueError(f"{len(views)} device views for {local_size} local ranks")
        try:
            return _one_gpu_each(views)
        except _Sharing as sharing:
            if not share:
                raise _sharing_error(local_size, sharing.gpus) from None
            return [r % len(view) for r, view in enumerate(views)]
    if visible >= local_size:
        return list(range(local_size))  # every rank sees the node's GPUs: one each, by local rank
    if not share:
        raise _sharing_error(local_size, visible)
    return [r % visible for r in range(local_size)]


class _Sharing(Exception):
    """No GPU of its own for every rank: `gpus` distinct GPUs for more ranks."""

    def __init__(self, gpus: int):
        super().__init__(gpus)
        self.gpus = gpus


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
            raise _Sharing(len({d for v in views for d in v}))
    index = {rank: views[rank].index(dev) for dev, rank in owner.items()}
    return [index[rank] for rank in range(len(views))]


def _sharing_error(local_size: int, gpus: int) -> InputError:
    return InputError(
        f"{local_size} ranks run on {socket.gethostname()} but they can reach only {gpus} GPU(s), so two ranks would "
        "share a GPU, which NCCL refuses (one rank per GPU is how hvdlm runs). Start at most "
        f"{gpus} rank(s) per node (--np, or slurm.ntasks_per_node / slurm.gpus_per_node), give each rank its own GPU "
        "(srun --gpu-bind / CUDA_VISIBLE_DEVICES), or train on CPUs by hiding the GPUs (CUDA_VISIBLE_DEVICES=). "
        "A layout with one replica (tensor or pipeline parallelism only, no ZeRO) may share a GPU on purpose: "
        "train.share_gpu = true."
    )


def check_share_gpu(dp: int | None, zero: int = 0, local_sgd_interval: int = 0) -> None:
    """train.share_gpu = true: refuse what would need an NCCL communicator between ranks that may share a GPU.

    `dp`: the job's replicas (world / (tp x pp)); None where the world size is not known yet (the job file alone).
    Everything else such a layout sends goes over MPI: the TP and pipeline collectives (hvdlm.parallel), the job's
    own agreements (jobwide), and with one replica the optimizer is torch's, wrapped by no Horovod.
    """
    needs = []
    if dp is not None and dp > 1:
        needs.append(
            (
                f"{dp} data-parallel replicas (world size / (parallel.tp x parallel.pp) = {dp}), whose gradients "
                "Horovod averages over NCCL on GPUs",
                "start parallel.tp x parallel.pp ranks (one replica)",
            )
        )
    if zero:
        needs.append((f"train.zero = {zero}, whose reduce-scatter and all-gather go through Horovod", "train.zero = 0"))
    if local_sgd_interval:
        needs.append(
            (
                "local SGD (train.local_sgd_interval > 0), which averages weights through Horovod",
                "local_sgd_interval = 0",
            )
        )
    if not needs:
        return
    what = "; ".join(n for n, _ in needs)
    fixes = ", ".join(f for _, f in needs)
    raise InputError(
        f"train.share_gpu = true lets ranks share a GPU only where no NCCL communicator is needed (NCCL refuses two "
        f"ranks on one GPU), but this job has {what}. Use {fixes}; or give each rank its own GPU and set "
        "train.share_gpu = false (on CPU ranks the switch does nothing: leave it off)."
    )


# FP8 matmuls need the tensor cores of compute capability 8.9 (Ada) or 9.0 (Hopper) and later; hvdlm asks for
# Hopper (H100 / H200), the GPUs it is measured on.
FP8_CAPABILITY = (9, 0)


def fp8_refusal(kind: str, capability: tuple[int, int] | None, has_torchao: bool) -> str | None:
    """Why train.precision = "fp8" cannot run on this device (None: it can). `kind`: "cuda" or "cpu";
    `capability`: the GPU's compute capability; `has_torchao`: torchao (its float8 training) imports."""
    if kind != "cuda":
        return (
            'train.precision = "fp8" needs an NVIDIA Hopper GPU (H100 / H200, compute capability 9.0): CPUs have no '
            'FP8 matmuls. Use precision = "bf16" on CPUs.'
        )
    if capability is None or tuple(capability) < FP8_CAPABILITY:
        cap = ".".join(map(str, capability)) if capability else "unknown"
        return (
            f'train.precision = "fp8" needs an NVIDIA Hopper GPU or later (compute capability >= 9.0); this GPU\'s is '
            f'{cap}, without FP8 tensor cores that hvdlm uses. Use precision = "bf16".'
        )
    if not has_torchao:
        return (
            'train.precision = "fp8" trains the linear layers through torchao\'s float8 training, and torchao does not '
            "import here. Install it (pip install torchao; on an offline machine, carry its wheel: "
            'bench/gpu_carry.sh), or use precision = "bf16".'
        )
    return None
