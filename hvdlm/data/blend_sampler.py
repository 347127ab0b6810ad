"""The training order of a blend of datasets, exact across resume and world size, and a blend's validation sets.

The blend's global order interleaves its datasets by a fixed schedule, the same on every rank and needing no
random numbers. Within each PERIOD (hvdlm.data.blend) sequences, where dataset d has a share of q_d, slot i goes to
the dataset that lags its target the most: the largest q_d x (i + 1) - PERIOD x c_d, where c_d counts d's slots
before i (ties to the earlier dataset), in integers, so exactly alike on every machine. Megatron-LM's blended
dataset orders its samples by the same kind of rule (build_blending_indices, in floating point). Each dataset's
count stays within about one sequence of its target (at most 1.12 in 40 random blends of up to 40 datasets), so
over any window of 1,000 consecutive sequences it is within 2 of 1,000 x its share, however many datasets there are
(tests/test_blend_sampler.py checks every window). Each period ends with every dataset exactly at its share, so the
schedule repeats: a dataset is taken only while it lags, so none ever gets a whole sequence ahead, and at a period's
end the lags are whole sequences adding up to 0.

Global sequence i is sequence p * q_d + r of dataset d, where p = i // PERIOD, d = pattern[i % PERIOD] and r counts
d's earlier slots in the pattern; that index goes through the dataset's own global order (a seeded permutation per
epoch, hvdlm.data.sampler.WindowSampler), so a small dataset with a large share repeats epochs sooner. The whole
position is one number, the sequences of the blend's global order consumed, and a step's global batch is the
next batch_size x dp of them, rank r taking its r-th block of batch_size, as for one dataset: so a restart on
any number of ranks continues with exactly the next sequences.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hvdlm.config import DataConfig
from hvdlm.data.blend import PERIOD, BlendPart, blend_parts
from hvdlm.data.dataset import Dataset, TokenSplit, open_dataset
from hvdlm.data.sampler import WindowSampler, split_windows
from hvdlm.errors import InputError
from hvdlm.units import format_count


@functools.lru_cache(maxsize=8)
def schedule(shares: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One period of the blend: the dataset of each of its sum(shares) slots, and how many slots of that dataset
    come before it in the period. (A loop over the slots, about 0.1 s for 65,536: once per run.)"""
    weights = np.asarray(shares, dtype=np.int64)
    period = int(weights.sum())
    owner = np.empty(period, dtype=np.int64)
    lag = np.zeros(len(shares), dtype=np.int64)  # q_d x i - period x c_d: how far each dataset is behind, x period
    for i in range(period):
        lag += weights
        d = int(lag.argmax())  # the first of equal lags
        owner[i] = d
        lag[d] -= period
    nth = np.empty(period, dtype=np.int64)
    for d in range(len(shares)):
        slots = np.flatnonzero(owner == d)
        nth[slots] = np.arange(len(slots))
    owner.flags.writeable = nth.flags.writeable = False  # shared by every sampler of the same shares
    return owner, nth


def part_sampler(part: BlendPart, split: TokenSplit, *args, **kwargs) -> WindowSampler:
    """The WindowSampler of one dataset of a blend (WindowSampler's arguments after the split); its errors (a split
    with no window) name the dataset."""
    try:
        return WindowSampler(split, *args, **kwargs)
    except InputError as e:
        raise InputError(f"data.blend's dataset '{part.name}' ({part.path}): {e}") from None


