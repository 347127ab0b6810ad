"""Model FLOPs utilisation (placeholder of the lead; the watch helper replaces it with the GPU table)."""

from __future__ import annotations

import resource

import torch


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_model: int) -> float:
    """6N + 12 L T d: forward and backward of the weights, plus attention's scores (PaLM, appendix B)."""
    return 6.0 * n_params + 12.0 * n_layer * seq_len * d_model


def peak_tflops(device: torch.device, precision: str, configured: float) -> float | None:
    return configured or None


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops_per_device: float | None, devices: int):
    if not peak_tflops_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops_per_device * 1e12 * devices)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
