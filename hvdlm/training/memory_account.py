"""The memory account of one rank: what its weights, gradients, optimizer state and saved activations take.

- `ActivationMeter` counts the bytes autograd saves for backward during a forward pass
  (torch.autograd.graph.saved_tensors_hooks, on any device): each saved storage once, the parameters not at all.
  Their sum at the end of the forward is the peak, since nothing saved is freed before backward.
- `memory_account` reads the live tensors (after the first step, when the optimizer state exists) and, on GPUs,
  torch.cuda.max_memory_allocated; the trainer logs it at the first step and in every metrics.jsonl row.
- `state_mb` is the same account of weights, gradients and optimizer state from sizes alone: arithmetic, no
  torch, for the planner.
"""

from __future__ import annotations

from typing import Any

MB = 1024**2
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4}  # fp32 moments per parameter: AdamW's two, SGD's momentum


def state_mb(params: int, optimizer: str, dp: int = 1, zero: int = 0, momentum: bool = True) -> dict[str, float]:
    """MB per rank for `params` fp32 parameters held by the rank (its TP shard or stage): weights and gradients
    whole, the optimizer state split over the dp replicas with ZeRO-1 (padded to equal slices)."""
    per_param = OPTIMIZER_STATE_BYTES[optimizer] if (optimizer == "adamw" or momentum) else 0
    held = -(-params // dp) if zero else params
    return {"params_mb": 4 * params / MB, "grads_mb": 4 * params / MB, "optimizer_mb": per_param * held / MB}


class ActivationMeter:
    """`with meter:` around a forward pass counts the bytes it saves for backward (`peak_bytes`)."""

    def __init__(self, model):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved twice (or a view) counts once

    def _pack(self, t):
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address and address not in self._skip:
            self._saved[address] = max(self._saved.get(address, 0), storage.nbytes())
        return t

    def __enter__(self) -> ActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def peak_bytes(self) -> int:
        return sum(self._saved.values())


def memory_account(model, optimizer, activation_bytes: int, device) -> dict[str, Any]:
    """MB per rank held by the model's weights and gradients, the optimizer's state (this rank's slice under
    ZeRO) and the activations saved for backward; with a GPU, the allocator's peak."""
    import torch

    params = list(model.parameters())  # a tied weight once
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    grads += getattr(optimizer, "buffer_bytes", 0)  # ZeRO: the reduce-scatter's slice
    tensors = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    state = sum(t.numel() * t.element_size() for t in tensors)
    account = {
        "params_mb": sum(p.numel() * p.element_size() for p in params) / MB,
        "grads_mb": grads / MB,
        "optimizer_mb": state / MB,
        "activations_mb": activation_bytes / MB,
    }
    if device.type == "cuda":
        account["max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return account


def describe(account: dict[str, Any]) -> str:
    """The account as one log line."""
    parts = [f"{key.removesuffix('_mb')} {value:,.1f} MB" for key, value in account.items()]
    return "memory per rank: " + ", ".join(parts) + " (activations: saved for backward by one micro-batch)"
