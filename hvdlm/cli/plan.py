"""`hvdlm plan JOB.toml --nodes N --gpus-per-node G --gpu NAME [...]`: memory per GPU, step time, tokens/s and
days of a layout, or every layout of the cluster ranked, before anything is submitted.

Pure arithmetic, standard library only, so it answers at once on a login node: hvdlm.plan.gpus (the GPU table),
.candidate (the tp x pp x dp grid and the choices of one layout), .memory (model states by accounting and ZeRO
stage, activations by recomputation and pipeline schedule), .timing (FLOPs, TP and DP communication, the pipeline
bubble), .layouts (one layout's estimate; every layout ranked, with the reasons for the dropped ones), .report
(text and JSON) and .jobfile (the job file with a chosen layout). Formulas and sources: README, "Planning a job".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from hvdlm.cli.options import job_argument
from hvdlm.config import JobConfig, ModelConfig, choices, load_config
from hvdlm.errors import InputError
from hvdlm.launch.hostfile import write_output
from hvdlm.model.size import parameter_count
from hvdlm.plan import gpus, jobfile, layouts, report
from hvdlm.plan.memory import ACCOUNTINGS


def _positive(what: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise InputError(f"{what} must be a positive number, got {value}.")


def _default_global_batch(cfg: JobConfig, gpu_count: int) -> int:
    """The job's batch per replica (batch_size x its micro-batches) times the replicas its own tp and pp give on
    this cluster."""
    p, t = cfg.parallel, cfg.train
    per_replica = t.batch_size * (p.microbatches if p.pp > 1 else t.accumulation_steps)
    if gpu_count % (p.tp * p.pp):
        raise InputError(
            f"the job's parallel.tp {p.tp} x parallel.pp {p.pp} does not divide the cluster's {gpu_count} GPUs, so "
            "its global batch on this cluster is undefined. Pass --global-batch (sequences per optimizer step)."
        )
    return per_replica * gpu_count // (p.tp * p.pp)


@click.command(name="plan")
@job_argument
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
@click.option("--zero", type=click.IntRange(0, 2), default=None, help="ZeRO stage: 0, 1 or 2.")
@click.option("--recompute", type=click.Choice(choices(ModelConfig, "recompute")), default=None, help="Recomputation.")
@click.option("--micro-batch", type=int, default=None, help="Sequences per micro-batch (train.batch_size).")
@click.option("--global-batch", type=int, default=None, help="Sequences per optimizer step (default: from the job).")
@click.option("--tokens", type=float, default=None, help="Tokens to train on: the answer says how many days.")
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
    help="Write JOB with the (best) layout here.",
)
def plan(job: str, gpu_name: str, as_json: bool, write_job: str | None, **o) -> None:
    """Predict memory per GPU, step time, tokens/s, MFU and days for JOB on a cluster: for the layout given by --tp
    / --pp (the rest from the flags or the job file), or for every layout, ranked by tokens/s, with the reasons
    the others were dropped. The formulas and their sources: README, "Planning a job"."""
    if write_job and write_job != "-" and Path(write_job).exists() and Path(job).exists():
        if os.path.samefile(write_job, job):
            raise InputError(
                f"--write-job '{write_job}' is the job file itself; the plan never overwrites its input. Name "
                "another file, e.g. --write-job planned.toml."
            )
    if write_job == "-" and as_json:
        raise InputError("--write-job - and --json would both print to stdout: write the job to a file instead.")
    cfg = load_config(job)
    nodes = o["nodes"] if o["nodes"] is not None else cfg.slurm.nodes
    per_node = o["gpus_per_node"] if o["gpus_per_node"] is not None else cfg.slurm.gpus_per_node
    for what, value in [
        ("--nodes", nodes),
        ("--gpus-per-node", per_node),
        ("--tp", o["tp"]),
        ("--pp", o["pp"]),
        ("--micro-batch", o["micro_batch"]),
        ("--global-batch", o["global_batch"]),
        ("--tokens", o["tokens"]),
        ("--top", o["top"]),
    ]:
        _positive(what, value)
    if not per_node:
        raise InputError("the job has no GPUs per node (slurm.gpus_per_node = 0). Pass --gpus-per-node.")
    gpu = gpus.gpu(
        gpu_name,
        memory_gb=o["gpu_memory_gb"],
        peak_tflops=o["peak_tflops"],
        intra_node_gbps=o["intra_node_gbps"],
        inter_node_gbps=o["inter_node_gbps"],
        efficiency=o["efficiency"],
    )
    cluster = layouts.Cluster(nodes, per_node, gpu)
    planned = layouts.Job(
        model=cfg.model,
        global_batch=o["global_batch"] or _default_global_batch(cfg, cluster.gpus),
        optimizer=cfg.train.optimizer,
        schedule=cfg.parallel.schedule,
        accounting=o["accounting"],
    )
    params = parameter_count(cfg.model)
    head = report.summary(planned, cluster, params, o["tokens"])
    if o["tp"] is not None or o["pp"] is not None:
        best = layouts.one(
            planned,
            cluster,
            tp=o["tp"] or cfg.parallel.tp,
            pp=o["pp"] or cfg.parallel.pp,
            zero=o["zero"] if o["zero"] is not None else cfg.train.zero,
            recompute=o["recompute"] or cfg.model.recompute,
            micro_batch=o["micro_batch"] or cfg.train.batch_size,
        )
        text = report.one_text(planned, cluster, params, best, o["tokens"])
        answer = report.as_json(head, best, o["tokens"])
    else:
        fixed = {"zero": o["zero"], "recompute": o["recompute"], "micro_batch": o["micro_batch"]}
        fitting, dropped = layouts.rank(planned, cluster, fixed)
        if not fitting:
            kinds = sorted({d.kind for d in dropped}) or ["no layout splits the global batch"]
            raise InputError(
                f"no layout of {cluster.gpus} {gpu.name} GPUs runs this job (dropped: {', '.join(kinds)}). Use more "
                "nodes or GPUs with more memory, another --global-batch, or pass --tp/--pp to see one layout's figures."
            )
        best = fitting[0]
        text = report.ranked_text(planned, cluster, params, fitting, dropped, o["tokens"], o["top"])
        answer = report.as_json(head, best, o["tokens"], fitting, dropped)
    if write_job:
        keys = jobfile.layout_keys(best.layout, cluster, cfg.train.precision)
        write_output(write_job, jobfile.job_text(job, keys))
    if as_json:
        click.echo(json.dumps(answer, indent=1))
    elif write_job != "-":
        click.echo(text, nl=False)
    if write_job and write_job != "-":
        click.echo(f"wrote {write_job}: the job with layout {report.layout_words(best)}", err=True)
    if cfg.train.precision == "fp32":
        click.echo(
            "note: the job trains in fp32 (train.precision); this plan is for bf16 autocast, the GPU path "
            '(--write-job sets train.precision = "bf16").',
            err=True,
        )
