"""`hvdlm plot` and `hvdlm generate`: watching a run from outside it, in a plain process (no launcher).

matplotlib and torch are imported inside the commands only, so the CLI that holds them stays instant.
"""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR ...]")
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(),
    default=None,
    help="Directory for the charts (default: plots/ in the first RUN_DIR).",
)
def plot(run_dirs: tuple[str, ...], out_dir: str | None) -> None:
    """Chart the loss (by step and by tokens) and the throughput of one or more runs, compared in one figure each."""
    from hvdlm.watch.plot import plot_runs

    for path in plot_runs(list(run_dirs), out_dir):
        click.echo(str(path))


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-tokens", type=int, default=200, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Softmax temperature (> 0).")
@click.option("--top-k", type=int, default=40, show_default=True, help="Sample from the k most likely tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same text.")
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="A checkpoint file (any shard) instead of RUN_DIR's newest complete one.",
)
@click.option("--ema", is_flag=True, help="Use the checkpoint's EMA weights (runs with train.ema_decay > 0).")
def generate(
    run_dir: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    checkpoint: str | None,
    ema: bool,
) -> None:
    """Print PROMPT continued by a model trained in RUN_DIR (its newest complete checkpoint, any TP size)."""
    from hvdlm.watch.generate import Sampling
    from hvdlm.watch.generate import generate as run_generation

    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
    result = run_generation(run_dir, prompt, sampling, checkpoint, ema)
    if result.prompt_tokens > result.context:
        click.echo(
            f"note: the prompt is {result.prompt_tokens} tokens, longer than the model's context of {result.context}; "
            f"only the last {result.context} tokens condition the text.",
            err=True,
        )
    click.echo(result.text)
    # Where the text came from, on stderr: stdout holds the text alone, for pipes.
    sys.stdout.flush()
    click.echo(f"[{result.weights} weights of step {result.step}: {result.checkpoint}]", err=True)


@click.command()
@click.argument("root", default="runs", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run (a list), for scripts.")
@click.option(
    "--active-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=10,
    show_default=True,
    help="Where nothing else tells (no status.json or heartbeat to check), a run that wrote a file within this many "
    "minutes counts as running.",
)
@click.option(
    "--verify",
    "digests",
    is_flag=True,
    help="Check the VERIFIED column's checkpoints by their sha256 (reads every byte) instead of by their sizes.",
)
def runs(root: str, as_json: bool, active_minutes: float, digests: bool) -> None:
    """List the runs under ROOT (default: runs/) with their state, progress, losses, newest checkpoint and newest
    verified checkpoint (its manifest checks out: every file there with the size written; --verify: the sha256).

    States: finished (summary.json covers train.max_steps), running (its process runs; its heartbeats are fresh),
    preempted (stopped at a checkpoint of the step where it stopped: `--resume auto` loses nothing), failed (bad
    input, the watchdog, an exception, killed, or stopped behind its newest checkpoint: the line under the table
    says how, with the exit code). How a run ended is in its status.json.
    """
    from hvdlm.watch.runs import list_runs, render_json, render_table

    found = list_runs(root, active_seconds=active_minutes * 60, digests=digests)
    if as_json:
        click.echo(render_json(found))
    elif not found:
        click.echo(f"no runs under '{root}' (a run directory holds config.toml or metrics.jsonl).")
    else:
        click.echo(render_table(found))
