"""ZeRO-1 (Rajbhandari et al. 2020): the optimizer state sharded over the data-parallel group.

Every parameter this rank holds (its TP shard, or its pipeline stage's layers: nothing here assumes the whole
model) lives in one flat fp32 buffer, decay parameters first, padded to a multiple of the DP size d; the gradients
live in a second buffer of the same layout (each `p.grad` is a view of it, so backward accumulates in place):

    flat   [ decay params ........ | no-decay params ..... | pad ]      padded = d x S
    ranks  [ dp 0: S  | dp 1: S  | ...                   | dp d-1: S ]

A step: Horovod's reduce-scatter averages the gradient buffer over the DP process set and leaves each rank its
slice of S elements (padding makes the slices equal: Horovod gives the first n % d ranks one row more); the
rank's AdamW (or SGD) updates its slice of the weights with its slice of the moments; an all-gather brings every
slice to every replica. Each element is computed by one rank and copied to the others, so the replicas stay
bit-identical. The moments per rank fall from 8 to 8 / d bytes per parameter (SGD: 4 to 4 / d).

The trainer drives it like Horovod's DistributedOptimizer: zero_grad, backward (k micro-batches accumulate),
synchronize (the reduce-scatter), clip_grad_norm (the norm summed over DP slices and TP shards), step (update and
all-gather). A checkpoint holds each DP rank's slice in a file of its own (`slice_state_dict`; the whole state is
never on one rank), which readers assemble to a plain optimizer's state_dict (hvdlm.checkpoint.slices), so a
checkpoint resumes at any DP size and with ZeRO on or off.

ZeRO-2 (gradients sharded too) is not built; see README, "Memory".
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

import horovod.torch as hvd
import torch

from hvdlm.checkpoint.slices import assemble, own_copies
from hvdlm.config import TrainConfig
from hvdlm.parallel.collectives import allreduce
from hvdlm.parallel.topology import Topology, dp_group_ranks
from hvdlm.training.optim import optimizer_over, param_groups

# Elements of each rank's slice per collective. Horovod's reduce-scatter and all-gather return new tensors, so one
# call over the whole buffer would hold a second copy of all the gradients (and of all the weights) for a moment:
# with d = 2 that transient (measured, bench/memory_budget.py) outweighed the optimizer state ZeRO-1 saves. In chunks
# the transient is d x CHUNK elements (16 MiB per rank's part), and each call is still large enough to run at the
# link's bandwidth.
CHUNK = 1 << 22


class ZeroOptimizer:
    """This rank's slice of the optimizer over the flat buffers of the parameters it holds (see the module)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, topo: Topology):
        self.topo = topo
        groups = param_groups(model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]  # the flat order: decay, then no-decay
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("ZeRO keeps fp32 weights: the model's parameters must be fp32 (autocast does the rest)")
        sizes = [sum(p.numel() for p in g["params"]) for g in groups]
        n, d = sum(sizes), topo.dp
        self.shard_numel = -(-n // d)  # S, the slice of each DP rank
        device = self.params[0].device
        self.flat_params = torch.zeros(self.shard_numel * d, device=device)
        self.flat_grads = torch.zeros_like(self.flat_params)
        offset = 0
        for p in self.params:  # the model's tensors become views of the flat buffers (values kept)
            k = p.numel()
            self.flat_params[offset : offset + k].copy_(p.detach().reshape(-1))
            p.data = self.flat_params[offset : offset + k].view_as(p)
            p.grad = self.flat_grads[offset : offset + k].view_as(p)
            offset += k
        lo = topo.dp_rank * self.shard_numel
        self.slice = slice(lo, lo + self.shard_numel)  # this rank's range of the flat buffers
        # This rank's averaged gradient slice (the reduce-scatter's output is copied here: the pieces' .grad).
        self.grad_slice = self.flat_grads[self.slice] if d == 1 else torch.zeros(self.shard_numel, device=device)
        # The pieces: this slice cut at the group boundary (and before the padding), one optimizer tensor each.
        pieces: list[list[torch.Tensor]] = []
        self.piece_ranges: list[tuple[int, int]] = []  # in flat coordinates, one per piece
        start = 0
        for size in sizes:
            a, b = max(lo, start), min(lo + self.shard_numel, start + size)
            # At most CHUNK elements a piece: torch's AdamW on CPU updates tensor by tensor with temporaries of each
            # tensor's size, which for a whole slice were two extra copies of it at the peak (measured).
            cuts = [(c, min(c + CHUNK, b)) for c in range(a, b, CHUNK)]
            piece = [self.flat_params[c:e] for c, e in cuts]
            for t, (c, e) in zip(piece, cuts):
                t.grad = self.grad_slice[c - lo : e - lo]
                self.piece_ranges.append((c, e))
            pieces.append(piece)
            start += size
        self.pieces = [t for ts in pieces for t in ts]
        self.inner = optimizer_over(
            [{**g, "params": ts} for g, ts in zip(groups, pieces)], cfg, fused=None if device.type == "cpu" else True
        )
        # For the global norm, the ranges of this slice (as ranges rather than a mask of S numbers) that hold
        # TP-sharded parameters (their squares are summed over the TP group; the replicated ones count once), and
        # the last pipeline stage's copy of the tied embedding (left out: the first stage counts it).
        self._sharded_ranges = self._ranges_of(lambda p: hasattr(p, "tp_shard") and not _tied_copy(p))
        self._copy_ranges = self._ranges_of(_tied_copy)
        self._groups_of_params = [g["params"] for g in groups]
        self._flat: dict[str, torch.Tensor] = {}  # the state tensors' flat slices, made at the first step

    def _ranges_of(self, chosen) -> list[tuple[int, int]]:
        """The ranges of this rank's slice (slice coordinates) holding the parameters `chosen` picks, contiguous
        ones joined."""
        lo, ranges, offset = self.slice.start, [], 0
        for p in self.params:
            a, b = max(offset, lo) - lo, min(offset + p.numel(), lo + self.shard_numel) - lo
            if chosen(p) and a < b:
                if ranges and ranges[-1][1] == a:
                    a = ranges.pop()[0]
                ranges.append((a, b))
            offset += p.numel()
        return ranges

    # -- the DistributedOptimizer interface the trainer uses ---------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # the trainer sets each group's lr here

    @property
    def state(self) -> dict:
        return self.inner.state  # this rank's slice of the moments (the memory account reads it)

    @property
    def buffer_bytes(self) -> int:
        """Gradient memory beyond the model's .grad views: the averaged slice (the memory account adds it)."""
        return 0 if self.topo.dp == 1 else self.grad_slice.numel() * self.grad_slice.element_size()

    def zero_grad(self) -> None:
        self.flat_grads.zero_()  # the grads stay views of the buffer: backward accumulates into it

    def synchronize(self) -> None:
        """Average the gradients over the DP group; this rank keeps its slice (fp32 buffers: bf16 autocast
        leaves fp32 gradients, and Horovod 0.28.1 has no bf16 anyway)."""
        if self.topo.dp == 1:
            return
        # Horovod: reduce-scatter over the DP process set, chunk by chunk (see CHUNK). Horovod splits dim 0 into d
        # equal rows: row r of a chunk is columns [lo, hi) of rank r's slice, so rank r gets its own columns back.
        grads = self.flat_grads.view(self.topo.dp, self.shard_numel)
        for i, (lo, hi) in enumerate(self._chunks()):
            mine = hvd.reducescatter(
                grads[:, lo:hi].contiguous(), op=hvd.Average, name=f"zero.grads.{i}", process_set=self._dp_set
            )
            self.grad_slice[lo:hi].copy_(mine[0])

    @contextlib.contextmanager
    def skip_synchronize(self):
        yield  # synchronize is explicit here: nothing to skip

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to the global norm of the averaged gradient: squares summed over this rank's slice, then over the
        DP group (the slices partition the buffer), for TP-sharded elements over the TP group too, and over the
        pipeline stages; replicated tensors (LayerNorms, the position table) and the tied weight count once."""
        g = self.grad_slice

        def over(ranges: list[tuple[int, int]]) -> torch.Tensor:
            # Dot products: a sum of squares without a temporary the size of the slice (the step's peak if made).
            return sum((torch.dot(g[a:b], g[a:b]) for a, b in ranges), g.new_zeros(()))

        sharded, copy = over(self._sharded_ranges), over(self._copy_ranges)
        everything = over([(0, g.numel())])
        squares = torch.stack([sharded, everything - sharded - copy])  # (sharded, replicated) sums of this slice
        if self.topo.dp > 1:
            # Horovod: 8 bytes over the DP process set.
            squares = hvd.allreduce(squares, op=hvd.Sum, name="zero.norm", process_set=self._dp_set)
        total_sq = allreduce(squares[:1], self.topo.tp_group)[0] + squares[1]
        total = allreduce(total_sq.reshape(1), self.topo.pp_group)[0].sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grad_norm_
        self.grad_slice.mul_(coef)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's slice of the weights, then gather every slice to every replica."""
        self.inner.step()
        if not self._flat:
            # The first step made the state: make it flat now, while the step's own temporaries are gone, rather
            # than at a save, when everything else is held too.
            for key in self._state_keys():
                self._flat_state(key)
        if self.topo.dp > 1:
            # Horovod: all-gather over the DP process set, chunk by chunk (see CHUNK); rows in DP-rank order.
            params = self.flat_params.view(self.topo.dp, self.shard_numel)
            for i, (lo, hi) in enumerate(self._chunks()):
                mine = params[self.topo.dp_rank, lo:hi].unsqueeze(0)
                params[:, lo:hi].copy_(hvd.allgather(mine, name=f"zero.params.{i}", process_set=self._dp_set))

    def _chunks(self) -> list[tuple[int, int]]:
        """Column ranges [lo, hi) of the slices, CHUNK wide."""
        return [(lo, min(lo + CHUNK, self.shard_numel)) for lo in range(0, self.shard_numel, CHUNK)]

    @property
    def _dp_set(self):
        return self.topo.dp_process_set

    # -- checkpoints: each rank saves its slice (hvdlm.checkpoint.slices); loading takes the whole state -------

    def slice_state_dict(self) -> dict[str, Any]:
        """This rank's slice of every state tensor over the flat buffer, and what puts the slices back together
        (hvdlm.checkpoint.slices.assemble). Not collective: each DP rank writes its own."""
        first = self.inner.state.get(self.pieces[0]) if self.pieces else None
        state = {key: self._flat_state(key).detach().cpu() for key in self._state_keys()}
        groups, start = [], 0
        for group, params in zip(self.inner.param_groups, self._groups_of_params):
            groups.append({**_settings(group), "params": list(range(start, start + len(params)))})
            start += len(params)
        numels = [p.numel() for p in self.params]
        layout = {
            "numels": numels,
            "shapes": [list(p.shape) for p in self.params],
            "shard_numel": self.shard_numel,
            "padding": self.shard_numel * self.topo.dp - sum(numels),
            "dp_rank": self.topo.dp_rank,
            "dp_size": self.topo.dp,
        }
        scalars = own_copies(first, list(state)) if first else {}
        return {"state": state, "scalars": scalars, "param_groups": groups, "layout": layout}

    def _state_keys(self) -> list[str]:
        """The names of the optimizer's per-element state tensors (exp_avg, exp_avg_sq; momentum_buffer)."""
        first = self.inner.state.get(self.pieces[0]) if self.pieces else None
        return sorted(k for k, v in (first or {}).items() if torch.is_tensor(v) and v.dim() == 1)

    def _flat_state(self, key: str) -> torch.Tensor:
        """This rank's slice of one state tensor (exp_avg, ...) as one tensor of S elements, the padding and any
        group boundary zero. The pieces' state tensors become views of it the first time (and again after a
        load), so that saves write it without a copy: a save that concatenated the pieces held two more
        copies of the slice (AdamW's two moments), the peak of a whole run's memory (bench/memory_budget.py)."""
        lo = self.slice.start
        flat = self._flat.get(key)
        states = [self.inner.state[t] for t in self.pieces]
        ranges = [(a - lo, b - lo) for a, b in self.piece_ranges]
        if flat is None or any(st[key].data_ptr() != flat[a:b].data_ptr() for st, (a, b) in zip(states, ranges)):
            flat = self._flat[key] = torch.zeros(self.shard_numel, device=self.flat_params.device)
            for st, (a, b) in zip(states, ranges):
                flat[a:b] = st[key]
                st[key] = flat[a:b]  # the piece's own tensor is freed here
            _return_freed_memory()  # so the copy costs one slice for a moment, not one per key for good
        return flat

    def full_state_dict(self) -> dict[str, Any]:
        """The whole optimizer state in the form and parameter order of the plain optimizer's state_dict, as a
        checkpoint's slices assemble to (the tests' check of that layout). Collective over all ranks."""
        # Horovod: every rank's slice (allgather_object takes no process set), then this DP group's, in DP-rank order.
        every = hvd.allgather_object(self.slice_state_dict(), name="zero.state")
        topo = self.topo
        return assemble([every[r] for r in dp_group_ranks(hvd.rank(), hvd.size(), topo.tp, topo.pp)])

    def load_full_state_dict(self, full: dict[str, Any]) -> None:
        """Take this rank's slice of an unsharded state (full_state_dict's form; any DP size, ZeRO or not)."""
        entries = full["state"]
        if not entries:
            return
        some = next(iter(entries.values()))
        keys = [k for k, v in some.items() if torch.is_tensor(v) and v.dim() > 0]
        flat = {key: torch.zeros_like(self.flat_params) for key in keys}
        offset = 0
        for i, p in enumerate(self.params):
            for key in keys:
                if i in entries:
                    flat[key][offset : offset + p.numel()] = entries[i][key].reshape(-1)
            offset += p.numel()
        local_state = {}
        for j, (a, b) in enumerate(self.piece_ranges):
            local_state[j] = {**own_copies(some, keys), **{key: flat[key][a:b].clone() for key in keys}}
        groups, j = [], 0
        for saved, ours in zip(full["param_groups"], self.inner.param_groups):
            n = len(ours["params"])
            groups.append({**_settings(saved), "params": list(range(j, j + n))})
            j += n
        self.inner.load_state_dict({"state": local_state, "param_groups": groups})


class _FullView:
    """A ZeroOptimizer as checkpoints see a plain optimizer: the model's parameters in groups; the state is in the
    DP ranks' slice files (CheckpointManager writes them), and loading takes this rank's slice of a whole one."""

    def __init__(self, zero: ZeroOptimizer):
        self._zero = zero
        self.param_groups = [
            {**_settings(g), "params": ps} for g, ps in zip(zero.inner.param_groups, zero._groups_of_params)
        ]

    def state_dict(self) -> None:
        return None  # the shard file holds no optimizer state: each DP rank saves its slice_state_dict

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._zero.load_full_state_dict(state)


def _return_freed_memory() -> None:
    """Give the memory freed by the parameters' old storage back to the system. glibc keeps freed blocks of the
    heap resident for reuse, and blocks of parameter size are rarely reused: measured, a rank's peak resident memory
    kept a whole extra copy of the weights (bench/memory_budget.py). malloc_trim releases free pages anywhere in
    the heap. Other C libraries (musl, macOS) have no such call and are left as they are."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _tied_copy(p: torch.nn.Parameter) -> bool:
    """The last pipeline stage's copy of the tied embedding/head weight (hvdlm.model.stage)."""
    return getattr(p, "pipeline_tied_copy", False)


def _settings(group: dict) -> dict:
    """A parameter group's settings (lr, betas, weight_decay, ...) without its parameters."""
    return {k: v for k, v in group.items() if k != "params"}


def checkpoint_view(optimizer):
    """The optimizer as a checkpoint saves and restores it: itself, or for ZeRO a view that saves no state (the
    slice files hold it) and loads a whole state by slicing."""
    if not isinstance(optimizer, ZeroOptimizer):
        return optimizer
    return _FullView(optimizer)


def zero_note(cfg: TrainConfig) -> str | None:
    """What the log says about a ZeRO setting that saves nothing."""
    if cfg.zero and cfg.optimizer == "sgd" and cfg.momentum == 0:
        return (
            "note: train.zero = 1 with SGD without momentum: the optimizer keeps no state, so there is nothing to "
            "shard; the weights are still updated in slices and all-gathered (no memory saved, more traffic)."
        )
    return None
