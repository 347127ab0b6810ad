"""`hvdlm data ...`: dataset commands. Import-light: no torch, no horovod (they run on login nodes)."""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

from hvdlm.errors import InputError


@click.group()
def data() -> None:
    """Prepare datasets: sources -> tokenizer -> token shards that the trainer memory-maps."""


@data.command()
@click.argument("sources", nargs=-1)
@click.option("--out", "-o", required=True, type=click.Path(), help="Dataset directory to write (created atomically).")
@click.option(
    "--tokenizer",
    default="byte",
    show_default=True,
    metavar="byte|bpe|DIR",
    help="byte: 256 byte tokens; bpe: byte-level BPE trained on the training documents; DIR: the tokenizer.json of "
    "a transformers model directory (to fine-tune that model with --init-from DIR).",
)
@click.option("--vocab-size", type=int, default=4096, show_default=True, help="BPE vocabulary size.")
@click.option(
    "--val-fraction", type=float, default=0.05, show_default=True, help="Share of documents held out for validation."
)
@click.option(
    "--glob",
    "globs",
    multiple=True,
    metavar="PATTERN",
    help="Files to take from directory sources, e.g. '**/*.md' (repeatable; default: every file but hidden ones).",
)
@click.option(
    "--text-field", default="text", show_default=True, help="JSON Lines field (or Parquet column) that holds the text."
)
@click.option(
    "--strict",
    is_flag=True,
    help="Reject unusable inputs (not UTF-8, binary, broken gzip or zstd, ...) instead of skipping and counting them.",
)
@click.option(
    "--shard-tokens", type=click.IntRange(min=1), default=None, help="Tokens per shard file [default: 2**27]."
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Processes that encode at once, on this machine (under mpirun or srun: on each rank) [default: the cores "
    "this process may use, shared among the ranks of a machine that are not bound to cores of their own].",
)
@click.option(
    "--unit-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=64.0,
    show_default=True,
    help="Input per work unit, in MB: JSON Lines and Parquet files larger than this are cut into several units "
    "that workers encode apart. It changes how the work is shared, never the dataset written.",
)
def prepare(
    sources: tuple[str, ...],
    out: str,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    globs: tuple[str, ...],
    text_field: str,
    strict: bool,
    shard_tokens: int | None,
    workers: int | None,
    unit_mb: float,
) -> None:
    """Tokenize SOURCES into a dataset directory.

    SOURCES are text files, directories (searched with --glob), JSON Lines files (.jsonl / .ndjson, one document
    per record), Parquet files (.parquet, one document per row of the --text-field column), text and JSON Lines
    compressed with gzip (.gz) or zstd (.zst), or 'stdlib' for the running Python's standard-library sources (the
    default). A single text file is cut into documents (at blank lines where it can), as the
    train / validation split is by document. Running it again on unchanged inputs does nothing; running it again
    after an interruption reuses the work units it finished.

    Under mpirun or srun every rank encodes its share of the work units and rank 0 writes the dataset: the same
    bytes whatever the number of workers or ranks.
    """
    _refuse_ignored_vocab_size(tokenizer, vocab_size)
    from hvdlm.data.prepare import PrepareOptions, Spread
    from hvdlm.data.prepare import prepare as run_prepare
    from hvdlm.data.ranks import default_workers, detect_world

    # The shard size's default lives with the shard format (numpy), which this module must not import.
    sizing = {"shard_tokens": shard_tokens} if shard_tokens is not None else {}
    options = PrepareOptions(
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        text_field=text_field,
        strict=strict,
        unit_bytes=max(1, int(unit_mb * 1e6)),
        **sizing,
    )
    world = detect_world()
    spread = Spread(workers=default_workers(world) if workers is None else workers, world=world)
    report = run_prepare(
        list(sources), out, options, globs=list(globs), progress=sys.stderr.isatty(), log=click.echo, spread=spread
    )
    if spread.world.rank == 0:
        click.echo(report.summary())


def _refuse_ignored_vocab_size(tokenizer: str, vocab_size: int) -> None:
    """--vocab-size shapes only a BPE vocabulary: given with the byte tokenizer it would be silently dropped.

    Only a value the user typed (or set in the environment) is refused; the default is never in the way.
    """
    source = click.get_current_context().get_parameter_source("vocab_size")
    if tokenizer == "byte" and source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
        raise InputError(
            f"--vocab-size {vocab_size} applies to the BPE tokenizer only; the byte tokenizer always has 256 tokens. "
            "Drop --vocab-size, or pass --tokenizer bpe to train a vocabulary of that size."
        )
