"""ZeRO-3 (Rajbhandari et al. 2020): the weights sharded over the data-parallel group too, gathered where used.

ZeRO-2 (hvdlm.optim.zero2) shards the optimizer state and the gradients; every rank still holds all the weights.
Here a rank keeps only its shard of them between uses, in the same bucketed flat layout (its part of every bucket),
and the buckets follow the model's modules: each part of a block (a norm, the attention, the MLP) is one unit, and
so is each other child of the model that holds parameters (the embeddings, the final norm, an untied head), its
parameters one bucket or two (a pipeline's tied weight is deferred as in ZeRO-2). Parts rather than whole blocks:
at the peak a rank holds the part computing and the next large one, prefetched, about one block in all (whole
blocks: two).

    unit u   = a module;  bucket b of u  [ u's params | pad ] = d parts;  rank r keeps part r in its shard
    gathered : bucket b's full buffer (a tensor of d parts; the module's parameters are views of it)
    released : that buffer's storage resized to nothing, so the memory really goes; the views keep their shape

A module's forward pre-hook gathers its units (an all-gather of the parts over the DP process set, Horovod's) and
starts the next modules' gathers up to the next large one (the prefetch: past a norm, which computes too little to
hide anything), so that they run while this module computes; the forward hook
releases them and puts an identity autograd function on the output, whose backward gathers the units again just
before the module's backward and prefetches the modules before it likewise. Each bucket's gradients are
reduce-scattered as ZeRO-2's (the post-accumulate hooks), and once a unit's buckets are launched its weights are
released. Recomputation (torch.utils.checkpoint) runs the forward again inside backward: the hooks see that
(autograd's current graph task), gather without releasing, and the backward that follows releases.

A tied weight used by two modules (the embedding and a tied head) is gathered for each use.

What overlaps with this CPU/MPI build: Horovod's collectives run on its background thread, so an all-gather
started by a prefetch moves its bytes while the main thread computes the current module (the MPI transfer needs no
main-thread progress once Horovod has negotiated it, one cycle later, HOROVOD_CYCLE_TIME). The copy of the
gathered parts into the module's buffer, and the first module's gather of every pass, are on the main thread and
exposed; so is any gather the compute of one module is too short to hide (small models).

Between the passes the model's parameters hold nothing. Whatever reads or writes them all outside a forward pass
(a load, the EMA, a sample) runs inside `whole_model()`, which gathers every unit and switches the hooks off; the
replicas' checksum reads them a unit at a time (`state_tensors`). The optimizer updates only the shard (no
all-gather after the step: the next forward gathers). A save gathers nothing: each DP rank's slice file holds its
part of the weights beside its slice of the optimizer state, and the shard file the rest (hvdlm.checkpoint.slices).
Gathering the whole weights for a save would make it the run's peak (whole weights and the optimizer slice: 6 bytes
a parameter at DP=4 against training's 4). Loading assembles the slices into the layout every reader knows, so a
ZeRO-3 checkpoint resumes at any DP size and with any ZeRO stage, and merges and exports as any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import horovod.torch as hvd
import torch
import torch.nn as nn
from horovod.torch import mpi_ops

from hvdlm.config import TrainConfig
from hvdlm.optim.zero import return_freed_memory
from hvdlm.optim.zero2 import Zero2Optimizer
from hvdlm.parallel.topology import Topology


def gather_units(model: nn.Module) -> list[nn.Module]:
    """The modules gathered as one, in forward order: each part of a block (its norms, its attention, its MLP),
    and each other child of the model holding parameters."""
    blocks = getattr(model, "blocks", None)
    units: list[nn.Module] = []
    for child in model.children():
        if child is blocks:
            for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
                units += [part for part in block.children() if _holds_parameters(part)]
        elif _holds_parameters(child):
            units.append(child)
    return units


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def in_backward() -> bool:
    """Inside a backward pass (a recomputation's forward runs there)."""
    return torch._C._current_graph_task_id() != -1


class _GatherForBackward(torch.autograd.Function):
    """Identity on a module's output; its backward gathers the module's weights before the module's backward."""

    @staticmethod
    def forward(ctx, before_backward: Callable[[], None], x: torch.Tensor) -> torch.Tensor:
        ctx.before_backward = before_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        ctx.before_backward()
        return None, grad


class Zero3Optimizer(Zero2Optimizer):
    """ZeRO-2 with the weights sharded too: gathered module by module for forward and backward (see the module)."""

    pieces_cross_buckets = False

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        topo: Topology,
        initial: Iterable[tuple[nn.Parameter, torch.Tensor]] | None = None,
        device: torch.device | None = None,
        adopt: dict | None = None,
    ):
        """`initial`: each parameter's initial value, one at a time (hvdlm.model.gpt.initial_values), where the
        model's parameters were allocated and never filled: each rank keeps its part of each and the whole model
        is never held (`device`: where the shard goes). Without it, the model's values are sharded. `adopt`: an
        own slice file to resume (see ZeroOptimizer), whose parts of the weights become the shard as they are."""
        self._modules = gather_units(model)
        self._initial = initial
        super().__init__(model, cfg, topo, device, adopt)
        self._initial = None  # (consumed)
        owner = {}  # parameter id -> the first module (in forward order) holding it: its unit
        for m, module in enumerate(self._modules):
            for p in module.parameters():
                owner.setdefault(id(p), m)
        self._owner = owner
        names: dict[int, list[str]] = {}  # parameter id -> its state_dict names (a tied weight has two)
        for name, t in model.state_dict(keep_vars=True).items():
            names.setdefault(id(t), []).append(name)
        self._names = [names[id(p)] for p in self.params]
        self._unit_of_bucket = [owner[id(self.params[ids[0]])] for ids in self.bucket_params]
        self._unit_buckets: dict[int, list[int]] = {}
        for b, u in enumerate(self._unit_of_bucket):
            self._unit_buckets.setdefault(u, []).append(b)
        # The units each module's forward reads: its own, and the one of a weight it shares (a tied head).
        self._uses = [sorted({owner[id(p)] for p in module.parameters()}) for module in self._modules]
        # Bytes each module's forward gathers; a module under an eighth of the largest (a norm) computes too little
        # to hide the next one's gather, so a prefetch reaches past it (see _prefetch).
        self._bytes_of = [sum(self._unit_bytes(u) for u in uses) for uses in self._uses]
        self._large = max(self._bytes_of) / 8
        self._gathered: set[int] = set()
        self._pending: dict[int, list] = {}  # unit -> its buckets' all-gathers in flight (a prefetch)
        self._launched_of: dict[int, int] = {}  # unit -> its buckets launched for reduction in this backward
        self._whole = False
        self._held_params = self._peak_params = 0  # bytes of the buffers holding weights (gathered or in flight)
        for m, module in enumerate(self._modules):
            module.register_forward_pre_hook(lambda _mod, _args, m=m: self._before_forward(m))
            module.register_forward_hook(lambda _mod, _args, out, m=m: self._after_forward(m, out))

    # -- the layout: buckets are the units, the weights only a shard ---------------------------------------------

    def _buckets(self, model: nn.Module, cfg: TrainConfig) -> list[list[int]]:
        """One bucket per unit (two where the unit mixes deferred and hook-driven parameters), units in the reverse
        of the forward order, as backward completes them."""
        index = {id(p): i for i, p in enumerate(self.params)}
        seen: set[int] = set()
        buckets: list[list[int]] = []
        for module in reversed(self._modules):
            own = [index[id(p)] for p in module.parameters() if id(p) in index and id(p) not in seen]
            seen.update(id(self.params[i]) for i in own)
            for deferred in (False, True):
                ids = [i for i in own if (id(self.params[i]) in self._deferred_ids) == deferred]
                if ids:
                    buckets.append(ids)
        return buckets

    def _place_weights(self) -> None:
        """This rank's part of every bucket's weights (a tensor each: a save gives them back one by one), and for
        every bucket a buffer of its whole weights (the parameters become views of it, values kept), released at
        once: this rank holds its shard only."""
        d, r = self.topo.dp, self.topo.dp_rank
        adopted = self._adopted_parts()
        self.own: list[torch.Tensor] = []  # bucket b's part of the shard
        self._full: list[torch.Tensor] = []
        for b, (ids, start, (_, _, part)) in enumerate(zip(self.bucket_params, self.bucket_starts, self.parts)):
            full = torch.zeros(d * part, device=self.device)
            for i in ids:
                p, at = self.params[i], self.param_offsets[i] - start
                if self._initial is None and adopted is None:
                    full[at : at + p.numel()].copy_(p.detach().reshape(-1))
                p.data = full[at : at + p.numel()].view_as(p)
            self.own.append(adopted[b] if adopted else full[r * part : (r + 1) * part].clone())
            self._full.append(full)
            full.untyped_storage().resize_(0)
        self._own_of = {s: b for b, (_, s, _) in enumerate(self.parts)}  # shard offset -> bucket
        if self._initial is not None and adopted is None:
            self._place_initial(self._initial)

    def _adopted_parts(self) -> list[torch.Tensor] | None:
        """The adopted slice's parts of the weights, one a bucket, on this device; None without one (or where
        they are not this layout's: nothing is adopted then)."""
        parts = ((self._adopted or {}).get("weights") or {}).get("parts")
        if parts is None or [t.numel() for t in parts] != [part for _, _, part in self.parts]:
            self._adopted = None
            return None
        # Copies, each read tensor let go once copied (one bucket's more at a time): whole_model() gives a part's
        # memory back by resizing its storage, which a tensor read from a file does not allow.
        own = []
        for b, t in enumerate(parts):
            own.append(t.to(self.device, copy=True))
            parts[b] = own[-1]
        return own

    @torch.no_grad()
    def _place_initial(self, initial: Iterable[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """This rank's part of each parameter's initial value, as the values come (one whole tensor at a time)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        bucket_of = {i: b for b, ids in enumerate(self.bucket_params) for i in ids}
        r = self.topo.dp_rank
        for p, value in initial:
            i = index[id(p)]
            b = bucket_of[i]
            at, n, part = self.param_offsets[i] - self.bucket_starts[b], p.numel(), self.parts[b][2]
            lo, hi = max(at, r * part), min(at + n, (r + 1) * part)  # the parameter within this rank's part
            if lo < hi:
                self.own[b][lo - r * part : hi - r * part].copy_(value.reshape(-1)[lo - at : hi - at])

    def _weights_piece(self, a: int, b: int, s: int) -> torch.Tensor:
        """Pieces never cross a bucket: the piece at shard offset s lies in the part of the bucket starting at or
        before s."""
        start = max(at for at in self._own_of if at <= s)
        return self.own[self._own_of[start]][s - start : s - start + b - a]

    def _share_weights(self) -> None:
        """Nothing: the updated shard is all a rank keeps; the next forward gathers."""

    # -- gathering and releasing ----------------------------------------------------------------------------------

    def _unit_bytes(self, u: int) -> int:
        return sum(self._full[b].numel() * self._full[b].element_size() for b in self._unit_buckets[u])

    def _prefetch(self, m: int, step: int) -> None:
        """Start the gathers of the modules after module m in the pass's order (step 1: forward, -1: backward), up
        to the first large one: the attention's gather runs while the MLP before it computes, and the reverse."""
        k = m + step
        while 0 <= k < len(self._modules):
            for u in self._uses[k]:
                self._start(u)
            if self._bytes_of[k] >= self._large:
                return
            k += step

    def _count_params(self, nbytes: int) -> None:
        self._held_params += nbytes
        self._peak_params = max(self._peak_params, self._held_params)

    @torch.no_grad()
    def _start(self, u: int) -> None:
        """Start the all-gathers of unit u's buckets (Horovod, asynchronous, over the DP process set) straight
        into their buffers, which take their memory back here: no second copy of the weights is made."""
        if u in self._gathered or u in self._pending:
            return
        handles = []
        for b in self._unit_buckets[u]:
            full = self._full[b]
            full.untyped_storage().resize_(full.numel() * full.element_size())
            self._count_params(full.numel() * full.element_size())
            own = self.own[b]
            if self.topo.dp == 1:
                full.copy_(own)
                continue
            # Horovod: the all-gather writes its output, the parts in DP-rank order, into the tensor given (the
            # public allgather_async allocates a new one); resized to its own shape, it keeps its storage.
            handles.append((b, mpi_ops._allgather_async(own, full, f"zero3.gather.{b}", self._dp_set)))
        self._pending[u] = handles

    @torch.no_grad()
    def _gather(self, u: int) -> None:
        """Unit u's weights whole in its buffers (waiting for its all-gathers, started here if not yet)."""
        if u in self._gathered:
            return
        self._start(u)
        for b, handle in self._pending.pop(u):
            out = hvd.synchronize(handle)
            if out.data_ptr() != self._full[b].data_ptr():  # had Horovod allocated anew, copy
                self._full[b].copy_(out.view(-1))
        self._gathered.add(u)
        self._launched_of[u] = 0

    def _release(self, u: int) -> None:
        if u not in self._gathered:
            return
        for b in self._unit_buckets[u]:
            full = self._full[b]
            full.untyped_storage().resize_(0)
            self._count_params(-full.numel() * full.element_size())
        self._gathered.discard(u)
        if self._unit_bytes(u) >= self._large:
            # glibc keeps freed blocks of this size in its heap (its mmap threshold rises after the first free):
            # measured, without this a rank's resident memory grew past ZeRO-2's (bench/memory_budget.py).
            return_freed_memory()

    def _settle(self) -> None:
        """Wait for the prefetches no forward or backward took (every rank issued the same), and drop them."""
        for u in list(self._pending):
            self._gather(u)
            self._release(u)

    def _before_forward(self, m: int) -> None:
        if self._whole:
            return
        for u in self._uses[m]:
            self._gather(u)
        if not in_backward():
            self._prefetch(m, 1)  # its bytes move while this module computes

    def _after_forward(self, m: int, out):
        if self._whole or in_backward():
            return None  # a recomputation: the module's backward follows and releases
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            out = _GatherForBackward.apply(lambda: self._before_backward(m), out)
        for u in self._uses[m]:
            self._release(u)
        return out

    def _before_backward(self, m: int) -> None:
        if self._whole:
            return
        for u in self._uses[m]:
            self._gather(u)
        self._prefetch(m, -1)

    def _launch(self, b: int) -> None:
        """ZeRO-2's reduction of bucket b; the unit's weights go once all its buckets are launched."""
        super()._launch(b)
        u = self._unit_of_bucket[b]
        if u in self._gathered and not self._whole:
            self._launched_of[u] = self._launched_of.get(u, 0) + 1
            if self._launched_of[u] >= len(self._unit_buckets[u]):
                self._release(u)

    # -- the optimizer interface (hvdlm.optim.interface) ---------------------------------------------------------

    def reduce_gradients(self, sum_tied: Callable[[], None] | None = None) -> None:
        super().reduce_gradients(sum_tied)
        self._settle()
        for u in list(self._gathered):
            self._release(u)

    def memory_bytes(self) -> dict[str, int]:
        """ZeRO-2's, and the weights: the shard and the most gathered at once (buffers and all-gathers in flight)."""
        shard = sum(t.numel() * t.element_size() for t in self.own)
        return {**super().memory_bytes(), "params": shard + self._peak_params}

    def checkpoint_slice(self) -> dict:
        """ZeRO-2's slice, and this rank's part of every bucket's weights with the names they load as: a save
        writes the shard as it is, and no rank gathers the whole weights for it (hvdlm.checkpoint.slices)."""
        # (never inside whole_model, where the parts have given their memory back: saves go by weights_for_save)
        return {**super().checkpoint_slice(), "weights": {"parts": list(self.own), "names": self._names}}

    def load_checkpoint_slice(self, saved: dict) -> bool:
        """ZeRO-2's, and this rank's part of every bucket's weights from the same file: the whole weights are
        never put together to resume at the layout that saved (outside whole_model, like a save)."""
        if self._taken_at_construction(saved):  # (its weights are the shard already)
            return True
        parts = (saved.get("weights") or {}).get("parts")
        if parts is None or [t.shape for t in parts] != [t.shape for t in self.own]:
            return False
        if not super().load_checkpoint_slice(saved):
            return False
        self._settle()  # (a running trainer's rollback: nothing gathered may outlive the shard it came from)
        for u in list(self._gathered):
            self._release(u)
        for own, part in zip(self.own, parts):
            own.copy_(part)
        return True

    def weights_for_save(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the slices hold the shard

    def state_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every state_dict entry sorted by name, whole while yielded: each parameter's unit is gathered for it and
        released once the next entry needs another (an entry's unit is usually the one before's), so at most one
        unit is whole at a time."""
        self._settle()
        gathered = None
        try:
            for name, t in sorted(model.state_dict(keep_vars=True).items()):
                unit = self._owner.get(id(t))
                if unit is not None and unit != gathered and not self._whole:
                    if gathered is not None:
                        self._release(gathered)
                    self._gather(unit)
                    gathered = unit
                yield name, t.detach()
        finally:
            if gathered is not None:
                self._release(gathered)

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[None]:
        """Every unit gathered and the hooks off inside (collective over the DP group). Meanwhile the shard (a copy
        of this rank's part of the whole weights) and the gradient slice (spent between a step and the next
        zero_grad, where this is used) give their memory back, so that a save's peak is no more than training's;
        after, the shard is this rank's part of what the block left in the weights, the slice zero."""
        if self._whole:
            yield
            return
        self._settle()
        # The gradient slice goes first (it feeds no gather); each part of the shard goes once its bucket is
        # gathered (it is a copy of this rank's part of the whole): the whole weights come at no extra cost.
        nbytes = self.grad_slice.untyped_storage().nbytes()
        self.grad_slice.untyped_storage().resize_(0)
        for u in self._unit_buckets:
            self._gather(u)
            for b in self._unit_buckets[u]:
                self.own[b].untyped_storage().resize_(0)
                self._count_params(-self.own[b].numel() * self.own[b].element_size())
        self._whole = True
        try:
            yield
        finally:
            self._whole = False
            # Unit by unit, each part of the shard back before its whole weights go, and the gradient slice last:
            # no moment holds the whole weights and the shard or the slice at once.
            d, r = self.topo.dp, self.topo.dp_rank
            for u in list(self._gathered):
                for b in self._unit_buckets[u]:
                    own, part = self.own[b], self.parts[b][2]
                    own.untyped_storage().resize_(own.numel() * own.element_size())
                    own.copy_(self._full[b].view(d, part)[r])
                    self._held_params += own.numel() * own.element_size()
                self._release(u)
            self.grad_slice.untyped_storage().resize_(nbytes)
            self.grad_slice.zero_()
