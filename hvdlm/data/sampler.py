"""Which windows each data-parallel rank trains on, and exactly where in the data the run is.

Samples are the non-overlapping windows of seq_len + 1 tokens in each shard (window k of a shard starts at token
k * seq_len; inputs are its first seq_len tokens, targets the last seq_len). Epoch e visits all of them in the
order of a permutation seeded with (seed, e); the epochs laid end to end are the run's *global order*, and the
sampler's whole state is how many samples of it the job has consumed: (epoch, position, seed).

A step's global batch is the next batch_size x dp_size samples of the global order; data-parallel rank r takes
its r-th contiguous block of batch_size. So:
  - the ranks' batches are disjoint and every rank computes its own without talking to the others;
  - 2 ranks with batch B see exactly the samples 1 rank with batch 2B sees;
  - the tensor-parallel ranks of one replica pass the same dp_rank and get the same samples;
  - a job restarted from the state on another number of ranks continues with the same next samples.
"""

from __future__ import annotations

import numpy as np
import torch

from hvdlm.data.dataset import TokenSplit
from hvdlm.errors import InputError

# Evaluation windows come from their own permutation (a seed word no epoch uses), so every evaluation of a run
# measures the same validation windows and the curve is comparable over time.
_EVAL_STREAM = 0x5EED_E7A1


class WindowSampler:
    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        stream: tuple[int, ...] = (),
    ):
        """`stream`: words added to the seed of each epoch's permutation, so that the datasets of a blend
        (hvdlm.data.blend_sampler) each have an order of their own."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        # Plain ndarray views of the memory maps: indexing a np.memmap object costs more than the read itself.
        self.shards = tuple(np.asarray(s) for s in split.shards)
        self._span = np.arange(seq_len + 1)
        self.seq_len, self.batch_size, self.dp_rank, self.dp_size, self.seed = (
            seq_len,
            batch_size,
            dp_rank,
            dp_size,
            seed,
        )
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self._first = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first window
        self.samples_per_epoch = int(self._first[-1])
        if self.samples_per_epoch == 0:
            what = "validation" if split.name == "val" else split.name
            longest = max((len(x) for x in self.shards), default=0)
            raise InputError(
                f"the {what} split ({len(split):,} tokens in {len(self.shards)} shards, the longest {longest:,}) "
                f"holds no window of {seq_len} + 1 tokens, and windows never cross shard boundaries. Use more "
                "data, a shorter model.seq_len, a larger --shard-tokens (if the shards are small), or for the "
                "validation split a larger --val-fraction."
            )
        self.stream = stream
        self._consumed = 0  # samples of the global order taken so far, by all ranks together
        self._orders: dict[int, np.ndarray] = {}  # epoch -> permutation of its samples
        self._eval_order: np.ndarray | None = None

    # --- the global order -------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # positions only move forward: keep the two newest epochs' orders
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, *self.stream, epoch]).permutation(
                self.samples_per_epoch
            )
        return self._orders[epoch]

    @property
    def consumed(self) -> int:
        """Samples of the global order taken so far, by all ranks together."""
        return self._consumed

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at ascending global-order positions (which may run past the end of an epoch into the next)."""
        first, last = positions[0] // self.samples_per_epoch, positions[-1] // self.samples_per_epoch
        if first == last:  # the common case, in one epoch (positions ascend)
            return self._order(int(first))[positions - first * self.samples_per_epoch]
        epochs, within = np.divmod(positions, self.samples_per_epoch)
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._order(int(e))[within[mask]]
        return out

    def take(self) -> np.ndarray:
        """Sample ids of this rank's next batch; every rank advances past the whole global batch."""
        start = self._consumed + self.dp_rank * self.batch_size
        ids = self.samples_at(np.arange(start, start + self.batch_size))
        self._consumed += self.batch_size * self.dp_size
        return ids

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y of this rank's next batch, both (B, T) int64."""
        return self.windows(self.take())

    def windows(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return split_windows(self.window_array(ids))

    def window_array(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The windows of `ids`, (len(ids), T + 1) int64, written into `out` when given."""
        w = np.empty((len(ids), self.seq_len + 1), dtype=np.int64) if out is None else out
        if len(self.shards) == 1:
            w[:] = self.shards[0][(ids * self.seq_len)[:, None] + self._span]
            return w
        shard = np.searchsorted(self._first, ids, side="right") - 1
        starts = (ids - self._first[shard]) * self.seq_len
        for s in np.unique(shard):
            rows = shard == s
            w[rows] = self.shards[s][starts[rows, None] + self._span]
        return w

    # --- evaluation ---------------------------------------------------------------------------------------

    def eval_ids(self, index: int) -> np.ndarray:
        """This rank's share of evaluation batch `index`: the same windows at every evaluation of a run."""
        if self._eval_order is None:
            self._eval_order = np.random.default_rng([self.seed, _EVAL_STREAM]).permutation(self.samples_per_epoch)
        order = self._eval_order
        start = (index * self.dp_size + self.dp_rank) * self.batch_size
        return order[np.arange(start, start + self.batch_size) % self.samples_per_epoch]

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(self.eval_ids(index))

    # --- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Where the job is: the next sample is number `position` of epoch `epoch` (samples_per_epoch checks
        that a restored state meets the same data and seq_len)."""
        epoch, position = divmod(self._consumed, self.samples_per_epoch)
        return {"epoch": epoch, "position": position, "seed": self.seed, "samples_per_epoch": self.samples_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "blend" in state:
            raise InputError(
                f"the checkpoint's data position is in a blend of datasets ({', '.join(state['blend'])}), and this "
                "job trains on one dataset: resume with the run's [[data.blend]], or start a new run from its "
                "weights with --init-from."
            )
        if state.get("samples_per_epoch", self.samples_per_epoch) != self.samples_per_epoch:
            raise InputError(
                f"the checkpoint's data position is for {state['samples_per_epoch']:,} samples per epoch, but this "
                f"dataset with seq_len {self.seq_len} has {self.samples_per_epoch:,}: resume with the dataset and "
                "model.seq_len the run was started with."
            )
        self.seed = int(state["seed"])
        self._orders.clear()
        self._eval_order = None
        self._consumed = int(state["epoch"]) * self.samples_per_epoch + int(state["position"])


def split_windows(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) each, of windows (B, T + 1)."""
    w = torch.from_numpy(w)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()
