"""`hvdlm data prepare` throughput on the standard-library corpus, for the byte-level and the BPE tokenizer.

Each run prepares a fresh dataset directory (nothing cached) and is timed end to end, from resolving the sources
to the published directory; MB/s counts the documents' UTF-8 bytes (the input text) per second of wall time.
For BPE the tokenizer's training time is reported on its own too.

    python bench/data_prepare.py [--repeats 3] [--vocab-size 4096] [--record]

Targets: byte-level >= 50 MB/s; BPE training on the standard library < 60 s.
--record appends the figures to bench/log/RESULTS.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from recording import Figure, record  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hvdlm.data.prepare import PrepareOptions, prepare  # noqa: E402


def one_run(options: PrepareOptions) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = prepare(["stdlib"], Path(tmp) / "ds", options, log=lambda message: None)
        seconds = time.perf_counter() - start
    tokens = sum(report.tokens.values())
    return {
        "seconds": seconds,
        "mb_per_s": report.bytes / 1e6 / seconds,
        "bytes": report.bytes,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "bytes_per_token": report.bytes / tokens,
        "train_s": report.bpe_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per tokenizer; the best one counts")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/log/RESULTS.md")
    args = parser.parse_args()

    configs = {
        "byte": PrepareOptions(tokenizer="byte"),
        f"bpe {args.vocab_size}": PrepareOptions(tokenizer="bpe", vocab_size=args.vocab_size),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
        for name, options in configs.items():
            r = one_run(options)
            runs[name].append(r)
            extra = f", BPE training {r['train_s']:.1f} s" if r["train_s"] else ""
            print(f"  run {repeat + 1}: {name:<10} {r['seconds']:6.2f} s  {r['mb_per_s']:7.1f} MB/s{extra}", flush=True)

    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    columns = ("tokenizer", "MB/s of input", "seconds", "tokens/s", "bytes per token", "BPE training s")
    header = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    lines = []
    for name, r in best.items():
        training = f"{r['train_s']:.1f}" if r["train_s"] else "-"
        lines.append(
            f"| {name} | {r['mb_per_s']:.1f} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {r['bytes_per_token']:.2f} | {training} |"
        )
    corpus = f"standard library of Python {platform.python_version()}: {best['byte']['bytes'] / 1e6:.1f} MB of text"
    byte_ok = best["byte"]["mb_per_s"] >= 50
    bpe_train = best[f"bpe {args.vocab_size}"]["train_s"]
    print(f"\n{corpus}, best of {args.repeats}\n{header}\n" + "\n".join(lines))
    byte_mb_s = best["byte"]["mb_per_s"]
    print(f"\nbyte-level prepare: {byte_mb_s:.1f} MB/s (target >= 50: {'met' if byte_ok else 'NOT met'})")
    print(f"BPE training:       {bpe_train:.1f} s (target < 60 s: {'met' if bpe_train < 60 else 'NOT met'})")

    if args.record:
        every = "; ".join(n + ": " + ", ".join("%.2f s" % r["seconds"] for r in rs) for n, rs in runs.items())
        record(
            "Data preparation throughput",
            [
                f"- corpus: {corpus}; each run prepares a fresh directory, timed end to end",
                "",
                header,
                *lines,
                "",
                "- every run, in order: " + every,
                f"- byte-level prepare: **{best['byte']['mb_per_s']:.1f} MB/s** (target >= 50)",
                f"- BPE training: **{bpe_train:.1f} s** (target < 60 s)",
            ],
            figures=[
                Figure("Data preparation, byte-level", f"{best['byte']['mb_per_s']:.1f} MB/s", ">= 50 MB/s"),
                Figure(
                    f"Data preparation, BPE training ({args.vocab_size}, {best['byte']['bytes'] / 1e6:.1f} MB corpus)",
                    f"{bpe_train:.1f} s",
                    "< 60 s",
                ),
            ],
        )


if __name__ == "__main__":
    main()
