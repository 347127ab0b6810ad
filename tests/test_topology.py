"""The pure parts of tensor parallelism, in one process: rank arithmetic, config checks, sharding, layout-independent
initialisation, checkpoint merge and reshard (a TP group of size p is built without communicating)."""

import math

import pytest
import torch

from hvdlm.checkpoint.format import training_state
from hvdlm.checkpoint.reshard import load_model, load_optimizer, merge_states
from hvdlm.config import ModelConfig, TrainConfig, load_config
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.optim.torch_optimizers import make_optimizer
from hvdlm.parallel.layers import Sharding, merge, shard
from hvdlm.parallel.topology import (
    IDLE_CYCLE_MS,
    GridPosition,
    Group,
    all_dp_groups,
    check_layout,
    dp_group_ranks,
    dp_rank_of,
    horovod_cycle_ms,
    tp_group_ranks,
    tp_rank_of,
)


def test_horovod_idles_at_a_long_cycle_only_where_one_replica_sends_it_nothing():
    idle = f"{IDLE_CYCLE_MS:g}"
    assert horovod_cycle_ms("5", dp=1, quiet_alone=True) == idle  # hvdlm launch's CPU cycle, lengthened
    assert horovod_cycle_ms(None, dp=1, quiet_alone=True) == idle  # Horovod's own default, too
    assert horovod_cycle_ms("500", dp=1, quiet_alone=True) == "500"  # a longer one is kept
    assert horovod_cycle_ms("5", dp=2, quiet_alone=True) is None  # replicas average gradients through Horovod
    assert horovod_cycle_ms("5", dp=1, quiet_alone=False) is None  # GPU tensors, ZeRO or local SGD use it


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 1), (2, 2), (4, 2), (8, 2), (8, 4), (12, 3)])
def test_groups_tile_the_world(world, tp):
    tp_groups = {tuple(tp_group_ranks(r, tp)) for r in range(world)}
    dp_groups = {tuple(g) for g in all_dp_groups(world, tp)}
    assert sorted(r for g in tp_groups for r in g) == list(range(world))  # a partition
    assert sorted(r for g in dp_groups for r in g) == list(range(world))
    assert len(tp_groups) == world // tp and len(dp_groups) == tp
    for r in range(world):
        tg, dg = tp_group_ranks(r, tp), dp_group_ranks(r, world, tp)
        assert tg == list(range(tg[0], tg[0] + tp))  # TP ranks are adjacent
        assert set(tg) & set(dg) == {r}  # a rank meets each other rank in at most one group
        assert tg[tp_rank_of(r, tp)] == r and dg[dp_rank_of(r, tp)] == r
        assert all(tp_rank_of(q, tp) == tp_rank_of(r, tp) for q in dg)  # a DP group holds one shard


def test_the_example_of_the_docstring():
    assert [tp_group_ranks(r, 2) for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all_dp_groups(4, 2) == [[0, 2], [1, 3]]
    layout = GridPosition(rank=3, world=4, tp=2)
    assert (layout.tp_rank, layout.dp_rank, layout.dp, layout.dp_ranks) == (1, 1, 2, [1, 3])


def test_tp_must_divide_the_world():
    with pytest.raises(InputError, match=r"parallel.tp = 4 does not divide the number of ranks \(6\).*\[1, 2, 3, 6\]"):
        check_layout(6, 4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.tp=3"], r"parallel.tp = 3 does not divide model.n_head \(4\)"),
        (["parallel.tp=8", "model.n_head=4"], r"parallel.tp = 8 does not divide model.n_head \(4\)"),
        (["parallel.tp=0"], r"'parallel.tp' must be positive, got 0"),
    ],
)
def test_config_refuses_tp_that_does_not_split_the_model(overrides, message):
    with pytest.raises(InputError, match=message):
        load_config(None, overrides)


def test_config_accepts_tp_that_splits_the_model():
    assert load_config(None, ["parallel.tp=4", "model.n_head=4"]).parallel.tp == 4


SPLITS = [(Sharding(0, 10), (10, 3)), (Sharding(0, 7), (7,)), (Sharding(1, 12, chunks=3), (2, 12))]


# Padding only ever applies to unchunked splits (the vocabulary); q / k / v blocks split evenly (n_head % tp == 0).
@pytest.mark.parametrize(
    "spec,shape,tp", [(s, shape, tp) for s, shape in SPLITS for tp in (1, 2, 3, 4) if s.chunks == 1 or 4 % tp == 0]
)
def test_shard_then_merge_gives_the_tensor_back(spec, shape, tp):
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    shards = [shard(full, spec, r, tp) for r in range(tp)]
    assert all(s.shape[spec.dim] == spec.local_size(tp) for s in shards)
    assert torch.equal(merge(shards, spec), full)


