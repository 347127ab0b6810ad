"""The `hvdlm` command line. Thin: it parses, validates and calls library functions.

Job-preparation commands (everything but `train`) never import torch or horovod, so they answer instantly on a
login node; `train` imports them inside the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from hvdlm import __version__
from hvdlm.checkpoint_cli import checkpoint as checkpoint_commands
from hvdlm.data.cli import data as data_commands
from hvdlm.errors import InputError
from hvdlm.preemption import Preempted

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def _is_rank0() -> bool:
    """Under a launcher every rank hits the same bad input; only rank 0 should say so."""
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return os.environ[name] == "0"
    return True


class _Group(click.Group):
    """Turns InputError into one clear paragraph and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as e:
            if _is_rank0():
                click.echo(f"Error: {e}", err=True)
            ctx.exit(InputError.exit_code)
        except Preempted as e:  # the checkpoint is written; the batch script requeues on this code
            ctx.exit(e.exit_code)


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override one config key (repeatable), e.g. --set train.lr=3e-4.",
)  # fmt: skip
_run_dir_option = click.option(
    "--run-dir", type=click.Path(file_okay=False), default=None,
    help="Where the run writes config.toml, metrics.jsonl and checkpoints/ (default: runs/JOB-TIMESTAMP).",
)  # fmt: skip
_job_argument = click.argument("job", type=click.Path(dir_okay=False))
_resume_option = click.option(
    "--resume", default=None, metavar="auto|CHECKPOINT",
    help="Continue the run in --run-dir: 'auto' takes its newest complete checkpoint (none yet: start fresh), "
    "or name a checkpoint.",
)  # fmt: skip
_init_from_option = click.option(
    "--init-from", default=None, metavar="RUN_DIR|CHECKPOINT",
    help="Start from another run's weights (its newest checkpoint), with a new optimizer and data order.",
)  # fmt: skip


def _check_resume(resume: str | None, run_dir: str | None) -> None:
    if resume is None:
        return
    if not run_dir:
        raise InputError("--resume continues the run in --run-dir: name the run directory too.")
    if resume != "auto" and not Path(resume).exists():
        raise InputError(f"--resume '{resume}': no such checkpoint. Pass 'auto' or the path of a checkpoint file.")


def _with_init_from(overrides: tuple[str, ...], init_from: str | None) -> tuple[str, ...]:
    return overrides + ((f"train.init_from={json.dumps(init_from)}",) if init_from else ())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvdlm")
def main() -> None:
    """Train GPT-style language models with Horovod and MPI, and prepare the jobs that do it."""


main.add_command(data_commands)
main.add_command(checkpoint_commands)


@main.command()
@_job_argument
@_set_option
@_run_dir_option
@_resume_option
@_init_from_option
def train(
    job: str, overrides: tuple[str, ...], run_dir: str | None, resume: str | None, init_from: str | None
) -> None:  # fmt: skip
    """Train JOB (a TOML job file) as one rank of a job; start it with `hvdlm launch`, mpirun or horovodrun."""
    from hvdlm.config import load_config
    from hvdlm.preemption import catch_stop_signals

    catch_stop_signals()  # a preemption signal during start-up still ends in a checkpoint and a requeue

    cfg = load_config(job, _with_init_from(overrides, init_from))
    _check_resume(resume, run_dir)
    from hvdlm.train import train as run_training  # torch and horovod load only now

    run_training(cfg, job_name=Path(job).stem, run_dir=run_dir, resume=resume)


