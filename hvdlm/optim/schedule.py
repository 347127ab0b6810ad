"""The learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math

from hvdlm.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, replicas: int = 1) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at max_steps.

    With scale_lr both ends are multiplied by the number of replicas (the linear scaling rule of Goyal et al.,
    2017: the global batch grows with them, so the step may too); warmup is what makes the larger rate safe.
    """
    scale = replicas if cfg.scale_lr else 1
    peak, floor = cfg.lr * scale, cfg.min_lr * scale
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (peak - floor)
