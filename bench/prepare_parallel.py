"""`hvdlm data prepare` spread over processes and ranks: MB/s of input for the byte and BPE tokenizers, from JSON
Lines and from Parquet, with 1 worker, 2 workers and `mpirun -np 2` (one worker per rank), in one run. MB/s
counts the documents' text (UTF-8 bytes), the same for both formats, per second.

The corpus is the standard library's .py files (real text) up to --mb megabytes, written once as a JSON Lines file
and as a Parquet file (row groups of 50 documents, about 1 MB). Every configuration runs in a fresh process
(under mpirun for the ranks) that times `prepare()` from the sources to the published directory, so the
interpreter's start is not counted but starting the worker processes is; BPE trains its tokenizer in every run,
as a user's run does, and the encoding's own rate (after the training) is shown beside the end-to-end one. The
configurations are interleaved round by round, so a slow spell of the machine hits them all; the best of --repeats
rounds counts. Work units are 1 MB (--unit-mb): a corpus of a few MB cut the default 64 MB way would be one unit.
"CPU s" is the CPU time of the run's processes (workers and ranks included): where it stays the same and the wall
time does not fall, the machine did not give the run more cores.

    python bench/prepare_parallel.py [--mb 4] [--repeats 2] [--vocab-size 4096] [--record]

Target: for BPE, 2 workers >= 1.8x one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from recording import Figure, record  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAUNCHES = {"1 worker": (1, 1), "2 workers": (2, 1), "mpirun -np 2": (1, 2)}  # (workers per rank, ranks)


def write_corpus(directory: Path, megabytes: float) -> dict[str, Path]:
    """The standard library's sources as JSON Lines and as Parquet, the same documents in both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, texts, size = Path(sysconfig.get_path("stdlib")), [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or size >= megabytes * 1e6:
            continue
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            size += len(text.encode())
    jsonl, parquet = directory / "corpus.jsonl", directory / "corpus.parquet"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=50)
    return {"JSON Lines": jsonl, "Parquet": parquet}


def one(source: str, out: str, tokenizer: str, vocab: int, workers: int, unit_mb: float) -> None:
    """A single timed preparation in this process (one rank of it under mpirun); rank 0 prints a JSON line."""
    from hvdlm.data.prepare import PrepareOptions, Spread, prepare
    from hvdlm.data.ranks import detect_world

    options = PrepareOptions(tokenizer=tokenizer, vocab_size=vocab, unit_bytes=int(unit_mb * 1e6))
    spread = Spread(workers=workers, world=detect_world())
    spread.world.barrier()
    start = time.perf_counter()
    report = prepare([source], out, options, log=lambda m: None, spread=spread)
    seconds = time.perf_counter() - start
    if spread.world.rank == 0:
        print(json.dumps({"seconds": seconds, "bpe_seconds": report.bpe_seconds, "input_bytes": report.bytes}))