@main.command()
@_job_argument
@click.option("--np", "np_", type=click.IntRange(min=1), default=None, help="Number of ranks (default: launch.np).")
@click.option("--hosts", default=None, metavar="HOST:SLOTS,...", help="Hosts and their slots (default: this machine).")
@click.option("--hostfile", type=click.Path(dir_okay=False), default=None, help="A hostfile instead of --hosts.")
@click.option(
    "--launcher", type=click.Choice(["mpirun", "horovodrun", "srun"]), default=None, help="Default: launch.launcher."
)
@click.option("--mpi", type=click.Choice(["openmpi", "mpich"]), default=None, help="mpirun's MPI (launch.mpi).")
@click.option("--nic", default=None, metavar="IFACE", help="Network interface for MPI, NCCL and Gloo (launch.nic).")
@click.option("-x", "--env", "forward", multiple=True, metavar="NAME", help="Forward this variable to every rank.")
@click.option("--dry-run", is_flag=True, help="Print the command without running it.")
@_set_option
@_run_dir_option
@_resume_option
@_init_from_option
def launch(
    job: str, np_: int | None, hosts: str | None, hostfile: str | None, launcher: str | None, mpi: str | None,
    nic: str | None, forward: tuple[str, ...], dry_run: bool, overrides: tuple[str, ...], run_dir: str | None,
    resume: str | None, init_from: str | None,
) -> None:  # fmt: skip
    """Start `hvdlm train JOB` on N ranks with mpirun, horovodrun or srun, printing the command first."""
    from hvdlm.config import default_run_dir, load_config
    from hvdlm.launch.commands import LaunchOptions, plan_launch
    from hvdlm.launch.hosts import parse_hosts, read_hostfile

    overrides = _with_init_from(overrides, init_from)
    cfg = load_config(job, overrides)  # fail here, once, rather than on every rank
    _check_resume(resume, run_dir)
    if hosts and hostfile:
        raise InputError("give either --hosts or --hostfile, not both.")
    hosts = hosts or cfg.launch.hosts or None
    if hostfile and (launcher or cfg.launch.launcher) == "srun":
        raise InputError("srun takes its hosts from the Slurm allocation, not a hostfile: drop --hostfile.")
    # A hostfile may mix Open MPI, MPICH and bare lines with comments, which no launcher reads in full (horovodrun
    # crashes on a comment, Open MPI refuses host:N, Hydra host slots=N): the launcher gets the parsed hosts as
    # -H / -hosts, the same checked list --hosts gives, and the printed command needs no file of ours.
    host_list = read_hostfile(hostfile) if hostfile else parse_hosts(hosts) if hosts else None
    run_dir = run_dir or str(default_run_dir(Path(job).stem))
    # Absolute paths: ranks on other nodes may start in another directory (a shared file system is assumed).
    program = [sys.executable, "-m", "hvdlm", "train", str(Path(job).resolve())]
    program += ["--run-dir", str(Path(run_dir).resolve())]
    for item in overrides:
        program += ["--set", item]
    if resume:
        program += ["--resume", resume if resume == "auto" else str(Path(resume).resolve())]
    options = LaunchOptions.from_config(cfg)
    options.mpi = mpi or options.mpi
    options.nic = nic or options.nic
    options.env += [name for name in forward if name not in options.env]
    plan = plan_launch(
        launcher or cfg.launch.launcher, np_ or cfg.launch.np, host_list, None, program,
        threads=cfg.train.threads, options=options, tp=cfg.parallel.tp,
        # Ranks' output is piped through the launcher, so rank 0 cannot see that a person watches: tell it.
        progress=not dry_run and sys.stdout.isatty(),
    )  # fmt: skip
    click.echo(plan.display())
    if dry_run:
        return
    sys.stdout.flush()
    try:
        code = subprocess.call(plan.argv, env={**os.environ, **plan.env})
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


# Job preparation beyond `launch`: hostfiles, Slurm batch scripts, the environment check (hvdlm/launch/cli.py).
from hvdlm.launch.cli import doctor, hostfile, sbatch  # noqa: E402 - after main, which they do not need

main.add_command(hostfile)
main.add_command(sbatch)
main.add_command(doctor)
from hvdlm.watch_cli import generate, plot  # noqa: E402 - watching a run: charts and samples (hvdlm/watch_cli.py)

main.add_command(plot)
main.add_command(generate)
