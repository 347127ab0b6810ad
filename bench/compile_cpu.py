"""torch.compile on the CPU: tokens/s of the demo model (jobs/demo.toml), eager against compiled, in one run.

One process with the demo's per-rank batch and 1 thread (what each of `make demo`'s 2 ranks gets on 2 cores),
the trainer's own step: fused AdamW, clipping, each block compiled in place as `train.compile = "on"` does.
Alternating timed rounds of both, so a machine that slows down mid-run slows both alike; the compile time is
reported apart.

    python bench/compile_cpu.py [--steps 40] [--rounds 3] [--threads 1] [--record]
"""

from __future__ import annotations

import time

import demo_model as dm  # bench/ is on sys.path when a script here runs
import torch
from recording import Figure, record


def main() -> None:
    args = dm.rounds_arguments(__doc__)

    cfg, data = dm.demo(args.threads)
    t = cfg.train
    tokens = t.batch_size * cfg.model.seq_len
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model, optimizer = dm.build(cfg, compiled)
        batches = dm.rank0_batches(cfg, data)
        start = time.perf_counter()
        for _ in range(3):  # the first steps compile (and warm the allocator in both)
            dm.step(model, optimizer, batches)
        runs[name] = {"model": model, "optimizer": optimizer, "batches": batches}
        runs[name]["warmup_s"] = time.perf_counter() - start
    rates = dm.alternating_rates(runs, tokens, args.steps, args.rounds)
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
        figure = Figure("torch.compile on the CPU against eager (demo model)", f"{rates['compiled'] / eager:.2f}x")
        record("torch.compile on the CPU (demo model)", lines, software=f"torch {torch.__version__}", figures=[figure])


if __name__ == "__main__":
    main()