def timed(source: Path, tokenizer: str, launch: str, args, tmp: Path) -> dict:
    workers, ranks = LAUNCHES[launch]
    out = tmp / f"out-{time.monotonic_ns()}"
    program = [sys.executable, __file__, "--one", str(source), str(out), tokenizer, str(args.vocab_size), str(workers)]
    program += ["--unit-mb", str(args.unit_mb)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    if ranks > 1:
        program = ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "PYTHONPATH", *program]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(program, env=env, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's processes, workers and ranks included
    if proc.returncode != 0:
        raise SystemExit(f"{launch} {tokenizer} failed:\n{proc.stdout}\n{proc.stderr}")
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    row["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row["mb_per_s"] = row["input_bytes"] / 1e6 / row["seconds"]
    row["encode_mb_per_s"] = row["input_bytes"] / 1e6 / max(row["seconds"] - row["bpe_seconds"], 1e-9)
    return row


def show(repeat: int, key: tuple, r: dict) -> None:
    tokenizer, fmt, launch = key
    print(
        f"  round {repeat + 1}: {tokenizer:<4} {fmt:<10} {launch:<13} {r['seconds']:6.2f} s {r['mb_per_s']:6.2f} MB/s "
        f"(BPE training {r['bpe_seconds']:.1f} s, {r['cpu_s']:.1f} CPU s)",
        flush=True,
    )


def table(best: dict) -> tuple[str, list[str]]:
    columns = (
        "tokenizer",
        "input",
        "launch",
        "MB/s of input",
        "x 1 worker",
        "seconds",
        "BPE training s",
        "encode MB/s",
        "CPU s",
    )
    header = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    lines = []
    for (tokenizer, fmt, launch), r in best.items():
        base = best[(tokenizer, fmt, "1 worker")]
        lines.append(
            f"| {tokenizer} | {fmt} | {launch} | {r['mb_per_s']:.2f} | {r['mb_per_s'] / base['mb_per_s']:.2f} "
            f"| {r['seconds']:.2f} | {r['bpe_seconds']:.1f} | {r['encode_mb_per_s']:.2f} | {r['cpu_s']:.1f} |"
        )
    return header, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best of each configuration counts")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--unit-mb", type=float, default=1.0, help="work unit size in MB")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # internal: one timed run in this process
    args = parser.parse_args()
    if args.one:
        source, out, tokenizer, vocab, workers = args.one
        one(source, out, tokenizer, int(vocab), int(workers), args.unit_mb)
        return
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_corpus(Path(tmp), args.mb)
        sizes = {fmt: path.stat().st_size / 1e6 for fmt, path in sources.items()}
        print(f"corpus: {', '.join(f'{fmt} {mb:.1f} MB' for fmt, mb in sizes.items())}", flush=True)
        runs: dict[tuple, list[dict]] = {}
        for repeat in range(args.repeats):
            for tokenizer in ("byte", "bpe"):
                for fmt, source in sources.items():
                    for launch in LAUNCHES:
                        r = timed(source, tokenizer, launch, args, Path(tmp))
                        runs.setdefault((tokenizer, fmt, launch), []).append(r)
                        show(repeat, (tokenizer, fmt, launch), r)
    best = {key: min(rs, key=lambda r: r["seconds"]) for key, rs in runs.items()}
    header, lines = table(best)
    print(f"\nbest of {args.repeats}\n{header}\n" + "\n".join(lines))
    speedups = {
        fmt: best[("bpe", fmt, "2 workers")]["mb_per_s"] / best[("bpe", fmt, "1 worker")]["mb_per_s"] for fmt in sources
    }
    for fmt, x in speedups.items():
        print(f"BPE {fmt}: 2 workers {x:.2f}x one worker (target >= 1.8x: {'met' if x >= 1.8 else 'NOT met'})")
    if args.record:
        write_record(args, sizes, runs, best, header, lines, speedups)


def bottlenecks(best: dict, speedups: dict) -> list[str]:
    """Where the time went, for the record: the serial tokenizer training (Amdahl's bound on 2 workers) and the
    cores the runs actually got (CPU seconds per second of wall time)."""
    lines = []
    for fmt in speedups:
        one = best[("bpe", fmt, "1 worker")]
        serial = one["bpe_seconds"]
        bound = one["seconds"] / (serial + (one["seconds"] - serial) / 2)
        cores = ", ".join(
            f"{la} {best[('bpe', fmt, la)]['cpu_s'] / best[('bpe', fmt, la)]['seconds']:.2f}" for la in LAUNCHES
        )
        lines += [
            f"- BPE from {fmt}, 1 worker: the tokenizer's training, {serial:.1f} s of {one['seconds']:.1f} s, runs "
            f"once on one process; with the rest halved, 2 workers could reach {bound:.2f}x at most",
            f"- BPE from {fmt}, cores the run got on average (CPU s / wall s): {cores}",
        ]
    return lines


def ratio(best: dict, fmt: str) -> float:
    return best[("bpe", fmt, "mpirun -np 2")]["mb_per_s"] / best[("bpe", fmt, "1 worker")]["mb_per_s"]


def write_record(args, sizes, runs, best, header, lines, speedups) -> None:
    every = "; ".join(
        f"{t} {f} {la}: " + ", ".join(f"{r['seconds']:.2f} s" for r in rs) for (t, f, la), rs in runs.items()
    )
    load = os.getloadavg()
    record(
        "Data preparation over workers and ranks",
        [
            f"- corpus: the standard library's .py files, {args.mb:g} MB of text, files of "
            f"{', '.join(f'{k} {v:.1f} MB' for k, v in sizes.items())}; "
            f"work units of {args.unit_mb:g} MB; BPE vocabulary {args.vocab_size}, trained in every run",
            f"- load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}; the machine was "
            "shared with other helpers' tests and benchmarks during the run",
            "",
            header,
            *lines,
            "",
            "- every run, in order of the rounds: " + every,
            *(f"- BPE from {fmt}: 2 workers **{x:.2f}x** one worker (target >= 1.8x)" for fmt, x in speedups.items()),
            *bottlenecks(best, speedups),
        ],
        figures=[
            *(
                Figure(f"Data preparation, BPE from {fmt}, 2 workers / 1 worker", f"{x:.2f}x", ">= 1.8x")
                for fmt, x in speedups.items()
            ),
            *(
                Figure(f"Data preparation, BPE from {fmt}, mpirun -np 2 / 1 worker", f"{ratio(best, fmt):.2f}x")
                for fmt in speedups
            ),
        ],
    )


if __name__ == "__main__":
    main()
