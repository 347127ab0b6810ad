"""Mixed precision: the autocast context of the forward pass and the fp16 gradient scaler (Horovod's fp16 gradient
compression: hvdlm.optim.replicated).

- fp32: nothing changes.
- bf16: autocast to bfloat16 (CPU and GPU). bf16 has fp32's exponent range, so gradients need no scaling.
- fp16: autocast to float16 and a GradScaler (GPU only). fp16 gradients underflow without loss scaling; the
  scaler multiplies the loss, unscales the averaged gradients before clipping, and skips steps whose gradients
  overflowed.
- fp8: bf16 autocast, and the blocks' linear layers through torchao's float8 training (dynamic per-tensor scales:
  each matmul casts its inputs to float8 e4m3, and its gradients to e5m2, with fp32 accumulation). Hopper GPUs
  (compute capability >= 9.0) with torchao installed only; refused elsewhere (hvdlm.devices.fp8_refusal).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from hvdlm.config import TrainConfig
from hvdlm.devices import fp8_refusal
from hvdlm.errors import InputError

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


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

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with its blocks' linear layers in float8 (fp8 only; others as they are). Before compiling."""
        if self.name != "fp8":
            return model
        from torchao.float8 import convert_to_float8_training

        as_torch_linears(model)

        # torchao's float8 matmuls need both dimensions divisible by 16; the head (vocabulary rows) stays bf16, as
        # torchtitan leaves its output layer: its logits feed the loss directly.
        def chosen(module: torch.nn.Module, name: str) -> bool:
            return "head" not in name and all(n % 16 == 0 for n in module.weight.shape)

        return convert_to_float8_training(model, module_filter_fn=chosen)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse what this device cannot do, before anything is written."""
    if cfg.precision == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        problem = fp8_refusal(device.type, capability, importlib.util.find_spec("torchao") is not None)
        if problem:
            raise InputError(problem)
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


def as_torch_linears(model: torch.nn.Module) -> int:
    """Replace the model's one-rank tensor-parallel linear layers (tp = 1: plain X A^T + b) by torch's nn.Linear
    holding the same parameters, which torchao knows how to convert; returns how many were replaced."""
    from hvdlm.parallel.layers import ColumnParallelLinear, RowParallelLinear

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (ColumnParallelLinear, RowParallelLinear)) or child.group.size != 1:
                continue
            with torch.device("meta"):  # no memory: the parameters are the layer's own, moved over below
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.weight = child.weight
            linear.bias = child.bias
            setattr(parent, name, linear)
            replaced += 1
    return replaced
