"""What Horovod's background thread costs a tensor-parallel step: TP=2 on 2 ranks (one thread each), the same
forward, backward and AdamW step timed without Horovod, with Horovod initialised (its background thread cycling,
as in every hvdlm rank), with Horovod plus the trainer's per-step stop vote (an asynchronous allreduce) as it
was, and as hvdlm runs such a job now: the vote over MPI (hvdlm.parallel.jobwide), Horovod idle at a 100 ms cycle.

    python bench/tp_horovod.py              # 3 rounds of each, medians; --record appends them to bench/log/RESULTS.md
    python bench/tp_horovod.py --cycles 5,50  # the two vote modes under each HOROVOD_CYCLE_TIME (ms)

The TP collectives run on mpi4py in the main thread; Horovod's background thread coordinates with the other
ranks over MPI every HOROVOD_CYCLE_TIME (5 ms, as `hvdlm launch` sets for CPU ranks), and a TP collective that
meets one of those waits. bench/plan_check.py's probe measures its synchronisations with Horovod running for that
reason. (A patch that kept the ranks' cycles in phase was tried and measured here: no gain, so not kept.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

HVDLM = "hvdlm now: vote over MPI, Horovod idle"
MODES = ("no Horovod", "Horovod initialised", "Horovod + stop vote", HVDLM)
STEPS, WARMUP = 30, 5


def worker(mode: str, cycle_ms: float | None = None) -> None:
    from hvdlm.parallel import jobwide
    from hvdlm.parallel.topology import IDLE_CYCLE_MS, GridPosition, make_tp_group

    if mode == HVDLM and cycle_ms is None:
        cycle_ms = IDLE_CYCLE_MS  # as init_topology sets it for one replica
    if cycle_ms is not None:  # read by hvd.init; `hvdlm launch` (and tests/helpers.mpirun) set 5 for CPU ranks
        os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_ms)
    import torch
    from mpi4py import MPI

    from hvdlm.config import ModelConfig
    from hvdlm.model import GPT

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    group = make_tp_group(GridPosition(world.Get_rank(), 2, 2), world)
    vote = None
    if mode != "no Horovod":
        import horovod.torch as hvd

        hvd.init(comm=world)
        if mode in ("Horovod + stop vote", HVDLM):
            vote = torch.zeros(1, dtype=torch.int32)
        if mode == HVDLM:
            jobwide.use_communicator(world.Dup())
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=128, seq_len=128, vocab_size=256)  # bench/plan_check.py's
    torch.manual_seed(0)
    model = GPT(cfg, group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    times = []
    for i in range(WARMUP + STEPS):
        world.Barrier()
        start = time.perf_counter()
        pending = jobwide.PendingMax(vote, "vote") if vote is not None else None
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
        if pending is not None:
            pending.wait()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    slowest = world.allreduce(statistics.median(times), op=MPI.MAX)
    if world.Get_rank() == 0:
        print("RESULT " + json.dumps({"mode": mode, "ms": 1000 * slowest}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    p.add_argument("--cycles", default="", help="comma-separated HOROVOD_CYCLE_TIME values (ms) for the two vote modes")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--cycle", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.cycle)
    from helpers import mpirun

    # (label, worker mode, cycle time or None for the launcher's)
    runs = [(mode, mode, None) for mode in MODES]
    if args.cycles:
        cycles = [float(c) for c in args.cycles.split(",")]
        runs = [(MODES[0], MODES[0], None)] + [
            (f"{mode}, cycle {c:g} ms", mode, c) for c in cycles for mode in MODES[2:]
        ]
    results = {label: [] for label, _, _ in runs}
    for _ in range(args.rounds):  # interleaved, so a change in the machine's load touches every mode alike
        for label, mode, cycle in runs:
            extra = ["--cycle", str(cycle)] if cycle is not None else []
            proc = mpirun(2, [sys.executable, str(Path(__file__).resolve()), "--worker", mode, *extra], timeout=300)
            rows = [json.loads(line[7:]) for line in proc.out.splitlines() if line.startswith("RESULT ")]
            if proc.code or not rows:
                sys.exit(f"{label}: the run failed\n{proc.out[-3000:]}")
            results[label].append(rows[0]["ms"])
    lines = [
        f"- model n_layer 4, d_model 128, seq_len 128, batch 4, TP=2 on 2 ranks, 1 thread "
        f"each, median of {STEPS} steps (slower rank), {args.rounds} interleaved rounds; load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        "",
        "| mode | ms/step (median of rounds) | rounds |",
        "|---|---|---|",
    ]
    for mode, values in results.items():
        lines.append(f"| {mode} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print("\n".join(lines))
    if args.record:
        import torch
        from recording import record  # bench/ is on sys.path when this script runs

        record("What Horovod's background thread costs a TP=2 step", lines, software=f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
