"""Pipeline benchmark: the bubble, saved activations of 1F1B against GPipe, PP=2 against 1 rank and against
torch.distributed.pipelining, and the bytes sent between stages (one thread per rank).

    python bench/pipeline.py             # d_model 512, n_layer 8: the figures for bench/log/RESULTS.md (--record)
    python bench/pipeline.py --quick     # a small model, to see that it runs

It starts itself under mpirun twice (the `--worker` runs): on 1 rank, the whole GPT accumulating m micro-batches
per step; on 2 ranks, the GPT split into 2 stages (hvdlm.model.stage, hvdlm.parallel.schedules) on random tokens.
A step is the schedule's forwards and backwards, the tied embedding/head gradient summed between the stages, and
an AdamW step; no data parallelism, so no Horovod.

- bubble: the share of the schedule's time a stage spends waiting for a message (StageLink.wait_seconds),
  against the ideal (p - 1) / (m + p - 1), for m in 2, 4, 8;
- peak saved-activation bytes per stage, counted with autograd's saved-tensor hooks, 1F1B against GPipe at m = 8;
- step time at m = 8: PP=2 against 1 rank, and against torch.distributed.pipelining (gloo, Schedule1F1B, the
  same stage modules);
- bytes each stage sent per step against the analytic m x B x T x d x 4 (fp32 activations forward from stage 0,
  their gradients back from stage 1).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def worker(args) -> None:
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rows = single_rank(args) if world.Get_size() == 1 else pipeline(args, world)
    if world.Get_rank() == 0:
        print("RESULT " + json.dumps(rows), flush=True)


def model_config(args):
    from hvdlm.config import ModelConfig

    return ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, seq_len=args.seq_len)


def batches(args, m: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (m, args.batch, args.seq_len + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in idx]


def timed(step, args) -> float:
    """Seconds per step: the mean of args.steps steps after args.warmup."""
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - start) / args.steps


def single_rank(args) -> dict:
    import torch

    from hvdlm.model import GPT

    torch.manual_seed(0)
    model = GPT(model_config(args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    m = 8

    def step() -> None:
        opt.zero_grad()
        for x, y in batches(args, m, 1):
            (model(x, y)[1] / m).backward()
        opt.step()

    return {"one_rank_m8": timed(step, args), "params_M": model.num_params() / 1e6, "torch": torch.__version__}


def pipeline(args, world) -> dict:
    import torch

    from hvdlm.model.stage import GPTStage, tied_parameters
    from hvdlm.parallel.collectives import allreduce
    from hvdlm.parallel.p2p import StageLink
    from hvdlm.parallel.schedules import StageWork, run_schedule
    from hvdlm.parallel.split import even_split
    from hvdlm.parallel.topology import Group
    from hvdlm.training.memory_account import ActivationMeter

    rank, p = world.Get_rank(), world.Get_size()
    pipe = Group(size=p, rank=rank, comm=world.Dup())
    cfg = model_config(args)
    torch.manual_seed(0)
    stage = GPTStage(cfg, even_split(cfg.n_layer, p), rank)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    shape = (args.batch, cfg.seq_len, cfg.d_model)

    def measure(schedule: str, m: int) -> dict:
        data = batches(args, m, 1)
        link = StageLink(pipe, shape, torch.float32, torch.device("cpu"))
        seen = {"schedule_s": 0.0, "wait_s": 0.0, "bytes": 0, "peak_saved": 0}

        def forward(i: int, inp):
            out = stage(data[i][0] if stage.is_first else inp, data[i][1])
            return out / m if stage.is_last else out

        def step() -> None:
            opt.zero_grad()
            meter = ActivationMeter(stage)
            work = StageWork(forward, stage.is_first, stage.is_last, meter=meter)
            wait, sent, start = link.wait_seconds, link.bytes_sent, time.perf_counter()
            run_schedule(schedule, work, link, m)
            seen["schedule_s"] += time.perf_counter() - start
            seen["wait_s"] += link.wait_seconds - wait
            seen["bytes"], seen["peak_saved"] = link.bytes_sent - sent, meter.peak_bytes
            for w in tied_parameters(stage):
                w.grad.copy_(allreduce(w.grad, pipe))  # the tied weight: both stages' gradients summed
            opt.step()

        world.Barrier()
        seconds = timed(step, args)
        steps = args.warmup + args.steps
        mine = {
            "step_s": seconds,
            "idle": seen["wait_s"] / seen["schedule_s"],
            "bytes": seen["bytes"],
            "peak_saved": seen["peak_saved"],
            "analytic_bytes": m * args.batch * cfg.seq_len * cfg.d_model * 4,
            "bubble": (p - 1) / (m + p - 1),
            "steps": steps,
        }
        return {"by_stage": world.gather(mine, root=0)}

    rows = {f"{s}_m{m}": measure(s, m) for s, m in (("1f1b", 2), ("1f1b", 4), ("1f1b", 8), ("gpipe", 8))}
    if not args.no_torch_pipelining:
        rows["torch_1f1b_m8"] = torch_pipelining(args, stage, rank, p)
    return rows


def torch_pipelining(args, stage, rank: int, p: int) -> dict:
    """torch.distributed.pipelining over gloo with the same stage modules and Schedule1F1B at m = 8."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.nn import functional as F

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=rank, world_size=p)

    class Logits(torch.nn.Module):
        """The hvdlm stage, with the last stage returning logits (torch's schedule applies the loss)."""

        def __init__(self):
            super().__init__()
            self.stage = stage

        def forward(self, x):
            s = self.stage
            if s.is_first:
                x = s.drop(s.tok_emb(x) + s.pos_emb(torch.arange(x.size(1))))
            for block in s.blocks.values():
                x = block(x)
            return s.head(s.ln_f(x)) if s.is_last else x

    m = 8
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    pstage = PipelineStage(Logits(), rank, p, torch.device("cpu"))
    schedule = Schedule1F1B(
        pstage, n_microbatches=m, loss_fn=lambda z, y: F.cross_entropy(z.flatten(0, 1), y.flatten())
    )
    data = batches(args, m, 1)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])

    def step() -> None:
        opt.zero_grad()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        opt.step()

    dist.barrier()
    seconds = timed(step, args)
    dist.destroy_process_group()
    return {"step_s": seconds}


