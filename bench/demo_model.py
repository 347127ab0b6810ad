"""The demo model (jobs/demo.toml) as the one-process benchmarks here set it up: its configuration with the
vocabulary of its dataset, the batches of rank 0 of its data-parallel ranks, and the model and optimizer as the
trainer builds them.

bench/ is on sys.path when a script here runs; importing this puts the repository there too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hvdlm.config import JobConfig, load_config  # noqa: E402
from hvdlm.data import open_dataset  # noqa: E402
from hvdlm.data.corpus import ensure_dataset, model_vocab_size  # noqa: E402
from hvdlm.data.sampler import WindowSampler  # noqa: E402
from hvdlm.model import GPT  # noqa: E402
from hvdlm.optim.torch_optimizers import make_optimizer  # noqa: E402

JOB = REPO / "jobs" / "demo.toml"


def demo(threads: int):
    """The demo's configuration (with AdamW) and dataset (prepared if it is not yet), with `threads` torch threads;
    the model's vocabulary is the dataset's, as training sets it."""
    cfg = load_config(JOB)
    # The figures in bench/log/RESULTS.md before the demo moved to Muon were taken with AdamW; bench/optimizers.py
    # compares the two.
    cfg.train.optimizer = "adamw"
    torch.set_num_threads(threads)
    data = open_dataset(ensure_dataset(cfg.data))
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    return cfg, data


def rank0_batches(cfg: JobConfig, data) -> WindowSampler:
    """Rank 0 of the demo's data-parallel ranks: its share of each global batch."""
    t = cfg.train
    return WindowSampler(data.train, cfg.model.seq_len, t.batch_size, 0, cfg.launch.np, t.seed)


def build(cfg: JobConfig, compiled: bool = False):
    """The model from the run's seed and its optimizer; `compiled`: each block compiled in place, as
    `train.compile = "on"` does."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    if compiled:
        for block in model.blocks:
            block.compile()
    return model, make_optimizer(model, cfg.train)


def step(model, optimizer, batches) -> float:
    """One training step as the trainer takes it on one rank: forward, backward, clipping, the update."""
    x, y = batches.next_batch()
    loss = model(x, y)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def alternating_rates(runs: dict[str, dict], tokens_per_step: int, steps: int, rounds: int) -> dict[str, float]:
    """Median tokens/s of each run ({"model", "optimizer", "batches"}) over `rounds` timed rounds of `steps`
    steps, taken in turn, so that a machine that slows down mid-run slows every run alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(run["model"], run["optimizer"], run["batches"])
            rates[name].append(tokens_per_step * steps / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def rounds_arguments(doc: str, steps: int = 40, rounds: int = 3) -> argparse.Namespace:
    """The options of the benchmarks that time the demo step in alternating rounds (compile_cpu, optimizers,
    llama_cpu); `steps` and `rounds` are their defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    return parser.parse_args()
