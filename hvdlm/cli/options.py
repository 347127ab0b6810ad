"""Options and checks that several commands share (train, launch, sbatch)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hvdlm.errors import InputError

# One --set for every command; hvdlm.config.parse_override reads the values (TOML, so lists too).
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config key (repeatable); the value is TOML: --set train.lr=3e-4, "
    "--set 'slurm.directives=[\"--mem=4G\"]'.",
)


def output_option(help_text: str):
    """-o/--output FILE, written with hvdlm.launch.hostfile.write_output: '-' is stdout, a FIFO or a device is a
    stream (never replaced), a regular file is replaced atomically."""
    return click.option(
        "-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default=None, help=help_text
    )


run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the run writes config.toml, metrics.jsonl and checkpoints/ (default: runs/JOB-TIMESTAMP).",
)
job_argument = click.argument("job", type=click.Path(dir_okay=False))
resume_option = click.option(
    "--resume",
    default=None,
    metavar="auto|CHECKPOINT",
    help="Continue the run in --run-dir: 'auto' takes its newest complete checkpoint (none yet: start fresh), "
    "or name a checkpoint.",
)
init_from_option = click.option(
    "--init-from",
    default=None,
    metavar="RUN_DIR|CHECKPOINT|HF_DIR",
    help="Start from another run's weights (its newest checkpoint), or from a GPT-2 or Llama model saved by "
    "transformers "
    "(data prepared with its tokenizer: hvdlm data prepare --tokenizer HF_DIR), with a new optimizer and data order.",
)


def check_resume(resume: str | None, run_dir: str | None) -> None:
    if resume is None:
        return
    if not run_dir:
        raise InputError("--resume continues the run in --run-dir: name the run directory too.")
    if resume != "auto" and not Path(resume).exists():
        raise InputError(f"--resume '{resume}': no such checkpoint. Pass 'auto' or the path of a checkpoint file.")


def with_init_from(overrides: tuple[str, ...], init_from: str | None) -> tuple[str, ...]:
    return overrides + ((f"train.init_from={json.dumps(init_from)}",) if init_from else ())
