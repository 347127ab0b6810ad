"""Tensor-parallel benchmark: bytes the TP collectives move per step, against the analytic minimum, and the step
throughput of TP=2 on 2 ranks against TP=1 on 1 rank (one thread per rank).

    python bench/tp_bytes.py                        # d_model 1024, the figures for bench/log/RESULTS.md
    python bench/tp_bytes.py --d-model 256 --steps 3  # a quick check that counted == analytic

It starts itself under mpirun once per layout (the `--worker` runs). A worker trains the GPT on random tokens
(forward, backward, TP-aware gradient clipping, AdamW step; no data parallelism, so no Horovod traffic) and
reads `bytes_moved` of its TP group: the payload of every collective, i.e. the bytes of one rank's tensor
(a ring allreduce sends about 2 (p-1)/p times that per rank on the wire).

The analytic minimum per step, for L layers, B sequences of T tokens, width d, 4-byte floats and p > 1:
    forward   2 L allreduces of B T d (attention and MLP output projections, row parallel)
              1 allreduce of B T d (vocabulary-parallel embedding)
              3 B T floats (cross-entropy: max, then sum of exponentials with the target logit)
    backward  2 L allreduces of B T d (inputs of the qkv and MLP-in projections, column parallel)
              1 allreduce of B T d (input of the vocabulary-parallel head)
    clipping  1 float (the squared gradient norm of the shards)
    total     4 x ((4 L + 2) B T d + 3 B T + 1) bytes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hvdlm, as bench/memory.py does

from hvdlm.plan.counts import tp_analytic_bytes as analytic_bytes  # noqa: E402  (the formula above, the planner's)


def worker(args) -> None:
    import torch
    from mpi4py import MPI

    from hvdlm.config import ModelConfig
    from hvdlm.model import GPT
    from hvdlm.optim.clipping import clip_grad_norm
    from hvdlm.parallel.topology import GridPosition, make_tp_group

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    group = make_tp_group(GridPosition(world.Get_rank(), world.Get_size(), world.Get_size()), world)
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, seq_len=args.seq_len)
    torch.manual_seed(0)
    model = GPT(cfg, group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)

    def step() -> float:
        idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0, group)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    world.Barrier()
    before, start = group.bytes_moved, time.perf_counter()
    for _ in range(args.steps):
        step()
    world.Barrier()
    elapsed = time.perf_counter() - start
    if world.Get_rank() == 0:
        row = {
            "tp": group.size,
            "ms_per_step": 1000 * elapsed / args.steps,
            "tokens_per_s": args.batch * args.seq_len * args.steps / elapsed,
            "bytes_per_step": (group.bytes_moved - before) // args.steps,
            "analytic_bytes": analytic_bytes(args.n_layer, args.batch, args.seq_len, args.d_model, group.size),
            "params_M": model.num_params() / 1e6,
            "torch": torch.__version__,
        }
        print("RESULT " + json.dumps(row), flush=True)


def launch(np: int, argv: list[str]) -> dict:
    from ranks import run_worker  # bench/ is on sys.path when this script runs

    return run_worker(__file__, np, argv, f"TP={np}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    shape = [
        "--d-model",
        str(args.d_model),
        "--n-layer",
        str(args.n_layer),
        "--n-head",
        str(args.n_head),
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    one, two = launch(1, shape), launch(2, shape)
    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
        f"python {' '.join(sys.argv)}"
    )
    print(
        f"# GPT {one['params_M']:.1f}M parameters: n_layer {args.n_layer}, d_model {args.d_model}, n_head "
        f"{args.n_head}, batch {args.batch} x seq_len {args.seq_len}; {args.steps} timed steps; 1 thread per rank"
    )
    print(f"{'layout':<16}{'ms/step':>10}{'tokens/s':>12}{'TP bytes/step':>16}{'analytic':>14}")
    for name, r in (("TP=1, 1 rank", one), ("TP=2, 2 ranks", two)):
        print(
            f"{name:<16}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12.0f}{r['bytes_per_step']:>16,}"
            f"{r['analytic_bytes']:>14,}"
        )
    speedup = two["tokens_per_s"] / one["tokens_per_s"]
    exact = all(r["bytes_per_step"] == r["analytic_bytes"] for r in (one, two))
    print(f"speed-up TP=2 / TP=1: {speedup:.2f}x (target >= 1.5x); counted bytes == analytic: {exact}")
    if args.record:
        from recording import Figure, record  # bench/ is on sys.path when this script runs

        record(
            "Tensor parallelism: bytes moved and TP=2 against TP=1",
            [
                f"- model: GPT with {one['params_M']:.1f}M parameters (n_layer {args.n_layer}, d_model {args.d_model}, "
                f"n_head {args.n_head}), batch {args.batch} x seq_len {args.seq_len}, 1 thread per rank, "
                f"{args.steps} timed steps; analytic bytes 4 x ((4 n_layer + 2) B T d + 3 B T + 1) (see the script)",
                "",
                "| layout | ms/step | TP bytes/step | analytic bytes/step |",
                "|---|---|---|---|",
                *(
                    f"| {name} | {r['ms_per_step']:.1f} | {r['bytes_per_step']:,} | {r['analytic_bytes']:,} |"
                    for name, r in (("TP=1, 1 rank", one), ("TP=2, 2 ranks", two))
                ),
                "",
                f"- speed-up TP=2 / TP=1: **{speedup:.2f}x** (target >= 1.5x); counted bytes == analytic: {exact}",
            ],
            software=f"torch {one['torch']}, Horovod 0.28.1, Open MPI",
            figures=[
                Figure(
                    f"Tensor parallelism: TP=2 on 2 ranks against 1 rank (d_model {args.d_model})",
                    f"{speedup:.2f}x",
                    ">= 1.5x",
                )
            ],
        )
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