def launch(np: int, argv: list[str]) -> dict:
    from ranks import run_worker  # bench/ is on sys.path when this script runs

    return run_worker(__file__, np, argv, f"{np}-rank")


def report(args, one: dict, two: dict) -> list[str]:
    """The figures as markdown lines."""
    lines = [
        f"- model: GPT with {one['params_M']:.1f}M parameters (n_layer {args.n_layer}, d_model {args.d_model}, "
        f"n_head {args.n_head}), micro-batches of {args.batch} x seq_len {args.seq_len}, vocabulary 256, 1 thread "
        f"per rank, {args.steps} timed steps after {args.warmup}; stages of {args.n_layer // 2} layers",
        "",
        "| schedule, m | step ms (PP=2) | idle stage 0 / 1 | ideal bubble | peak saved MB stage 0 / 1 | bytes sent "
        "stage 0 / 1 | analytic |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("1f1b_m2", "1f1b_m4", "1f1b_m8", "gpipe_m8"):
        s0, s1 = two[name]["by_stage"]
        lines.append(
            f"| {name.replace('_m', ', m = ')} | {1000 * max(s0['step_s'], s1['step_s']):.0f} | "
            f"{s0['idle']:.0%} / {s1['idle']:.0%} | {s0['bubble']:.0%} | {s0['peak_saved'] / 2**20:.1f} / "
            f"{s1['peak_saved'] / 2**20:.1f} | {s0['bytes']:,} / {s1['bytes']:,} | {s0['analytic_bytes']:,} |"
        )
    pp2 = two["1f1b_m8"]["by_stage"][0]["step_s"]
    lines += [
        "",
        f"- step time at m = 8: 1 rank {1000 * one['one_rank_m8']:.0f} ms, hvdlm PP=2 1F1B {1000 * pp2:.0f} ms: "
        f"**{one['one_rank_m8'] / pp2:.2f}x** (target >= 1.6x)",
    ]
    if "torch_1f1b_m8" in two:
        theirs = two["torch_1f1b_m8"]["step_s"]
        lines.append(
            f"- torch.distributed.pipelining (gloo, Schedule1F1B, m = 8, same stages): {1000 * theirs:.0f} ms per "
            f"step: hvdlm takes **{pp2 / theirs:.2f}x** its time (target <= 1)"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a small model (d_model 128, n_layer 4)")
    p.add_argument("--no-torch-pipelining", action="store_true", help="leave torch.distributed.pipelining out")
    p.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_head = 128, 4, 4
    if args.worker:
        return worker(args)
    shape = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("d_model", "n_layer", "n_head", "seq_len")]
    shape += [f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    shape += ["--no-torch-pipelining"] if args.no_torch_pipelining else []
    one, two = launch(1, shape), launch(2, shape)
    lines = report(args, one, two)
    print("\n".join(lines))
    if args.record:
        from recording import record  # bench/ is on sys.path when this script runs

        record(
            "Pipeline parallelism: bubble, activations, PP=2 against 1 rank", lines, f"torch {one['torch']}, Open MPI"
        )


if __name__ == "__main__":
    main()
