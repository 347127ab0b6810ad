"""Tensor collectives over one `Group` (see topology.py), for the tensor-parallel layers.

    allreduce(x)              sum over the group, every rank gets the sum
    allgather(x, dim)         the ranks' tensors concatenated along dim, in rank order
    split(x, dim)             this rank's equal chunk along dim (local, no communication)
    reduce_scatter(x, dim)    sum over the group, each rank keeps its chunk along dim
    broadcast_(x, root)       overwrite x with group rank `root`'s x

A group of one returns at once (allreduce and allgather return the input tensor itself, no copy).

`route_for` is the one place that decides how a tensor travels:
- CPU tensors: mpi4py on the group's communicator, handed numpy views of the tensors' memory (no copies);
- CUDA tensors: the same when `MPI.Query_cuda_support()` says the MPI library is CUDA-aware (mpi4py reads
  `__cuda_array_interface__`), otherwise a Horovod collective over the group's process set (NCCL), or, on a
  group without one, mpi4py on a host copy ("staged through host memory"): the pipeline's groups, which carry
  a few numbers per step, and every group of a job whose ranks share a GPU (train.share_gpu: NCCL refuses two
  ranks on one GPU, so their TP groups get no process set). HVDLM_MPI_CUDA_AWARE=0 or 1 overrides the MPI
  library's answer (a library that claims CUDA support its transport lacks, or a check of the host path).

16-bit floats: numpy has no bfloat16, mpi4py hands a bf16 buffer to MPI as MPI.BYTE (which MPI cannot sum), Open
MPI has no sum for fp16 either, and Horovod 0.28.1's torch ops have no bfloat16 (horovod issue #4047). So
- summing collectives (allreduce, reduce_scatter) reduce such tensors in fp32 and round the result back once:
  for two ranks that is the correctly rounded sum, as close as bf16 can hold it (fp16 on GPUs over Horovod is
  summed as fp16, which NCCL supports);
- collectives that only move data (allgather, broadcast) carry the 16-bit words unchanged, viewed as int16:
  bit for bit, and half the bytes of a round trip through fp32.

Every call adds its payload (the bytes of one rank's input) to `group.bytes_moved`, so the benchmark can count
what the layers send without tracing.
"""

from __future__ import annotations

import functools
import os

import torch

from hvdlm.parallel.topology import Group

CPU_MPI, CUDA_MPI, CUDA_HOROVOD, CUDA_HOST = "cpu-mpi", "cuda-mpi", "cuda-horovod", "cuda-host"


@functools.cache
def _mpi_is_cuda_aware() -> bool:
    override = os.environ.get("HVDLM_MPI_CUDA_AWARE", "")
    if override in ("0", "1"):
        return override == "1"
    from mpi4py import MPI

    try:
        return bool(MPI.Query_cuda_support())
    except (AttributeError, NotImplementedError):  # MPI libraries without the MPIX extension
        return False


def route_for(is_cuda: bool, cuda_aware_mpi: bool, has_process_set: bool) -> str:
    """How a tensor travels (see the module docstring): CPU_MPI, CUDA_MPI, CUDA_HOROVOD or CUDA_HOST."""
    if not is_cuda:
        return CPU_MPI
    if cuda_aware_mpi:
        return CUDA_MPI
    return CUDA_HOROVOD if has_process_set else CUDA_HOST


def _route(x: torch.Tensor, group: Group) -> str:
    return route_for(x.is_cuda, x.is_cuda and _mpi_is_cuda_aware(), group.process_set is not None)


def _reduce_dtype(x: torch.Tensor, route: str) -> torch.dtype | None:
    """The dtype to sum x in when its own cannot be summed on this route (None: its own)."""
    if x.dtype == torch.bfloat16:
        return torch.float32  # MPI cannot sum it; Horovod 0.28.1 has no bfloat16 for torch
    if x.dtype == torch.float16 and route != CUDA_HOROVOD:
        return torch.float32  # MPI has no fp16 sum (NCCL, through Horovod, has one)
    return None


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """A 16-bit float tensor seen as int16 (same memory), which numpy, MPI and Horovod all carry; others as is."""
    return x.view(torch.int16) if x.dtype in (torch.bfloat16, torch.float16) else x


def _buf(x: torch.Tensor):
    """What mpi4py reads and writes: a numpy view sharing x's memory (CPU), or x itself (CUDA-aware MPI)."""
    assert x.is_contiguous()
    if x.is_cuda:
        # MPI reads device memory outside torch's streams: the kernels that wrote x must have finished.
        torch.cuda.current_stream(x.device).synchronize()
        return x.detach()
    return x.detach().numpy()


