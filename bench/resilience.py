"""What the features of resilient runs cost: 2 data-parallel ranks on the demo model, each feature against the
plain synchronous loop of the same run, and PyTorch DDP as the outside peer of that loop.

The plain loop already carries the per-step stop vote (a 4-byte allreduce in flight with the gradients), so
"plain / DDP" shows whether the vote costs anything; every other line is one feature switched on. Last, the
atomic checkpoint save against a plain torch.save of the same state:

    python bench/resilience.py [--steps 60] [--repeats 2] [--threads 1] [--record]

--record appends the figures to bench/log/RESULTS.md with the command, date and machine.
"""

from __future__ import annotations

from dp_scaling import REPO, best_of_interleaved, ddp_tokens_per_s, hvdlm_tokens_per_s, training_bench_arguments
from recording import record

CHECKPOINT_EVERY = 10
FEATURES = {
    "plain synchronous loop": [],
    f"checkpoint every {CHECKPOINT_EVERY} steps": [f"train.checkpoint_interval={CHECKPOINT_EVERY}"],
    "EMA of the weights": ["train.ema_decay=0.999"],
    "accumulation 4 x batch 4": ["train.batch_size=4", "train.accumulation_steps=4"],
    "local SGD, H = 8": ["train.local_sgd_interval=8"],
    "bf16 autocast": ['train.precision="bf16"'],
}


def save_times(repeats: int) -> tuple[float, float, int]:
    """ms for hvdlm's atomic save and for a plain torch.save of the same state (best of `repeats`), and its bytes."""
    import tempfile
    import time
    from pathlib import Path

    import torch

    from hvdlm.checkpoint.format import save_checkpoint, training_state
    from hvdlm.checkpoint.store import checkpoint_path
    from hvdlm.config import load_config
    from hvdlm.model import GPT
    from hvdlm.optim.torch_optimizers import make_optimizer

    cfg = load_config(REPO / "jobs" / "demo.toml", ["train.optimizer=adamw"])
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()  # the AdamW moments exist from the first step on
    state = training_state(model, optimizer, 1, cfg.to_dict(), 0, 1)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            path = save_checkpoint(checkpoint_path(Path(tmp), 1), state)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.save(state, Path(tmp) / "plain.pt")
            plain.append(time.perf_counter() - start)
        size = path.stat().st_size
    return 1000 * min(ours), 1000 * min(plain), size


def main() -> None:
    args, common = training_bench_arguments(__doc__)
    runs = {
        name: (lambda extra=extra: hvdlm_tokens_per_s(2, common + extra, warmup_rows=1))
        for name, extra in FEATURES.items()
    }
    runs["DDP (gloo), plain loop"] = lambda: ddp_tokens_per_s(2, common, warmup_steps=args.log_interval)
    results = best_of_interleaved(runs, args.repeats)
    best = {name: max(values) for name, values in results.items()}
    plain = best["plain synchronous loop"]
    lines = [f"| {name} | {value:,.0f} | {value / plain:.3f} |" for name, value in best.items()]
    table = ["| configuration (2 ranks) | tokens/s (best of %d) | vs plain |" % args.repeats, "|---|---|---|", *lines]
    print("\n" + "\n".join(table))
    ours, plain_save, size = save_times(args.repeats * 3)
    saving = (
        f"- one checkpoint of the demo model with AdamW moments ({size / 2**20:.1f} MiB), best of {args.repeats * 3}: "
        f"hvdlm's save (temporary file, fsync, rename, directory fsync) **{ours:.1f} ms**, a plain "
        f"`torch.save` to the final name {plain_save:.1f} ms"
    )
    print(saving)

    if args.record:
        import torch

        every_run = "; ".join(f"{n}: {', '.join(f'{v:,.0f}' for v in vs)}" for n, vs in results.items())
        record(
            "Cost of the resilient-run features",
            [
                f"- model: jobs/demo.toml, {args.steps} steps, {args.threads} thread(s) per rank, 2 ranks (mpirun)",
                "",
                *table,
                "",
                "- every run, in order: " + every_run,
                saving,
            ],
            software=f"torch {torch.__version__}, Horovod 0.28.1",
        )


if __name__ == "__main__":
    main()
