"""Activation recomputation (model.recompute): keep less of the forward pass for backward, recompute the rest.

- full: each block keeps only its input; its forward runs again inside backward (one extra forward pass, the
  activations of one block at a time). Activation memory per layer falls from ~sbh(34 + 5as/h) bytes to 2sbh
  (Korthikanti et al. 2022, fp16 counts).
- selective: only the attention core (QK^T, softmax, attention dropout, the weighted sum over V) is recomputed:
  its (B, H, T, T) tensors are the memory-heavy part that grows with the sequence, and cheap to recompute (the
  paper's 5as/h term) compared with the matmuls that are kept.

torch.utils.checkpoint (use_reentrant=False) stashes the RNG state before the forward and replays it in the
recomputation, so dropout draws the same masks twice; the RNG stream after the step is the one without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), keeping only args for backward (and running fn again there); plain fn(*args) without grad."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
