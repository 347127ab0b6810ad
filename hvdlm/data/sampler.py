"""Which windows each data-parallel rank trains on at each step.

The global batch of a step is `global_batch` random windows drawn from a generator seeded with (seed, step);
data-parallel rank r of n takes the r-th contiguous slice of it. So the ranks' batches are disjoint slices of one
global batch, every rank can compute its own without talking to the others, and 2 ranks with batch B see
exactly the samples that 1 rank with batch 2B sees.
"""

from __future__ import annotations

import numpy as np
import torch

# Evaluation batches come from their own stream (a seed word no training step uses), so every evaluation of a
# run measures the same validation windows and the curve is comparable over time.
_EVAL_STREAM = 0x5EED_E7A1


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of {seq_len} + 1")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self._span = np.arange(seq_len + 1)

    def offsets(self, step: int, stream: int = 0) -> np.ndarray:
        """Start offsets of this rank's windows at `step`: its slice of the global batch."""
        rng = np.random.default_rng([self.seed, stream, step])
        global_offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size * self.dp_size)
        return global_offsets[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]

    def batch(self, step: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y, both (B, T) int64."""
        windows = self.tokens[self.offsets(step, stream)[:, None] + self._span]  # (B, T + 1)
        w = torch.from_numpy(windows.astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(index, stream=_EVAL_STREAM)
