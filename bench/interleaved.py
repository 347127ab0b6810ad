"""Virtual stages: hvdlm's interleaved 1F1B (v = 2) against its 1F1B on the same layout, and against
torch.distributed.pipelining's ScheduleInterleaved1F1B over gloo on the same chunks, in one run.

    python bench/interleaved.py [--rounds 12] [--steps 1] [--record]
    python bench/interleaved.py --quick          # a small model, to see that it runs
    python bench/interleaved.py --d-model 512 --n-head 8 --seq-len 128 --record   # 8x the compute a chunk

It starts itself under `mpirun -np 2` (the `--worker` run): p = 2 stages, m = 4 micro-batches a step, the GPT of
n_layer 8 (1F1B: 4 consecutive layers a rank; interleaved: chunks of 2 layers, rank 0 layers 0-1 and 4-5, rank 1
2-3 and 6-7), random tokens, 1 thread a rank, no data parallelism (so no Horovod). A step is the schedule's
forwards and backwards, the tied embedding/head gradient summed between the first and last stage, and an AdamW
step. The three run in alternating rounds of --steps timed steps (one untimed step first), so a machine that
slows down mid-run slows all three alike; the step time is the median over the rounds' steps, the slower rank's.

- idle fraction per stage: the share of the pipeline's span (from the common start to the end of the last stage's
  schedule) in which the stage computes nothing: the time it waits for its messages (hvdlm: StageLink.wait_seconds,
  its Waitall over the exchange's receives and sends; torch: the time in torch.distributed.pipelining's
  `_wait_batch_p2p`, which waits for each batch of sends and receives the same way), and the time after its own
  schedule ends while the other stage's goes on (the last stage's share of the drain). Against the ideal bubble
  (p - 1) / (v m + p - 1): 20 % for 1F1B, 11 % interleaved, the same for every stage;
- step time: interleaved against 1F1B (target: at least 1.1x faster at p = 2, m = 4, v = 2), and against torch's;
- bytes a stage sends per step: v times 1F1B's (every chunk boundary is a message).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from ranks import run_worker, transport  # bench/ is on sys.path when this script runs

P, M, V = 2, 4, 2


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29547")
    dist.init_process_group("gloo", rank=world.Get_rank(), world_size=world.Get_size())
    runners = {"1f1b": hvdlm_runner(args, world, 1), "interleaved": hvdlm_runner(args, world, V)}
    runners["torch_interleaved"] = torch_runner(args, world)
    seen = {name: {"steps": [], "schedule": [], "wait": [], "bytes": 0} for name in runners}
    for name, run in runners.items():
        run(seen[name])  # untimed: the allocator's first step
        seen[name] = {"steps": [], "schedule": [], "wait": [], "bytes": 0}
    for _ in range(args.rounds):
        for name, run in runners.items():
            for _ in range(args.steps):
                world.Barrier()
                start = time.perf_counter()
                run(seen[name])
                seen[name]["steps"].append(time.perf_counter() - start)
    dist.destroy_process_group()
    rows = {name: summary(s, world) for name, s in seen.items()}
    gathered = world.gather(rows, root=0)
    if world.Get_rank() == 0:
        print("RESULT " + json.dumps({"by_stage": gathered, "torch": torch.__version__}), flush=True)


def summary(seen: dict, world) -> dict:
    """A schedule's figures on this rank: the median step, the median span of the pipeline and this stage's idle
    share of it (every step's span is the longer of the two stages' schedules: both start after one barrier)."""
    import numpy as np
    from mpi4py import MPI

    schedule, wait = np.array(seen["schedule"]), np.array(seen["wait"])
    spans = np.empty_like(schedule)
    world.Allreduce(schedule, spans, op=MPI.MAX)
    return {
        "step_s": statistics.median(seen["steps"]),
        "span_s": float(np.median(spans)),
        "idle": float((spans - (schedule - wait)).sum() / spans.sum()),
        "bytes_per_step": seen["bytes"] // len(seen["steps"]),
    }


def model_config(args):
    from hvdlm.config import ModelConfig

    return ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, seq_len=args.seq_len)


def batches(args, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (M, args.batch, args.seq_len + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in idx]


def hvdlm_runner(args, world, virtual: int):
    """One step of hvdlm's 1F1B (virtual = 1) or interleaved schedule, as hvdlm.training.pipeline runs it."""
    import torch

    from hvdlm.model.stage import GPTStage, tied_parameters
    from hvdlm.parallel.collectives import allreduce
    from hvdlm.parallel.interleaved import ChunkWork, Interleaving, run_interleaved
    from hvdlm.parallel.p2p import StageLink
    from hvdlm.parallel.schedules import StageWork, run_schedule
    from hvdlm.parallel.split import chunk_layers
    from hvdlm.parallel.topology import Group

    rank = world.Get_rank()
    pipe = Group(size=P, rank=rank, comm=world.Dup())
    cfg = model_config(args)
    torch.manual_seed(0)
    stage = GPTStage(cfg, chunk_layers(cfg.n_layer, P, "", virtual), rank, virtual=virtual)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    link = StageLink(pipe, (args.batch, cfg.seq_len, cfg.d_model), torch.float32, torch.device("cpu"), ring=virtual > 1)
    data = batches(args)

    def forward(c: int, i: int, inp):
        out = stage(data[i][0] if inp is None else inp, data[i][1], chunk=c)
        return out / M if stage.is_last and c == virtual - 1 else out

    def step(seen: dict) -> None:
        opt.zero_grad()
        wait, sent, start = link.wait_seconds, link.bytes_sent, time.perf_counter()
        if virtual > 1:
            run_interleaved(ChunkWork(forward), link, Interleaving(P, rank, virtual, M))
        else:
            run_schedule("1f1b", StageWork(lambda i, inp: forward(0, i, inp), stage.is_first, stage.is_last), link, M)
        seen["schedule"].append(time.perf_counter() - start)
        seen["wait"].append(link.wait_seconds - wait)
        seen["bytes"] += link.bytes_sent - sent
        for w in tied_parameters(stage):
            w.grad.copy_(allreduce(w.grad, pipe))
        opt.step()

    return step


