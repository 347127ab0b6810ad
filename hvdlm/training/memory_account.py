"""The memory account of one rank: what its weights, gradients, optimizer state and saved activations take.

- `ActivationMeter` counts the bytes autograd saves for backward during a forward pass
  (torch.autograd.graph.saved_tensors_hooks, on any device): each saved storage once, the parameters not at all;
  its peak is the most held at once, over the micro-batches whose backward has not run yet.
- `memory_account` reads the live tensors (after the first step, when the optimizer state exists; the optimizer
  reports its own state and buffers) and, on GPUs, torch.cuda.max_memory_allocated; the trainer logs it at the
  first step and in every metrics.jsonl row.

The same account from sizes alone, for the planner, is hvdlm.plan.memory.state_mb.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hvdlm.plan.memory import MB


class ActivationMeter:
    """The bytes forward passes save for backward: `with meter.counting(i):` around micro-batch i's forward,
    `meter.release(i)` once its backward has run (the saved tensors are freed then). `peak_bytes` is the most held
    at once: one micro-batch's forward for plain accumulation (each backward frees it before the next forward),
    the in-flight micro-batches of a pipeline schedule. `with meter:` counts micro-batch 0."""

    def __init__(self, model):
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._params = {id(p) for p in model.parameters()}  # ZeRO-3's weights move storage between gathers
        self._held: dict[int, dict[int, int]] = {}  # micro-batch -> storage address -> bytes
        self.peak_bytes = 0

    @contextlib.contextmanager
    def counting(self, i: int = 0):
        import torch

        saved = self._held.setdefault(i, {})

        def pack(t):
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if (
                address and address not in self._skip and id(t) not in self._params
            ):  # a tensor saved twice (or a view) counts once
                saved[address] = max(saved.get(address, 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self
        self.peak_bytes = max(self.peak_bytes, sum(sum(held.values()) for held in self._held.values()))

    def release(self, i: int) -> None:
        self._held.pop(i, None)

    def __enter__(self) -> ActivationMeter:
        self._counting = self.counting(0)
        return self._counting.__enter__()

    def __exit__(self, *exc) -> None:
        self._counting.__exit__(*exc)


def memory_account(model, optimizer, activation_bytes: int, device) -> dict[str, Any]:
    """MB per rank held by the model's weights and gradients, the optimizer's state (this rank's slice under
    ZeRO) and the activations saved for backward; with a GPU, the allocator's peak. `optimizer`: an
    hvdlm.optim TrainingOptimizer, which reports its own state and reduction buffers."""
    import torch

    params = list(model.parameters())  # a tied weight once
    held = optimizer.memory_bytes()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    grads += held["gradient_buffers"]  # ZeRO: the reduce-scatter's slice (ZeRO-2: and its buckets)
    account = {
        # ZeRO-3: its shard and the most gathered at once, not the model's (whole-shaped) tensors.
        "params_mb": held.get("params", sum(p.numel() * p.element_size() for p in params)) / MB,
        "grads_mb": grads / MB,
        "optimizer_mb": held["state"] / MB,
        "activations_mb": activation_bytes / MB,
    }
    if device.type == "cuda":
        account["max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return account


def describe(account: dict[str, Any]) -> str:
    """The account as one log line."""
    parts = [f"{key.removesuffix('_mb')} {value:,.1f} MB" for key, value in account.items()]
    return "memory per rank: " + ", ".join(parts) + " (activations: saved for backward by one micro-batch)"
