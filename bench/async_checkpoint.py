"""Asynchronous against synchronous checkpoint saves: the step time of a step during which a save is in flight,
against a step without one, at a state of at least 200 MB per rank; and `hvdlm checkpoint verify`'s speed.

Real runs of `hvdlm train` (one rank, 1 thread, as each of `make demo`'s ranks) of a 19M-parameter GPT: fp32
weights and AdamW's two moments are 229 MB per rank, the size of each checkpoint file. Every run takes the same
steps and saves at the same steps (every --interval), with train.async_checkpoint on and off, in alternating
rounds so that a machine that slows down mid-run slows both alike. Each step's time comes from metrics.jsonl
(log_interval = 1: ms_per_step, from the end of one step's log row to the next):

- sync: the save at step k is in step k+1's time (the whole write: serialise, hash, write, fsync, rename);
- async: step k+1 holds the host copy; the steps after it, up to the one in which the file's last byte was
  written (its mtime), ran while the write was in flight; the baseline is the median of the steps away from any
  save, in the same run.

Then `hvdlm checkpoint verify` of the last async run (all its checkpoints, read back from the page cache as a requeue
right after a run would), in MB/s of checkpoint, beside hashlib's sha256 on a buffer in memory.

    python bench/async_checkpoint.py [--steps 24] [--interval 6] [--rounds 2] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recording import Figure, record

REPO = Path(__file__).resolve().parents[1]
JOB = """
[model]
n_layer = 6
n_head = 8
d_model = 512
seq_len = 64

[train]
batch_size = 2
warmup_steps = 2
log_interval = 1
eval_interval = 0
sample_tokens = 0
tensorboard = false
threads = 1
keep_checkpoints = 0
"""


def train(job: Path, run_dir: Path, steps: int, interval: int, mode: str) -> list[dict]:
    """One run of `hvdlm train`; its training rows."""
    sets = [f"train.max_steps={steps}", f"train.checkpoint_interval={interval}", f"train.async_checkpoint={mode}"]
    argv = [sys.executable, "-m", "hvdlm", "train", str(job), "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"hvdlm train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def classify(rows: list[dict], interval: int, written: dict[int, float]) -> dict[str, list[float]]:
    """Each step's ms as: `save` (the step after a save's step: the write or the copy), `flight` (later steps
    that started before the save's file was written, `written` = step -> mtime), `plain` (the others, away from
    the first steps)."""
    by_step = {r["step"]: r for r in rows}
    saves = [s for s in by_step if s % interval == 0 and s < max(by_step)]
    kinds: dict[str, list[float]] = {"save": [], "flight": [], "plain": []}
    busy = {k + 1 for k in saves}
    for k in saves:
        kinds["save"].append(by_step[k + 1]["ms_per_step"])
        step = k + 2
        # A step ran while the write was in flight when it began (the row before it) before the file's last byte;
        # the next save's step (which may wait for this write) counts as a save's.
        while step in by_step and step - 1 not in saves and by_step[step - 1]["time"] < written.get(k, 0):
            kinds["flight"].append(by_step[step]["ms_per_step"])
            busy.add(step)
            step += 1
        busy.add(step)  # the step whose boundary puts the save in place (its manifest, pruning): not plain either
    kinds["plain"] = [r["ms_per_step"] for s, r in by_step.items() if s > 3 and s not in busy]
    return kinds


def one_round(job: Path, folder: Path, args, mode: str, index: int) -> tuple[dict, Path]:
    run_dir = folder / f"{mode}-{index}"
    written: dict[int, float] = {}
    rows = train(job, run_dir, args.steps, args.interval, mode)
    # Each file says when its last byte was written (the rename into place keeps that time): every save is kept.
    for p in (run_dir / "checkpoints").glob("step-*.pt"):
        written[int(p.name[5:12])] = p.stat().st_mtime
    return classify(rows, args.interval, written), run_dir


def verify_speed(run_dir: Path) -> tuple[float, float]:
    """`hvdlm checkpoint verify RUN_DIR` in MB/s of checkpoint (its own timing, the process start left out), and
    hashlib's sha256 on 256 MB in memory."""
    from hvdlm.checkpoint.verify import verify_target

    start = time.perf_counter()
    results = verify_target(run_dir)
    seconds = time.perf_counter() - start
    assert all(not v.problems for v in results), [v.problems for v in results]
    verify = sum(v.size for v in results) / 1e6 / seconds
    buffer = os.urandom(256 << 20)
    start = time.perf_counter()
    hashlib.sha256(buffer).hexdigest()
    raw = len(buffer) / 1e6 / (time.perf_counter() - start)
    return verify, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--interval", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        folder = Path(tmp)
        job = folder / "job.toml"
        job.write_text(JOB)
        found: dict[str, dict[str, list[float]]] = {m: {"save": [], "flight": [], "plain": []} for m in ("on", "off")}
        state_mb, last_async = 0.0, None
        for i in range(args.rounds):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                kinds, run_dir = one_round(job, folder, args, mode, i)
                for k, v in kinds.items():
                    found[mode][k] += v
                state_mb = max(p.stat().st_size for p in (run_dir / "checkpoints").glob("*.pt")) / 1e6
                if mode == "on":
                    last_async = run_dir
                for other in folder.glob("*-*"):  # the disk holds one run's saves at a time, and the last async
                    if other.is_dir() and other not in (run_dir, last_async):
                        shutil.rmtree(other)
                print(mode, {k: [round(x) for x in v] for k, v in kinds.items()}, flush=True)
        verify, raw = verify_speed(last_async)
    report(found, state_mb, verify, raw, args)


