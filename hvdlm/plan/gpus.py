"""The GPU table: peak dense bf16 throughput, memory, and typical link bandwidths, per GPU.

Figures from NVIDIA's datasheets (dense, without 2:4 sparsity, which doubles the headline figures): A100 SXM
312 TFLOP/s bf16, 40 or 80 GB, NVLink 3 600 GB/s in total per GPU (300 GB/s each way); H100 SXM 989 TFLOP/s,
80 GB, NVLink 4 900 GB/s (450 each way); H200 SXM the H100's compute with 141 GB. The inter-node figure is the
share of network per GPU in the usual build: one 200 Gbit/s HDR InfiniBand adapter per A100 (DGX A100: 8 per
node), one 400 Gbit/s NDR adapter per H100 / H200 (DGX H100).

Bandwidths are in Gbit/s (the flags' unit, as networks are sold); `bytes_per_s` converts. Memory is in GB of
10^9 bytes, as the datasheets count it and as the planner reports (an "80 GB" A100 holds 80 GiB, so the
capacity used here leaves it ~7 % of headroom).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hvdlm.errors import InputError

# Achievable fraction of peak for the matmul-dominated work of a GPT training step, per GPU generation (not per
# table row: the A100 40 GB and 80 GB share it, as do H100 and H200). Ampere's is calibrated on one published run,
# the 7.5B row of Narayanan et al. 2021, Table 1 (32 heads, h 4096, 36 layers, t 4, 128 A100s, batch 512,
# 142 TFLOP/s per GPU with recomputation counted; micro-batches of 1 sequence): 0.578 makes the planner predict
# that row exactly, and the other nine rows are predictions, each within 20 % (tests/test_plan.py). Hopper's is
# not calibrated on a run of its own: Megatron-Core reports ~390 TFLOP/s per H100 for GPT-3 175B (t 4, p 8),
# 39 % of peak against Table 1's 45.5 % on A100s (Hopper's matmuls got faster than its memory and links), so
# Ampere's fraction scaled by 39 / 45.5. Override either with --efficiency (e.g. from a measured run's MFU).
EFFICIENCY = {"ampere": 0.578, "hopper": 0.50}
CUSTOM_EFFICIENCY = EFFICIENCY["hopper"]  # a GPU described only by flags: the lower of the two


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float  # dense bf16 tensor throughput, TFLOP/s
    memory_gb: float  # device memory, GB (10^9 bytes)
    intra_node_gbps: float  # GPU-to-GPU inside a node, each way, Gbit/s (NVLink)
    inter_node_gbps: float  # network share per GPU, each way, Gbit/s (InfiniBand)
    efficiency: float  # achievable fraction of peak for the step's matmul-dominated work

    @property
    def intra_bytes_per_s(self) -> float:
        return self.intra_node_gbps * 1e9 / 8

    @property
    def inter_bytes_per_s(self) -> float:
        return self.inter_node_gbps * 1e9 / 8


GPUS: dict[str, Gpu] = {
    "a100-40gb": Gpu("a100-40gb", 312.0, 40.0, 2400.0, 200.0, EFFICIENCY["ampere"]),
    "a100-80gb": Gpu("a100-80gb", 312.0, 80.0, 2400.0, 200.0, EFFICIENCY["ampere"]),
    "h100": Gpu("h100", 989.0, 80.0, 3600.0, 400.0, EFFICIENCY["hopper"]),
    "h200": Gpu("h200", 989.0, 141.0, 3600.0, 400.0, EFFICIENCY["hopper"]),
}

# The flags that describe a GPU, by field: all four describe a GPU the table does not know.
FLAGS = {
    "memory_gb": "--gpu-memory-gb",
    "peak_tflops": "--peak-tflops",
    "intra_node_gbps": "--intra-node-gbps",
    "inter_node_gbps": "--inter-node-gbps",
    "efficiency": "--efficiency",
}


def gpu(name: str, **overrides: float | None) -> Gpu:
    """The table's GPU `name` with any of FLAGS' fields overridden; a name the table does not know needs the four
    describing fields (efficiency defaults to CUSTOM_EFFICIENCY)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if key not in FLAGS:
            raise TypeError(key)
        if not value > 0 or value != value or value == float("inf") or (key == "efficiency" and value > 1):
            limit = "a fraction in (0, 1]" if key == "efficiency" else "a positive number"
            raise InputError(f"{FLAGS[key]} must be {limit}, got {value}.")
    known = GPUS.get(name.lower())
    if known is not None:
        return replace(known, **given)
    missing = [FLAGS[k] for k in FLAGS if k != "efficiency" and k not in given]
    if missing:
        raise InputError(
            f"unknown GPU '{name}': the table knows {', '.join(GPUS)}. Pass one of those, or describe this GPU "
            f"with {', '.join(missing)} (--gpu-memory-gb GB, --peak-tflops dense bf16 TFLOP/s, --intra-node-gbps "
            "and --inter-node-gbps in Gbit/s per GPU, each way)."
        )
    return Gpu(name=name, efficiency=given.pop("efficiency", CUSTOM_EFFICIENCY), **given)  # type: ignore[arg-type]
