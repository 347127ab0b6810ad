"""The blend sampler: a fixed interleaving of datasets by weight, the same on every rank, with an exact position.

Unit tests on in-memory splits whose tokens tell which dataset and which position they came from; the trainings on
real ranks are in test_blend_training.py.
"""

import numpy as np
import pytest
import torch

from hvdlm.config import BlendSource, DataConfig
from hvdlm.data import TokenSplit
from hvdlm.data.blend import PERIOD, BlendPart, apportion, blend_parts
from hvdlm.data.blend_sampler import BlendSampler, ValidationSets, schedule
from hvdlm.data.sampler import WindowSampler
from hvdlm.errors import InputError

SEQ = 8
# Dataset d's tokens are d * OFFSET + their position in it (shards of 300 and 700 tokens, sizes differ by dataset).
OFFSET = 10_000


def token_split(d: int, lengths=(300, 700)) -> TokenSplit:
    shards, start = [], 0
    for n in lengths:
        shards.append(d * OFFSET + np.arange(start, start + n + 97 * d, dtype=np.int64))
        start += n + 97 * d
    return TokenSplit(tuple(shards), ())


def parts(weights, names=None) -> list[BlendPart]:
    names = names or [f"d{i}" for i in range(len(weights))]
    shares = apportion(list(weights), PERIOD)
    return [BlendPart(n, None, w, q) for n, w, q in zip(names, weights, shares)]


def blend(weights, n_ranks: int, batch: int, seed: int = 0) -> list[BlendSampler]:
    """One sampler per data-parallel rank of a blend of len(weights) datasets."""
    splits = [token_split(d) for d in range(len(weights))]
    return [BlendSampler(splits, parts(weights), SEQ, batch, r, n_ranks, seed) for r in range(n_ranks)]


def global_stream(ranks: list[BlendSampler], steps: int) -> list[tuple[int, int]]:
    """(dataset, window id) of `steps` global batches, in global order."""
    out = []
    for _ in range(steps):
        for s in ranks:
            owner, ids = s.take()
            out += list(zip(owner.tolist(), ids.tolist()))
    return out


WEIGHTS = [
    [0.7, 0.3],
    [1, 1, 1],
    [0.5, 0.3, 0.15, 0.05],
    [0.97, 0.01, 0.01, 0.01],
    [3, 1e-3],
    *[list(np.random.default_rng(k).uniform(0.01, 1, size=k % 4 + 2)) for k in range(6)],
    # Many datasets, one dominant: equal small shares must not bunch up and squeeze the large one.
    [30.0] + [0.1] * 29,
    list(np.random.default_rng(7).pareto(1.0, size=24) + 0.01),
]


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "-".join(f"{x:.3g}" for x in w))
def test_every_window_of_1000_sequences_holds_each_dataset_at_its_weight(weights):
    """Every window of 1,000 consecutive sequences (over three periods, so across their seams too) holds each
    dataset within 2 sequences of weight x 1,000: 0.2 % of the window, well inside the 2 % asked for."""
    (s,) = blend(weights, 1, 1)
    owner, _ = s.locate(np.arange(3 * PERIOD + 1000))
    share = np.asarray(weights) / sum(weights)
    for d in range(len(weights)):
        counts = np.concatenate([[0], np.cumsum(owner == d)])
        window = counts[1000:] - counts[:-1000]  # every window [i, i + 1000)
        worst = np.abs(window - 1000 * share[d]).max()
        assert worst <= 2, f"dataset {d} (weight share {share[d]:.4f}): a window is off by {worst:.2f} sequences"
        assert np.abs(window / 1000 - share[d]).max() <= 0.02
    # Over the long run the shares are the weights' to 1 / PERIOD.
    assert np.abs(np.bincount(owner[:PERIOD], minlength=len(weights)) / PERIOD - share).max() < 1 / PERIOD


def test_shares_add_up_and_stay_within_one_sequence_of_the_weights():
    for weights in WEIGHTS:
        shares = apportion(list(weights), PERIOD)
        assert sum(shares) == PERIOD
        exact = np.asarray(weights) / sum(weights) * PERIOD
        assert np.abs(np.asarray(shares) - exact).max() < 1
    assert apportion([1e300, 1e300], 4) == [2, 2]  # huge weights do not overflow their sum
    assert apportion([1, 1, 1], 4) == [2, 1, 1]  # the spare sequence goes to the earlier of equal weights


def test_the_schedule_is_deterministic_and_puts_each_dataset_in_its_own_order():
    owner, nth = schedule((3, 1))
    # Lags 3 x (i + 1) - 4 c_0 and 1 x (i + 1) - 4 c_1: (3, 1) -> 0; (2, 2), a tie -> 0; (1, 3) -> 1; (4, 0) -> 0.
    assert owner.tolist() == [0, 0, 1, 0] and nth.tolist() == [0, 1, 0, 2]
    shares = tuple(apportion([0.5, 0.3, 0.2], PERIOD))
    a = schedule(shares)
    schedule.cache_clear()
    b = schedule(shares)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.bincount(a[0]).tolist() == list(shares)  # a period ends with every dataset at its share


