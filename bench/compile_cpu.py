"""torch.compile on the CPU: tokens/s of the demo model (jobs/demo.toml), eager against compiled, in one run.

One process with the demo's per-rank batch and 1 thread (what each of `make demo`'s 2 ranks gets on 2 cores),
the trainer's own step: fused AdamW, clipping, each block compiled in place as `train.compile = "on"` does.
Alternating timed rounds of both, so a machine that slows down mid-run slows both alike; the compile time is
reported apart.

    python bench/compile_cpu.py [--steps 40] [--rounds 3] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from recording import record  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hvdlm.config import load_config  # noqa: E402
from hvdlm.data import open_dataset  # noqa: E402
from hvdlm.data.corpus import ensure_dataset, model_vocab_size  # noqa: E402
from hvdlm.data.sampler import WindowSampler  # noqa: E402
from hvdlm.model import GPT  # noqa: E402
from hvdlm.training.optim import make_optimizer  # noqa: E402

JOB = REPO / "jobs" / "demo.toml"


def build(cfg, compiled: bool):
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    if compiled:
        for block in model.blocks:
            block.compile()
    return model, make_optimizer(model, cfg.train)


def step(model, optimizer, batches) -> float:
    x, y = batches.next_batch()
    loss = model(x, y)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()

    cfg = load_config(JOB)
    t = cfg.train
    torch.set_num_threads(args.threads)
    data = open_dataset(ensure_dataset(cfg.data))
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    tokens = t.batch_size * cfg.model.seq_len
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model, optimizer = build(cfg, compiled)
        batches = WindowSampler(data.train, cfg.model.seq_len, t.batch_size, 0, cfg.launch.np, t.seed)
        start = time.perf_counter()
        for _ in range(3):  # the first steps compile (and warm the allocator in both)
            step(model, optimizer, batches)
        runs[name] = {"model": model, "optimizer": optimizer, "batches": batches, "rates": []}
        runs[name]["warmup_s"] = time.perf_counter() - start
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(run["model"], run["optimizer"], run["batches"])
            run["rates"].append(tokens * args.steps / (time.perf_counter() - start))
    eager = statistics.median(runs["eager"]["rates"])
    lines = [
        f"- model: jobs/demo.toml, one process, batch {t.batch_size} x {cfg.model.seq_len}, {args.threads} thread(s), "
        f"{args.rounds} alternating rounds of {args.steps} steps after 3 warm-up steps",
        "",
        "| mode | tokens/s (median of rounds) | vs eager | first 3 steps (compile) |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        rate = statistics.median(run["rates"])
        lines.append(f"| {name} | {rate:,.0f} | {rate / eager:.2f}x | {run['warmup_s']:.1f} s |")
    print("\n".join(lines))
    if args.record:
        record("torch.compile on the CPU (demo model)", lines, software=f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
