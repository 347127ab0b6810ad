"""What failure handling costs and how fast it recovers:

1. the watchdog's cost per step: the main thread's beats (4 per step) and the thread's heartbeat write (one per
   tick, at most one a second), timed alone; then whole runs with the watchdog on and off, interleaved;
2. from a SIGKILL of rank 1 to the restarted run's first step, by launcher (`hvdlm launch --max-restarts 1`).

    python bench/failures.py [--rounds 3] [--steps 200] [--record]

--record appends the figures to bench/log/RESULTS.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from recording import record

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import TINY_JOB  # noqa: E402  (the tests' tiny GPT: 2 layers, d_model 32, seq 32, batch 4)


def job_sets(steps: int, log: int) -> list[str]:
    """The tiny job's settings for a benchmark run of `steps` steps."""
    keys = [f"train.max_steps={steps}", f"train.log_interval={log}", "train.eval_interval=0", "train.sample_tokens=0"]
    return [arg for key in [*keys, "train.checkpoint_interval=20"] for arg in ("--set", key)]


_PREFIX = r"(?:\[\d+\]<stdout>:)?"  # horovodrun's prefix of a rank's output lines


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def beat_and_heartbeat_ns() -> tuple[float, float]:
    """ns of one beat() on the main thread, and of one heartbeat write by the watchdog's thread."""
    sys.path.insert(0, str(REPO))
    from hvdlm.training.watchdog import Watchdog

    dog = Watchdog(0, 0)  # off: only records beats, no thread
    n = 200_000
    beat = timeit.timeit(lambda: dog.beat("train_step", 7), number=n) / n * 1e9
    with tempfile.TemporaryDirectory() as tmp:
        dog.attach(Path(tmp), 0, 1, 0)
        dog.heartbeats = Path(tmp)
        writes = 2000
        write = timeit.timeit(lambda: dog._write_heartbeat("train_step", 7), number=writes) / writes * 1e9
    return beat, write


def ms_per_step(job: Path, watchdog_s: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        argv = [sys.executable, "-m", "hvdlm", "train", str(job), "--run-dir", str(run_dir), *job_sets(steps, steps)]
        argv += ["--set", f"train.watchdog_s={watchdog_s}", "--set", "train.threads=1"]
        subprocess.run(argv, env=env(), check=True, capture_output=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["ms_per_step"] for r in rows if "ms_per_step" in r][-1]


def kill_to_first_step(job: Path, launcher: str) -> tuple[float, str]:
    """Seconds from a SIGKILL of rank 1 (after step 25) to the restarted run's first logged step, and the cause."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "out.txt"
        argv = [
            sys.executable,
            "-m",
            "hvdlm",
            "launch",
            str(job),
            "--np",
            "2",
            "--launcher",
            launcher,
            *job_sets(60, 1),
        ]
        argv += ["--max-restarts", "1", "--run-dir", str(run_dir)]
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not re.search(rf"^{_PREFIX}step +(2[5-9]|[3-9]\d) \|", log.read_text(), re.M):
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.02)
            pid = json.loads((run_dir / "heartbeats" / "rank-1.json").read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            while True:
                text = log.read_text()
                m = re.search(r"restart 1 of 1 from the checkpoint of step (\d+)", text)
                if m and re.search(rf"^{_PREFIX}step +{int(m[1]) + 1} \|", text[m.end() :], re.M):
                    took = time.monotonic() - killed
                    cause = re.search(r"hvdlm launch: (.*?); restart", text)[1]
                    break
                assert proc.poll() is None, text[-3000:]
                time.sleep(0.02)
            proc.wait(timeout=300)
            return took, cause
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    beat, write = beat_and_heartbeat_ns()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "tiny.toml"
        job.write_text(TINY_JOB)
        on, off = [], []
        for _ in range(args.rounds):  # interleaved: the machine's drift hits both alike
            off.append(ms_per_step(job, 0, args.steps))
            on.append(ms_per_step(job, 60, args.steps))
        recovery = {launcher: kill_to_first_step(job, launcher) for launcher in ("mpirun", "horovodrun")}
    lines = [
        f"- model: the tests' tiny GPT (2 layers, d_model 32, seq 32, batch 4), 1 rank, {args.steps} steps, "
        f"{args.rounds} interleaved rounds; recovery: 2 ranks, 60 steps, checkpoint every 20, rank 1 killed after "
        "step 25",
        "- the machine was shared with two other engineers' test runs (load average 8-13 on 2 cores): timings are "
        "inflated and noisy",
        "",
        "| watchdog | ms/step (median) | runs |",
        "|---|---|---|",
        f"| off (train.watchdog_s = 0) | {statistics.median(off):.2f} | {', '.join(f'{x:.2f}' for x in off)} |",
        f"| on (train.watchdog_s = 60) | {statistics.median(on):.2f} | {', '.join(f'{x:.2f}' for x in on)} |",
        "",
        f"- alone: one beat() on the main thread **{beat:.0f} ns** (4 per step); one heartbeat write by the "
        f"watchdog's thread **{write / 1000:.0f} us** (once a tick, at most once a second, off the main thread)",
        "",
        "| launcher (--max-restarts 1) | kill -> restarted run's first step | cause reported |",
        "|---|---|---|",
        *(f"| {launcher} | {took:.1f} s | {cause} |" for launcher, (took, cause) in recovery.items()),
    ]
    print("\n".join(lines))
    if args.record:
        record("Failures: the watchdog's cost and the time to restart", lines, "torch 2.13.0+cpu, Horovod 0.28.1")


if __name__ == "__main__":
    main()
