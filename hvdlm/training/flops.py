"""Model FLOPs utilisation (MFU) and peak memory, for the metrics rows.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices), where the achieved figure counts only the
FLOPs the model needs (PaLM, Chowdhery et al. 2022, appendix B): no recomputation, no padding, no optimizer.
It says how much of the hardware the training uses, comparable across TP / DP layouts and machines.

torch is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_model: int) -> int:
    """Training FLOPs per token: 6N + 12 L T d (PaLM appendix B, with H x Q = d).

    6N: every weight does one multiply-add (2 FLOPs) per token forward and two backward (input and weight
    gradients), so 2N + 4N. 12 L T d: the attention scores QK^T and their product with V, which have no
    weights, 2 matmuls x 2 FLOPs x T x d per layer forward, times 3 for forward + backward. (Causal masking
    would halve this term, but PaLM and nanoGPT count it whole, and so do we, so figures compare.)

    N is the count of parameters that take part in a matmul: the whole model's (all TP shards), without the
    position table (a lookup, no FLOPs) but with the token embedding, because the output head is tied to it
    and its (d x V) matmul per token is real work. That is `GPT.num_params()` (non_embedding=True), the N of
    nanoGPT's estimate_mfu. PaLM excludes embeddings too, but its output head is counted the same way.
    """
    return 6 * n_params + 12 * n_layer * seq_len * d_model


# Peak dense tensor throughput in TFLOP/s per GPU (no 2:4 sparsity: the datasheets' headline figures are
# doubled by it), per precision: "bf16" (= fp16 on all of these), "tf32", "fp32" (plain CUDA cores).
# Sources, NVIDIA datasheets: H100 / H200 ("NVIDIA H100 Tensor Core GPU" and "NVIDIA H200" datasheets, the
# sparse figures halved), A100 (A100 datasheet, 40 / 80 GB SXM and PCIe alike), A10, A30, L4, L40, L40S
# (their product datasheets), V100 (V100 datasheet: no bf16 tensor cores, its fp16 tensor figure is used for
# fp16 only), GeForce RTX 4090 (Ada whitepaper appendix, fp16 / bf16 with fp32 accumulate, as torch does) and
# RTX 3090 (Ampere GA102 whitepaper, fp16 with fp32 accumulate).
# Patterns match torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
# "Tesla V100-SXM2-16GB"; the first match wins, so the specific variants come before the general name.
_GPU_PEAKS: list[tuple[str, dict[str, float | None]]] = [
    (r"H100.*NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIE", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100|GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 (named "H100 80GB HBM3")
    (r"H200.*NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM: the H100 SXM's compute, more memory
    (r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bA30\b", {"bf16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    (r"\bL40S\b", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100S", {"fp16": 130.0, "bf16": None, "tf32": None, "fp32": 16.4}),
    (r"V100.*PCIE", {"fp16": 112.0, "bf16": None, "tf32": None, "fp32": 14.0}),
    (r"V100", {"fp16": 125.0, "bf16": None, "tf32": None, "fp32": 15.7}),  # SXM2
    (r"RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6}),
]


def gpu_peak_tflops(name: str, precision: str, tf32: bool = False) -> float | None:
    """The table's peak for a GPU name and a training precision ("fp32", "bf16", "fp16"); None if unknown.

    fp32: torch runs fp32 matmuls on TF32 tensor cores only when allowed (torch.backends.cuda.matmul.allow_tf32
    or set_float32_matmul_precision("high")); by default it does not, so the plain FP32 figure is the honest
    peak, and the TF32 one (8x higher on an H100) applies only with `tf32=True`.
    A GPU without tensor cores for a precision (V100 and bf16) runs it at its FP32 rate.
    """
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if precision == "fp32":
                return (peaks.get("tf32") if tf32 else None) or peaks["fp32"]
            return peaks.get(precision, peaks.get("bf16")) or peaks["fp32"]
    return None


def peak_tflops(device: torch.device, precision: str, configured: float) -> float | None:
    """Peak TFLOP/s of one device for MFU: `configured` (train.peak_tflops) when > 0, else the table's figure
    for a known CUDA GPU; None for a CPU or an unknown GPU (MFU is then not reported)."""
    if configured > 0:
        return float(configured)
    if device.type != "cuda":
        return None
    import torch

    return gpu_peak_tflops(torch.cuda.get_device_name(device), precision, tf32=_tf32_allowed())


def _tf32_allowed() -> bool:
    import torch

    try:
        return torch.get_float32_matmul_precision() != "highest"
    except (AttributeError, RuntimeError):  # newer torch may refuse the legacy query under its new fp32 API
        return bool(torch.backends.cuda.matmul.allow_tf32)


def mfu(
    tokens_per_s: float, flops_per_token: float, peak_tflops_per_device: float | None, devices: int
) -> float | None:
    """The fraction of the devices' peak the training achieves; None without a known peak.

    tokens_per_s is the whole job's throughput (all data-parallel replicas); devices the job's ranks (tp x dp).
    """
    if not peak_tflops_per_device or peak_tflops_per_device <= 0 or devices < 1 or not math.isfinite(tokens_per_s):
        return None
    return tokens_per_s * flops_per_token / (peak_tflops_per_device * 1e12 * devices)


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: tensors allocated on a CUDA device (torch's allocator, since the process started or
    the last reset of peak stats), or the process's maximum resident set size on a CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10
