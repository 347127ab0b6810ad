"""Run under `mpirun -np 4`: ZeRO-1, ZeRO-2 and ZeRO-3 on a tp 2 x dp 2 grid against Horovod's
DistributedOptimizer, step by step.

Copies of the same model (one TP shard per rank), one driven by the replicated optimizer, one by the ZeroOptimizer,
one by the Zero2Optimizer (buckets of a few thousand bytes: several per shard) and one by the Zero3Optimizer (one
bucket a module, gathered for each pass), as the trainer drives them
through the optimizer interface (2 micro-batches accumulated, reduce_gradients, clip_gradients, step), on batches
that differ between the replicas. Rank 0 prints
one JSON line per check: {"check", "ok", "detail"} (see tests/test_zero.py, which starts this).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import horovod.torch as hvd
import torch
from mpi4py import MPI

from hvdlm.config import JobConfig, ModelConfig, TrainConfig
from hvdlm.model import GPT
from hvdlm.optim import zero as zero_module
from hvdlm.optim.build import build as build_optimizer
from hvdlm.optim.zero import ZeroOptimizer
from hvdlm.parallel.topology import init_topology
from hvdlm.training.memory_account import memory_account

world = MPI.COMM_WORLD
STEPS, MICRO, TOL = 4, 2, 1e-6
NO_SCALING = torch.amp.GradScaler("cuda", enabled=False)  # fp32 and bf16: the trainer's scaler, disabled


def report(name: str, ok: bool, detail) -> None:
    ok = world.allreduce(bool(ok), op=MPI.LAND)
    details = world.gather(detail, root=0)
    if world.Get_rank() == 0:
        print(json.dumps({"check": name, "ok": ok, "detail": details}), flush=True)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().clone().numpy().tobytes())  # a copy: numpy would pin ZeRO-3's resizable storage
    return h.hexdigest()[:12]


def train(model, optimizer, topo, cfg: ModelConfig, tag: str, bf16: bool = False) -> list[tuple[float, float]]:
    """STEPS steps as the trainer takes them; (the global batch's loss, the gradient norm) of each."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    out = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = torch.zeros(())
        for micro in range(MICRO):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + topo.dp_rank)  # the replica's own batch
            x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
            with autocast:
                micro_loss = model(x, torch.roll(x, -1, 1))[1]
            (micro_loss / MICRO).backward()
            loss += micro_loss.detach() / MICRO
        optimizer.reduce_gradients()
        norm = optimizer.clip_gradients(0.5, NO_SCALING)
        optimizer.step(NO_SCALING)
        mean = hvd.allreduce(loss, op=hvd.Average, name=f"loss.{tag}.{step}", process_set=topo.dp_process_set)
        out.append((mean.item(), norm.item()))
    return out