def report(found: dict, state_mb: float, verify: float, raw: float, args) -> None:
    med = {m: statistics.median(found[m]["plain"]) for m in found}
    sync_save = statistics.fmean(found["off"]["save"])
    async_copy = statistics.fmean(found["on"]["save"])
    flight = statistics.fmean(found["on"]["flight"]) if found["on"]["flight"] else med["on"]
    flight_pct = 100 * (flight / med["on"] - 1)
    lines = [
        f"- a state of {state_mb:,.0f} MB per rank (each checkpoint file); {args.rounds} round(s) of {args.steps} "
        f"steps each mode, a save every {args.interval}",
        "",
        "| mode | step without a save (median) | the step holding the save | steps with the write in flight |",
        "|---|---|---|---|",
        f"| sync | {med['off']:,.0f} ms | {sync_save:,.0f} ms (+{sync_save - med['off']:,.0f} ms: the whole write) | "
        "none |",
        f"| async | {med['on']:,.0f} ms | {async_copy:,.0f} ms (+{async_copy - med['on']:,.0f} ms: the host copy) | "
        f"{flight:,.0f} ms ({flight_pct:+.0f} %, {len(found['on']['flight'])} steps) |",
        "",
        f"- `checkpoint verify`: {verify:,.0f} MB/s of checkpoint (from the page cache); sha256 in memory "
        f"{raw:,.0f} MB/s",
    ]
    print("\n".join(lines))
    if args.record:
        import torch

        record(
            "Asynchronous checkpoint saves (bench/async_checkpoint.py)",
            lines,
            software=f"torch {torch.__version__}",
            figures=[
                Figure(
                    "async checkpoint: a step with the write in flight against one without, 229 MB state per rank",
                    f"{flight_pct:+.0f} % ({flight:,.0f} against {med['on']:,.0f} ms)",
                    "at most +10 %",
                ),
                Figure(
                    "sync checkpoint: the step holding the save against one without, 229 MB state per rank",
                    f"+{sync_save - med['off']:,.0f} ms ({sync_save:,.0f} against {med['off']:,.0f} ms)",
                ),
                Figure(
                    "async checkpoint: the step holding the host copy against one without, 229 MB state per rank",
                    f"+{async_copy - med['on']:,.0f} ms ({async_copy:,.0f} against {med['on']:,.0f} ms)",
                ),
                Figure("checkpoint verify speed", f"{verify:,.0f} MB/s of checkpoint", ">= 500 MB/s"),
            ],
        )


if __name__ == "__main__":
    main()