def torch_runner(args, world):
    """One step of torch.distributed.pipelining's ScheduleInterleaved1F1B over gloo, with hvdlm's chunks as its
    stages (rank r: stages r and r + p of 2p), the loss applied by the schedule as torch does."""
    import torch
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
    from torch.distributed.pipelining import schedules as torch_schedules
    from torch.nn import functional as F

    from hvdlm.model.gpt import embed
    from hvdlm.model.stage import GPTStage, tied_parameters
    from hvdlm.parallel.collectives import allreduce
    from hvdlm.parallel.split import chunk_layers
    from hvdlm.parallel.topology import Group

    rank = world.Get_rank()
    pipe = Group(size=P, rank=rank, comm=world.Dup())
    cfg = model_config(args)
    torch.manual_seed(0)
    whole = GPTStage(cfg, chunk_layers(cfg.n_layer, P, "", V), rank, virtual=V)

    class Chunk(torch.nn.Module):
        """Chunk c of the rank's: only its own parts, so that no parameter is in two of torch's stages."""

        def __init__(self, c: int):
            super().__init__()
            self.first, self.last = whole.is_first and c == 0, whole.is_last and c == V - 1
            self.blocks = torch.nn.ModuleList(whole.blocks[str(i)] for i in whole.chunks[c])
            if self.first:
                self.tok_emb, self.pos_emb = whole.tok_emb, whole.pos_emb
            if self.last:
                self.ln_f, self.head = whole.ln_f, whole.head

        def forward(self, x):
            if self.first:
                x = embed(self.tok_emb, self.pos_emb, x)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x)) if self.last else x

    stages = [PipelineStage(Chunk(c), rank + c * P, P * V, torch.device("cpu")) for c in range(V)]
    schedule = ScheduleInterleaved1F1B(
        stages, n_microbatches=M, loss_fn=lambda z, y: F.cross_entropy(z.flatten(0, 1), y.flatten())
    )
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-4)
    data = batches(args)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    waited = [0.0]
    plain_wait = torch_schedules._wait_batch_p2p

    def timed_wait(work):
        start = time.perf_counter()
        plain_wait(work)
        waited[0] += time.perf_counter() - start

    torch_schedules._wait_batch_p2p = timed_wait  # the schedules call it by its module-level name

    def step(seen: dict) -> None:
        opt.zero_grad()
        wait, start = waited[0], time.perf_counter()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        seen["schedule"].append(time.perf_counter() - start)
        seen["wait"].append(waited[0] - wait)
        for w in tied_parameters(whole):
            w.grad.copy_(allreduce(w.grad, pipe))
        opt.step()

    return step


def launch(argv: list[str]) -> dict:
    return run_worker(__file__, P, argv, f"{P}-rank")


