"""Run under `mpirun -np P`: every tensor-parallel piece against its unsharded reference, on one TP group of P.

Each check builds the reference on every rank from the same seed, the sharded version from slices of it, and
compares forward outputs, input gradients and weight gradients (the weight-gradient shard against the slice of
the reference gradient). tests/rank_checks.py runs them: rank 0 prints one JSON line per check, where
error is the worst absolute difference over all ranks. tests/test_tp_layers.py starts this and reads the lines.
"""

from __future__ import annotations

import math
import sys

import torch
from rank_checks import G, P, R, check, gpt_and_its_shard, rnd, run_checks
from torch import nn
from torch.nn import functional as F

from hvdlm.config import ModelConfig
from hvdlm.optim.clipping import clip_grad_norm
from hvdlm.parallel import collectives
from hvdlm.parallel.layers import (
    VOCAB_MULTIPLE,
    ColumnParallelLinear,
    RowParallelLinear,
    Sharding,
    VocabParallelEmbedding,
    shard,
    vocab_parallel_cross_entropy,
)
from hvdlm.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp

TOL = 1e-5


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


# --- collectives --------------------------------------------------------------------------------------------


@check
def collectives_allreduce_allgather_split_reduce_scatter_broadcast():
    x = rnd(3, 4 * P, seed=1) + R  # different on every rank
    all_x = [rnd(3, 4 * P, seed=1) + r for r in range(P)]
    errs = {
        "allreduce": diff(collectives.allreduce(x, G), sum(all_x)),
        "allreduce_max": diff(collectives.allreduce(x, G, op="max"), torch.stack(all_x).amax(0)),
        "allgather_dim0": diff(collectives.allgather(x, G, dim=0), torch.cat(all_x, 0)),
        "allgather_dim-1": diff(collectives.allgather(x, G, dim=-1), torch.cat(all_x, -1)),
        "split_dim-1": diff(collectives.split(x, G, dim=-1), x.chunk(P, -1)[R]),
        "reduce_scatter_dim0": diff(collectives.reduce_scatter(torch.cat([x] * P, 0), G, dim=0), sum(all_x)),
        "reduce_scatter_dim-1": diff(collectives.reduce_scatter(x, G, dim=-1), sum(all_x).chunk(P, -1)[R]),
    }
    b = x.clone()
    collectives.broadcast_(b, G, root=P - 1)
    errs["broadcast"] = diff(b, all_x[P - 1])
    before = G.bytes_moved
    collectives.allreduce(torch.ones(10), G)
    errs["bytes_counted_off_by"] = abs(G.bytes_moved - before - 40)
    return errs


# --- mappings -----------------------------------------------------------------------------------------------


@check
def mappings_are_mirrored_pairs():
    x = (rnd(2, 4 * P, seed=2) + R).requires_grad_()
    gy = rnd(2, 4 * P, seed=3) * (R + 1)
    all_x = [rnd(2, 4 * P, seed=2) + r for r in range(P)]
    all_gy = [rnd(2, 4 * P, seed=3) * (r + 1) for r in range(P)]
    errs = {}
    y = copy_to_tp(x, G)
    y.backward(gy)
    errs["copy_fwd"], errs["copy_bwd"] = diff(y, x), diff(x.grad, sum(all_gy))
    x.grad = None
    y = reduce_from_tp(x, G)
    y.backward(gy)
    errs["reduce_fwd"], errs["reduce_bwd"] = diff(y, sum(all_x)), diff(x.grad, gy)
    x.grad = None
    y = scatter_to_tp(x, G, dim=-1)
    gs = rnd(*y.shape, seed=4) + R
    y.backward(gs)
    errs["scatter_fwd"] = diff(y, x.chunk(P, -1)[R])
    errs["scatter_bwd"] = diff(x.grad, torch.cat([rnd(*y.shape, seed=4) + r for r in range(P)], -1))
    x.grad = None
    y = gather_from_tp(x, G, dim=-1)
    gg = rnd(*y.shape, seed=5)
    y.backward(gg)
    errs["gather_fwd"], errs["gather_bwd"] = diff(y, torch.cat(all_x, -1)), diff(x.grad, gg.chunk(P, -1)[R])
    return errs


# --- layers -------------------------------------------------------------------------------------------------


