"""Run under `mpirun -np P`: tensor parallelism in 16-bit floats (bf16, and fp16 where CPUs allow), on CPU ranks.

MPI cannot sum bf16 (mpi4py passes it as MPI.BYTE) nor fp16, so the collectives sum them in fp32 and round once;
what only moves data (allgather, broadcast) travels as 16-bit words. Checks:
- the collectives: exactly the fp32 sum rounded to the dtype, and the data moved bit for bit;
- the GPT under bf16 autocast, TP=P against TP=1 in bf16: the difference is bf16 rounding noise, measured
  against the distance of TP=1 bf16 from TP=1 fp32 (the noise bf16 itself brings).
Each check is ok at an error of 0 (tests/rank_checks.py runs them; rank 0 prints a JSON line per check);
tests/test_tp_bf16.py reads them.
"""

from __future__ import annotations

import sys

import torch
from rank_checks import G, P, R, check, gpt_and_its_shard, rnd, run_checks

from hvdlm.config import ModelConfig
from hvdlm.model import GPT
from hvdlm.parallel import collectives
from hvdlm.parallel.layers import shard


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> float:
    """Elements whose bits differ (0 when a and b are the same tensor bit for bit)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    return float((a.view(torch.int16) != b.view(torch.int16)).sum())


@check
def collectives_in_16_bit_floats_are_exact():
    errs = {}
    for dtype in (torch.bfloat16, torch.float16):
        tag = str(dtype).removeprefix("torch.")
        x = rnd(3, 4 * P, seed=1, dtype=dtype) + R  # different on every rank
        all_x = [rnd(3, 4 * P, seed=1, dtype=dtype) + r for r in range(P)]
        total = sum(t.float() for t in all_x).to(dtype)  # the fp32 sum, rounded once
        out = collectives.allreduce(x, G)
        errs[f"{tag}_allreduce_dtype"] = float(out.dtype != dtype)
        errs[f"{tag}_allreduce"] = bits_differ(out, total)
        errs[f"{tag}_allreduce_max"] = bits_differ(collectives.allreduce(x, G, op="max"), torch.stack(all_x).amax(0))
        errs[f"{tag}_allgather_dim0"] = bits_differ(collectives.allgather(x, G, dim=0), torch.cat(all_x, 0))
        errs[f"{tag}_allgather_dim-1"] = bits_differ(collectives.allgather(x, G, dim=-1), torch.cat(all_x, -1))
        errs[f"{tag}_reduce_scatter_dim-1"] = bits_differ(
            collectives.reduce_scatter(x, G, dim=-1), total.chunk(P, -1)[R]
        )
        b = x.clone()
        collectives.broadcast_(b, G, root=P - 1)
        errs[f"{tag}_broadcast"] = bits_differ(b, all_x[P - 1])
        strided = x.clone().t()  # not contiguous: broadcast_ must still write into it
        collectives.broadcast_(strided, G, root=P - 1)
        errs[f"{tag}_broadcast_strided"] = bits_differ(strided.contiguous(), all_x[P - 1].t().contiguous())
        before = G.bytes_moved
        collectives.allreduce(torch.ones(10, dtype=dtype), G)
        errs[f"{tag}_bytes_counted_off_by"] = abs(G.bytes_moved - before - 20)
    return errs


def _loss_and_grads(model: GPT, idx, tgt, dtype) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(idx, tgt)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@check
def gpt_tp_in_bf16_tracks_tp1_in_bf16():
    cfg = ModelConfig(n_layer=2, n_head=2 * P, d_model=16 * P, seq_len=16, vocab_size=256 + 1)
    ref, par, idx, tgt = gpt_and_its_shard(cfg, seed=60, batch=4)
    loss32, g32 = _loss_and_grads(ref, idx, tgt, torch.float32)
    loss16, g16 = _loss_and_grads(ref, idx, tgt, torch.bfloat16)
    loss_tp, g_tp = _loss_and_grads(par, idx, tgt, torch.bfloat16)
    specs = {n: getattr(p, "tp_shard", None) for n, p in par.named_parameters()}

    def cut(name, t):
        return shard(t, specs[name], R, P) if specs[name] is not None else t

    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3); the noise floor is what bf16 does to TP=1.
    noise_loss = abs(loss16 - loss32) / abs(loss32)
    errs = {"loss": abs(loss_tp - loss16) / abs(loss16)}
    worst_noise = {"loss": noise_loss}
    for name in g_tp:
        errs[f"grad:{name}"] = _rel(g_tp[name], cut(name, g16[name]))
        worst_noise[f"grad:{name}"] = _rel(cut(name, g16[name]), cut(name, g32[name]))
    # Within bf16 noise: no worse than 2x bf16's own distance from fp32, plus a floor of a few bf16 ulps.
    excess = {k: errs[k] - (2 * worst_noise[k] + 8 * 2**-9) for k in errs}
    worst = max(errs, key=lambda k: excess[k])
    return excess, f"{worst}: tp-vs-tp1 {errs[worst]:.2e}, bf16 noise {worst_noise[worst]:.2e}"


if __name__ == "__main__":
    sys.exit(run_checks(0.0))