def report(args, result: dict, load: str) -> tuple[list[str], dict]:
    """The figures as markdown lines, and the headline numbers."""
    s0, s1 = result["by_stage"]
    ideal = {"1f1b": (P - 1) / (M + P - 1), "interleaved": (P - 1) / (V * M + P - 1)}
    ideal["torch_interleaved"] = ideal["interleaved"]
    step = {name: max(s0[name]["step_s"], s1[name]["step_s"]) for name in s0}
    lines = [
        f"- model: GPT n_layer {args.n_layer}, d_model {args.d_model}, n_head {args.n_head}, micro-batches of "
        f"{args.batch} x seq_len {args.seq_len}, vocabulary 256; p = {P}, m = {M}, v = {V}; 1 thread a rank; "
        f"{args.rounds} alternating rounds of {args.steps} timed steps; {load}; shared memory: {transport()}",
        "",
        "| schedule | step ms (median, slower rank) | pipeline span ms (median) | idle stage 0 / 1 (of the span) | "
        "ideal bubble | bytes sent per step stage 0 / 1 |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "1f1b": "hvdlm 1F1B",
        "interleaved": "hvdlm interleaved",
        "torch_interleaved": "torch ScheduleInterleaved1F1B (gloo)",
    }
    for name, label in names.items():
        sent = (
            f"{s0[name]['bytes_per_step']:,} / {s1[name]['bytes_per_step']:,}" if name != "torch_interleaved" else "-"
        )
        lines.append(
            f"| {label} | {1000 * step[name]:.0f} | {1000 * s0[name]['span_s']:.0f} | {s0[name]['idle']:.1%} / "
            f"{s1[name]['idle']:.1%} | {ideal[name]:.1%} | {sent} |"
        )
    speedup = step["1f1b"] / step["interleaved"]
    span_speedup = s0["1f1b"]["span_s"] / s0["interleaved"]["span_s"]
    busy = {name: max(s[name]["span_s"] * (1 - s[name]["idle"]) for s in (s0, s1)) * 1000 for name in s0}
    vs_torch = step["interleaved"] / step["torch_interleaved"]
    # The target is the interleaved schedule's; 1F1B's gap is shown beside it.
    worst_gap = max(abs(s["interleaved"]["idle"] - ideal["interleaved"]) for s in (s0, s1))
    gap_1f1b = max(abs(s["1f1b"]["idle"] - ideal["1f1b"]) for s in (s0, s1))
    lines += [
        "",
        f"- interleaved against 1F1B: **{speedup:.2f}x** faster a step (target >= 1.1x); the ideal is "
        f"(m + p - 1) / (m + (p - 1) / v) = {(M + P - 1) / (M + (P - 1) / V):.2f}x; the pipeline's span alone "
        f"(the step less the tied-weight sum and the optimizer step): {span_speedup:.2f}x",
        f"- hvdlm interleaved takes **{vs_torch:.2f}x** torch's interleaved step time",
        f"- interleaved: measured idle against its ideal bubble, worst stage: {100 * worst_gap:.1f} points (target "
        f"<= 5); 1F1B against its own: {100 * gap_1f1b:.1f} points",
        f"- compute a step (the span less the idle, slower stage): interleaved {busy['interleaved']:.0f} ms, 1F1B "
        f"{busy['1f1b']:.0f} ms ({busy['interleaved'] / busy['1f1b'] - 1:+.1%}): the same forwards and backwards, cut "
        "into twice the chunk passes",
        "- reading it: 1.1x is 99 % of the ideal 1.11x, which takes the chunks' compute as the schedule's only cost; "
        "interleaving also sends 3x the messages (each a wait inside a turn), and its finer turns pass the "
        "last chunk's extra work (the head and the loss) on to the other stage more often; on a machine whose 2 "
        "cores are shared by more runnable processes than cores, a rank is often descheduled while its neighbour "
        "waits for it, which counts as idle on the neighbour and lengthens both schedules' steps by chance amounts",
    ]
    return lines, {"speedup": speedup, "span_speedup": span_speedup, "vs_torch": vs_torch, "gap": worst_gap}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="a small model (d_model 64, 1 round of 1 step)")
    p.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.d_model, args.rounds, args.steps = 64, 1, 1
    if args.worker:
        return worker(args)
    keys = ("d_model", "n_layer", "n_head", "seq_len", "batch", "steps", "rounds")
    load_before = os.getloadavg()[0]
    result = launch([f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys])
    load = (
        f"machine shared with other jobs (load average {load_before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores)"
    )
    lines, h = report(args, result, load)
    print("\n".join(lines))
    if args.record:
        from recording import Figure, record  # bench/ is on sys.path when this script runs

        figures = [
            Figure("interleaved 1F1B (v=2) step against 1F1B, p=2 m=4", f"{h['speedup']:.2f}x faster", ">= 1.1x"),
            Figure("interleaved 1F1B step against torch ScheduleInterleaved1F1B", f"{h['vs_torch']:.2f}x its time"),
            Figure(
                "interleaved 1F1B idle against its ideal bubble (p-1)/(vm+p-1)",
                f"{100 * h['gap']:.1f} points (worst stage)",
                "<= 5 points",
            ),
        ]
        title = "Virtual stages: interleaved 1F1B against 1F1B and torch.distributed.pipelining"
        record(title, lines, f"torch {result['torch']}, Open MPI", figures)


if __name__ == "__main__":
    main()
