"""An exponential moving average of the weights: ema = decay * ema + (1 - decay) * weights after every step.

The average generalises better than the last iterate late in training; evaluation uses it when enabled. Each
rank averages its own shard, so the EMA is sharded (and saved, merged and resharded) exactly like the model.
"""

from __future__ import annotations

import contextlib

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.shadow = {name: t.detach().clone() for name, t in model.state_dict().items()}
        live = model.state_dict()
        # One multi-tensor kernel per update instead of one small kernel per tensor (torch._foreach).
        self._floats = [(self.shadow[n], t) for n, t in live.items() if t.is_floating_point()]
        self._others = [(self.shadow[n], t) for n, t in live.items() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self._floats:
            shadows, weights = zip(*self._floats)
            torch._foreach_lerp_(list(shadows), list(weights), 1.0 - self.decay)  # ema + (1 - decay) * (t - ema)
        for shadow, t in self._others:
            shadow.copy_(t)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own again after."""
        backup = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.model.load_state_dict(backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in state.items():
            self.shadow[name].copy_(t)