def allreduce(x: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """Sum (or max) of x over the group, in a new tensor (x itself for a group of one)."""
    if group.size == 1:
        return x
    x = x.contiguous()
    route = _route(x, group)
    if route == CUDA_HOST:
        return allreduce(x.cpu(), group, op).to(x.device)
    group.bytes_moved += x.numel() * x.element_size()
    wide = _reduce_dtype(x, route)
    if wide is not None:
        # Summed in fp32, rounded back once (see the module docstring); max is exact either way.
        return _allreduce(x.to(wide), group, op, route).to(x.dtype)
    return _allreduce(x, group, op, route)


def _allreduce(x: torch.Tensor, group: Group, op: str, route: str) -> torch.Tensor:
    if route == CUDA_HOROVOD:
        import horovod.torch as hvd

        # Horovod: a TP-group collective as a process-set allreduce (NCCL on GPUs).
        return hvd.allreduce(x, op=hvd.Sum if op == "sum" else hvd.Max, process_set=group.process_set)
    from mpi4py import MPI

    out = torch.empty_like(x)
    group.comm.Allreduce(_buf(x), _buf(out), op=MPI.SUM if op == "sum" else MPI.MAX)
    return out


def allgather(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Concatenate the ranks' x (all the same shape) along dim, in rank order."""
    if group.size == 1:
        return x
    x = x.contiguous()
    if _route(x, group) == CUDA_HOST:
        return allgather(x.cpu(), group, dim).to(x.device)
    group.bytes_moved += x.numel() * x.element_size()
    words = _as_words(x)  # 16-bit floats travel as their bits: nothing is summed
    if _route(x, group) == CUDA_HOROVOD:
        import horovod.torch as hvd

        # Horovod: allgather concatenates along dim 0.
        stacked = hvd.allgather(words.unsqueeze(0), process_set=group.process_set)  # (p, *x.shape)
    else:
        stacked = words.new_empty((group.size, *x.shape))
        group.comm.Allgather(_buf(words), _buf(stacked))
    stacked = stacked.view(x.dtype)
    if dim % x.dim() == 0:
        return stacked.view(-1, *x.shape[1:])  # rank blocks are already contiguous along dim 0
    return torch.cat(stacked.unbind(0), dim=dim)


def split(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """This rank's chunk of x along dim (x.size(dim) must divide by the group size)."""
    if group.size == 1:
        return x
    if x.size(dim) % group.size:
        raise ValueError(f"size {x.size(dim)} along dim {dim} does not divide among {group.size} ranks")
    return x.chunk(group.size, dim=dim)[group.rank].contiguous()


def reduce_scatter(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Sum x over the group and keep this rank's chunk along dim."""
    if group.size == 1:
        return x
    if x.size(dim) % group.size:
        raise ValueError(f"size {x.size(dim)} along dim {dim} does not divide among {group.size} ranks")
    if _route(x, group) == CUDA_HOST:
        return reduce_scatter(x.cpu(), group, dim).to(x.device)
    # MPI's Reduce_scatter_block wants each rank's block contiguous: free along dim 0, a copy otherwise.
    blocks = x.contiguous() if dim % x.dim() == 0 else torch.stack(x.chunk(group.size, dim=dim)).contiguous()
    group.bytes_moved += blocks.numel() * blocks.element_size()
    route = _route(blocks, group)
    wide = _reduce_dtype(blocks, route)
    if wide is not None:  # summed in fp32, rounded back once (see the module docstring)
        mine = _reduce_scatter_blocks(blocks.to(wide), group, route).to(x.dtype)
    else:
        mine = _reduce_scatter_blocks(blocks, group, route)
    return mine if dim % x.dim() == 0 else mine.squeeze(0)


def _reduce_scatter_blocks(blocks: torch.Tensor, group: Group, route: str) -> torch.Tensor:
    """Sum blocks (group.size equal rows along dim 0) over the group; this rank's row block."""
    if route == CUDA_HOROVOD:
        import horovod.torch as hvd

        # Horovod: reducescatter splits along dim 0, as our blocks are laid out.
        return hvd.reducescatter(blocks, op=hvd.Sum, process_set=group.process_set)
    from mpi4py import MPI

    mine = blocks.new_empty((blocks.size(0) // group.size, *blocks.shape[1:]))
    group.comm.Reduce_scatter_block(_buf(blocks), _buf(mine), op=MPI.SUM)
    return mine


def broadcast_(x: torch.Tensor, group: Group, root: int = 0) -> torch.Tensor:
    """Overwrite x in place with the x of the group's rank `root`."""
    if group.size == 1:
        return x
    if _route(x, group) == CUDA_HOST:
        return x.copy_(broadcast_(x.cpu(), group, root))
    group.bytes_moved += x.numel() * x.element_size()
    buf = x if x.is_contiguous() else x.contiguous()  # x's own memory when it can be
    words = _as_words(buf)  # 16-bit floats travel as their bits: nothing is summed
    if _route(x, group) == CUDA_HOROVOD:
        import horovod.torch as hvd

        # Horovod: broadcast's root is a global rank, even inside a process set.
        hvd.broadcast_(words, root_rank=group.process_set.ranks[root], process_set=group.process_set)
    else:
        group.comm.Bcast(_buf(words), root=root)
    if buf is not x:
        x.copy_(buf)
    return x