def main() -> int:
    topo = init_topology(2)
    assert world.Get_size() == 4, "run with 4 ranks"
    # Slices of over 8,000 elements in collectives of 4,000: three chunks, the last one short. The checks below
    # then hold for the chunked reduce-scatter and all-gather that large models take.
    zero_module.CHUNK = 4000
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, bias=False)
    tcfg = TrainConfig(lr=3e-3, weight_decay=0.1, accumulation_steps=MICRO, grad_clip=0.5)
    models, results, optimizers = {}, {}, {}
    tcfg = dataclasses.replace(tcfg, zero_bucket_mb=0.005)  # ZeRO-2: 1,310 fp32 elements a bucket
    runs = (
        ("replicated", 0, False),
        ("zero", 1, False),
        ("zero2", 2, False),
        ("zero3", 3, False),
        ("bf16", 0, True),
        ("zero_bf16", 1, True),
        ("zero2_bf16", 2, True),
        ("zero3_bf16", 3, True),
    )
    for name, zero, bf16 in runs:
        torch.manual_seed(100 + world.Get_rank())  # different weights per rank: the initial broadcast must fix that
        models[name] = GPT(cfg, topo.tp_group)
        job = JobConfig(model=cfg, train=dataclasses.replace(tcfg, zero=zero))
        optimizers[name] = build_optimizer(models[name], job, topo)
        results[name] = train(models[name], optimizers[name], topo, cfg, name, bf16)
    (ref, zero), (m_ref, m_zero) = (results["replicated"], results["zero"]), (models["replicated"], models["zero"])

    sharded = (zero, results["zero2"], results["zero3"])
    errors = [abs(a[0] - b[0]) / abs(a[0]) for got in sharded for a, b in zip(ref, got)]
    norm_errors = [abs(a[1] - b[1]) / abs(a[1]) for got in sharded for a, b in zip(ref, got)]
    report("loss_and_norm_at_every_step", max(errors + norm_errors) <= TOL, {"loss": errors, "norm": norm_errors})

    # bf16 autocast: fp32 gradients reduced in fp32. The fp32 runs differ in the last bits of the weights (the
    # clipping norm is summed in another order), which can flip the rounding of a weight to bf16 (8 bits of
    # mantissa): bf16's own tolerance then, far below its 4e-3 resolution.
    bf16 = [results[name] for name in ("zero_bf16", "zero2_bf16", "zero3_bf16")]
    bf16_errors = [abs(a[0] - b[0]) / abs(a[0]) for got in bf16 for a, b in zip(results["bf16"], got)]
    report("bf16_autocast_loss_at_every_step", max(bf16_errors) <= 1e-4, bf16_errors)

    # ZeRO-3 holds only a shard of its weights between passes: the buffers of every unit hold no memory.
    z3 = optimizers["zero3"]
    released = all(p.untyped_storage().nbytes() == 0 for p in models["zero3"].parameters())
    report("zero3_holds_only_its_shard_between_passes", released and z3.shard_numel < 0.6 * z3.flat_numel, None)
    p_ref = m_ref.state_dict()
    with z3.whole_model():  # collective: every rank gathers
        got = [{n: t.clone() for n, t in m.state_dict().items()} for m in (m_zero, models["zero2"], models["zero3"])]
        zero3_digest = world.allgather(digest(models["zero3"]))
    worst = max((p_ref[n] - g[n]).abs().max().item() for g in got for n in p_ref)
    report("final_parameters", worst <= TOL, worst)

    dp_peers = [r for r in range(4) if r % 2 == topo.tp_rank]
    identical = True
    for m in (m_zero, models["zero2"]):
        digests = world.allgather(digest(m))
        identical = identical and len({digests[r] for r in dp_peers}) == 1 and digests[0] != digests[1]
    identical = identical and len({zero3_digest[r] for r in dp_peers}) == 1
    report("replicas_bit_identical", identical, digests)

    cpu = torch.device("cpu")
    mem = {name: memory_account(models[name], optimizers[name], 0, cpu) for name in ("replicated", "zero", "zero2")}
    ratios = [mem[name]["optimizer_mb"] / mem["replicated"]["optimizer_mb"] for name in ("zero", "zero2")]
    report("optimizer_state_per_rank_halved", max(ratios) <= 0.55, {"ratios": ratios, **{n: m for n, m in mem.items()}})

    # The slices assemble (as a checkpoint's slice files do) to the replicated optimizer's state_dict (same layout
    # and parameter order), and loading that into a new ZeRO optimizer (as a resume does) gives back the same slices.
    full = optimizers["zero"].full_state_dict()
    plain = optimizers["replicated"].checkpoint_view().state_dict()
    same_layout = full["state"].keys() == plain["state"].keys()
    moments = max(
        (full["state"][i][k].float() - plain["state"][i][k].float()).abs().max().item()
        for i in plain["state"]
        for k in plain["state"][i]
    )
    again = ZeroOptimizer(models["zero"], dataclasses.replace(tcfg, zero=1), topo)
    again.load_full_state_dict(full)
    back = again.full_state_dict()
    round_trip = all(
        torch.equal(full["state"][i][k], back["state"][i][k]) for i in full["state"] for k in full["state"][i]
    )
    report("checkpoint_state_is_the_plain_one", same_layout and moments <= TOL and round_trip, moments)

    # A non-finite gradient on one rank makes the global norm non-finite on every rank: all replicas skip. ZeRO-2:
    # through a real backward (its hooks reduce the buckets), and the next zero_grad starts clean.
    zo, z2 = optimizers["zero"], optimizers["zero2"]
    zo.zero_grad()
    if world.Get_rank() == 3:
        zo.flat_grads[0] = float("nan")
    z2.zero_grad()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(7))
    loss = models["zero2"](x, torch.roll(x, -1, 1))[1]
    (loss * (float("nan") if world.Get_rank() == 3 else 1.0)).backward()
    # The overlap: backward itself reduced every bucket (their .grads are gone before synchronize is called).
    reduced_in_backward = all(p.grad is None for p in z2.params)
    z3.zero_grad()
    loss = models["zero3"](x, torch.roll(x, -1, 1))[1]
    (loss * (float("nan") if world.Get_rank() == 3 else 1.0)).backward()
    reduced_in_backward = reduced_in_backward and all(p.grad is None for p in z3.params)
    norms = []
    for opt in (zo, z2, z3):
        opt.reduce_gradients()
        norms.append(opt.clip_gradients(1.0, NO_SCALING))
    z2.zero_grad()
    z2.reduce_gradients()
    clean = z2.clip_gradients(1.0, NO_SCALING).item() == 0.0 and all(p.grad is None for p in z2.params)
    seen = not any(torch.isfinite(n).item() for n in norms) and clean
    report("a_non_finite_gradient_on_one_rank_is_seen_by_all", seen, [n.item() for n in norms])
    report("zero2_reduces_the_buckets_during_backward", reduced_in_backward, len(z2.bucket_params))

    hvd.allgather_object(None, name="done")  # Horovod: nobody shuts down while others still communicate
    return 0


if __name__ == "__main__":
    sys.exit(main())
