"""ZeRO-1 (Rajbhandari et al. 2020): the optimizer state sharded over the data-parallel group (ZeRO-2: see below).

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

The trainer drives it through the optimizer interface (hvdlm.optim.interface): zero_grad, backward (k
micro-batches accumulate), reduce_gradients (the reduce-scatter), clip_gradients (the norm summed over DP slices
and TP shards), step (update and all-gather). A checkpoint holds each DP rank's slice in a file of its own
(`checkpoint_slice`; the whole state is never on one rank), which readers assemble to a plain optimizer's state_dict
(hvdlm.checkpoint.slices), so a checkpoint resumes at any DP size and with ZeRO on or off.

The layout is general enough for ZeRO-2 (hvdlm.optim.zero2, a subclass): the flat buffer is a sequence of
buckets, each padded to a multiple of d, and a rank's shard is its part of every bucket, concatenated:

    bucket b   [ params ...... | pad ]  = d parts of S_b elements; rank r owns part r of every bucket
    shard      [ part r of bucket 0 | part r of bucket 1 | ... ]   S = sum of S_b

ZeRO-1 is the case of one bucket (the picture above); ZeRO-2 reduce-scatters its buckets during backward and keeps
no whole gradient buffer. The update, the all-gather (one, of the shard, put back bucket by bucket), the norm and
the checkpoint slices are the same code for both.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import horovod.torch as hvd
import torch

from hvdlm.checkpoint.slices import assemble, own_copies
from hvdlm.config import TrainConfig
from hvdlm.optim.interface import TrainingOptimizer
from hvdlm.optim.replicated import state_bytes
from hvdlm.optim.torch_optimizers import optimizer_over, param_groups
from hvdlm.parallel import jobwide
from hvdlm.parallel.collectives import allreduce
from hvdlm.parallel.topology import Topology, dp_group_ranks

# Elements of each rank's part per collective, and at most per optimizer tensor. Horovod's reduce-scatter and
# all-gather return new tensors, so one call over the whole buffer would hold a second copy of all the gradients (and
# of all the weights) for a moment, and torch's AdamW on CPU updates tensor by tensor with temporaries of each
# tensor's size: measured (bench/memory_budget.py), whole-shard calls and tensors outweighed the optimizer state
# ZeRO-1 saves at d = 2. In chunks the transients are d x CHUNK elements (16 MiB a rank's part), and each call is
# still large enough to run at the link's bandwidth.
CHUNK = 1 << 22


def chunks(n: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering n elements, CHUNK wide (the last one shorter)."""
    return [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]


