"""`hvdlm hostfile`, `hvdlm sbatch` and `hvdlm doctor`; registered on the main group in hvdlm/cli/__init__.py.

hostfile and sbatch answer in well under half a second on a login node: nothing here imports torch or horovod
(doctor imports them in a child process, so one broken piece is reported instead of crashing the check).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from hvdlm.config import SlurmConfig, choices, load_config
from hvdlm.errors import InputError
from hvdlm.launch.hostfile import FORMATS, render_hostfile, write_atomically
from hvdlm.launch.sources import SOURCES, hosts_from


@click.command()
@click.option(
    "--from",
    "source",
    type=click.Choice(SOURCES),
    required=True,
    help="Where the hosts come from: a Slurm job (SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE), a PBS job "
    "(PBS_NODEFILE), an LSF job (LSB_MCPU_HOSTS / LSB_HOSTS), a host:slots string, or a hostfile.",
)
@click.argument("spec", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(FORMATS)),
    default="openmpi",
    show_default=True,
    help="openmpi: 'host slots=N'; mpich: 'host:N'; horovod: the -H string; list: host per line.",
)
@click.option("--slots", type=int, default=None, help="Slots per host, instead of what the source says.")
@click.option("--tasks-per-node", default=None, metavar="COUNTS", help="Slurm counts such as 2(x3),1 for SPEC.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here (default: stdout).")
def hostfile(
    source: str, spec: str | None, fmt: str, slots: int | None, tasks_per_node: str | None, output: str | None
) -> None:
    """Write a hostfile from a scheduler's allocation, a host:slots list or another hostfile.

    SPEC is the source's text: a Slurm node list such as 'node[01-04]', a PBS node file, LSF hosts such as
    'h1 4 h2 4', 'node1:4,node2:4' for --from hosts, or a file for --from file. Without it the scheduler's
    variables of the running job are read.

    \b
    Examples:
      hvdlm hostfile --from slurm                       # inside a Slurm job
      hvdlm hostfile --from slurm 'node[01-04]' --slots 4 --format mpich -o hosts.txt
      hvdlm hostfile --from hosts node1:4,node2:4 --format horovod
    """
    if tasks_per_node and source != "slurm":
        raise InputError("--tasks-per-node belongs to --from slurm.")
    text = render_hostfile(hosts_from(source, spec, slots=slots, tasks_per_node=tasks_per_node), fmt)
    if output:
        write_atomically(output, text)  # everything is checked before the file is touched
    else:
        click.echo(text, nl=False)


@click.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--nodes", type=int, default=None, help="Nodes (default: slurm.nodes).")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node; 0: CPU-only (slurm.gpus_per_node).")
@click.option("--time", "time_", default=None, metavar="HH:MM:SS", help="Wall-clock limit (slurm.time).")
@click.option("--partition", default=None, help="Partition (slurm.partition).")
@click.option("--account", default=None, help="Account to charge (slurm.account).")
@click.option(
    "--launcher",
    type=click.Choice(choices(SlurmConfig, "launcher")),
    default=None,
    help="Launch line: srun --mpi=pmix (default), mpirun or horovodrun (slurm.launcher).",
)
@click.option("--ntasks-per-node", type=int, default=None, help="Ranks per node (default: GPUs, or np / nodes).")
@click.option("--cpus-per-task", type=int, default=None, help="Cores per rank (default: 4 per GPU, 1 per CPU rank).")
@click.option("--venv", default=None, help="Virtual environment to activate (default: slurm.venv, or the running one).")
@click.option("--run-dir", default=None, help="The run's directory (default: runs/JOB-<job id>).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the script here.")
@click.option("--submit", is_flag=True, help="Submit it with sbatch and print the job id.")
def sbatch(
    job: str,
    nodes: int | None,
    gpus_per_node: int | None,
    time_: str | None,
    partition: str | None,
    account: str | None,
    launcher: str | None,
    ntasks_per_node: int | None,
    cpus_per_task: int | None,
    venv: str | None,
    run_dir: str | None,
    overrides: tuple[str, ...],
    output: str | None,
    submit: bool,
) -> None:
    """Render a Slurm batch script that trains JOB; print it, write it (-o) or submit it (--submit)."""
    from hvdlm.launch import sbatch as batch

    if output and Path(output).exists() and Path(job).exists() and os.path.samefile(output, job):
        raise InputError(
            f"-o '{output}' is the job file itself; writing the script there would destroy it. Choose "
            "another file name, e.g. -o job.sbatch."
        )
    cfg = load_config(job, overrides)
    spec = batch.spec_from_config(
        cfg,
        job,
        list(overrides),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        time=time_,
        partition=partition,
        account=account,
        launcher=launcher,
        run_dir=run_dir,
        ntasks_per_node=ntasks_per_node,
        cpus_per_task=cpus_per_task,
        venv=venv,
        command=shlex.join(["hvdlm", "sbatch", *sys.argv[2:]]),
        script=output or "",
    )
    batch.check_setup(spec.setup)  # before anything is written or submitted
    script = batch.render(spec)
    if output:
        write_atomically(output, script)
    if submit:
        click.echo(f"submitted batch job {batch.submit(script, output)}")
    elif not output:
        click.echo(script, nl=False)


@click.command()
@click.option("--python", "python", default=None, help="Check this interpreter's Horovod (default: the running one).")
def doctor(python: str | None) -> None:
    """Check Horovod's build, MPI, mpi4py, GPUs and NCCL, and the launchers, with a fix for each problem."""
    from hvdlm.launch.doctor import report, run_checks

    checks = run_checks(python or sys.executable)
    click.echo(report(checks))
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)
