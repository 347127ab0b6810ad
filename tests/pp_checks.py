"""Run under `mpirun -np P`: the pipeline's point-to-point and schedules, with all P ranks as one pipeline of P
stages (no Horovod: the stages talk through mpi4py alone). tests/test_pipeline.py starts this on 2 ranks (the
training runs there cover middle stages).

Rank 0 prints one JSON line per check (see rank_checks.py). A deadlock would hang the run: the faulthandler ends
it after a while with every rank's traceback instead.
"""

from __future__ import annotations

import faulthandler
import sys

import torch
from rank_checks import P, R, check, rnd, run_checks, world

from hvdlm.config import ModelConfig
from hvdlm.model import GPT
from hvdlm.model.stage import GPTStage
from hvdlm.parallel.p2p import StageLink
from hvdlm.parallel.schedules import StageWork, run_schedule
from hvdlm.parallel.split import even_split
from hvdlm.parallel.topology import Group
from hvdlm.training.memory_account import ActivationMeter

faulthandler.dump_traceback_later(150, exit=True)
PIPE = Group(size=P, rank=R, comm=world.Dup())  # stage R of P
CPU = torch.device("cpu")
FIRST, LAST = R == 0, R == P - 1


def differs(a: torch.Tensor, b: torch.Tensor) -> float:
    """0 if bit-identical, else 1 (an error no tolerance lets through)."""
    return 0.0 if torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a, b) else 1.0


@check
def messages_above_the_eager_limit_both_ways_at_once():
    """8 MB each way between every pair of neighbours at the same time (1F1B's steady state), far above any MPI
    eager limit: blocking sends would wait for each other forever."""
    shape = (2, 1024, 1024)
    link = StageLink(PIPE, shape, torch.float32, CPU)
    from_prev, from_next = link.exchange(
        send_next=None if LAST else rnd(*shape, seed=R),
        send_prev=None if FIRST else rnd(*shape, seed=100 + R),
        recv_prev=not FIRST,
        recv_next=not LAST,
    )
    errs = {"bytes counted": float(link.bytes_sent != (2 - FIRST - LAST) * 8 * 2**20)}
    if not FIRST:
        errs["activation from the previous stage"] = differs(from_prev, rnd(*shape, seed=R - 1))
    if not LAST:
        errs["gradient from the next stage"] = differs(from_next, rnd(*shape, seed=100 + R + 1))
    return errs


@check
def bf16_travels_as_its_16_bit_words():
    x = rnd(4, 8, seed=R, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])  # NaN, infinity, signed zero, subnormal
    link = StageLink(PIPE, (4, 8), torch.bfloat16, CPU)
    got, _ = link.exchange(send_next=None if LAST else x, recv_prev=not FIRST)
    errs = {"bytes: 2 per element": float(link.bytes_sent != (0 if LAST else 64))}
    if not FIRST:
        want = rnd(4, 8, seed=R - 1, dtype=torch.bfloat16)
        want[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
        errs["bits"] = differs(got, want.view(torch.int16))
    return errs


CFG = ModelConfig(n_layer=4, n_head=2, d_model=32, seq_len=16)
M, B = 6, 2  # micro-batches (more than the stages), sequences per micro-batch


def run_stage(schedule: str, wire: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's stage of the GPT after one step's forwards and backwards in `schedule`: its gradients, and its
    peak of saved-activation bytes. A bf16 `wire` runs under bf16 autocast and sends bf16, as training does."""
    data = batches()
    torch.manual_seed(5)
    stage = GPTStage(CFG, even_split(CFG.n_layer, P), R)

    def forward(i: int, inp: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=wire == torch.bfloat16):
            out = stage(data[i][0] if FIRST else inp, data[i][1])
        return out / M if LAST else out.to(wire)

    meter = ActivationMeter(stage)
    work = StageWork(forward, FIRST, LAST, meter=meter)
    run_schedule(schedule, work, StageLink(PIPE, (B, CFG.seq_len, CFG.d_model), wire, CPU), M)
    return {n: p.grad.clone() for n, p in stage.named_parameters()}, meter.peak_bytes


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    shape = (B, CFG.seq_len)
    return [(torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, shape, generator=g)) for _ in range(M)]


@check
def one_f_one_b_equals_gpipe_and_gradient_accumulation():
    """The same gradients, bit for bit, from both schedules; within rounding of one process accumulating the m
    micro-batches' gradients of the whole GPT. 1F1B holds fewer micro-batches' activations on the first stage."""
    (g1, peak_1f1b), (g2, peak_gpipe) = run_stage("1f1b"), run_stage("gpipe")
    torch.manual_seed(5)
    ref = GPT(CFG)
    for x, y in batches():
        (ref(x, y)[1] / M).backward()
    ref_grads = dict(ref.named_parameters())
    errs = {f"1f1b vs gpipe {n}": differs(g1[n], g2[n]) for n in g1}
    for n, g in g1.items():
        if n not in ("tok_emb.weight", "head.weight"):  # the tied weight's gradient is summed by the trainer
            errs[f"vs one process {n}"] = (g - ref_grads[n].grad).abs().max().item()
    if FIRST:  # 1F1B: at most P micro-batches in flight on stage 0 of P; GPipe: all 6
        errs["1f1b peak below gpipe's"] = float(not 0 < peak_1f1b < peak_gpipe)
    detail = {"stage": R, "peak_saved_bytes": {"1f1b": peak_1f1b, "gpipe": peak_gpipe}}
    return errs, detail


@check
def bf16_pipeline_gradients_within_bf16_rounding_of_fp32():
    """bf16 autocast with bf16 activations and gradients on the wire: each gradient within 5% (relative to its
    largest entry) of the fp32 pipeline's; the check fails beyond that."""
    exact, _ = run_stage("1f1b")
    low, _ = run_stage("1f1b", torch.bfloat16)
    rel = {n: ((low[n] - g).abs().max() / g.abs().max()).item() for n, g in exact.items()}
    return {f"beyond 5%: {n}": float(not r <= 0.05) for n, r in rel.items()}, {"stage": R, "worst": max(rel.values())}


if __name__ == "__main__":
    sys.exit(run_checks(tol=1e-6))
