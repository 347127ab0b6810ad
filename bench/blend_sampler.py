"""The blend sampler's cost per step against the single-dataset sampler, next to a tiny model's and the demo's step.

One process, the demo's dataset (the built-in stdlib corpus, prepared into the cache if it is not yet). The
blends mix that dataset's training split with itself, 2 and 4 ways (0.7 / 0.3, and 0.4 / 0.3 / 0.2 / 0.1): the
sampler's work (the schedule lookup, each part's global order, the memory-mapped windows of each part, the
tensors) does not depend on what the parts hold. The samplers take rank 0's batches of 2 data-parallel ranks, in
alternating rounds (the fastest round of each counts: other work on the machine only adds). The steps are timed
whole (the loader, forward, backward, clipping, AdamW) for the tiny model of the tests (tests/helpers.py TINY_JOB:
2 layers, d_model 32, batch 4 x 32) and the demo (jobs/demo.toml: 4 layers, d_model 128, batch 16 x 128), with the
spread of their times from step to step (the interquartile range): a cost below it cannot be seen in a step.

    python bench/blend_sampler.py [--calls 2000] [--rounds 5] [--steps 30] [--record]

Target: the blend's extra cost is not measurable in a step: below 1 % of the tiny model's step, and below the
spread of its step times. --record appends
the figures to bench/log/RESULTS.md and bench/results.jsonl with the command, date and machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from demo_model import build, demo, step  # bench/ is on sys.path when a script here runs; it puts the repo there
from recording import Figure, record

from hvdlm.data.blend import PERIOD, BlendPart, apportion
from hvdlm.data.blend_sampler import BlendSampler, schedule
from hvdlm.data.sampler import WindowSampler

BLENDS = {"2-way blend": [0.7, 0.3], "4-way blend": [0.4, 0.3, 0.2, 0.1]}
TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32}  # tests/helpers.py TINY_JOB
TINY_BATCH = 4


def samplers(split, seq_len: int, batch: int, seed: int) -> dict[str, object]:
    """Rank 0 of 2 data-parallel ranks: one dataset, and the blends of BLENDS."""
    out = {"one dataset": WindowSampler(split, seq_len, batch, 0, 2, seed)}
    for name, weights in BLENDS.items():
        shares = apportion(weights, PERIOD)
        parts = [BlendPart(f"part{i}", None, w, q) for i, (w, q) in enumerate(zip(weights, shares))]
        out[name] = BlendSampler([split] * len(weights), parts, seq_len, batch, 0, 2, seed)
    return out


def sampler_us(batches: dict[str, object], calls: int, rounds: int) -> dict[str, float]:
    """Microseconds per next_batch of each sampler: the fastest of alternating rounds of `calls` calls (on a shared
    machine other work only adds to a round's time)."""
    times: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(rounds):
        for name, sampler in batches.items():
            start = time.perf_counter()
            for _ in range(calls):
                sampler.next_batch()
            times[name].append(1e6 * (time.perf_counter() - start) / calls)
    return {name: min(t) for name, t in times.items()}


def step_ms(cfg, batches, steps: int) -> tuple[float, float]:
    """Milliseconds of a whole training step (loader included), after 3 warm-up steps: the median, and the
    interquartile range of the steps' times."""
    model, optimizer = build(cfg)
    for _ in range(3):
        step(model, optimizer, batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, optimizer, batches)
        times.append(1000 * (time.perf_counter() - start))
    quartiles = statistics.quantiles(times, n=4)
    return statistics.median(times), quartiles[2] - quartiles[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="next_batch calls per sampler per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    cfg, data = demo(args.threads)
    seed, demo_batch, demo_seq = cfg.train.seed, cfg.train.batch_size, cfg.model.seq_len
    shares = tuple(apportion(BLENDS["4-way blend"], PERIOD))
    start = time.perf_counter()
    schedule(shares)  # what a sampler builds once (a run's samplers share it)
    setup_ms = 1000 * (time.perf_counter() - start)

    tiny_us = sampler_us(samplers(data.train, TINY["seq_len"], TINY_BATCH, seed), args.calls, args.rounds)
    demo_us = sampler_us(samplers(data.train, demo_seq, demo_batch, seed), args.calls // 4, args.rounds)
    demo_step = step_ms(cfg, samplers(data.train, demo_seq, demo_batch, seed)["2-way blend"], args.steps)
    for key, value in TINY.items():
        setattr(cfg.model, key, value)
    cfg.train.batch_size = TINY_BATCH
    tiny_step = step_ms(cfg, samplers(data.train, TINY["seq_len"], TINY_BATCH, seed)["2-way blend"], args.steps)
    report(args, tiny_us, demo_us, tiny_step, demo_step, setup_ms)


def report(args, tiny_us: dict, demo_us: dict, tiny_step: tuple, demo_step: tuple, setup_ms: float) -> None:
    lines, worst = [], 0.0
    for what, us, (step_time, spread), batch in (
        ("tiny model", tiny_us, tiny_step, f"{TINY_BATCH} x {TINY['seq_len']}"),
        ("demo model", demo_us, demo_step, "16 x 128"),
    ):
        base = us["one dataset"]
        cells = []
        for name in BLENDS:
            extra = us[name] - base
            share = extra / (1000 * step_time)
            worst = max(worst, share) if what == "tiny model" else worst
            cells.append(f"{name} {us[name]:.1f} us (+{extra:.1f} us, {100 * share:.2f} % of a step)")
        lines.append(
            f"- {what} (batch {batch}, step {step_time:.2f} ms, spread {spread:.2f} ms = "
            f"{100 * spread / step_time:.1f} %): one dataset {base:.1f} us per batch; " + "; ".join(cells)
        )
    load = os.getloadavg()[0]
    lines.append(f"- load average at the end: {load:.1f} on {os.cpu_count()} cores (other work shared the machine)")
    lines.append(f"- building a 4-way blend's schedule ({PERIOD:,} slots): {setup_ms:.1f} ms, once per run")
    verdict = "met" if worst < min(0.01, tiny_step[1] / tiny_step[0]) else "NOT met"
    lines.append(f"- the blend's extra cost, worst of the tiny model's: **{100 * worst:.2f} %** of a step ({verdict})")
    print("\n".join(lines))
    if args.record:
        record(
            "Blend sampler against the single-dataset sampler",
            [
                f"- {args.calls} next_batch calls per round (demo batch: a quarter), fastest of {args.rounds} rounds, "
                f"{args.threads} thread(s), {args.steps} timed steps per model",
                *lines,
            ],
            software=f"torch {torch.__version__}",
            figures=[
                Figure(
                    "Blend sampler's extra cost per step (tiny model, worst of 2- and 4-way blends)",
                    f"{100 * worst:.2f} % of a step",
                    "not measurable (< 1 %)",
                )
            ],
        )


if __name__ == "__main__":
    main()