def run(layer, x, gy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    return y, x.grad


@check
def column_parallel_linear_matches_nn_linear():
    errs = {}
    for chunks, gather in ((1, False), (1, True), (3, False)):
        torch.manual_seed(10)
        ref = nn.Linear(8, 6 * P, bias=True)
        par = ColumnParallelLinear(8, 6 * P, G, bias=True, chunks=chunks, gather_output=gather)
        spec = Sharding(0, 6 * P, chunks)
        with torch.no_grad():
            par.weight.copy_(shard(ref.weight, spec, R, P))
            par.bias.copy_(shard(ref.bias, spec, R, P))
        x, gy_full = rnd(2, 5, 8, seed=11), rnd(2, 5, 6 * P, seed=12)
        y_ref, gx_ref = run(ref, x, gy_full)
        gy = gy_full if gather else shard(gy_full, Sharding(2, 6 * P, chunks), R, P)
        y, gx = run(par, x, gy)
        tag = f"chunks{chunks}{'_gather' if gather else ''}"
        errs[f"{tag}_out"] = diff(y, y_ref if gather else shard(y_ref, Sharding(2, 6 * P, chunks), R, P))
        errs[f"{tag}_dx"] = diff(gx, gx_ref)
        errs[f"{tag}_dW"] = diff(par.weight.grad, shard(ref.weight.grad, spec, R, P))
        errs[f"{tag}_db"] = diff(par.bias.grad, shard(ref.bias.grad, spec, R, P))
    return errs


@check
def row_parallel_linear_matches_nn_linear():
    errs = {}
    for parallel_input in (True, False):
        torch.manual_seed(20)
        ref = nn.Linear(4 * P, 7, bias=True)
        par = RowParallelLinear(4 * P, 7, G, bias=True, input_is_parallel=parallel_input)
        with torch.no_grad():
            par.weight.copy_(shard(ref.weight, Sharding(1, 4 * P), R, P))
            par.bias.copy_(ref.bias)
        x, gy = rnd(2, 5, 4 * P, seed=21), rnd(2, 5, 7, seed=22)
        y_ref, gx_ref = run(ref, x, gy)
        y, gx = run(par, x.chunk(P, -1)[R] if parallel_input else x, gy)
        tag = "parallel_input" if parallel_input else "full_input"
        errs[f"{tag}_out"] = diff(y, y_ref)
        errs[f"{tag}_dx"] = diff(gx, gx_ref.chunk(P, -1)[R] if parallel_input else gx_ref)
        errs[f"{tag}_dW"] = diff(par.weight.grad, shard(ref.weight.grad, Sharding(1, 4 * P), R, P))
        errs[f"{tag}_db"] = diff(par.bias.grad, ref.bias.grad)
    return errs


@check
def vocab_parallel_embedding_matches_nn_embedding():
    vocab = 4 * P + 3  # not a multiple of P: the last shard carries padding
    torch.manual_seed(30)
    ref = nn.Embedding(vocab, 6)
    par = VocabParallelEmbedding(vocab, 6, G)
    with torch.no_grad():
        par.weight.copy_(shard(ref.weight, par.weight.tp_shard, R, P))  # the layer's own padding
    idx = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(31))
    idx[0, :] = vocab - 1  # the last real token, next to the padding
    gy = rnd(3, 9, 6, seed=32)
    y_ref = ref(idx)
    y_ref.backward(gy)
    y = par(idx)
    y.backward(gy)
    return {
        "out": diff(y, y_ref),
        "dW": diff(par.weight.grad, shard(ref.weight.grad, par.weight.tp_shard, R, P)),
        # Each rank's rows: the fewest multiples of VOCAB_MULTIPLE that hold the vocabulary together.
        "padding_off_by": abs(par.weight.size(0) - math.ceil(vocab / (P * VOCAB_MULTIPLE)) * VOCAB_MULTIPLE),
    }


@check
def vocab_parallel_cross_entropy_matches_f_cross_entropy():
    errs = {}
    for vocab in (5 * P, 5 * P + 1):  # divisible, and padded
        logits = rnd(4, 6, vocab, seed=40) * 3
        targets = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(41))
        targets[0, 0] = vocab - 1
        full = logits.clone().requires_grad_()
        loss_ref = F.cross_entropy(full.view(-1, vocab), targets.view(-1))
        loss_ref.backward()
        local = shard(logits, Sharding(2, vocab), R, P)
        real = max(0, min(local.size(-1), vocab - R * local.size(-1)))  # this rank's real (unpadded) columns
        local[..., real:] = 100.0  # padding that the loss must ignore (a real 100 would dominate the softmax)
        local.requires_grad_()
        before = G.bytes_moved
        loss = vocab_parallel_cross_entropy(local, targets, G, vocab)
        moved = G.bytes_moved - before
        loss.backward()
        ref_grad = shard(full.grad, Sharding(2, vocab), R, P)
        errs[f"v{vocab}_loss"] = abs(loss.item() - loss_ref.item())
        errs[f"v{vocab}_dlogits"] = diff(local.grad[..., :real], ref_grad[..., :real])
        errs[f"v{vocab}_dpadding"] = local.grad[..., real:].abs().max().item() if real < local.size(-1) else 0.0
        # Forward moves 3 floats per token (max; sum of exponentials with the target logit), backward nothing.
        errs[f"v{vocab}_bytes_off_by"] = abs(moved - 3 * 4 * 24)
    return errs


# --- the whole model ----------------------------------------------------------------------------------------


@check
def gpt_shard_matches_the_unsharded_gpt():
    cfg = ModelConfig(n_layer=2, n_head=2 * P, d_model=8 * P, seq_len=12, vocab_size=256 + 1)  # padded vocab
    ref, par, idx, tgt = gpt_and_its_shard(cfg, seed=50, batch=3)
    _, loss_ref = ref(idx, tgt)
    loss_ref.backward()
    _, loss = par(idx, tgt)
    loss.backward()
    errs = {"loss": abs(loss.item() - loss_ref.item()), "logits": diff(par(idx)[0], ref(idx)[0])}
    ref_params = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        spec = getattr(p, "tp_shard", None)
        r = ref_params[name]
        cut = (lambda t: shard(t, spec, R, P)) if spec is not None else (lambda t: t)  # noqa: E731
        errs[f"init:{name}"] = diff(p.detach(), cut(r.detach()))
        errs[f"grad:{name}"] = diff(p.grad, cut(r.grad))
    norm_ref = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
    norm = clip_grad_norm(list(par.parameters()), 0.5, G)
    errs["grad_norm"] = abs(norm.item() - norm_ref.item()) / norm_ref.item()
    for name, p in par.named_parameters():
        spec = getattr(p, "tp_shard", None)
        r = ref_params[name].grad
        errs[f"clipped:{name}"] = diff(p.grad, shard(r, spec, R, P) if spec is not None else r)
    return errs


if __name__ == "__main__":
    sys.exit(run_checks(TOL))
