"""The llama arch against GPT-2's on the CPU: jobs/llama-demo.toml and jobs/demo.toml (853K and 842K parameters),
tokens/s and the loss after the same tokens, in one run.

One process per model step as each of `make demo`'s 2 ranks takes it (the demo's per-rank batch, 1 thread, the
batches of rank 0), as the other one-process benchmarks here do (bench/compile_cpu.py, bench/optimizers.py). Both
models start from the same seed and read the same windows in the same order; each trains with its job's own
optimizer (Muon for both) and learning-rate schedule (warmup, then cosine to min_lr at the last step taken here).
They train in alternating timed rounds of --steps steps, so a machine that slows down mid-run slows both alike,
and both have seen the same tokens at the end: then each is evaluated on the same validation windows.

    python bench/llama_cpu.py [--steps 200] [--rounds 4] [--threads 1] [--record]

The defaults train 3 + 800 steps a model (about the demo's 850); --steps 2 --rounds 1 shows that it works.
"""

from __future__ import annotations

import statistics
import time

import demo_model as dm  # bench/ is on sys.path when a script here runs
import torch
from recording import Figure, record

from hvdlm.config import load_config
from hvdlm.data.sampler import WindowSampler
from hvdlm.model.size import parameter_count
from hvdlm.optim.schedule import lr_at

JOBS = {"gpt2": dm.REPO / "jobs" / "demo.toml", "llama": dm.REPO / "jobs" / "llama-demo.toml"}
WARMUP_STEPS = 3  # untimed: the allocator's and the first Muon steps'
EVAL_BATCHES = 8  # validation windows of the per-rank batch each, the same for both models


def setup(name: str, data, total_steps: int) -> dict:
    """A job's model and optimizer as dm.build makes them, with the job's own optimizer, and its schedule ending
    at `total_steps` (the run here is shorter than the job's)."""
    cfg = load_config(JOBS[name])
    cfg.model.vocab_size = dm.model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    cfg.train.max_steps = total_steps
    model, optimizer = dm.build(cfg)
    return {"cfg": cfg, "data": data, "model": model, "optimizer": optimizer, "batches": dm.rank0_batches(cfg, data)}


def train(run: dict, steps: int) -> float:
    """`steps` training steps at the schedule's learning rates; the mean loss over them."""
    losses = []
    for _ in range(steps):
        for group in run["optimizer"].param_groups:
            group["lr"] = lr_at(run["step"], run["cfg"].train)
        losses.append(dm.step(run["model"], run["optimizer"], run["batches"]))
        run["step"] += 1
    return statistics.fmean(losses)


@torch.no_grad()
def val_loss(run: dict) -> float:
    """The mean loss over the first EVAL_BATCHES batches of validation windows (the same windows for both)."""
    cfg = run["cfg"]
    windows = WindowSampler(run["data"].val, cfg.model.seq_len, cfg.train.batch_size, 0, 1, cfg.train.seed)
    run["model"].eval()
    losses = [run["model"](*windows.next_batch())[1].item() for _ in range(EVAL_BATCHES)]
    run["model"].train()
    return statistics.fmean(losses)


def main() -> None:
    args = dm.rounds_arguments(__doc__, steps=200, rounds=4)
    total = WARMUP_STEPS + args.steps * args.rounds
    _, data = dm.demo(args.threads)  # the dataset both jobs read (the built-in corpus, byte-level)
    runs = {name: {**setup(name, data, total), "step": 0, "rates": []} for name in JOBS}
    for run in runs.values():
        train(run, WARMUP_STEPS)
    cfg = runs["gpt2"]["cfg"]
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            run["train_loss"] = train(run, args.steps)
            run["rates"].append(tokens_per_step * args.steps / (time.perf_counter() - start))
    lines = [
        f"- models: jobs/demo.toml (gpt2) and jobs/llama-demo.toml (llama), one process, batch "
        f"{cfg.train.batch_size} x {cfg.model.seq_len}, {args.threads} thread(s), {WARMUP_STEPS} warm-up steps "
        f"then {args.rounds} alternating rounds of {args.steps} steps: {total * tokens_per_step:,} tokens each",
        "",
        "| arch | parameters | tokens/s (median of rounds) | vs gpt2 | train loss (last round) | val loss after |",
        "|---|---|---|---|---|---|",
    ]
    rates = {name: statistics.median(run["rates"]) for name, run in runs.items()}
    losses = {name: val_loss(run) for name, run in runs.items()}
    for name, run in runs.items():
        lines.append(
            f"| {name} | {parameter_count(run['cfg'].model):,} | {rates[name]:,.0f} | "
            f"{rates[name] / rates['gpt2']:.2f}x | {run['train_loss']:.3f} | {losses[name]:.3f} |"
        )
    print("\n".join(lines))
    if args.record:
        figures = [
            Figure("llama-demo against the gpt2 demo, tokens/s on the CPU", f"{rates['llama'] / rates['gpt2']:.2f}x"),
            Figure(
                "llama-demo against the gpt2 demo, validation loss after the same tokens on the CPU",
                f"{losses['llama']:.3f} against {losses['gpt2']:.3f} after {total * tokens_per_step:,} tokens",
            ),
        ]
        record("The llama arch against GPT-2's on the CPU (demo size)", lines, f"torch {torch.__version__}", figures)


if __name__ == "__main__":
    main()
