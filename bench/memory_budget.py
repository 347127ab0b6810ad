"""The largest model that really trains in a per-rank memory budget: replicated against ZeRO + full recomputation.

    python bench/memory_budget.py                     # 3 GiB per rank, d_model 1024: the figures of bench/log/
    python bench/memory_budget.py --budget-gb 2       # another budget
    python bench/memory_budget.py --settings "zero2 + full recompute" "zero3 + full recompute" --record
                                                      # ZeRO-3 against ZeRO-2, recorded (bench/recording.py)
    python bench/memory_budget.py --dp 4 ...          # 4 ranks: ZeRO's shards are quarters

For each setting, two real runs (`hvdlm train` under mpirun, DP=2 or --dp, one thread per rank, a few steps) at small
n_layer give each rank's peak resident memory (the kernel's high-water mark of the rank's process: weights,
gradients, optimizer state, saved activations and everything else a real run holds: the interpreter, torch,
Horovod's fusion buffer, MPI) as a + b x n_layer; from the n_layer that line predicts, more real runs step until
n_layer trains under the budget and n_layer + 1 goes over it. The memory account of the first step
(metrics.jsonl) is printed beside the peak, so the difference (what the account does not count) is in view, and
the median step time of each run (after its first step), so that settings compare at the same n_layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SETTINGS = {  # name: --set overrides
    "replicated": [],
    "zero1 + full recompute": ["train.zero=1", "model.recompute=full"],
    "zero2 + full recompute": ["train.zero=2", "model.recompute=full"],
    "zero3 + full recompute": ["train.zero=3", "model.recompute=full"],
}
ACCOUNT = ("params_mb", "grads_mb", "optimizer_mb", "activations_mb")

# Each rank runs hvdlm in a child process and prints the child's peak resident memory (ru_maxrss, KiB on Linux)
# when it ends: the high-water mark of everything the rank held, not only the tensors the account counts.
PEAK_OF_CHILD = (
    "import os, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(f'peak_rss_mb rank {os.environ.get(\"OMPI_COMM_WORLD_RANK\", 0)} {rss:.1f}', flush=True)\n"
    "sys.exit(code)\n"
)


def trained(job: Path, run_dir: Path, n_layer: int, extra: list[str], args) -> dict:
    """One real run of `steps` steps on args.dp ranks; each rank's peak resident MB and the first step's account."""
    from helpers import mpirun, sets, train_argv

    model = [f"model.n_layer={n_layer}", "model.n_head=16", "model.d_model=1024", f"model.seq_len={args.seq_len}"]
    common = [f"train.batch_size={args.micro_batch}", f"train.max_steps={args.steps}", "train.eval_interval=0"]
    common += ["train.sample_tokens=0", "train.log_interval=1", "train.tensorboard=false", "train.threads=1"]
    program = [sys.executable, "-c", PEAK_OF_CHILD, *train_argv(job, run_dir, *sets(*model, *common, *extra))]
    proc = mpirun(args.dp, program, timeout=3600)
    assert proc.code == 0, proc.out[-3000:]
    peaks = [float(line.split()[-1]) for line in proc.out.splitlines() if line.startswith("peak_rss_mb")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    times = sorted(r["ms_per_step"] for r in steps[1:]) or [steps[0]["ms_per_step"]]
    account = {k: steps[0][k] for k in ACCOUNT}
    return {"n_layer": n_layer, "peak_rss_mb": max(peaks), "ms_per_step": times[len(times) // 2], "account_mb": account}


def largest(name: str, args, tmp: Path, job: Path) -> dict:
    """Two probes give the line; from its prediction, real runs step up (or down) until n_layer trains under the
    budget and n_layer + 1 does not."""
    extra = SETTINGS[name]
    budget_mb = args.budget_gb * 1024
    runs: dict[int, dict] = {}

    def run(n: int) -> dict:
        if n not in runs:
            runs[n] = trained(job, tmp / f"{name.replace(' ', '').replace('+', '-')}-{n}", n, extra, args)
            print(name, json.dumps(runs[n]), flush=True)
        return runs[n]

    (n0, r0), (n1, r1) = ((n, run(n)["peak_rss_mb"]) for n in args.probe_layers)
    per_layer = (r1 - r0) / (n1 - n0)
    fixed = r0 - per_layer * n0
    n = predicted = int((budget_mb - fixed) // per_layer)
    for _ in range(8):  # the line is close: a step or two settles it
        if run(n)["peak_rss_mb"] > budget_mb:
            n -= 1
        elif run(n + 1)["peak_rss_mb"] <= budget_mb:
            n += 1
        else:
            break
    fits, next_one = runs.get(n), runs.get(n + 1)
    confirmed = bool(fits and next_one) and fits["peak_rss_mb"] <= budget_mb < next_one["peak_rss_mb"]
    return {
        "fixed_mb": round(fixed, 1),
        "per_layer_mb": round(per_layer, 1),
        "predicted_n_layer": predicted,
        "largest_n_layer": n,
        "confirmed": confirmed,
        "runs": [runs[k] for k in sorted(runs)],
    }


def record_results(results: dict, args) -> None:
    """The largest n_layer of each setting, the weights' account and the step time at the probes' n_layer, and
    ZeRO-3 against ZeRO-2 where both ran."""
    from recording import Figure, record

    lines = ["", "| setting | largest n_layer | per layer MB | params MB (largest probe) | ms/step by n_layer |"]
    lines.append("|---|---|---|---|---|")
    for name, r in results.items():
        probe = next(x for x in r["runs"] if x["n_layer"] == max(args.probe_layers))
        times = ", ".join(f"{x['n_layer']}: {x['ms_per_step']:.0f}" for x in r["runs"])
        lines.append(
            f"| {name} | {r['largest_n_layer']} | {r['per_layer_mb']} | {probe['account_mb']['params_mb']:.0f} "
            f"| {times} |"
        )
    figures = [
        Figure(
            f"largest n_layer (d_model 1024) trained in {args.budget_gb:g} GiB a rank, DP={args.dp}, {name}",
            str(r["largest_n_layer"]),
        )
        for name, r in results.items()
    ]
    two, three = results.get("zero2 + full recompute"), results.get("zero3 + full recompute")
    if two and three:
        same = {x["n_layer"]: x for x in two["runs"]}
        both = [(x, same[x["n_layer"]]) for x in three["runs"] if x["n_layer"] in same]
        n, (z3, z2) = max((x["n_layer"], (x, y)) for x, y in both)
        ratio = z3["ms_per_step"] / z2["ms_per_step"]
        layers = three["largest_n_layer"] / two["largest_n_layer"]
        figures += [
            Figure(f"ZeRO-3 layers in the budget over ZeRO-2's, DP={args.dp}", f"{layers:.2f}x", ">= 1.6x"),
            Figure(
                f"ZeRO-3 step time over ZeRO-2's (n_layer {n}, DP={args.dp}, this CPU)", f"{ratio:.2f}x", "<= 1.35x"
            ),
        ]
        lines.append(f"\nZeRO-3 / ZeRO-2: {layers:.2f}x the layers, {ratio:.2f}x the step time at n_layer {n}.")
    record("Largest model in a memory budget: ZeRO-3 against ZeRO-2", lines, figures=figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gb", type=float, default=3.0, help="per rank")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dp", type=int, default=2, help="ranks (data-parallel); ZeRO shards over them")
    parser.add_argument("--probe-layers", type=int, nargs=2, default=[2, 6])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log and results.jsonl")
    args = parser.parse_args()
    from helpers import TINY_JOB

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(TINY_JOB)
        for name in args.settings:
            results[name] = largest(name, args, Path(tmp), job)
    print(json.dumps({"budget_gb": args.budget_gb, "seq_len": args.seq_len, "dp": args.dp, "largest": results}))
    if args.record:
        record_results(results, args)
    if not all(r["confirmed"] for r in results.values()):
        sys.exit("the predicted largest model did not train under the budget, or the next one did too")


if __name__ == "__main__":
    main()
