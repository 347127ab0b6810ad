"""`hvdlm hostfile`, `hvdlm sbatch` and `hvdlm doctor`; registered on the main group in hvdlm/cli/__init__.py.

hostfile and sbatch answer in well under half a second on a login node: nothing here imports torch or horovod
(doctor imports them in a child process, so one broken piece is reported instead of crashing the check).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from hvdlm.cli.options import output_option, set_option
from hvdlm.config import SlurmConfig, choices, load_config
from hvdlm.errors import InputError
from hvdlm.launch.hostfile import FORMATS, output_is_file, render_hostfile, write_output
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
@output_option("Write here (default: stdout).")
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
    hosts = hosts_from(source, spec, slots=slots, tasks_per_node=tasks_per_node)
    text = render_hostfile(hosts, fmt)
    if output:
        write_output(output, text)  # everything is checked before the file is touched
        _wrote(output, f"{len(hosts)} host(s) with {sum(h.slots for h in hosts)} slot(s), {fmt} format")
    else:
        click.echo(text, nl=False)


@click.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--nodes", type=int, default=None, help="Nodes (default: slurm.nodes).")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node; 0: CPU-only (slurm.gpus_per_node).")
@click.option("--time", metavar="TIME", help="Wall-clock limit, e.g. 02:00:00 or 1-12:00:00 (slurm.time).")
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
@click.option(
    "--venv",
    default=None,
    help="Virtual environment to activate (default: slurm.venv, or the running one); '' activates none.",
)
@click.option(
    "--job-name",
    default=None,
    help="Slurm job name, and the run directory's prefix (default: the job file's name, with '_' for spaces).",
)
@click.option("--run-dir", default=None, help="The run's directory (default: runs/JOB-<job id>).")
@set_option
@output_option("Write the script here (- for stdout).")
@click.option("--submit", is_flag=True, help="Submit it with sbatch and print the job id.")
@click.option(
    "--prepare",
    "prepare_args",
    default=None,
    metavar="ARGS",
    help="Instead of training: a script that prepares a dataset over the allocation, running `hvdlm data prepare "
    "ARGS` on every rank (ARGS as one quoted string; --out defaults to the job's data.dataset).",
)
def sbatch(
    job: str, overrides: tuple[str, ...], output: str | None, submit: bool, prepare_args: str | None, **values: Any
) -> None:
    """Render a Slurm batch script that trains JOB (or, with --prepare, prepares its dataset); print it, write it
    (-o) or submit it (--submit)."""
    from hvdlm.launch import sbatch as batch

    # A file written by rename can be named in the header and submitted by path; a stream (-, a FIFO) cannot.
    script_file = output if output and output_is_file(output) else None
    if script_file and Path(output).exists() and Path(job).exists() and os.path.samefile(output, job):
        raise InputError(
            f"-o '{output}' is the job file itself; writing the script there would destroy it. Choose "
            "another file name, e.g. -o job.sbatch."
        )
    cfg = load_config(job, overrides)
    # values: the [slurm] options above, by name (None where not given).
    command = shlex.join(["hvdlm", "sbatch", *sys.argv[2:]])
    cli = batch.SlurmOverrides(**values, sets=list(overrides), command=command, script=script_file or "")
    if prepare_args is not None:
        from hvdlm.launch.prepare_job import prepare_spec

        spec = prepare_spec(cfg, job, cli)
    else:
        spec = batch.spec_from_config(cfg, job, cli)
    batch.check_setup(spec.setup)  # before anything is written or submitted
    explicit_venv = spec.venv and (cli.venv is not None or cfg.slurm.venv)  # the running one needs no check
    notes = [batch.check_venv(spec.venv) if explicit_venv else ""]
    if prepare_args is not None:
        from hvdlm.launch.prepare_job import render_prepare

        script = render_prepare(spec, _prepare_argv(prepare_args, cfg.data.dataset))
    else:
        notes.append(batch.rank_note(cfg, spec))
        script = batch.render(spec)
    if output:
        write_output(output, script)
        hint = "" if submit else f"; submit it with: sbatch {shlex.quote(output)}"
        _wrote(output, f"the batch script{hint}")
    for note in filter(None, notes):
        click.echo(note, err=True)
    if submit:
        click.echo(f"submitted batch job {batch.submit(script, script_file)}")
    elif not output:
        click.echo(script, nl=False)


def _prepare_argv(text: str, dataset: str) -> list[str]:
    """--prepare's ARGS as `hvdlm data prepare` arguments, checked by that command's own parser (on the login
    node, not hours later in the job); --out from the job's data.dataset when ARGS name none."""
    from hvdlm.cli.data import prepare

    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise InputError(f"--prepare '{text}' is not a valid argument list ({e}). Quote it as one string.") from None
    if not any(a in ("--out", "-o") or a.startswith(("--out=", "-o")) for a in argv):
        if not dataset:
            raise InputError(
                "--prepare names no --out, and the job file sets no data.dataset to prepare. Add --out DIR to the "
                "arguments, or set data.dataset in the job file."
            )
        argv += ["--out", dataset]
    try:
        ctx = prepare.make_context("hvdlm data prepare", list(argv))
    except click.UsageError as e:
        raise InputError(
            f"--prepare: `hvdlm data prepare` would refuse these arguments: {e.format_message()}"
        ) from None
    if ctx.params.get("workers") is not None and ctx.params["workers"] < 1:
        raise InputError(f"--prepare: --workers must be 1 or more, got {ctx.params['workers']}.")
    return argv


def _wrote(output: str, what: str) -> None:
    """Say on standard error (standard output may carry the job id of --submit) which file -o wrote, and what."""
    if output_is_file(output):  # not '-' or a stream, which show their text themselves
        click.echo(f"wrote {output}: {what}", err=True)


@click.command()
@click.option("--python", "python", default=None, help="Check this interpreter's Horovod (default: the running one).")
def doctor(python: str | None) -> None:
    """Check Horovod's build, MPI, mpi4py, GPUs and NCCL, the launchers and shared memory between ranks, with a fix
    for each problem."""
    from hvdlm.launch.doctor import report, run_checks

    checks = run_checks(_interpreter(python) if python else sys.executable)
    click.echo(report(checks))
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


def _interpreter(python: str) -> str:
    """--python as an executable path; a missing one is named as such, not diagnosed as a broken Horovod."""
    found = shutil.which(python)
    if found:
        return found
    path = Path(python)
    if path.is_dir():
        why = "is a directory, not an interpreter"
    elif path.exists():
        why = "is not executable"
    else:
        why = "does not exist" if os.sep in python else "is not on the PATH"
    raise InputError(
        f"--python '{python}' {why}. Pass the path of a Python interpreter, e.g. --python .venv/bin/python "
        "(a virtual environment's bin/python)."
    )