class ZeroOptimizer(TrainingOptimizer):
    """This rank's slice of the optimizer over the flat buffers of the parameters it holds (see the module)."""

    pieces_cross_buckets = True  # an optimizer tensor may span buckets (ZeRO-3: no, each bucket's part is its own)

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        topo: Topology,
        device: torch.device | None = None,
        adopt: dict[str, Any] | None = None,
    ):
        """`device`: where the buffers go (by default the parameters'; ZeRO-3 with `initial` values: the model's
        parameters are placeholders, never filled, wherever they were allocated). `adopt`: this rank's own slice
        file of a save to resume (hvdlm.training.resume): where it cuts the flat buffer as this optimizer does,
        its tensors become the state (ZeRO-3: the shard of the weights too), none allocated beside them."""
        self.topo = topo
        groups = param_groups(model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]  # the optimizer's order: decay, then no-decay
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("ZeRO keeps fp32 weights: the model's parameters must be fp32 (autocast does the rest)")
        # The flat layout: buckets of parameters, each padded to a multiple of d (ZeRO-1: one bucket).
        self.bucket_params = self._buckets(model, cfg)  # each bucket's parameters (their indices), in flat order
        self._lay_out()
        self.device = device = device or self.params[0].device
        self._adopted = adopt if adopt is not None and adopt.get("layout") == self._layout() else None
        self._adopted_id: int | None = None
        self._place_weights()
        # This rank's averaged gradient slice (the pieces' .grad), filled by the reduce-scatter.
        self.grad_slice = self._gradient_buffers()
        # The pieces: this shard cut at bucket and group boundaries (and before padding), one optimizer tensor each.
        pieces: list[list[torch.Tensor]] = []
        self.piece_ranges: list[tuple[int, int, int]] = []  # (flat start, flat end, shard start), one per piece
        for group in groups:
            ids = {id(p) for p in group["params"]}
            ranges = [
                (a + lo, a + hi, s + lo)
                for a, b, s in self._ranges_of(lambda p: id(p) in ids, self.pieces_cross_buckets)
                for lo, hi in chunks(b - a)
            ]
            pieces.append([self._weights_piece(a, b, s) for a, b, s in ranges])
            for t, (a, b, s) in zip(pieces[-1], ranges):
                t.grad = self.grad_slice[s : s + b - a]
            self.piece_ranges += ranges
        self.pieces = [t for ts in pieces for t in ts]
        self.inner = optimizer_over(
            [{**g, "params": ts} for g, ts in zip(groups, pieces)], cfg, fused=None if device.type == "cpu" else True
        )
        # For the global norm, the ranges of this shard that hold TP-sharded parameters (their squares are summed
        # over the TP group; the replicated ones count once), and the last pipeline stage's copy of the tied
        # embedding (left out: the first stage counts it).
        self._sharded_ranges = self._ranges_of(lambda p: hasattr(p, "tp_shard") and not _tied_copy(p))
        self._copy_ranges = self._ranges_of(_tied_copy)
        self._groups_of_params = [g["params"] for g in groups]
        self._flat: dict[str, torch.Tensor] = {}  # the state tensors' flat shards, made at the first step
        if self._adopted is not None:
            ZeroOptimizer.load_checkpoint_slice(self, self._adopted)  # (the subclasses' parts are not built yet)
        else:
            self._preallocate_adamw_state()
        # The resume's own call with the same slice finds it taken; no reference is kept past it (a later load, a
        # spike rollback, brings other tensors, and these would stay alive).
        self._adopted_id, self._adopted = (id(self._adopted) if self._adopted is not None else None), None

    def _lay_out(self) -> None:
        """Where each parameter and bucket starts in the flat buffer, this rank's part of each bucket, and the
        sizes of the shard and of the whole buffer."""
        d, r = self.topo.dp, self.topo.dp_rank
        self.param_offsets = [0] * len(self.params)  # where each parameter starts in the flat buffer
        self.bucket_starts: list[int] = []
        self.parts: list[tuple[int, int, int]] = []  # this rank's part of each bucket: (flat start, shard start, S_b)
        offset = held = 0
        for ids in self.bucket_params:
            start = offset
            self.bucket_starts.append(start)
            for i in ids:
                self.param_offsets[i] = offset
                offset += self.params[i].numel()
            part = -(-(offset - start) // d)  # S_b
            self.parts.append((start + r * part, held, part))
            offset, held = start + d * part, held + part
        self.shard_numel = held  # S, the rank's shard: its parts of every bucket, concatenated
        self.flat_numel = offset

    def _preallocate_adamw_state(self) -> None:
        """AdamW's moments as views of one flat shard each from the start, as torch's first step would make them
        (zeros, a step count of 0 a piece): torch makes a tensor a piece, and making them flat after the first step
        held both for a moment, one shard more than training ever holds (bench/memory_budget.py, DP=4: the peak
        of a whole run). Other update rules (SGD's momentum starts as the first gradient) flatten after their
        first step (`step`)."""
        groups = self.inner.param_groups
        if not isinstance(self.inner, torch.optim.AdamW) or any(g["amsgrad"] for g in groups):
            return
        self._flat = {key: torch.zeros(self.shard_numel, device=self.device) for key in ("exp_avg", "exp_avg_sq")}
        on_device = any(g["capturable"] or g["fused"] for g in groups)  # one setting: make_optimizer's
        for t, (a, b, s) in zip(self.pieces, self.piece_ranges):  # the inner groups' params, in this order
            # torch's own step count: a device tensor for fused or capturable updates, else a CPU float
            step = torch.zeros((), dtype=torch.float32, device=self.device) if on_device else torch.tensor(0.0)
            self.inner.state[t] = {"step": step, **{k: f[s : s + b - a] for k, f in self._flat.items()}}

    def _place_weights(self) -> None:
        """ZeRO-1/2: the whole flat buffer of the weights on every rank; the model's tensors become views of it
        (values kept). ZeRO-3 keeps only the shard (hvdlm.optim.zero3)."""
        self.flat_params = torch.zeros(self.flat_numel, device=self.device)
        for p, start in zip(self.params, self.param_offsets):
            self.flat_params[start : start + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat_params[start : start + p.numel()].view_as(p)

    def _weights_piece(self, a: int, b: int, s: int) -> torch.Tensor:
        """The weights of flat range [a, b) (shard offset s) as the inner optimizer updates them: a view."""
        return self.flat_params[a:b]

    def _buckets(self, model: torch.nn.Module, cfg: TrainConfig) -> list[list[int]]:
        """ZeRO-1: every parameter in one bucket, reduce-scattered at once after backward."""
        return [list(range(len(self.params)))]

    def _gradient_buffers(self) -> torch.Tensor:
        """ZeRO-1: a flat gradient buffer of the whole model (each `p.grad` a view, so backward accumulates in
        place), and the rank's slice of the average apart from it (the buffer itself when d = 1)."""
        self.flat_grads = torch.zeros_like(self.flat_params)
        for p, start in zip(self.params, self.param_offsets):
            p.grad = self.flat_grads[start : start + p.numel()].view_as(p)
        start, _, part = self.parts[0]
        return self.flat_grads[start : start + part] if self.topo.dp == 1 else torch.zeros(part, device=self.device)

    def _ranges_of(self, chosen, across_buckets: bool = True) -> list[tuple[int, int, int]]:
        """(flat start, flat end, shard start) of this rank's elements that hold the parameters `chosen` picks,
        contiguous ones joined (within a bucket's part only, unless `across_buckets`)."""
        ranges: list[tuple[int, int, int]] = []
        flat_order = [i for ids in self.bucket_params for i in ids]
        for lo, shard_lo, part in self.parts:
            first = len(ranges)
            for p, start in ((self.params[i], self.param_offsets[i]) for i in flat_order):
                a, b = max(start, lo), min(start + p.numel(), lo + part)
                if not (chosen(p) and a < b):
                    continue
                s = shard_lo + a - lo
                joins = across_buckets or len(ranges) > first
                if joins and ranges and ranges[-1][1] == a and ranges[-1][2] + a - ranges[-1][0] == s:
                    a, _, s = ranges.pop()
                ranges.append((a, b, s))
        return ranges

    # -- the optimizer interface (hvdlm.optim.interface) ---------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # the trainer sets each group's lr here

    @property
    def buffer_bytes(self) -> int:
        """Gradient memory beyond the model's .grad views: the averaged slice."""
        return 0 if self.topo.dp == 1 else self.grad_slice.numel() * self.grad_slice.element_size()

    def memory_bytes(self) -> dict[str, int]:
        return {"state": state_bytes(self.inner), "gradient_buffers": self.buffer_bytes}  # the moments: this slice

    def zero_grad(self) -> None:
        self.flat_grads.zero_()  # the grads stay views of the buffer: backward accumulates into it

    def reduce_gradients(self, sum_tied: Callable[[], None] | None = None) -> None:
        """Average the gradients over the DP group; this rank keeps its slice (fp32 buffers: bf16 autocast
        leaves fp32 gradients, and Horovod 0.28.1 has no bf16 anyway). The tied weight's copies are summed first:
        the reduce-scatter reads the local gradients, and sum and average commute."""
        if sum_tied is not None:
            sum_tied()
        if self.topo.dp == 1:
            return
        d = self.topo.dp
        for start, (_, s, part) in zip(self.bucket_starts, self.parts):
            grads = self.flat_grads[start : start + d * part].view(d, part)
            for lo, hi in chunks(part):
                # Horovod: reduce-scatter over the DP process set, in chunks (see CHUNK). It splits dim 0 into d
                # equal rows; row r holds columns [lo, hi) of rank r's part, so each rank gets its own columns.
                mine = hvd.reducescatter(
                    grads[:, lo:hi].contiguous(),
                    op=hvd.Average,
                    name=f"zero.grads.{start}.{lo}",
                    process_set=self._dp_set,
                )
                self.grad_slice[s + lo : s + hi].copy_(mine[0])

    @torch.no_grad()
    def clip_gradients(self, max_norm: float, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Clip to the global norm of the averaged gradient: squares summed over this rank's slice, then over the
        DP group (the slices partition the buffer), for TP-sharded elements over the TP group too, and over the
        pipeline stages; replicated tensors (LayerNorms, the position table) and the tied weight count once."""
        scaler.unscale_(self.inner)  # fp16: the slice's pieces are the inner optimizer's parameters
        g = self.grad_slice

        def over(ranges: list[tuple[int, int, int]]) -> torch.Tensor:
            # Dot products: sums of squares without a temporary the size of the slice (the step's peak if made).
            return sum((torch.dot(g[s : s + b - a], g[s : s + b - a]) for a, b, s in ranges), g.new_zeros(()))

        sharded, copy = over(self._sharded_ranges), over(self._copy_ranges)
        everything = over([(0, g.numel(), 0)])
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
    def step(self, scaler: torch.amp.GradScaler, found_inf: torch.Tensor | None = None) -> None:
        """Update this rank's slice of the weights, then gather every slice to every replica (after an fp16
        overflow the scaler leaves the slice as it was, and the gather copies it unchanged)."""
        scaler.step(self.inner)
        if not self._flat:
            # The first step made the state: make it flat now, while the step's own temporaries are gone, rather
            # than at a save, when everything else is held too.
            for key in self._state_keys():
                self._flat_state(key)
        self._share_weights()

    def _share_weights(self) -> None:
        """Every replica gets the updated weights: an all-gather of the shards (ZeRO-3: none, see there)."""
        d, r = self.topo.dp, self.topo.dp_rank
        if d == 1:
            return
        for start, (_, _, part) in zip(self.bucket_starts, self.parts):
            params = self.flat_params[start : start + d * part].view(d, part)  # row r: rank r's part of the bucket
            for lo, hi in chunks(part):
                # Horovod: all-gather over the DP process set, in chunks (see CHUNK); rows in DP-rank order.
                every = hvd.allgather(
                    params[r : r + 1, lo:hi], name=f"zero.params.{start}.{lo}", process_set=self._dp_set
                )
                params[:, lo:hi].copy_(every)

    @property
    def _dp_set(self):
        return self.topo.dp_process_set

    # -- checkpoints: each rank saves its slice (hvdlm.checkpoint.slices); loading takes the whole state -------

    def checkpoint_view(self) -> _FullView:
        return _FullView(self)

    def checkpoint_slice(self) -> dict[str, Any]:
        return self.slice_state_dict()

    def slice_state_dict(self) -> dict[str, Any]:
        """This rank's slice of every state tensor over the flat buffer, and what puts the slices back together
        (hvdlm.checkpoint.slices.assemble). Not collective: each DP rank writes its own."""
        first = self.inner.state.get(self.pieces[0]) if self.pieces else None
        state = {key: self._flat_state(key).detach().cpu() for key in self._state_keys()}
        groups, start = [], 0
        for group, params in zip(self.inner.param_groups, self._groups_of_params):
            groups.append({**_settings(group), "params": list(range(start, start + len(params)))})
            start += len(params)
        scalars = own_copies(first, list(state)) if first else {}
        return {"state": state, "scalars": scalars, "param_groups": groups, "layout": self._layout()}

    def _layout(self) -> dict[str, Any]:
        """How this rank's slice cuts the flat buffer (hvdlm.checkpoint.slices)."""
        numels = [p.numel() for p in self.params]
        return {
            "numels": numels,
            "shapes": [list(p.shape) for p in self.params],
            "shard_numel": self.shard_numel,
            "padding": self.flat_numel - sum(numels),
            "buckets": [[ids, self.topo.dp * part] for ids, (_, _, part) in zip(self.bucket_params, self.parts)],
            "dp_rank": self.topo.dp_rank,
            "dp_size": self.topo.dp,
        }

    def load_checkpoint_slice(self, saved: dict[str, Any]) -> bool:
        """Take this rank's own slice file as it is, where the save cut the flat buffer as this optimizer does
        (same DP rank and size, parameters and buckets); False, loading nothing, where it did not."""
        if self._taken_at_construction(saved):
            return True
        if saved.get("layout") != self._layout():
            return False
        keys = sorted(saved["state"])
        if not keys:  # saved before the first update, or a slice all padding: no moments to put back
            return True
        self._flat = {key: saved["state"][key].to(self.device) for key in keys}
        scalars = saved["scalars"]
        local_state = {
            j: {**own_copies(scalars), **{key: self._flat[key][s : s + b - a] for key in keys}}
            for j, (a, b, s) in enumerate(self.piece_ranges)
        }
        groups = [
            {**_settings(theirs), "params": ours["params"]}
            for theirs, ours in zip(saved["param_groups"], self.inner.state_dict()["param_groups"])
        ]
        self.inner.load_state_dict({"state": local_state, "param_groups": groups})
        return True

    def _taken_at_construction(self, saved: dict[str, Any]) -> bool:
        """Whether `saved` is the slice this optimizer adopted when it was made (once: the resume's own call)."""
        if self._adopted_id is None or id(saved) != self._adopted_id:
            return False
        self._adopted_id = None
        return True

    def _state_keys(self) -> list[str]:
        """The names of the optimizer's per-element state tensors (exp_avg, exp_avg_sq; momentum_buffer)."""
        first = self.inner.state.get(self.pieces[0]) if self.pieces else None
        return sorted(k for k, v in (first or {}).items() if torch.is_tensor(v) and v.dim() == 1)

    def _flat_state(self, key: str) -> torch.Tensor:
        """This rank's shard of one state tensor (exp_avg, ...) as one tensor of S elements, the padding and any
        group boundary zero. The pieces' state tensors become views of it the first time (and again after a
        load), so that saves write it without a copy: a save that concatenated the pieces held two more copies of
        the shard (AdamW's two moments), the peak of a whole run's memory (bench/memory_budget.py)."""
        flat = self._flat.get(key)
        states = [self.inner.state[t] for t in self.pieces]
        ranges = [(s, s + b - a) for a, b, s in self.piece_ranges]
        if flat is None or any(st[key].data_ptr() != flat[a:b].data_ptr() for st, (a, b) in zip(states, ranges)):
            flat = self._flat[key] = torch.zeros(self.shard_numel, device=self.device)
            for st, (a, b) in zip(states, ranges):
                flat[a:b] = st[key]
                st[key] = flat[a:b]  # the piece's own tensor is freed here
            return_freed_memory()  # so the copy costs one shard for a moment, not one per key for good
        return flat

    def full_state_dict(self) -> dict[str, Any]:
        """The whole optimizer state in the form and parameter order of the plain optimizer's state_dict, as a
        checkpoint's slices assemble to (the tests' check of that layout). Collective over all ranks."""
        # Every rank's slice (a job-wide gather: Horovod's takes no process set), then this DP group's, in DP-rank
        # order.
        every = jobwide.allgather_object(self.slice_state_dict(), "zero.state")
        topo = self.topo
        return assemble([every[r] for r in dp_group_ranks(hvd.rank(), hvd.size(), topo.tp, topo.pp)])

    def load_full_state_dict(self, full: dict[str, Any]) -> None:
        """Take this rank's slice of an unsharded state (full_state_dict's form; any DP size, ZeRO or not)."""
        entries = full["state"]
        if not entries:
            return
        some = next(iter(entries.values()))
        keys = [k for k, v in some.items() if torch.is_tensor(v) and v.dim() > 0]
        flat = {key: torch.zeros(self.flat_numel, device=self.device) for key in keys}
        for i, (p, start) in enumerate(zip(self.params, self.param_offsets)):
            for key in keys:
                if i in entries:
                    flat[key][start : start + p.numel()] = entries[i][key].reshape(-1)
        # This rank's shard of each state tensor, one flat tensor a key, the pieces' state views of it (as
        # `_flat_state` keeps them: a later save or step makes no copy).
        self._flat = {key: torch.zeros(self.shard_numel, device=self.device) for key in keys}
        local_state = {}
        for j, (a, b, s) in enumerate(self.piece_ranges):
            for key in keys:
                self._flat[key][s : s + b - a] = flat[key][a:b]
            local_state[j] = {**own_copies(some, keys), **{key: self._flat[key][s : s + b - a] for key in keys}}
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


def return_freed_memory() -> None:
    """Give memory freed on the heap back to the system. glibc keeps freed blocks resident for reuse, and blocks
    of a parameter's size are rarely reused: measured, a rank's peak resident memory kept the replaced state
    tensors (bench/memory_budget.py). malloc_trim releases free pages anywhere in the heap; other C libraries
    (musl, macOS) have no such call and are left as they are."""
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


def zero_note(cfg: TrainConfig) -> str | None:
    """What the log says about a ZeRO setting that saves nothing."""
    if cfg.zero and cfg.optimizer == "sgd" and cfg.momentum == 0:
        return (
            f"note: train.zero = {cfg.zero} with SGD without momentum: the optimizer keeps no state, so there is "
            "nothing to shard; the weights are still updated in slices and all-gathered (no optimizer memory saved, "
            "more traffic)."
        )
    return None
