"""The sampler: one global order of windows per epoch, split over data-parallel ranks, with an exact position."""

import numpy as np
import pytest
import torch

from hvdlm.data import TokenSplit
from hvdlm.data.sampler import WindowSampler
from hvdlm.errors import InputError

SEQ = 8


def token_split(lengths=(1001, 333, 70)) -> TokenSplit:
    """Shards whose tokens are their own global positions (mod 65536), so a window tells where it came from."""
    shards, offset = [], 0
    for n in lengths:
        shards.append(np.arange(offset, offset + n, dtype=np.int64) % 65536)
        offset += n
    return TokenSplit(tuple(shards), ())


def samplers(n_ranks: int, batch: int, seed: int = 0, split=None):
    split = split or token_split()
    return [WindowSampler(split, SEQ, batch, r, n_ranks, seed) for r in range(n_ranks)]


def global_stream(ranks: list[WindowSampler], steps: int) -> list[int]:
    """The samples of `steps` global batches, in global order: each step's batches, rank after rank."""
    out = []
    for _ in range(steps):
        for s in ranks:
            out += s.take().tolist()
    return out


def test_windows_are_the_non_overlapping_windows_of_each_shard():
    (s,) = samplers(1, 4)
    # (1001 - 1) // 8 + (333 - 1) // 8 + (70 - 1) // 8 windows: none crosses a shard boundary.
    assert s.samples_per_epoch == 125 + 41 + 8
    x, y = s.windows(np.array([0, 124, 125, 173]))
    assert x[:, 0].tolist() == [0, 992, 1001, 1001 + 333 + 56]
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert x.dtype == torch.int64 and x.shape == (4, SEQ)


@pytest.mark.parametrize("n_ranks", [1, 2, 3])
def test_one_epoch_sees_every_sample_exactly_once(n_ranks):
    ranks = samplers(n_ranks, batch=5)
    n = ranks[0].samples_per_epoch
    steps = -(-n // (5 * n_ranks))  # enough global batches to cover the epoch (the last one runs into the next)
    stream = global_stream(ranks, steps)
    assert sorted(stream[:n]) == list(range(n))
    # The part of the last global batch past the epoch's end is the start of the next epoch, a new permutation.
    next_epoch = np.random.default_rng([0, 1]).permutation(n)
    assert stream[n:] == next_epoch[: len(stream) - n].tolist()
    assert all(s.state_dict()["epoch"] == 1 for s in ranks)


def test_ranks_take_disjoint_blocks_of_one_global_batch():
    one = samplers(1, 12)[0]
    three = samplers(3, 4)
    for _ in range(20):
        x1, y1 = one.next_batch()
        parts = [s.next_batch() for s in three]
        assert torch.equal(x1, torch.cat([p[0] for p in parts])) and torch.equal(y1, torch.cat([p[1] for p in parts]))


def test_the_global_order_does_not_depend_on_world_or_batch_size():
    reference = global_stream(samplers(1, 6), 60)  # 360 samples: two epochs and then some
    assert global_stream(samplers(2, 3), 60) == reference
    assert global_stream(samplers(3, 2), 60) == reference
    assert global_stream(samplers(2, 9), 20) == reference
    # Each epoch has its own order, and another seed another one.
    n = samplers(1, 1)[0].samples_per_epoch
    assert reference[:n] != reference[n : 2 * n] and sorted(reference[:n]) == sorted(reference[n : 2 * n])
    assert global_stream(samplers(1, 6, seed=1), 60) != reference


@pytest.mark.parametrize("new_ranks, new_batch", [(2, 4), (1, 8), (3, 2)])
def test_restored_state_continues_with_exactly_the_remaining_samples(new_ranks, new_batch):
    ranks = samplers(2, 4)
    n = ranks[0].samples_per_epoch
    seen = global_stream(ranks, 7)  # 56 samples into the epoch
    state = ranks[0].state_dict()
    assert state == {"epoch": 0, "position": 56, "seed": 0, "samples_per_epoch": n}
    assert all(s.state_dict() == state for s in ranks)  # every rank knows the same position

    resumed = samplers(new_ranks, new_batch, seed=123)  # the seed comes from the state
    for s in resumed:
        s.load_state_dict(state)
    rest = global_stream(resumed, -(-(n - 56) // (new_ranks * new_batch)))[: n - 56]
    assert sorted(seen + rest) == list(range(n))  # nothing twice, nothing skipped
    uninterrupted = global_stream(samplers(1, 1), n)
    assert seen + rest == uninterrupted


def test_a_state_from_other_data_is_refused():
    state = samplers(1, 4)[0].state_dict()
    other = WindowSampler(token_split((500,)), SEQ, 4, 0, 1, 0)
    with pytest.raises(InputError, match="samples per epoch"):
        other.load_state_dict(state)


def test_evaluation_batches_are_fixed_split_over_ranks_and_apart_from_training():
    one = samplers(1, 8)[0]
    two = samplers(2, 4)
    first = [one.eval_batch(i)[0] for i in range(3)]
    one.next_batch()  # training progress does not move the evaluation windows
    for i in range(3):
        assert torch.equal(one.eval_batch(i)[0], first[i])
        assert torch.equal(first[i], torch.cat([s.eval_batch(i)[0] for s in two]))
    assert len({tuple(one.eval_ids(i)) for i in range(3)}) == 3
    assert not torch.equal(samplers(1, 8)[0].next_batch()[0], first[0])


def test_too_little_data_for_one_window_is_a_clear_error():
    with pytest.raises(
        InputError,
        match="the train split .13 tokens in 2 shards, the longest 8. holds no window of 8 "
        "\\+ 1 tokens, and windows never cross shard boundaries.*--shard-tokens",
    ):
        WindowSampler(token_split((8, 5)), SEQ, 2, 0, 1, 0)
    # 12 tokens would hold a window, but not in two shards of 6.
    val = TokenSplit(token_split((6, 6)).shards, (), "val")
    with pytest.raises(InputError, match="the validation split .12 tokens"):
        WindowSampler(val, SEQ, 2, 0, 1, 0)
