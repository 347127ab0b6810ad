"""torch.compile on the CPU: tokens/s of the demo model (jobs/demo.toml), eager against compiled, in one run.

One process with the demo's per-rank batch and 1 thread (what each of `make demo`'s 2 ranks gets on 2 cores),
the trainer's own step: fused AdamW, clipping, each block compiled in place as `train.compile = "on"` does.
Alternating timed rounds of both, so a machine that slows down mid-run slows both alike; the compile time is
reported apart.

    python bench/compile_cpu.py [--steps 40] [--rounds 3] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import time

import torch
from demo_model import alternating_rates, build, demo, rank0_batches, step  # bench/ is on sys.path here
from recording import record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()

    cfg, data = demo(args.threads)
    t = cfg.train
    tokens = t.batch_size * cfg.model.seq_len
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model, optimizer = build(cfg, compiled)
        batches = rank0_batches(cfg, data)
        start = time.perf_counter()
        for _ in range(3):  # the first steps compile (and warm the allocator in both)
            step(model, optimizer, batches)
        runs[name] = {"model": model, "optimizer": optimizer, "batches": batches}
        runs[name]["warmup_s"] = time.perf_counter() - start
    rates = alternating_rates(runs, tokens, args.steps, args.rounds)
    eager = rates["eager"]
    lines = [
        f"- model: jobs/demo.toml, one process, batch {t.batch_size} x {cfg.model.seq_len}, {args.threads} thread(s), "
        f"{args.rounds} alternating rounds of {args.steps} steps after 3 warm-up steps",
        "",
        "| mode | tokens/s (median of rounds) | vs eager | first 3 steps (compile) |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        rate = rates[name]
        lines.append(f"| {name} | {rate:,.0f} | {rate / eager:.2f}x | {run['warmup_s']:.1f} s |")
    print("\n".join(lines))
    if args.record:
        record("torch.compile on the CPU (demo model)", lines, software=f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
