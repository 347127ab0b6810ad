"""Loss-spike detection (train.spike_rollback): the rule, its running statistics, and the test hook that makes a
real spike.

The rule. Every step the detector sees the loss of the global batch (the mean over every rank, which all ranks
hold alike). It keeps two exponential moving averages over a span of train.spike_window steps (weight
alpha = 2 / (window + 1), as a pandas `ewm(span=window)`): the loss's running mean, and its noise, the variance
estimated as half the mean square of the step-to-step differences (for noise around a slowly moving level,
Var(x_t - x_t-1) = 2 sigma^2: the falling trend that a variance around the lagging mean would count as noise adds
only its slope squared). It judges once it has seen a whole window. A step is high when its loss exceeds

    mean + spike_sigma x max(std, REL_STD_FLOOR x mean)

and a spike is spike_steps high steps in a row. Why each part:
- a falling loss (all of healthy training) sits below its running mean, which lags behind it, so it never rises
  above the threshold (on the demo's recorded curve, tests/data/demo-loss-curve.json, no step comes within 3
  standard deviations with the defaults);
- a high step does not move the statistics, so a spike cannot raise its own threshold while it is counted;
- one high batch (an unusual document) is noise and passes; a spike (the weights damaged by an update) stays up
  for many steps, so a few steps in a row tell them apart at the price of those few steps;
- the floor on the deviation keeps a very smooth curve (a tiny std) from calling a rise of a few hundredths a
  spike: with the defaults a spike is at least 5 % above the running mean.

Non-finite losses are the skipped steps' business (train.max_skipped_steps) and are passed over here.

The detector's state is a plain dict kept in the run's progress, so it travels in checkpoints: a resumed run
judges at once, without a second warm-up.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from hvdlm.errors import InputError

# The deviation a spike is measured in is at least this share of the running mean (see the docstring).
REL_STD_FLOOR = 0.01

# A test hook that makes a real spike: "STEP:FACTOR" multiplies the learning rate of step STEP (as the logs number
# steps, the update that completes it) by FACTOR the first time this process trains that step; "STEP:FACTOR:every"
# does it every time (after a rollback too), so that the spike recurs.
INJECT_LR_ENV = "HVDLM_INJECT_LR_SPIKE"
_injected: set[int] = set()  # the steps whose learning rate this process has multiplied


@dataclass
class Spike:
    """A confirmed spike: its high steps' losses (from `start` to `detected`) and the statistics they broke."""

    start: int  # the first high step
    detected: int  # the step that made spike_steps in a row
    losses: list[float]
    mean: float
    std: float
    threshold: float


@dataclass
class SpikeState:
    """What the detector carries from step to step (and in checkpoints), plus the rollbacks' counts."""

    mean: float = 0.0
    var: float = 0.0  # of the noise: half the running mean square of the step-to-step differences
    last: float = 0.0  # the last loss folded in
    seen: int = 0  # steps folded into the statistics
    streak: list[list] = field(default_factory=list)  # the high steps in a row so far: [step, loss] each
    spike: dict | None = None  # the confirmed spike, until its rollback
    rollbacks: int = 0  # in the whole run
    in_a_row: int = 0  # rollbacks whose spikes came back before the run got past the step it had rolled back from
    rolled_back_from: int = 0  # the step the last rollback went back from

    @classmethod
    def from_dict(cls, d: dict | None) -> SpikeState:
        return cls(**d) if d else cls()

    def to_dict(self) -> dict:
        return asdict(self)  # a new dict (and lists): a save in progress keeps its own copy


class SpikeDetector:
    def __init__(self, sigma: float, steps: int, window: int, state: SpikeState | None = None):
        self.sigma, self.steps, self.window = sigma, steps, window
        self.alpha = 2.0 / (window + 1)
        self.state = state or SpikeState()

    def threshold(self) -> float:
        s = self.state
        return s.mean + self.sigma * max(math.sqrt(s.var), REL_STD_FLOOR * abs(s.mean))

    def observe(self, step: int, loss: float) -> Spike | None:
        """Fold in step `step`'s loss; the spike it confirms, if it does (once per spike)."""
        s = self.state
        if not math.isfinite(loss):
            return None
        if s.in_a_row and step > s.rolled_back_from and not s.streak:
            s.in_a_row = 0  # past the point the last rollback went back from, healthy: that spike is over
        if s.seen >= self.window and loss > self.threshold():
            s.streak.append([step, loss])
            if len(s.streak) == self.steps and s.spike is None:
                spike = Spike(s.streak[0][0], step, [x for _, x in s.streak], s.mean, self.std(), self.threshold())
                s.spike = asdict(spike)
                return spike
            return None
        s.streak = []
        self._fold(loss)
        return None

    def std(self) -> float:
        return math.sqrt(self.state.var)

    def _fold(self, loss: float) -> None:
        """The exponentially weighted mean, and the noise from the step-to-step differences."""
        s = self.state
        if s.seen == 0:
            s.mean, s.var = loss, 0.0
        else:
            s.mean += self.alpha * (loss - s.mean)
            half_square = (loss - s.last) ** 2 / 2
            s.var = half_square if s.seen == 1 else (1 - self.alpha) * s.var + self.alpha * half_square
        s.last = loss
        s.seen += 1


def injected_lr_factor(step: int) -> float:
    """The learning-rate multiplier INJECT_LR_ENV asks for at step `step` (1: none)."""
    spec = os.environ.get(INJECT_LR_ENV)
    if not spec:
        return 1.0
    parts = spec.split(":")
    try:
        at, factor = int(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise InputError(
            f"{INJECT_LR_ENV}={spec!r} is not STEP:FACTOR[:every] (e.g. 12:1000): unset it, or write it so."
        ) from None
    every = parts[2:] == ["every"]
    if step != at or (step in _injected and not every):
        return 1.0
    _injected.add(step)
    return factor
