"""`hvdlm config JOB.toml [--set ...]`: the configuration a run would use, resolved and validated, as TOML.

Nothing starts and nothing heavy loads (no torch, horovod, mpi4py or numpy): it answers at once on a login node,
and what it prints is a complete job file that `hvdlm train` and `hvdlm launch` take as they are.
"""

from __future__ import annotations

import click

from hvdlm.cli.options import job_argument, output_option, set_option
from hvdlm.config import load_config
from hvdlm.launch.hostfile import write_output


@click.command(name="config")
@job_argument
@set_option
@output_option("Write the TOML here (default: stdout).")
def config(job: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Print JOB's resolved configuration (every key, defaults filled in, --set applied) as TOML, after the same
    validation as train, launch and sbatch; exit code 2 names what is wrong."""
    text = load_config(job, overrides).to_toml()
    if output:
        write_output(output, text)
    else:
        click.echo(text, nl=False)
