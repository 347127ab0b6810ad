"""`hvdlm train` (one rank's program) and `hvdlm launch` (the launcher's command line, printed, then run).

torch and horovod are imported inside `train` only: `launch` answers at once on a login node.
"""

from __future__ import annotations

import os
import shlex
import signal
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
from hvdlm.config import LaunchConfig, choices, default_run_dir, load_config
from hvdlm.errors import InputError
from hvdlm.training.preemption import REQUEUE_EXIT_CODE


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
@click.option("--np", "np_", type=click.IntRange(min=1), default=None, help="Number of ranks (default: launch.np).")
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
def launch(
    job: str,
    np_: int | None,
    hosts: str | None,
    hostfile: str | None,
    launcher: str | None,
    mpi: str | None,
    nic: str | None,
    forward: tuple[str, ...],
    dry_run: bool,
    max_restarts: int,
    min_np: int | None,
    elastic: bool,
    max_np: int | None,
    overrides: tuple[str, ...],
    run_dir: str | None,
    resume: str | None,
    init_from: str | None,
) -> None:
    """Start `hvdlm train JOB` on N ranks with mpirun, horovodrun or srun, printing the command first.

    Ctrl-C, SIGTERM or SIGHUP asks the ranks for a checkpoint and a stop (again: they end at once)."""
    from hvdlm.launch.commands import LaunchRequest, plan_launch
    from hvdlm.launch.preflight import check_before_launch

    overrides = with_init_from(overrides, init_from)
    cfg = load_config(job, overrides)  # fail here, once, rather than on every rank
    check_resume(resume, run_dir)
    la = cfg.launch
    launcher = launcher or ("horovodrun" if elastic else la.launcher)
    if elastic and max_restarts:
        raise InputError(
            "--elastic and --max-restarts are two answers to a failure: elastic drops the lost workers and goes on, "
            "restarts start the job again from a checkpoint. Choose one."
        )
    if elastic:
        from hvdlm.launch.elastic import check_elastic
        from hvdlm.training.elastic import refuse_unsupported

        refuse_unsupported(cfg)
        min_np = check_elastic(launcher, la.controller, min_np, max_np or np_ or la.np, np_ or la.np)
    else:
        _check_restarts(max_restarts, min_np, np_ or la.np)
    host_list = _host_list(hosts or la.hosts or None, hostfile, launcher)
    run_dir = run_dir or str(default_run_dir(Path(job).stem))
    check_before_launch(cfg, Path(run_dir), resume, local_only=host_list is None and launcher != "srun")
    # Ranks' output is piped through the launcher, so rank 0 cannot see that a person watches: tell it.
    progress = not dry_run and sys.stdout.isatty()

    def plan_for(np: int, resume: str | None, more: tuple[str, ...] = ()):
        """The launch of np ranks; a hostfile is read again each time (a restart's hosts are those it lists)."""
        hosts_now = _host_list(None, hostfile, launcher) if hostfile else host_list
        program = _rank_program(job, run_dir, overrides + more, resume)
        request = LaunchRequest.from_config(cfg, launcher, np, program, hosts=hosts_now, progress=progress)
        return plan_launch(request, _launch_options(cfg, mpi, nic, forward))

    plan = plan_for(np_ or la.np, resume)
    if elastic:
        plan, script = _elastic_plan(plan, run_dir, host_list, hostfile, min_np, max_np or np_ or la.np)
    for note in plan.notes:  # settings this launcher cannot honour, and why
        click.echo(note, err=True)
    click.echo(plan.display())
    if dry_run:
        return
    if elastic:
        from hvdlm.launch.elastic import write_discovery_script

        write_discovery_script(Path(run_dir), script)
    sys.stdout.flush()
    if max_restarts:
        from hvdlm.launch.restarts import ACCUMULATION, AttemptSize, RestartPolicy

        p = cfg.parallel
        # With pipeline stages a step's micro-batches are parallel.microbatches (accumulation_steps stays 1).
        key, steps = (
            ("parallel.microbatches", p.microbatches) if p.pp > 1 else (ACCUMULATION, cfg.train.accumulation_steps)
        )
        policy = RestartPolicy(max_restarts, min_np or np_ or la.np, p.tp * p.pp, key)
        first = AttemptSize(np_ or la.np, steps)
        sys.exit(_run_restarting(plan, plan_for, first, policy, launcher, (job, run_dir, hostfile)))
    sys.exit(_run(plan, launcher, job, run_dir))


def _elastic_plan(plan, run_dir: str, hosts, hostfile: str | None, min_np: int, max_np: int):
    """horovodrun's elastic command line and the text of its host discovery script."""
    from hvdlm.launch.elastic import DISCOVERY_SCRIPT, discovery_script, elastic_argv

    script = Path(run_dir).resolve() / DISCOVERY_SCRIPT
    plan.argv = elastic_argv(plan.argv, script, min_np, max_np)
    return plan, discovery_script(hosts, hostfile)


