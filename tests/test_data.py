import numpy as np
import pytest
import torch

from hvdlm.data import WindowSampler, load_corpus
from hvdlm.data.corpus import is_validation, stdlib_files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a cache of the module's own, for the whole module
        mp.setenv("HVDLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_corpus("stdlib", 0.05)


def test_stdlib_corpus_is_real_source_text(corpus):
    total = sum(p.stat().st_size for p in stdlib_files())
    assert len(corpus.train) + len(corpus.val) >= total  # every file, plus separators
    assert 0.01 < len(corpus.val) / len(corpus.train) < 0.15
    assert b"def " in bytes(corpus.train[:100_000]) and b"import" in bytes(corpus.val[:100_000])


def test_split_is_by_document_and_stable():
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    first = [is_validation(n, 0.05) for n in names]
    assert first == [is_validation(n, 0.05) for n in names]
    assert 50 < sum(first) < 150


def test_second_load_reuses_the_cache(corpus):
    again = load_corpus("stdlib", 0.05)
    assert again.directory == corpus.directory
    assert np.array_equal(again.val, corpus.val)


def test_ranks_get_disjoint_slices_of_one_global_batch(corpus):
    one = WindowSampler(corpus.train, 32, batch_size=8, dp_rank=0, dp_size=1, seed=3)
    halves = [WindowSampler(corpus.train, 32, batch_size=4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for step in range(5):
        x1, y1 = one.batch(step)
        parts = [h.batch(step) for h in halves]
        assert torch.equal(x1, torch.cat([p[0] for p in parts]))
        assert torch.equal(y1, torch.cat([p[1] for p in parts]))
        a, b = (set(h.offsets(step).tolist()) for h in halves)
        assert not a & b


def test_targets_are_inputs_shifted_by_one(corpus):
    x, y = WindowSampler(corpus.train, 32, batch_size=2, dp_rank=0, dp_size=1, seed=0).batch(0)
    assert x.shape == y.shape == (2, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_eval_batches_are_fixed_and_differ_from_training(corpus):
    s = WindowSampler(corpus.val, 32, batch_size=4, dp_rank=0, dp_size=1, seed=0)
    assert torch.equal(s.eval_batch(0)[0], s.eval_batch(0)[0])
    assert not torch.equal(s.eval_batch(0)[0], s.batch(0)[0])
