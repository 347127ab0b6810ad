"""What a resume costs in memory: each rank's peak when it reads only its own files, against the merged state.

    python bench/resume_memory.py              # ZeRO-3, DP=2, d_model 512 x 8 layers (25 M parameters)
    python bench/resume_memory.py --zero 2 --record

Three real runs (`hvdlm train` under mpirun, one thread a rank), each of the same 2 steps after a step-2 checkpoint
of the same ZeRO run, and each rank's peak resident memory (the kernel's high-water mark of its process):

- trained: the run that wrote the checkpoint (steps 1-4, saving at 2 and 4): training's own peak;
- own files: that step-2 checkpoint continued at the layout that saved it (`--resume auto`): each rank reads its
  shard file and its own ZeRO slice, nothing else;
- merged: the same checkpoint merged into one file (`hvdlm checkpoint merge`) and continued at the same layout
  (`--resume FILE`): every rank reads the whole state (weights and moments) and cuts its slice, which is what any
  other layout does (and what every resume did before the own-files path).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from memory_budget import PEAK_OF_CHILD  # noqa: E402 - bench/ is the script's directory


def trained(job: Path, run_dir: Path, args, *flags: str) -> dict:
    """One real run on args.dp ranks to step 4 (flags: how it starts); each rank's peak MB and its resume line."""
    from helpers import mpirun, sets, train_argv

    model = [f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", "model.n_head=8", "model.seq_len=64"]
    common = ["train.batch_size=2", "train.max_steps=4", "train.checkpoint_interval=2", "train.eval_interval=0"]
    common += ["train.sample_tokens=0", "train.log_interval=1", "train.tensorboard=false", "train.threads=1"]
    common += [f"train.zero={args.zero}", "model.recompute=full", "train.async_checkpoint=off"]
    program = [sys.executable, "-c", PEAK_OF_CHILD, *train_argv(job, run_dir, *flags, *sets(*model, *common))]
    proc = mpirun(args.dp, program, timeout=1800)
    assert proc.code == 0, proc.out[-3000:]
    peaks = sorted(float(line.split()[-1]) for line in proc.out.splitlines() if line.startswith("peak_rss_mb"))
    how = re.findall(r"^resumed from .* at step \d+ \((.*)\)$", proc.out, flags=re.MULTILINE)
    return {"peak_rss_mb": peaks, "resumed": how[0] if how else ""}


def measure(args, tmp: Path, job: Path) -> dict:
    from helpers import run_cli

    first = tmp / "trained"
    results = {"trained": trained(job, first, args)}
    own = tmp / "own" / "checkpoints"
    own.mkdir(parents=True)
    for path in (first / "checkpoints").glob("step-0000002*"):  # the shard, its slices and its manifest
        shutil.copy(path, own / path.name)
    results["own files"] = trained(job, own.parent, args, "--resume", "auto")
    if args.skip_merged:  # (at larger DP sizes every rank's merged state may not fit the machine together)
        return results
    merged = tmp / "merged.pt"
    proc = run_cli("checkpoint", "merge", first / "checkpoints" / "step-0000002.pt", "--out", merged)
    assert proc.code == 0, proc.out
    results["merged"] = trained(job, tmp / "merged", args, "--resume", str(merged))
    return results


def report(results: dict, args, params: int) -> list[str]:
    base = max(results["trained"]["peak_rss_mb"])
    lines = [
        "",
        f"- model: GPT d_model {args.d_model} x {args.n_layer} layers ({params / 1e6:.1f} M parameters), "
        f"ZeRO-{args.zero}, DP={args.dp}, full recomputation, AdamW: the whole weights are {4 * params / 2**20:,.0f} "
        f"MiB, the whole state (weights and two moments) {12 * params / 2**20:,.0f} MiB, a rank's slice of it "
        f"{12 * params / args.dp / 2**20:,.0f} MiB",
        "",
        "| run | how the state was read | peak resident MiB per rank | over training's peak |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        peak = max(r["peak_rss_mb"])
        ranks = " / ".join(f"{p:,.0f}" for p in r["peak_rss_mb"])
        lines.append(f"| {name} | {r['resumed'] or 'fresh start'} | {ranks} | {peak - base:+,.0f} MiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--zero", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--skip-merged", action="store_true", help="the first two runs only")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log and results.jsonl")
    args = parser.parse_args()
    from helpers import TINY_JOB

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(TINY_JOB)
        results = measure(args, Path(tmp), job)
    params = 12 * args.n_layer * args.d_model**2  # the blocks' weights; the byte vocabulary's table is small
    lines = report(results, args, params)
    print("\n".join(lines))
    print(json.dumps(results))
    if args.record:
        from recording import Figure, record

        base = max(results["trained"]["peak_rss_mb"])
        figures = [
            Figure(
                f"ZeRO-{args.zero} resume's peak over training's, DP={args.dp}, {name}",
                f"{max(results[name]['peak_rss_mb']) - base:+,.0f} MiB",
            )
            for name in ("own files", "merged")
            if name in results
        ]
        record(
            f"What a ZeRO-{args.zero} resume costs in memory: own files against the merged state",
            lines,
            figures=figures,
        )


if __name__ == "__main__":
    main()
