"""The `hvdlm` command line. Thin: it parses, validates and calls library functions.

Job-preparation commands (everything but `train`) never import torch or horovod, so they answer instantly on a
login node; `train` imports them inside the command.

- run: `hvdlm train` and `hvdlm launch`;
- jobprep: `hvdlm hostfile`, `hvdlm sbatch` and `hvdlm doctor`;
- plan: `hvdlm plan`;
- config: `hvdlm config`;
- data: `hvdlm data ...`;
- checkpoint: `hvdlm checkpoint ...`;
- export: `hvdlm export`;
- watch: `hvdlm plot`, `hvdlm generate` and `hvdlm runs`;
- options: options and checks that several commands share.
"""

from __future__ import annotations

import os

import click

from hvdlm import __version__
from hvdlm.cli.checkpoint import checkpoint
from hvdlm.cli.config import config
from hvdlm.cli.data import data
from hvdlm.cli.export import export
from hvdlm.cli.jobprep import doctor, hostfile, sbatch
from hvdlm.cli.plan import plan
from hvdlm.cli.run import launch, train
from hvdlm.cli.watch import generate, plot, runs
from hvdlm.errors import InputError
from hvdlm.runfiles import INTERRUPTED_EXIT_CODE, StoppedAtCheckpoint

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def _is_rank0() -> bool:
    """Under a launcher every rank hits the same bad input; only rank 0 should say so."""
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return os.environ[name] == "0"
    return True


class _Group(click.Group):
    """Turns InputError into one clear paragraph and exit code 2, and Ctrl-C into exit code 130 (as a shell
    reports an interrupted command; click's own "Aborted!" exits 1), without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as e:
            if _is_rank0():
                click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)  # 2; a subclass may have its own (hvdlm.runfiles.SpikeRecurred)
        except StoppedAtCheckpoint as e:  # the checkpoint is written; the batch script requeues on exit code 75
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if _is_rank0():
                click.echo("\ninterrupted", err=True)
            ctx.exit(INTERRUPTED_EXIT_CODE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvdlm")
def main() -> None:
    """Train GPT-style language models with Horovod and MPI, and prepare the jobs that do it."""


for command in (train, launch, hostfile, sbatch, config, plan, doctor, data, checkpoint, export, plot, generate, runs):
    main.add_command(command)
