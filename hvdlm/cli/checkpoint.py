"""`hvdlm checkpoint ...`: work on checkpoint files without starting a job. torch loads inside the commands only."""

from __future__ import annotations

from pathlib import Path

import click

from hvdlm.errors import InputError


@click.group()
def checkpoint() -> None:
    """Inspect, verify and convert checkpoints."""


@checkpoint.command()
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the unsharded checkpoint (default: STEM-merged.pt, or .safetensors, beside the input).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pt", "safetensors"]),
    default="pt",
    show_default=True,
    help="pt: an hvdlm checkpoint (model and optimizer); safetensors: the weights only (the model's, and the EMA's "
    "as ema.NAME when the run kept one).",
)
def merge(ckpt: str, out: str | None, fmt: str) -> None:
    """Merge the TP shards of CKPT into one unsharded checkpoint (model and optimizer state), or its weights.

    CKPT is any one shard (step-0000100.tp0-of-2.pt), or the checkpoint's unsharded name (step-0000100.pt).
    """
    from hvdlm.checkpoint.format import save_checkpoint
    from hvdlm.checkpoint.reshard import load_full_state
    from hvdlm.checkpoint.store import shard_paths

    paths = shard_paths(ckpt)
    stem = Path(ckpt).name.split(".")[0]
    target = Path(out) if out else paths[0].parent / f"{stem}-merged.{fmt}"
    if target.exists():
        raise InputError(f"'{target}' already exists; hvdlm does not write over a checkpoint. Pass another --out.")
    state = load_full_state(ckpt)
    try:
        if fmt == "safetensors":
            from hvdlm.checkpoint.hf import write_safetensors

            write_safetensors(state, target)
        else:
            save_checkpoint(target, state)
    except OSError as e:
        raise InputError(
            f"cannot write '{target}': {e.strerror or e}. Pass an --out in a writable directory."
        ) from None
    from hvdlm.checkpoint.stages import head_is_tied

    tied = head_is_tied(state)  # a tied head is the embedding's tensor, counted once
    n = sum(t.numel() for name, t in state["model"].items() if name != "head.weight" or not tied)
    click.echo(f"merged {len(paths)} shard(s) of step {state.get('step')} ({n / 1e6:.2f}M parameters) into {target}")


@checkpoint.command()
@click.argument("ckpt", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="The description as one JSON object, for scripts.")
def inspect(ckpt: str, as_json: bool) -> None:
    """Describe a checkpoint: step, model shape, layout (TP shards), sizes, and what it holds (optimizer, EMA,
    scaler, data position, RNG states, progress). Reads the files only; changes nothing.

    CKPT is a checkpoint file, any one of its shards, or a run directory (its newest complete checkpoint).
    """
    import json

    from hvdlm.checkpoint.describe import describe_checkpoint, render

    if not Path(ckpt).exists() and not Path(ckpt).name.endswith(".pt"):
        raise InputError(f"'{ckpt}' does not exist. Name a checkpoint file (.pt) or a run directory.")
    info = describe_checkpoint(ckpt)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@checkpoint.command()
@click.argument("path", type=click.Path())
def verify(path: str) -> None:
    """Check checkpoint files against the checksums their save recorded (step-N.manifest.json): one line per
    checkpoint, ok or which file is missing, truncated or differs. Exit code 0 when every checkpoint is good, 2
    otherwise (a check to run before requeueing a job). Reads the files only; changes nothing.

    PATH is a run directory (every checkpoint in it) or a checkpoint file or any of its shards (that checkpoint).
    A checkpoint written before hvdlm recorded checksums has no manifest: it is checked for missing files only.
    """
    import time

    from hvdlm.checkpoint.store import refuse_missing_run
    from hvdlm.checkpoint.verify import verify_target

    refuse_missing_run(path)
    start = time.perf_counter()
    results = verify_target(path)
    if not results:
        raise InputError(
            f"'{path}' holds no checkpoint (looked in its checkpoints/ directory). Name a run directory "
            "that has written one, or a checkpoint file."
        )
    for r in results:
        if r.problems:
            click.echo(f"{r.name}: FAILED: {'; '.join(r.problems)}")
        else:
            click.echo(
                f"{r.name}: ok" + ("" if r.has_manifest else " (no manifest: every file there, not checksummed)")
            )
    seconds, size = time.perf_counter() - start, sum(r.size for r in results)
    bad = sum(bool(r.problems) for r in results)
    click.echo(
        f"{len(results) - bad} of {len(results)} checkpoint(s) good; {size / 1e6:,.1f} MB read in {seconds:.2f} s "
        f"({size / 1e6 / max(seconds, 1e-9):,.0f} MB/s)"
    )
    if bad:
        raise click.exceptions.Exit(InputError.exit_code)
