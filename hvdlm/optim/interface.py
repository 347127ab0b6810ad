"""The one interface of every optimizer the trainer holds (hvdlm.optim.build returns one).

A training step asks it, in this order:

    zero_grad()                        before the step's first backward
    reduce_gradients(sum_tied)         average the gradients over the data-parallel group (or nothing to do)
    clip_gradients(max_norm, scaler)   the true-scale gradients clipped to one norm over the whole model
    step(scaler, found_inf)            update the weights, or leave them (a non-finite step, an fp16 overflow)
    after_step(done, ema)              what follows an update (local SGD's periodic averaging)

and outside the step: `set_lr`, `memory_bytes` (the memory account), `checkpoint_view`, `checkpoint_slice` and
`load_checkpoint_slice` (what a checkpoint saves and a resume loads), and `whole_model()` around whatever reads or
writes the weights outside a forward pass (loads, the EMA, samples: ZeRO-3 holds only a shard of them between
passes), `weights_for_save()` around a save and `state_tensors()` to read every weight (the replicas' checksum)
without holding them all at once. The trainer, the memory account, the checkpoint manager and the step verdict ask
these, never the optimizer's type: a new kind (a ZeRO stage, another update rule) is a class here.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


class TrainingOptimizer(abc.ABC):
    """One rank's optimizer as a training step drives it (see the module)."""

    # The optimizer skips a step by itself when step() is given a set found_inf flag (fused AdamW's kernel reads
    # it on the device), so the host need not wait for the verdict before queueing the update.
    skips_on_device: bool = False

    @property
    @abc.abstractmethod
    def param_groups(self) -> list[dict]:
        """The parameter groups the update steps (their lr is set every step)."""

    def set_lr(self, lr: float) -> None:
        """This step's learning rate, in every group."""
        for group in self.param_groups:
            group["lr"] = lr

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Start a step: no gradient from the last one is left."""

    @abc.abstractmethod
    def reduce_gradients(self, sum_tied: Callable[[], None] | None = None) -> None:
        """Average the gradients over the data-parallel group, as the update needs them. `sum_tied` adds up the
        two pipeline stages' copies of the tied embedding/head gradient; each kind calls it where that sum
        commutes with its reduction (before a reduce-scatter, after an allreduce that wrote averages)."""

    @abc.abstractmethod
    def clip_gradients(self, max_norm: float, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Unscale (fp16) and clip the gradients to `max_norm` of the global norm, summed over DP slices, TP
        shards and pipeline stages; returns that norm (non-finite when any gradient is)."""

    @abc.abstractmethod
    def step(self, scaler: torch.amp.GradScaler, found_inf: torch.Tensor | None = None) -> None:
        """Update the weights through the scaler (which skips an fp16 overflow). `found_inf` (only where
        skips_on_device): a device flag, 1 leaves weights, moments and step count as they were."""

    def after_step(self, done: int, ema: Any = None) -> None:
        """After the update of step `done` (an EMA whose shadow averages along, if any): nothing by default."""

    @abc.abstractmethod
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds beyond the model's weights and `.grad`s: "state" (moments, this rank's slice of
        them under ZeRO) and "gradient_buffers" (reduction buffers; ZeRO-2: the most held during a backward);
        optionally "params", where the weights are not simply the model's tensors (ZeRO-3: the shard and the
        most gathered at once)."""

    def whole_model(self) -> contextlib.AbstractContextManager:
        """Inside it the model's parameters hold the whole weights (collective over the DP group where they are
        sharded), and what the block leaves in them is kept. Nothing to do by default."""
        return contextlib.nullcontext()

    def weights_for_save(self) -> contextlib.AbstractContextManager:
        """What a checkpoint save needs of the weights around it: whole (`whole_model`), unless the optimizer's
        slices hold them (ZeRO-3)."""
        return self.whole_model()

    def state_tensors(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's state_dict entries sorted by name, each whole while it is yielded (collective over the DP
        group where weights are sharded: every rank goes through all of them). By default inside `whole_model`;
        ZeRO-3 gathers one unit at a time, so that reading every weight never holds them all."""
        with self.whole_model():
            yield from sorted(model.state_dict().items())

    @abc.abstractmethod
    def checkpoint_view(self) -> Any:
        """The optimizer as a checkpoint's shard file sees a plain torch one: param_groups over the model's
        parameters, state_dict() (None where slice files hold the state) and load_state_dict(whole state)."""

    def checkpoint_slice(self) -> dict[str, Any] | None:
        """This rank's slice of the state for a file of its own (ZeRO), or None: the shard file holds it whole."""
        return None

    def load_checkpoint_slice(self, saved: dict[str, Any]) -> bool:
        """Take a `checkpoint_slice` this rank wrote at this very layout, as it is; False (nothing loaded) where the
        slice cuts the state otherwise, or this kind keeps no slices: the caller loads the merged state instead."""
        return False
