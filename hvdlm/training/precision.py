"""Mixed precision: the autocast context of the forward pass and the fp16 gradient scaler (Horovod's fp16 gradient
compression: hvdlm.optim.replicated).

- fp32: nothing changes.
- bf16: autocast to bfloat16 (CPU and GPU). bf16 has fp32's exponent range, so gradients need no scaling.
- fp16: autocast to float16 and a GradScaler (GPU only). fp16 gradients underflow without loss scaling; the
  scaler multiplies the loss, unscales the averaged gradients before clipping, and skips steps whose gradients
  overflowed.
"""

from __future__ import annotations

import contextlib

import torch

from hvdlm.config import TrainConfig
from hvdlm.errors import InputError

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        check_precision(cfg, device)
        self.name = cfg.precision
        self.device = device
        self._dtype = _AUTOCAST_DTYPES.get(cfg.precision)
        # A disabled scaler passes everything through unchanged, so the loop calls it unconditionally.
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")

    def autocast(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse what this device cannot do, before anything is written."""
    if device.type != "cuda" and cfg.precision == "fp16":
        raise InputError(
            'train.precision = "fp16" needs a GPU: fp16 training relies on a CUDA gradient scaler, and CPUs have '
            'no fast fp16 arithmetic. Use precision = "bf16" (autocast to bfloat16 works on CPUs) or "fp32".'
        )
    if device.type != "cuda" and cfg.grad_compression == "fp16":
        raise InputError(
            'train.grad_compression = "fp16" is for GPU tensors: on CPU, the MPI and Gloo reductions of fp16 '
            "buffers are slower than fp32 ones (no native half arithmetic), so it would cost time, not save it. "
            'Set grad_compression = "none" on CPU ranks.'
        )
