"""Does the model fit? Checked on every rank before anything is allocated, so a model too large for the device
ends in one clear error instead of the allocator's traceback (or the kernel's OOM killer) minutes later."""

from __future__ import annotations

import socket

import torch

from hvdlm.config import JobConfig
from hvdlm.errors import InputError
from hvdlm.model.size import parameter_count, state_bytes_per_parameter

GB = 1024**3


def check_model_fits(cfg: JobConfig, device: torch.device, ranks_on_node: int, dp: int = 1) -> None:
    """Refuse a model whose weights, gradients and optimizer state alone exceed this rank's memory: the GPU's
    free memory, or on a CPU this machine's available memory shared by its ranks. Activations come on top.
    With train.zero = 1 the optimizer's moments are split over the dp replicas, with 2 the gradients too, with 3 the
    weights too."""
    t = cfg.train
    params = parameter_count(cfg.model)
    per_param = state_bytes_per_parameter(t.optimizer, t.ema_decay > 0)
    if t.zero:
        moments = state_bytes_per_parameter(t.optimizer, False) - 8  # beyond the weight and its gradient
        sharded = moments + (4 if t.zero >= 2 else 0)  # ZeRO-2: the fp32 gradient too (its buckets in flight aside)
        sharded += 4 if t.zero >= 3 else 0  # ZeRO-3: the fp32 weight too (the modules gathered aside)
        per_param -= sharded * (1 - 1 / dp)
    # Every rank builds its whole shard of the model before ZeRO-3 cuts the weights: at least those fit.
    need = params * max(per_param, 4) / (cfg.parallel.tp * cfg.parallel.pp)
    have, what = _available_bytes(device, ranks_on_node)
    if have is not None and need > have:
        raise InputError(
            f"the model does not fit: {params / 1e6:,.1f}M parameters need about {need / GB:,.1f} GB per rank for "
            f"weights, gradients and {t.optimizer} state in fp32 (split over parallel.tp = {cfg.parallel.tp} and "
            f"pp = {cfg.parallel.pp}), before activations, but {socket.gethostname()} has {have / GB:,.1f} GB {what}. "
            "Use a smaller model ([model] n_layer, d_model), more tensor or pipeline parallelism (parallel.tp, "
            "parallel.pp), the optimizer state sharded over the data-parallel replicas (train.zero = 1; 2 shards the "
            "gradients too), or a device with more memory."
        )


def _available_bytes(device: torch.device, ranks_on_node: int) -> tuple[float | None, str]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    available = _meminfo_bytes("MemAvailable")
    if available is None:  # not Linux: no cheap, reliable figure; the allocator will say
        return None, ""
    return available / ranks_on_node, f"of available memory per rank ({ranks_on_node} rank(s) on this machine)"


def _meminfo_bytes(field: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024  # the figure is in kB
    except OSError:
        pass
    return None
