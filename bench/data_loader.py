"""Loader time as a share of training step time, for the demo model (jobs/demo.toml) on its dataset.

One process, the demo's per-rank batch and threads per rank (1 by default: `hvdlm launch` gives each of 2 ranks on
2 cores one thread). Each step times the loader (`next_batch`: the global-order lookup, the memory-mapped window
reads, the int64 tensors) apart from the rest of the step (forward, backward, clipping, AdamW). A step of a
multi-rank job also waits for the gradient allreduce, so the share measured here is an upper bound.

    python bench/data_loader.py [--steps 60] [--threads 1] [--record]

Target: loader < 1% of step time. --record appends the figures to bench/log/RESULTS.md with the command, date and
machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from demo_model import build, demo, rank0_batches  # bench/ is on sys.path when a script here runs
from recording import Figure, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per rank in the demo)")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    args = parser.parse_args()

    cfg, data = demo(args.threads)
    t = cfg.train
    batches = rank0_batches(cfg, data)
    model, optimizer = build(cfg)

    loader_s, step_s = [], []
    for step in range(args.steps + args.warmup):
        start = time.perf_counter()
        x, y = batches.next_batch()
        loaded = time.perf_counter()
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        end = time.perf_counter()
        if step >= args.warmup:
            loader_s.append(loaded - start)
            step_s.append(end - start)

    loader_ms, step_ms = 1000 * statistics.fmean(loader_s), 1000 * statistics.fmean(step_s)
    share = loader_ms / step_ms
    worst = 1000 * max(loader_s)
    summary = (
        f"loader {loader_ms:.3f} ms (worst {worst:.3f} ms) of a {step_ms:.1f} ms step: {100 * share:.3f}% "
        f"(target < 1%: {'met' if share < 0.01 else 'NOT met'})"
    )
    print(
        f"demo model ({model.num_params() / 1e6:.2f}M parameters), batch {t.batch_size} x {cfg.model.seq_len} "
        f"{data.tokenizer.kind} tokens, {args.threads} thread(s), {args.steps} timed steps\n{summary}"
    )
    if args.record:
        record(
            "Loader share of step time",
            [
                f"- model: jobs/demo.toml, one process, batch {t.batch_size} x {cfg.model.seq_len}, {args.threads} "
                f"thread(s), mean of {args.steps} steps after {args.warmup}",
                f"- {summary.replace(f'{100 * share:.3f}%', f'**{100 * share:.3f}%**')}",
            ],
            software=f"torch {torch.__version__}",
            figures=[Figure("Data loader's share of a training step (demo model)", f"{100 * share:.3f} %", "< 1 %")],
        )


if __name__ == "__main__":
    main()