def test_each_dataset_is_read_in_its_own_global_order_without_skips_or_repeats():
    weights = [0.6, 0.3, 0.1]
    ranks = blend(weights, 2, 5)
    stream = global_stream(ranks, 400)  # 4,000 sequences: several epochs of each dataset
    for d in range(len(weights)):
        own = WindowSampler(token_split(d), SEQ, 1, 0, 1, 0, stream=(d,) if d else ())
        ids = [i for owner, i in stream if owner == d]
        assert ids == own.samples_at(np.arange(len(ids))).tolist()
        # The first dataset has the order it has alone; the others each their own.
        if d == 0:
            assert ids[:50] == WindowSampler(token_split(0), SEQ, 1, 0, 1, 0).samples_at(np.arange(50)).tolist()
    first = WindowSampler(token_split(1), SEQ, 1, 0, 1, 0).samples_at(np.arange(50)).tolist()
    assert [i for owner, i in stream if owner == 1][:50] != first


def test_batches_hold_the_windows_of_their_datasets():
    (s,) = blend([0.5, 0.5], 1, 16)
    owner, ids = s.take()
    s2 = blend([0.5, 0.5], 1, 16)[0]
    x, y = s2.next_batch()
    assert x.shape == y.shape == (16, SEQ) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert (x[:, 0] // OFFSET).tolist() == owner.tolist()  # each row comes from the dataset the schedule names
    for row, d, i in zip(x, owner, ids):
        assert torch.equal(row, s.sources[d].windows(np.array([i]))[0][0])


def test_the_global_order_does_not_depend_on_world_or_batch_size_or_the_rank_asking():
    weights = [0.7, 0.2, 0.1]
    reference = global_stream(blend(weights, 1, 12), 50)
    assert global_stream(blend(weights, 2, 6), 50) == reference
    assert global_stream(blend(weights, 3, 4), 50) == reference
    assert global_stream(blend(weights, 4, 1), 150) == reference
    assert global_stream(blend(weights, 1, 12, seed=1), 50) != reference
    # Ranks take disjoint blocks of each global batch, as with one dataset.
    one, two = blend(weights, 1, 8)[0], blend(weights, 2, 4)
    for _ in range(10):
        x1, _ = one.next_batch()
        assert torch.equal(x1, torch.cat([s.next_batch()[0] for s in two]))


@pytest.mark.parametrize("new_ranks, new_batch", [(2, 4), (1, 8), (4, 2), (3, 1)])
def test_a_restored_state_continues_exactly_on_any_number_of_ranks(new_ranks, new_batch):
    weights = [0.7, 0.3]
    ranks = blend(weights, 2, 4, seed=5)
    seen = global_stream(ranks, 37)  # 296 sequences: past the first epoch of the smaller dataset
    state = ranks[0].state_dict()
    assert all(s.state_dict() == state for s in ranks)
    assert state["samples"] == 296 and state["seed"] == 5 and state["blend"] == ["d0", "d1"]
    resumed = blend(weights, new_ranks, new_batch, seed=99)  # the seed comes from the state
    for s in resumed:
        s.load_state_dict(state)
    rest = global_stream(resumed, 240 // (new_ranks * new_batch))
    assert seen + rest == global_stream(blend(weights, 1, 8, seed=5), (296 + len(rest)) // 8)


def test_a_state_of_another_blend_or_of_one_dataset_is_refused():
    state = blend([0.7, 0.3], 1, 4)[0].state_dict()
    with pytest.raises(
        InputError, match=r"another blend than this job.s: the run.s is d0 \(124 windows, 45,875 sequences\) and d1"
    ):
        blend([0.6, 0.4], 1, 4)[0].load_state_dict(state)
    single = WindowSampler(token_split(0), SEQ, 4, 0, 1, 0)
    with pytest.raises(InputError, match=r"in a blend of datasets \(d0, d1\), and this job trains on one dataset"):
        single.load_state_dict(state)
    with pytest.raises(InputError, match="in one dataset .data.dataset., and this job trains on a blend"):
        blend([0.7, 0.3], 1, 4)[0].load_state_dict(single.state_dict())


def test_a_blend_of_one_dataset_is_that_dataset():
    (s,) = blend([1.0], 1, 6)
    alone = WindowSampler(token_split(0), SEQ, 6, 0, 1, 0)
    for _ in range(40):
        assert torch.equal(s.next_batch()[0], alone.next_batch()[0])


def test_parts_are_named_after_their_directories_and_share_by_weight():
    data = DataConfig(blend=[BlendSource("data/web", 0.75), BlendSource("/x/code/", 0.25, name="src")])
    got = blend_parts(data)
    assert [(p.name, p.share, p.fraction) for p in got] == [("web", 49152, 0.75), ("src", 16384, 0.25)]
    sets = ValidationSets({"web": None, "src": None}, {"web": 0.75, "src": 0.25})
    assert sets.overall({"web": 2.0, "src": 4.0}) == 2.5
    assert sets.by_name({"web": 2.0, "src": 4.0}) == {"val_loss/web": 2.0, "val_loss/src": 4.0}
    assert ValidationSets({"": None}, {"": 1.0}).by_name({"": 3.0}) == {}


def test_a_dataset_without_a_window_is_named():
    splits = [token_split(0), TokenSplit((np.arange(5, dtype=np.int64),), ())]
    with pytest.raises(InputError, match="data.blend's dataset 'd1' .*the train split .5 tokens in 1 shards"):
        BlendSampler(splits, parts([0.5, 0.5]), SEQ, 2, 0, 1, 0)
