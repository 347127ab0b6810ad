"""`hvdlm plan JOB.toml --nodes N --gpus-per-node G --gpu NAME [...]`: memory per GPU, step time, tokens/s and
days of a layout, or every layout of the cluster ranked, before anything is submitted.

The command parses, asks hvdlm.plan.request for the answer and prints it; the planner (hvdlm.plan) is pure
arithmetic, so it answers at once on a login node. Formulas and sources: docs/guides/planner.md.
"""

from __future__ import annotations

import click

from hvdlm.cli.options import job_argument, set_option
from hvdlm.config import ModelConfig, choices
from hvdlm.launch.hostfile import write_output
from hvdlm.plan import gpus
from hvdlm.plan.memory import ACCOUNTINGS
from hvdlm.plan.request import PlanRequest, answer


@click.command(name="plan")
@job_argument
@set_option
@click.option("--nodes", type=int, default=None, help="Nodes (default: slurm.nodes).")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node (default: slurm.gpus_per_node).")
@click.option(
    "--gpu", "gpu_name", required=True, help=f"GPU kind: {', '.join(gpus.GPUS)}, or any name with the four flags below."
)
@click.option("--gpu-memory-gb", type=float, default=None, help="Memory per GPU, GB (10^9 bytes).")
@click.option("--peak-tflops", type=float, default=None, help="Peak dense bf16 TFLOP/s per GPU.")
@click.option("--intra-node-gbps", type=float, default=None, help="GPU-to-GPU bandwidth in a node, Gbit/s each way.")
@click.option("--inter-node-gbps", type=float, default=None, help="Network bandwidth per GPU, Gbit/s each way.")
@click.option("--efficiency", type=float, default=None, help="Achievable fraction of peak (default: the GPU kind's).")
@click.option(
    "--tp", type=int, default=None, help="Tensor-parallel size; with --tp or --pp one layout, else all ranked."
)
@click.option("--pp", type=int, default=None, help="Pipeline stages.")
@click.option("--zero", type=click.IntRange(0, 3), default=None, help="ZeRO stage: 0, 1, 2 or 3.")
@click.option("--recompute", type=click.Choice(choices(ModelConfig, "recompute")), default=None, help="Recomputation.")
@click.option("--micro-batch", type=int, default=None, help="Sequences per micro-batch (train.batch_size).")
@click.option("--global-batch", type=int, default=None, help="Sequences per optimizer step (default: from the job).")
@click.option(
    "--tokens",
    type=float,
    default=None,
    help="Tokens to train on: the answer says how many days (default: train.max_steps steps).",
)
@click.option(
    "--accounting",
    type=click.Choice(ACCOUNTINGS),
    default="hvdlm",
    help="Model-state bytes: hvdlm (4 + 4 + 8 per parameter, what hvdlm holds) or mixed (2 + 2 + 12, ZeRO paper).",
)
@click.option("--top", type=int, default=10, show_default=True, help="Ranked form: rows of text shown.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--write-job",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Write JOB with the (best) layout here ('-': stdout); a layout that does not fit in memory is refused.",
)
def plan(job: str, **options) -> None:
    """Predict memory per GPU, step time, tokens/s, MFU and days for JOB on a cluster: for the layout given by --tp
    / --pp (the rest from the flags or the job file), or for every layout, ranked by tokens/s, with the reasons
    the others were dropped. The formulas and their sources: docs/guides/planner.md (hvdlm's documentation)."""
    request = PlanRequest(job=job, **options)
    planned = answer(request)
    if planned.job_text is not None:
        write_output(request.write_job, planned.job_text)
    click.echo(planned.stdout, nl=False)
    for note in planned.notes:
        click.echo(note, err=True)