class BlendSampler:
    """The training batches of a blend: the interface of WindowSampler (take, next_batch, state_dict, ...)."""

    def __init__(
        self,
        splits: Sequence[TokenSplit],
        parts: Sequence[BlendPart],
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.parts, self.batch_size, self.dp_rank, self.dp_size = list(parts), batch_size, dp_rank, dp_size
        self.seq_len = seq_len
        self.shares = np.array([p.share for p in parts], dtype=np.int64)
        self.period = int(self.shares.sum())
        self.owner, self.nth = schedule(tuple(self.shares.tolist()))
        # Each dataset's own global order; the first keeps the order it has alone, so a blend of one dataset trains
        # exactly as data.dataset does.
        self.sources = [
            part_sampler(parts[d], split, seq_len, batch_size, 0, 1, seed, stream=(d,) if d else ())
            for d, split in enumerate(splits)
        ]
        self._consumed = 0  # sequences of the blend's global order taken so far, by all ranks together

    @property
    def consumed(self) -> int:
        return self._consumed

    @property
    def seed(self) -> int:
        return self.sources[0].seed

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The dataset of each global-order position, and the position in that dataset's own global order."""
        cycle, slot = np.divmod(positions, self.period)
        owner = self.owner[slot]
        return owner, cycle * self.shares[owner] + self.nth[slot]

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The datasets and window ids of this rank's next batch; every rank advances past the whole global batch."""
        owner, ids, order = self._next_ids()
        in_batch = np.empty((2, len(ids)), dtype=np.int64)
        in_batch[:, order] = owner, ids
        return in_batch[0], in_batch[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y of this rank's next batch, both (B, T) int64."""
        owner, ids, order = self._next_ids()
        by_dataset = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)  # (B, T + 1), rows grouped by dataset
        for d, rows in self._segments(owner):
            self.sources[d].window_array(ids[rows], out=by_dataset[rows])
        w = np.empty_like(by_dataset)
        w[order] = by_dataset
        return split_windows(w)

    def _next_ids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's next batch grouped by dataset (a stable sort of the rows): the datasets, the window ids, and
        each row's place in the batch. Each dataset's rows are one slice, so each costs a few whole-array steps."""
        start = self._consumed + self.dp_rank * self.batch_size
        owner, index = self.locate(np.arange(start, start + self.batch_size))
        order = np.argsort(owner, kind="stable")
        owner, index = owner[order], index[order]
        ids = np.empty_like(index)
        for d, rows in self._segments(owner):
            ids[rows] = self.sources[d].samples_at(index[rows])
        self._consumed += self.batch_size * self.dp_size
        return owner, ids, order

    def _segments(self, grouped: np.ndarray):
        """(dataset, slice of its rows) of the datasets present in `grouped` (dataset indices, sorted)."""
        ends = np.cumsum(np.bincount(grouped, minlength=len(self.sources))).tolist()
        start = 0
        for d, end in enumerate(ends):
            if end > start:
                yield d, slice(start, end)
            start = end

    def describe(self) -> str:
        """The blend, for the run's log."""
        return ", ".join(
            f"{p.name} {p.fraction:.1%} ({s.samples_per_epoch:,} windows per epoch, {p.path})"
            for p, s in zip(self.parts, self.sources)
        )

    # --- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the job is: `samples` sequences of the blend's order consumed. The datasets' windows per epoch and
        shares check that a restored state meets the same blend."""
        return {
            "samples": self._consumed,
            "seed": self.seed,
            "blend": [p.name for p in self.parts],
            "windows": [s.samples_per_epoch for s in self.sources],
            "shares": self.shares.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "blend" not in state:
            raise InputError(
                "the checkpoint's data position is in one dataset (data.dataset), and this job trains on a blend "
                "([[data.blend]]): resume with the run's data, or start a new run from its weights with --init-from."
            )
        theirs = list(zip(state["blend"], state["windows"], state["shares"]))
        ours = list(zip(*(self.state_dict()[key] for key in ("blend", "windows", "shares"))))
        if [(w, q) for _, w, q in theirs] != [(w, q) for _, w, q in ours]:
            raise InputError(
                f"the checkpoint's data position is in another blend than this job's: the run's is "
                f"{_blend_text(theirs)}; this job's is {_blend_text(ours)} (windows per epoch at this model.seq_len, "
                f"and sequences of every {PERIOD:,}). Resume with the run's [[data.blend]] and model.seq_len, or "
                "start a new run from its weights with --init-from."
            )
        for source in self.sources:
            source.seed = int(state["seed"])
            source.load_state_dict({**source.state_dict(), "seed": int(state["seed"])})
        self._consumed = int(state["samples"])


def _blend_text(entries: list[tuple]) -> str:
    return " and ".join(f"{name} ({windows:,} windows, {share:,} sequences)" for name, windows, share in entries)


@dataclass
class ValidationSets:
    """The validation batches of a run, by dataset: one unnamed set for a run on one dataset, one per part of a
    blend. The overall validation loss is the mean of the sets' losses weighted by the blend's shares, the loss
    of validation data drawn as the training data is."""

    samplers: dict[str, WindowSampler]  # "" for the one dataset of a run without a blend
    fractions: dict[str, float]

    def overall(self, losses: dict[str, float]) -> float:
        return sum(self.fractions[name] * loss for name, loss in losses.items())

    def by_name(self, losses: dict[str, float]) -> dict[str, float]:
        """The metrics row's per-dataset entries, val_loss/NAME (none without a blend)."""
        return {f"val_loss/{name}": loss for name, loss in losses.items() if name}


@dataclass(frozen=True)
class Blend:
    """A blend's datasets, opened (memory-mapped), with what the trainer asks of its data: the tokenizer, which
    all of them share (hvdlm.data.blend.check_blend)."""

    parts: tuple[BlendPart, ...]
    datasets: tuple[Dataset, ...]

    @property
    def tokenizer(self):
        return self.datasets[0].tokenizer

    @property
    def vocab_size(self) -> int:
        return self.datasets[0].vocab_size

    @property
    def meta(self) -> dict:
        return self.datasets[0].meta


def open_blend(data: DataConfig) -> Blend:
    parts = tuple(blend_parts(data))
    return Blend(parts, tuple(open_dataset(part.path) for part in parts))


def make_samplers(
    data: Dataset | Blend, seq_len: int, batch_size: int, dp_rank: int, dp_size: int, seed: int
) -> tuple[WindowSampler | BlendSampler, ValidationSets]:
    """The training sampler and the validation sets of one dataset or of a blend."""
    if isinstance(data, Dataset):
        train = WindowSampler(data.train, seq_len, batch_size, dp_rank, dp_size, seed)
        val = WindowSampler(data.val, seq_len, batch_size, dp_rank, dp_size, seed)
        return train, ValidationSets({"": val}, {"": 1.0})
    splits = [d.train for d in data.datasets]
    train = BlendSampler(splits, data.parts, seq_len, batch_size, dp_rank, dp_size, seed)
    val = {
        part.name: part_sampler(part, d.val, seq_len, batch_size, dp_rank, dp_size, seed)
        for part, d in zip(data.parts, data.datasets)
    }
    return train, ValidationSets(val, {part.name: part.fraction for part in data.parts})


def describe_data(data: Dataset | Blend, train: WindowSampler | BlendSampler) -> str:
    """The run's data, for its first log line."""
    if isinstance(data, Dataset):
        return (
            f"data {format_count(len(data.train))} train / {format_count(len(data.val))} val {data.tokenizer.kind} "
            f"tokens ({train.samples_per_epoch:,} windows per epoch) from {data.path}"
        )
    tokens = sum(len(d.train) for d in data.datasets)
    return f"data: a blend of {format_count(tokens)} train {data.tokenizer.kind} tokens: {train.describe()}"
