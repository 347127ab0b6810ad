"""The parts in which the decoder's architectures differ, each small and named; the decoder (gpt.py) is built from
them and holds no `if arch` of its own.

    part        gpt2 (Radford et al. 2019)          llama (Touvron et al. 2023)
    norm        LayerNorm: gain and shift           RMSNorm: gain only
    positions   a learned table added at the input  RoPE on queries and keys in every attention (Rotary)
    MLP         GELU: fc, proj                      SwiGLU: gate, up, down
    attention   one key/value head per query head   grouped-query: model.n_kv_head key/value heads

Attention itself is shared (gpt.CausalSelfAttention, with n_kv_head = n_head for gpt2). The numbers behind the
table (which positions, how many MLP matrices, the default widths) are hvdlm.config.ARCH_TRAITS, which the parameter
count and the planner read without torch; `PARTS` maps each arch to the modules.

Every part computes what transformers' GPT2LMHeadModel (activation_function "gelu") or LlamaForCausalLM computes
from the same weights (hvdlm.checkpoint.hf maps the names), so exports and imports are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from hvdlm.config import ModelConfig
from hvdlm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from hvdlm.parallel.mappings import copy_to_tp
from hvdlm.parallel.topology import Group

# ------------------------------------------------------------------------------------------------------------
# Norms (replicated on every TP rank: they act on the whole residual stream)
# ------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019): no mean subtracted, no shift. Computed in fp32 and cast back before
    the gain, as transformers' LlamaRMSNorm does (so bf16 runs agree with it too)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def layer_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rms_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps)


NORMS = (nn.LayerNorm, RMSNorm)  # their gains start at 1 (gpt.initial_value)

# ------------------------------------------------------------------------------------------------------------
# Rotary positions
# ------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension: transformers' Llama convention (its
    conversion script permutes Meta's interleaved q/k rows into it), so weights map across unchanged."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """RoPE (Su et al. 2021): dimension pair (i, i + D/2) of a head at position t is rotated by the angle
    t theta^(-2i/D). The cos and sin tables are computed once, in fp32, for every position up to seq_len (a
    sequence of T tokens reads their first T rows), and kept as buffers that are not saved: they follow the model
    to its device, and one table serves every block. The rotation itself runs in fp32 and is cast back."""

    def __init__(self, head_dim: int, seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (D/2,)
        angles = torch.arange(seq_len, dtype=torch.float)[:, None] * inv_freq  # (T, D/2), as transformers' Llama
        angles = torch.cat((angles, angles), dim=-1)  # (T, D): pair i and i + D/2 share an angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) -> x rotated by position."""
        T = x.size(-2)
        xf = x.float()
        return (xf * self.cos[:T] + rotate_half(xf) * self.sin[:T]).to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# MLPs: column parallel in, row parallel out; each rank's hidden units are its own
# ------------------------------------------------------------------------------------------------------------


class GeluMLP(nn.Module):
    """GPT-2's MLP: proj(gelu(fc(x))), the exact (erf) GELU, d_ff = 4 d_model by default."""

    def __init__(self, cfg: ModelConfig, group: Group):
        super().__init__()
        self.fc = ColumnParallelLinear(cfg.d_model, cfg.ffn_width, group, bias=cfg.bias)
        self.proj = RowParallelLinear(cfg.ffn_width, cfg.d_model, group, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C), summed over the TP group


class SwiGLU(nn.Module):
    """Llama's MLP (Shazeer 2020): down(silu(gate(x)) * up(x)). gate and up are column parallel, split alike, so
    each rank multiplies its own units; down is row parallel. Three matrices, each a matrix of its own (Muon
    orthogonalizes them one by one, as transformers stores them). gate and up read one copy of the input: its
    gradient is summed over the TP group once in backward, as one fused column-parallel layer's would be."""

    def __init__(self, cfg: ModelConfig, group: Group):
        super().__init__()
        self.gate = ColumnParallelLinear(cfg.d_model, cfg.ffn_width, group, bias=cfg.bias)
        self.up = ColumnParallelLinear(cfg.d_model, cfg.ffn_width, group, bias=cfg.bias)
        self.down = RowParallelLinear(cfg.ffn_width, cfg.d_model, group, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.gate.group)  # (B, T, C): forward the identity, backward one allreduce for both
        gate = F.linear(x, self.gate.weight, self.gate.bias)  # (B, T, d_ff / p)
        up = F.linear(x, self.up.weight, self.up.bias)  # (B, T, d_ff / p)
        return self.dropout(self.down(F.silu(gate) * up))  # (B, T, C), summed over the TP group


# The linear layers whose output is added to the residual stream: GPT-2's scaled init (gpt.initial_value).
RESIDUAL_OUTPUTS = ("attn.proj", "mlp.proj", "mlp.down")


@dataclass(frozen=True)
class Parts:
    norm: Callable[[ModelConfig], nn.Module]
    mlp: Callable[[ModelConfig, Group], nn.Module]


PARTS = {"gpt2": Parts(norm=layer_norm, mlp=GeluMLP), "llama": Parts(norm=rms_norm, mlp=SwiGLU)}


def rotary_of(cfg: ModelConfig) -> Rotary | None:
    """The RoPE tables every block of an arch without learned positions shares; None for gpt2."""
    if cfg.traits.learned_positions:
        return None
    return Rotary(cfg.d_model // cfg.n_head, cfg.seq_len, cfg.rope_theta)
