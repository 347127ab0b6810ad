"""One job's launch, as `hvdlm launch` asks for it: the checks before anything starts, the launcher's command line
(horovodrun's elastic one with its host discovery script under --elastic), then running it under supervision,
again from the newest checkpoint after a failure under --max-restarts. hvdlm.cli.run only parses and prints.

Job preparation: no torch, horovod, mpi4py or numpy here.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hvdlm.config import JobConfig, default_run_dir
from hvdlm.errors import InputError
from hvdlm.launch.commands import LaunchOptions, LaunchPlan, LaunchRequest, plan_launch
from hvdlm.launch.elastic import (
    DISCOVERY_SCRIPT,
    check_elastic,
    discovery_script,
    elastic_argv,
    elastic_nic,
    refuse_unsupported,
    single_host_note,
    write_discovery_script,
)
from hvdlm.launch.hosts import Host, parse_hosts, read_hostfile
from hvdlm.launch.preflight import check_before_launch
from hvdlm.launch.restarts import ACCUMULATION, AttemptSize, RestartPolicy, failure_cause, run_with_restarts
from hvdlm.launch.supervise import Ended, run_supervised
from hvdlm.runfiles import REQUEUE_EXIT_CODE, WORKERS_LOST_EXIT_CODE

Say = Callable[[str], None]  # one line for the user (standard output or standard error)


@dataclass(frozen=True)
class LaunchArgs:
    """The command line of `hvdlm launch`, one field per option (None: the job's [launch] setting)."""

    job: str  # the job file
    np: int | None = None
    hosts: str | None = None  # HOST:SLOTS,...
    hostfile: str | None = None
    launcher: str | None = None
    mpi: str | None = None
    nic: str | None = None
    forward: tuple[str, ...] = ()  # -x NAME: variables forwarded to every rank
    dry_run: bool = False
    max_restarts: int = 0
    min_np: int | None = None
    elastic: bool = False
    max_np: int | None = None
    overrides: tuple[str, ...] = ()  # --set, --init-from's included
    run_dir: str | None = None
    resume: str | None = None


@dataclass
class PreparedLaunch:
    """A checked launch: the command to print, and what running it (again) needs."""

    cfg: JobConfig
    args: LaunchArgs
    launcher: str
    run_dir: str
    hosts: list[Host] | None  # None: this machine, or srun's allocation
    min_np: int | None  # --elastic: the checked fewest workers
    progress: bool  # rank 0 draws a progress bar (a person watches)
    plan: LaunchPlan = field(default_factory=lambda: LaunchPlan([]))
    script: str = ""  # --elastic: the host discovery script's text

    @property
    def np(self) -> int:
        return self.args.np or self.cfg.launch.np

    def plan_for(self, np: int, resume: str | None, more: tuple[str, ...] = ()) -> LaunchPlan:
        """The launch of np ranks; a hostfile is read again each time (a restart's hosts are those it lists)."""
        a = self.args
        hosts_now = _host_list(None, a.hostfile, self.launcher) if a.hostfile else self.hosts
        program = _rank_program(a.job, self.run_dir, a.overrides + more, resume)
        request = LaunchRequest.from_config(
            self.cfg, self.launcher, np, program, hosts=hosts_now, progress=self.progress
        )
        return plan_launch(request, _launch_options(self.cfg, a))


def prepare_launch(cfg: JobConfig, args: LaunchArgs) -> PreparedLaunch:
    """Every check that can be made before anything starts, and the launcher's command line."""
    la = cfg.launch
    launcher = args.launcher or ("horovodrun" if args.elastic else la.launcher)
    min_np = _check_failure_handling(cfg, args, launcher)
    hosts = _host_list(args.hosts or la.hosts or None, args.hostfile, launcher)
    if args.elastic:  # horovodrun's elastic driver cannot find the interface of a job on one host by itself
        args = dataclasses.replace(args, nic=elastic_nic(hosts, args.nic or la.nic))
    run_dir = args.run_dir or str(default_run_dir(Path(args.job).stem))
    check_before_launch(cfg, Path(run_dir), args.resume, local_only=hosts is None and launcher != "srun")
    # Ranks' output is piped through the launcher, so rank 0 cannot see that a person watches: tell it.
    progress = not args.dry_run and sys.stdout.isatty()
    prepared = PreparedLaunch(cfg, args, launcher, run_dir, hosts, min_np, progress)
    prepared.plan = prepared.plan_for(prepared.np, args.resume)
    if args.elastic:
        _make_elastic(prepared)
    return prepared


def start_launch(prepared: PreparedLaunch, show: Say, say: Say) -> int:
    """Run the prepared launch to its end (`show`: the command again at a restart; `say`: what happened); returns
    the exit code for `hvdlm launch`."""
    if prepared.args.elastic:
        write_discovery_script(Path(prepared.run_dir), prepared.script)
    sys.stdout.flush()
    if prepared.args.max_restarts:
        return _run_restarting(prepared, show, say)
    plan = prepared.plan
    return _explain_end(run_supervised(plan.argv, {**os.environ, **plan.env}, prepared.launcher), prepared, say)


def _check_failure_handling(cfg: JobConfig, args: LaunchArgs, launcher: str) -> int | None:
    """--elastic or --max-restarts, with their --min-np and --max-np checked; the elastic --min-np (None without)."""
    np = args.np or cfg.launch.np
    if args.elastic and args.max_restarts:
        raise InputError(
            "--elastic and --max-restarts are two answers to a failure: elastic drops the lost workers and goes on, "
            "restarts start the job again from a checkpoint. Choose one."
        )
    if args.elastic:
        refuse_unsupported(cfg)
        return check_elastic(launcher, cfg.launch.controller, args.min_np, args.max_np or np, np)
    _check_restarts(args.max_restarts, args.min_np, np)
    return args.min_np


def _check_restarts(max_restarts: int, min_np: int | None, np: int) -> None:
    if min_np is not None and not max_restarts:
        raise InputError("--min-np is the fewest ranks a restart may continue with: give --max-restarts N too.")
    if min_np is not None and min_np > np:
        raise InputError(
            f"--min-np {min_np} is more than the {np} ranks the job starts with: use --min-np {np} or less."
        )


def _make_elastic(prepared: PreparedLaunch) -> None:
    """horovodrun's elastic command line and the text of its host discovery script."""
    script = Path(prepared.run_dir).resolve() / DISCOVERY_SCRIPT
    max_np = prepared.args.max_np or prepared.np
    prepared.plan.argv = elastic_argv(prepared.plan.argv, script, prepared.min_np, max_np)
    prepared.script = discovery_script(prepared.hosts, prepared.args.hostfile)
    prepared.plan.notes += single_host_note(prepared.hosts)


def _run_restarting(prepared: PreparedLaunch, show: Say, say: Say) -> int:
    """--max-restarts: attempts until one does not fail (hvdlm.launch.restarts). A restart resumes from the newest
    checkpoint, on the hosts a hostfile lists by then, with the global batch kept."""
    cfg, args, launcher = prepared.cfg, prepared.args, prepared.launcher
    p = cfg.parallel
    # With pipeline stages a step's micro-batches are parallel.microbatches (accumulation_steps stays 1).
    key, steps = ("parallel.microbatches", p.microbatches) if p.pp > 1 else (ACCUMULATION, cfg.train.accumulation_steps)
    policy = RestartPolicy(args.max_restarts, args.min_np or prepared.np, p.tp * p.pp, key)

    def attempt(size: AttemptSize, again: bool) -> tuple[int, int | None]:
        now = prepared.plan
        if again:
            now = prepared.plan_for(size.np, "auto", (f"{policy.key}={size.accumulation}",))
            show(now.display())
            sys.stdout.flush()
        return run_supervised(now.argv, {**os.environ, **now.env}, launcher)[:2]

    def slots() -> int | None:  # a hostfile is read again at each restart: a host gone means fewer ranks
        return sum(h.slots for h in _host_list(None, args.hostfile, launcher)) if args.hostfile else None

    first = AttemptSize(prepared.np, steps)
    code, signum = run_with_restarts(attempt, first, Path(prepared.run_dir), policy, slots, say)
    return _explain_end(Ended(code, signum), prepared, say)


def _launch_options(cfg: JobConfig, args: LaunchArgs) -> LaunchOptions:
    """The job's [launch] and [slurm] with the command line's --mpi, --nic and -x on top (a copy: cfg is kept)."""
    la = cfg.launch
    forward = la.env + [name for name in args.forward if name not in la.env]
    return LaunchOptions.from_config(cfg, mpi=args.mpi or la.mpi, nic=args.nic or la.nic, env=forward)


def _host_list(hosts: str | None, hostfile: str | None, launcher: str) -> list[Host] | None:
    """The checked hosts of --hosts or --hostfile (None: this machine, or srun's allocation)."""
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


def _explain_end(end: Ended, prepared: PreparedLaunch, say: Say) -> int:
    """The exit code of `hvdlm launch`, and in a line what happened: after a stop signal, how to continue (exit
    128 + signal); after horovodrun ended a job with a failed worker (its traceback held back), why."""
    job, run_dir = shlex.quote(prepared.args.job), shlex.quote(prepared.run_dir)
    resume = f"continue with: hvdlm launch {job} --run-dir {run_dir} --resume auto"
    code, signum = end.code, end.signum
    if signum is not None:
        name = signal.Signals(signum).name
        # The ranks' checkpoint and exit, or the launcher ended by the signal itself (no rank had started).
        if code in (0, REQUEUE_EXIT_CODE, 128 + signum, -signum):
            say(f"hvdlm launch: stopped by {name}; {resume}")
        else:
            say(f"hvdlm launch: stopped by {name}; the launcher exited {code}")
        return 128 + signum
    cause = failure_cause(code) if end.worker_failed else None
    if cause and prepared.args.elastic:
        say(
            f"hvdlm launch: the elastic job has no worker left: {cause}, and horovodrun drops the whole host of a "
            f"failed worker. Its checkpoints are kept; {resume}"
        )
        return WORKERS_LOST_EXIT_CODE
    if cause:
        say(f"hvdlm launch: {cause}; horovodrun ended the job")
    return code
