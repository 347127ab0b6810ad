"""`hvdlm train` (one rank's program) and `hvdlm launch` (the launcher's command line, printed, then run: the
checks and the running are hvdlm.launch.job's).

torch and horovod are imported inside `train` only: `launch` answers at once on a login node.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hvdlm.cli.options import (
    check_resume,
    init_from_option,
    job_argument,
    resume_option,
    run_dir_option,
    set_option,
    with_init_from,
)
from hvdlm.config import LaunchConfig, choices, load_config


@click.command()
@job_argument
@set_option
@run_dir_option
@resume_option
@init_from_option
def train(job: str, overrides: tuple[str, ...], run_dir: str | None, resume: str | None, init_from: str | None) -> None:
    """Train JOB (a TOML job file) as one rank of a job; start it with `hvdlm launch`, mpirun or horovodrun."""
    from hvdlm.training.preemption import catch_stop_signals

    catch_stop_signals()  # a preemption signal during start-up still ends in a checkpoint and a requeue

    cfg = load_config(job, with_init_from(overrides, init_from))
    check_resume(resume, run_dir)
    from hvdlm.training.trainer import train as run_training  # torch and horovod load only now

    run_training(cfg, job_name=Path(job).stem, run_dir=run_dir, resume=resume)


@click.command()
@job_argument
@click.option("--np", type=click.IntRange(min=1), default=None, help="Number of ranks (default: launch.np).")
@click.option("--hosts", default=None, metavar="HOST:SLOTS,...", help="Hosts and their slots (default: this machine).")
@click.option("--hostfile", type=click.Path(dir_okay=False), default=None, help="A hostfile instead of --hosts.")
@click.option(
    "--launcher", type=click.Choice(choices(LaunchConfig, "launcher")), default=None, help="Default: launch.launcher."
)
@click.option("--mpi", type=click.Choice(choices(LaunchConfig, "mpi")), default=None, help="mpirun's MPI (launch.mpi).")
@click.option("--nic", default=None, metavar="IFACE", help="Network interface for MPI, NCCL and Gloo (launch.nic).")
@click.option("-x", "--env", "forward", multiple=True, metavar="NAME", help="Forward this variable to every rank.")
@click.option("--dry-run", is_flag=True, help="Print the command without running it.")
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=0,
    help="After a failure (a rank died, the watchdog), start again from the newest checkpoint, at most N times.",
)
@click.option(
    "--min-np",
    type=click.IntRange(min=1),
    default=None,
    help="At a restart with fewer slots left (hostfile), or under --elastic, go on with this many ranks or more.",
)
@click.option("--elastic", is_flag=True, help="Horovod elastic (horovodrun, Gloo, tp = 1): lost workers are dropped.")
@click.option("--max-np", type=click.IntRange(min=1), default=None, help="--elastic: the most workers (default: --np).")
@set_option
@run_dir_option
@resume_option
@init_from_option
def launch(job: str, overrides: tuple[str, ...], init_from: str | None, **options) -> None:
    """Start `hvdlm train JOB` on N ranks with mpirun, horovodrun or srun, printing the command first.

    Ctrl-C, SIGTERM or SIGHUP asks the ranks for a checkpoint and a stop (again: they end at once)."""
    from hvdlm.launch.job import LaunchArgs, prepare_launch, start_launch

    args = LaunchArgs(job=job, overrides=with_init_from(overrides, init_from), **options)
    cfg = load_config(job, args.overrides)  # fail here, once, rather than on every rank
    check_resume(args.resume, args.run_dir)
    prepared = prepare_launch(cfg, args)
    for note in prepared.plan.notes:  # settings this launcher cannot honour, and why
        click.echo(note, err=True)
    click.echo(prepared.plan.display())
    if not args.dry_run:
        sys.exit(start_launch(prepared, show=click.echo, say=lambda line: click.echo(line, err=True)))
