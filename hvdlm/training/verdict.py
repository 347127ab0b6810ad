"""Whether a step is skipped: a step whose loss or gradient norm is not finite takes no update.

Decided on the host, the verdict is a wait for the device: the step's end, before its update can be queued, and
the device idles until the host has queued the next step's first kernels. A fused AdamW decides on the device
instead: its kernel reads a flag (found_inf, the gradient scaler's mechanism) and leaves weights, moments and step
count as they were where the flag is set. The host learns the verdict later, from a copy the device writes to
pinned memory as the step ends, read once the next step's work is queued behind it.
"""

from __future__ import annotations

import torch

from hvdlm.optim.interface import TrainingOptimizer


def non_finite_flags(loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> torch.Tensor:
    """[the loss is not finite, the gradient norm is not finite], on the device. fp16 (`scaled`): the gradient
    scaler handles an overflowing gradient by itself, so only the loss counts."""
    return torch.stack([~torch.isfinite(loss), ~(torch.isfinite(grad_norm) | scaled)])


def decides_on_device(optimizer: TrainingOptimizer, scaled: bool, ema, elastic: bool) -> bool:
    """Whether the optimizer skips a step by itself, so that the host need not wait for the verdict.

    Where the optimizer can (its skips_on_device: fused AdamW), and not with fp16 (the scaler's own skip comes
    first), an EMA (its update would need the verdict) or elastic jobs (their in-memory commits carry the count of
    skipped steps).
    """
    return optimizer.skips_on_device and not scaled and ema is None and not elastic


class Verdict:
    """A step's verdict, read on the host when first asked: at once on CPUs; on GPUs from a pinned copy, waiting
    only for the step that wrote it (its own event), not for whatever was queued after it."""

    def __init__(self, flags: torch.Tensor):
        self._ready = None
        if flags.device.type == "cuda":
            self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._flags.copy_(flags, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._flags = flags

    @property
    def problem(self) -> str | None:
        """Why the step was skipped, or None if it was taken."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        loss_bad, norm_bad = self._flags.tolist()
        if loss_bad:
            return "non-finite loss"
        if norm_bad:
            return "non-finite gradient norm"
        return None