def test_qkv_blocks_are_split_each_on_its_own():
    q, k, v = torch.zeros(4), torch.ones(4), torch.full((4,), 2.0)
    s = shard(torch.cat([q, k, v]), Sharding(0, 12, chunks=3), rank=1, tp=2)
    assert s.tolist() == [0, 0, 1, 1, 2, 2]  # rank 1 gets its half of q, of k and of v


CFG = ModelConfig(n_layer=2, n_head=4, d_model=16, seq_len=8, vocab_size=257)  # 257: padded for tp 2 and 4


def shards_of(cfg, tp, seed=3):
    """The tp shards of a model, built one rank at a time: construction does not communicate."""
    out = []
    for r in range(tp):
        torch.manual_seed(seed)
        out.append(GPT(cfg, Group(size=tp, rank=r)))
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_init_holds_the_slices_of_the_unsharded_model(tp):
    torch.manual_seed(3)
    full = dict(GPT(CFG).named_parameters())
    for r, model in enumerate(shards_of(CFG, tp)):
        for name, p in model.named_parameters():
            spec = getattr(p, "tp_shard", None)
            expected = shard(full[name].detach(), spec, r, tp) if spec else full[name]
            assert torch.equal(p.detach(), expected), (name, r)
    assert model.head.weight is model.tok_emb.weight  # tying survives sharding


def test_tp1_with_a_group_of_one_is_the_plain_model():
    torch.manual_seed(3)
    a = GPT(CFG)
    torch.manual_seed(3)
    b = GPT(CFG, Group.single())
    idx = torch.randint(0, 257, (2, 8))
    assert torch.equal(a(idx, idx)[1], b(idx, idx)[1])
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert a.tok_emb.weight.shape == (320, 16)  # 257 rows padded to a multiple of 64 (fast kernels), TP or not


def _states(models, step_once=True):
    states = []
    for r, m in enumerate(models):
        opt = make_optimizer(m, TrainConfig())
        if step_once:  # give AdamW moments to merge
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.01 * (r + 1))
            opt.step()
        states.append(training_state(m, opt, 7, {"model": CFG.__dict__}, r, len(models)))
    return states


def test_merged_shards_load_into_any_tp_size():
    two = shards_of(CFG, 2)
    merged = merge_states(_states(two, step_once=False))
    torch.manual_seed(3)
    ref = GPT(CFG)
    for name, t in ref.state_dict().items():
        full = t.narrow(0, 0, CFG.vocab_size) if name in ("tok_emb.weight", "head.weight") else t  # padding off
        assert torch.equal(merged["model"][name], full), name  # merged 2 shards == the TP=1 model
    for tp in (1, 4):
        for r, model in enumerate(shards_of(CFG, tp, seed=99)):  # other weights, then overwritten by the load
            load_model(model, merged, "ckpt", r, tp)
            expected = shards_of(CFG, tp)[r]
            for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
                assert torch.equal(a, b), (tp, r, name)


def test_merge_also_merges_optimizer_moments():
    merged = merge_states(_states(shards_of(CFG, 2)))
    names = [n for g in merged["tp"]["param_names"] for n in g]
    qkv = names.index("blocks.0.attn.qkv.weight")
    moment = merged["optimizer"]["state"][qkv]["exp_avg"]
    assert moment.shape == (48, 16)
    # rank 0's moments came from grads of 0.01, rank 1's from 0.02, interleaved q / k / v blocks of 8 rows each
    rows = moment[:, 0] / moment[0, 0]
    assert rows.round().tolist() == ([1.0] * 8 + [2.0] * 8) * 3


def test_loading_another_shape_names_the_numbers():
    merged = merge_states(_states(shards_of(CFG, 2), step_once=False))
    other = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=8, vocab_size=257)
    with pytest.raises(InputError, match=r"another shape.*\(257, 16\) there, \(257, 32\) here.*d_model=16.*d_model=32"):
        load_model(GPT(other), merged, "ckpt.pt", 0, 1)


def test_optimizer_moments_reshard_to_any_tp_size():
    merged = merge_states(_states(shards_of(CFG, 2)))
    names = [n for g in merged["tp"]["param_names"] for n in g]
    full_moment = merged["optimizer"]["state"][names.index("blocks.0.mlp.fc.weight")]["exp_avg"]
    for tp in (1, 4):
        for r, model in enumerate(shards_of(CFG, tp)):
            opt = make_optimizer(model, TrainConfig())
            load_optimizer(opt, model, merged, r, tp)
            moment = opt.state[model.blocks[0].mlp.fc.weight]["exp_avg"]
            assert torch.equal(moment, shard(full_moment, model.blocks[0].mlp.fc.weight.tp_shard, r, tp))
            assert opt.state[model.ln_f.weight]["step"] == 1  # replicated state comes through whole
