"""ZeRO-3's step time against ZeRO-2's on this machine, alternating rounds in one run (DP=2, full recomputation).

    python bench/zero_step_time.py --record            # d_model 1024, 6 layers, 2 rounds of 3 steps each

The runs are bench/memory_budget.py's (`hvdlm train` under mpirun, one thread a rank); rounds alternate the two
settings so that a change in the machine's load (it is shared) falls on both. Each run's step time is its median
after the first step; the figure is the ratio of the settings' medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_budget import SETTINGS, trained  # noqa: E402

PEERS = ("zero2 + full recompute", "zero3 + full recompute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from helpers import TINY_JOB

    times: dict[str, list[float]] = {name: [] for name in PEERS}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(TINY_JOB)
        for r in range(args.rounds):
            for name in PEERS:
                run_dir = Path(tmp) / f"{name.split()[0]}-{r}"
                result = trained(job, run_dir, args.n_layer, SETTINGS[name], args)
                times[name].append(result["ms_per_step"])
                loads.append(os.getloadavg()[0])
                print(name, r, f"{result['ms_per_step']:.0f} ms/step", flush=True)
    two, three = (statistics.median(times[name]) for name in PEERS)
    ratio = three / two
    print(f"ZeRO-3 / ZeRO-2 step time: {ratio:.2f}x ({three:.0f} / {two:.0f} ms)")
    if args.record:
        from recording import Figure, record

        lines = [
            "",
            f"- model: d_model 1024, {args.n_layer} layers, seq_len {args.seq_len}, DP=2, full recomputation, "
            f"{args.rounds} alternating rounds of {args.steps} steps; load average during the runs "
            f"{min(loads):.1f}-{max(loads):.1f} on 2 cores (shared with other work)",
            "",
            "| setting | ms/step by round | median |",
            "|---|---|---|",
            *(
                f"| {n} | {', '.join(f'{t:.0f}' for t in times[n])} | {statistics.median(times[n]):.0f} |"
                for n in PEERS
            ),
        ]
        figure = Figure(
            f"ZeRO-3 step time over ZeRO-2's (d_model 1024, {args.n_layer} layers, DP=2, this CPU)",
            f"{ratio:.2f}x",
            "<= 1.35x",
        )
        record("ZeRO-3 against ZeRO-2: step time", lines, figures=[figure])


if __name__ == "__main__":
    main()
