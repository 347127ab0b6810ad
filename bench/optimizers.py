"""AdamW against Muon on the CPU: the time of a demo step with each, and the share of Muon's orthogonalization.

One process with the demo's per-rank batch and 1 thread (what each of `make demo`'s 2 ranks gets on 2 cores), the
trainer's step with each optimizer as make_optimizer builds it, in alternating timed rounds. Then the Newton-Schulz
iterations alone over the model's hidden matrices, which every data-parallel rank runs in full. What each
optimizer learns per step is measured by training the demo (bench/log/RESULTS.md, "Muon").

    python bench/optimizers.py [--steps 40] [--rounds 3] [--threads 1] [--record]
"""

from __future__ import annotations

import time

import demo_model as dm  # bench/ is on sys.path when a script here runs
import torch
from recording import Figure, record

from hvdlm.optim.muon import is_hidden_matrix, orthogonalize


def main() -> None:
    args = dm.rounds_arguments(__doc__)

    cfg, data = dm.demo(args.threads)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    runs = {}
    for name in ("adamw", "muon"):
        cfg.train.optimizer = name
        model, optimizer = dm.build(cfg)
        batches = dm.rank0_batches(cfg, data)
        for _ in range(3):
            dm.step(model, optimizer, batches)
        runs[name] = {"model": model, "optimizer": optimizer, "batches": batches}
    rates = dm.alternating_rates(runs, tokens, args.steps, args.rounds)
    hidden = [p for n, p in runs["muon"]["model"].named_parameters() if is_hidden_matrix(n, p)]
    start = time.perf_counter()
    for _ in range(args.steps):
        for p in hidden:
            orthogonalize(p.detach())
    ns_ms = 1000 * (time.perf_counter() - start) / args.steps
    lines = [
        f"- model: jobs/demo.toml, one process, batch {cfg.train.batch_size} x {cfg.model.seq_len}, {args.threads} "
        f"thread(s), {args.rounds} alternating rounds of {args.steps} steps after 3 warm-up steps",
        "",
        "| optimizer | tokens/s (median of rounds) | ms a step | vs AdamW |",
        "|---|---|---|---|",
    ]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:,.0f} | {1000 * tokens / rate:.0f} | {rate / rates['adamw']:.2f}x |")
    lines.append(
        f"- the orthogonalization alone (5 Newton-Schulz steps on each of the {len(hidden)} hidden matrices): "
        f"{ns_ms:.1f} ms a step"
    )
    print("\n".join(lines))
    if args.record:
        muon = Figure(
            "Muon against AdamW, tokens/s a step on the CPU (demo model)", f"{rates['muon'] / rates['adamw']:.2f}x"
        )
        record(
            "AdamW against Muon on the CPU (demo model)", lines, software=f"torch {torch.__version__}", figures=[muon]
        )


if __name__ == "__main__":
    main()
