"""Data-parallel scaling on one machine: 1 rank vs 2 ranks with hvdlm (Horovod) vs 2 ranks with PyTorch DDP (gloo).

Every configuration trains the same model on the same per-rank batch with the same threads per rank, so:
    weak-scaling efficiency = tokens/s(2 ranks) / (2 x tokens/s(1 rank))
    hvdlm / DDP            = tokens/s(hvdlm, 2 ranks) / tokens/s(DDP, 2 ranks)

    python bench/dp_scaling.py [--steps 60] [--repeats 2] [--threads 1] [--record]

--record appends the figures to bench/log/RESULTS.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from recording import Figure, record  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "demo.toml"


def hvdlm_tokens_per_s(ranks: int, overrides: list[str], warmup_rows: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "hvdlm", "launch", str(JOB), "--np", str(ranks), "--run-dir", str(run_dir)]
        for item in overrides:
            cmd += ["--set", item]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r][warmup_rows:]
    # Each row covers the same number of steps, so the mean step time gives the throughput of all of them.
    ms = statistics.fmean(r["ms_per_step"] for r in timed)
    return timed[0]["tokens_per_s"] * timed[0]["ms_per_step"] / ms


def ddp_tokens_per_s(ranks: int, overrides: list[str], warmup_steps: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        str(REPO / "bench" / "ddp_baseline.py"),
        str(JOB),
        f"--warmup-steps={warmup_steps}",
    ]
    for item in overrides:
        cmd += ["--set", item]
    out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def training_bench_arguments(doc: str) -> tuple[argparse.Namespace, list[str]]:
    """The options of the benchmarks that time demo-model training, and the overrides every run of them gets
    (no evaluation or sampling, so only training steps are timed; the same threads everywhere)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best one counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank, the same everywhere")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    args = parser.parse_args()
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.log_interval={args.log_interval}",
        "train.eval_interval=0",
        "train.sample_tokens=0",
        f"train.threads={args.threads}",
        f"train.warmup_steps={args.steps // 4}",
        "train.optimizer=adamw",  # as the figures before the demo moved to Muon (bench/optimizers.py compares them)
    ]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    return args, overrides


def best_of_interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Every configuration's tokens/s, run by run; interleaved, so a slow spell of the machine hits them all."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
            print(f"  run {repeat + 1}: {name:<28} {results[name][-1]:>10,.0f} tokens/s", flush=True)
    return results


def main() -> None:
    args, overrides = training_bench_arguments(__doc__)
    runs = {
        "hvdlm, 1 rank": lambda: hvdlm_tokens_per_s(1, overrides, warmup_rows=1),
        "hvdlm, 2 ranks": lambda: hvdlm_tokens_per_s(2, overrides, warmup_rows=1),
        "DDP (gloo), 2 ranks": lambda: ddp_tokens_per_s(2, overrides, warmup_steps=args.log_interval),
    }
    results = best_of_interleaved(runs, args.repeats)
    best = {name: max(values) for name, values in results.items()}
    efficiency = best["hvdlm, 2 ranks"] / (2 * best["hvdlm, 1 rank"])
    versus_ddp = best["hvdlm, 2 ranks"] / best["DDP (gloo), 2 ranks"]

    lines = [f"| {name} | {value:,.0f} |" for name, value in best.items()]
    print("\n| configuration | tokens/s (best of %d) |\n|---|---|" % args.repeats)
    print("\n".join(lines))
    print(f"\nweak-scaling efficiency (2 ranks / 2 x 1 rank): {efficiency:.3f}   (target >= 0.90)")
    print(f"hvdlm / DDP, 2 ranks:                         {versus_ddp:.3f}   (target >= 1.00)")

    if args.record:
        import torch

        every_run = "; ".join(f"{n}: {', '.join(f'{v:,.0f}' for v in vs)}" for n, vs in results.items())
        record(
            "Data-parallel scaling",
            [
                f"- model: jobs/demo.toml, {args.steps} steps, {args.threads} thread(s) per rank, "
                "per-rank batch as in the job",
                "",
                "| configuration | tokens/s (best of %d) |" % args.repeats,
                "|---|---|",
                *lines,
                "",
                "- every run, in order: " + every_run,
                f"- weak-scaling efficiency: **{efficiency:.3f}** (target >= 0.90)",
                f"- hvdlm / DDP: **{versus_ddp:.3f}** (target >= 1.00)",
            ],
            software=f"torch {torch.__version__}, Horovod 0.28.1",
            figures=[
                Figure(
                    "Data parallelism: weak-scaling efficiency, 1 -> 2 ranks (demo model)",
                    f"{efficiency:.3f}",
                    ">= 0.90",
                ),
                Figure(
                    "Data parallelism: hvdlm / PyTorch DDP (gloo) tokens/s, 2 ranks", f"{versus_ddp:.3f}", ">= 1.00"
                ),
            ],
        )


if __name__ == "__main__":
    main()
