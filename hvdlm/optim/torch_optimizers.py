"""The torch optimizers that do the update: AdamW or SGD over decay / no-decay groups, or Muon with AdamW
(hvdlm.optim.muon). The kinds of hvdlm.optim hold one of these, over the model's parameters or over ZeRO's slices."""

from __future__ import annotations

import torch

from hvdlm.config import TrainConfig
from hvdlm.optim.muon import Muon, muon_groups


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (Linear weights, embeddings); leave biases and LayerNorm gains alone, as in GPT-2/3."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW, SGD, or Muon with AdamW (hvdlm.optim.muon, never fused). `fused` (one kernel updating every
    parameter, as nanoGPT and llm.c do) follows train.fused_optimizer, whose auto is on for GPU parameters. On
    CPUs the fused kernel rounds differently from the per-tensor one, enough to move a data-parallel run past
    1e-5 of the single-rank reference (tests/test_tp_training.py), for no measured gain."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "muon":
        return Muon(muon_groups(model, groups), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum)
    return optimizer_over(groups, cfg, fused)


def optimizer_over(groups: list[dict], cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """make_optimizer's AdamW or SGD over given parameter groups (ZeRO's are slices of flat buffers)."""
    if fused is None:
        fused = {"on": True, "off": False}.get(cfg.fused_optimizer)
    if fused is None:
        devices = {p.device.type for g in groups for p in g["params"]}
        fused = True if devices == {"cuda"} else None  # None: torch's default
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