def _check_restarts(max_restarts: int, min_np: int | None, np: int) -> None:
    if min_np is not None and not max_restarts:
        raise InputError("--min-np is the fewest ranks a restart may continue with: give --max-restarts N too.")
    if min_np is not None and min_np > np:
        raise InputError(
            f"--min-np {min_np} is more than the {np} ranks the job starts with: use --min-np {np} or less."
        )


def _run_restarting(plan, plan_for, first, policy, launcher: str, where: tuple[str, str, str | None]) -> int:
    """--max-restarts: attempts until one does not fail (hvdlm.launch.restarts). A restart resumes from the newest
    checkpoint, on the hosts a hostfile lists by then, with the global batch kept."""
    from hvdlm.launch.restarts import AttemptSize, run_with_restarts
    from hvdlm.launch.supervise import run_supervised

    job, run_dir, hostfile = where

    def attempt(size: AttemptSize, again: bool) -> tuple[int, int | None]:
        now = plan
        if again:
            now = plan_for(size.np, "auto", (f"{policy.key}={size.accumulation}",))
            click.echo(now.display())
            sys.stdout.flush()
        return run_supervised(now.argv, {**os.environ, **now.env}, launcher)

    def slots() -> int | None:  # a hostfile is read again at each restart: a host gone means fewer ranks
        return sum(h.slots for h in _host_list(None, hostfile, launcher)) if hostfile else None

    say = lambda line: click.echo(line, err=True)  # noqa: E731
    code, signum = run_with_restarts(attempt, first, Path(run_dir), policy, slots, say)
    return _explain_stop(code, signum, launcher, job, run_dir)


def _launch_options(cfg, mpi: str | None, nic: str | None, forward: tuple[str, ...]):
    """The job's [launch] and [slurm] with the command line's --mpi, --nic and -x on top (a copy: cfg is kept)."""
    from hvdlm.launch.commands import LaunchOptions

    la = cfg.launch
    return LaunchOptions.from_config(
        cfg, mpi=mpi or la.mpi, nic=nic or la.nic, env=la.env + [name for name in forward if name not in la.env]
    )


def _host_list(hosts: str | None, hostfile: str | None, launcher: str):
    """The checked hosts of --hosts or --hostfile (None: this machine, or srun's allocation)."""
    from hvdlm.launch.hosts import parse_hosts, read_hostfile

    if hosts and hostfile:
        raise InputError("give either --hosts or --hostfile, not both.")
    if hostfile and launcher == "srun":
        raise InputError("srun takes its hosts from the Slurm allocation, not a hostfile: drop --hostfile.")
    # A hostfile may mix Open MPI, MPICH and bare lines with comments, which no launcher reads in full (horovodrun
    # crashes on a comment, Open MPI refuses host:N, Hydra host slots=N): the launcher gets the parsed hosts as
    # -H / -hosts, the same checked list --hosts gives, and the printed command needs no file of ours.
    return read_hostfile(hostfile) if hostfile else parse_hosts(hosts) if hosts else None


def _rank_program(job: str, run_dir: str, overrides: tuple[str, ...], resume: str | None) -> list[str]:
    """Each rank's `hvdlm train` command line, with absolute paths: ranks on other nodes may start in another
    directory (a shared file system is assumed)."""
    program = [sys.executable, "-m", "hvdlm", "train", str(Path(job).resolve())]
    program += ["--run-dir", str(Path(run_dir).resolve())]
    for item in overrides:
        program += ["--set", item]
    if resume:
        program += ["--resume", resume if resume == "auto" else str(Path(resume).resolve())]
    return program


def _run(plan, launcher: str, job: str, run_dir: str) -> int:
    """Run the launcher under supervision; after a stop signal, say how to continue and exit 128 + signal."""
    from hvdlm.launch.supervise import run_supervised

    code, signum = run_supervised(plan.argv, {**os.environ, **plan.env}, launcher)
    return _explain_stop(code, signum, launcher, job, run_dir)


def _explain_stop(code: int, signum: int | None, launcher: str, job: str, run_dir: str) -> int:
    if signum is None:
        return code
    name = signal.Signals(signum).name
    if code in (0, REQUEUE_EXIT_CODE) or (launcher == "horovodrun" and code == 1):  # Gloo reports 75 as 1
        click.echo(
            f"hvdlm launch: stopped by {name}; continue with: hvdlm launch {shlex.quote(job)} --run-dir "
            f"{shlex.quote(run_dir)} --resume auto",
            err=True,
        )
    else:
        click.echo(f"hvdlm launch: stopped by {name}; the launcher exited {code}", err=True)
    return 128 + signum
