"""One `hvdlm plan` question and its answer: the checks of the command line, the cluster and the job it names, one
layout's estimate or every layout ranked, and what to print and write. hvdlm.cli.plan only parses and prints.

Arithmetic and file reading only (the job file), no torch: it answers at once on a login node.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvdlm.config import JobConfig, load_config, maximum
from hvdlm.errors import InputError
from hvdlm.model.size import parameter_count
from hvdlm.plan import gpus, jobfile, layouts, report
from hvdlm.plan.memory import GB

FP32_NOTE = (
    "note: the job trains in fp32 (train.precision); this plan is for bf16 autocast, the GPU path (--write-job sets "
    'train.precision = "bf16").'
)

# What the cluster's flags count, for their errors.
SIZE_WORDS = {"--nodes": "nodes", "--gpus-per-node": "GPUs per node"}


@dataclass(frozen=True)
class PlanRequest:
    """The command line's question, one field per option (None: from the job file, or the GPU kind's table)."""

    job: str  # the job file
    gpu_name: str  # a kind of hvdlm.plan.gpus.GPUS, or any name with the four figures below
    nodes: int | None = None  # slurm.nodes
    gpus_per_node: int | None = None  # slurm.gpus_per_node
    gpu_memory_gb: float | None = None
    peak_tflops: float | None = None
    intra_node_gbps: float | None = None
    inter_node_gbps: float | None = None
    efficiency: float | None = None
    tp: int | None = None  # with tp or pp: that one layout; else every layout, ranked
    pp: int | None = None
    zero: int | None = None
    recompute: str | None = None
    micro_batch: int | None = None
    global_batch: int | None = None  # default: the job's, on this cluster
    tokens: float | None = None  # the answer says how many days they take
    accounting: str = "hvdlm"
    top: int = 10  # ranked text: rows shown
    as_json: bool = False
    write_job: str | None = None  # the job file with the (best) layout goes here; '-': standard output
    overrides: tuple[str, ...] = ()  # --set section.key=value, applied to the job file (and to the job written)

    @property
    def one_layout(self) -> bool:
        return self.tp is not None or self.pp is not None


@dataclass(frozen=True)
class PlanAnswer:
    """What the command prints and writes, in this order: the job file, standard output, the notes."""

    stdout: str  # the JSON object or the text; "" when the job file goes to standard output
    job_text: str | None  # the job file with the (best) layout, for request.write_job; None: nothing to write
    notes: list[str]  # lines for standard error


def answer(request: PlanRequest) -> PlanAnswer:
    """The plan for the request: one layout's figures, or every layout ranked with the reasons for the dropped."""
    _check_write_job(request)
    cfg = load_config(request.job, request.overrides)
    cluster = _cluster(request, cfg)
    job = _planned_job(request, cfg, cluster)
    params = parameter_count(cfg.model)
    horizon = _horizon(request, cfg, job)
    head = report.summary(job, cluster, params, horizon)
    note = None
    if request.one_layout:
        best, note = _one(request, cfg, job, cluster)
        text = report.one_text(job, cluster, params, best, horizon)
        answer_json = report.as_json(head, best, horizon)
    else:
        fitting, dropped = _ranked(request, job, cluster)
        best = fitting[0]
        text = report.ranked_text(job, cluster, params, fitting, dropped, horizon, request.top)
        answer_json = report.as_json(head, best, horizon, fitting, dropped)
    job_text = None
    if request.write_job:
        _check_fits(best, cluster)
        keys = jobfile.layout_keys(best.layout, cluster, cfg.train.precision)
        job_text = jobfile.job_text(request.job, request.overrides, keys)
    if request.as_json:
        stdout = json.dumps(answer_json, indent=1) + "\n"
    else:
        stdout = "" if request.write_job == "-" else text
    notes = [note] if note else []
    if request.write_job and request.write_job != "-":
        notes.append(f"wrote {request.write_job}: the job with layout {report.layout_words(best)}")
    if cfg.train.precision == "fp32":
        notes.append(FP32_NOTE)
    return PlanAnswer(stdout, job_text, notes)


def _check_write_job(request: PlanRequest) -> None:
    """--write-job never overwrites the job file, and never shares standard output with --json."""
    write_job, job = request.write_job, request.job
    if write_job and write_job != "-" and Path(write_job).exists() and Path(job).exists():
        if os.path.samefile(write_job, job):
            raise InputError(
                f"--write-job '{write_job}' is the job file itself; the plan never overwrites its input. Name "
                "another file, e.g. --write-job planned.toml."
            )
    if write_job == "-" and request.as_json:
        raise InputError("--write-job - and --json would both print to stdout: write the job to a file instead.")


def _check_fits(best: layouts.Estimate, cluster: layouts.Cluster) -> None:
    """--write-job writes only a layout that fits: a job that runs out of memory on its first step is no plan (only
    the one-layout form can name one that does not fit; the ranked form's best always fits)."""
    if not best.fits:
        raise InputError(
            f"the layout {report.layout_words(best)} does not fit: it needs {best.memory.total / GB:.1f} GB per GPU, "
            f"the {cluster.gpu.name} has {cluster.gpu.memory_gb:g} GB, so --write-job writes nothing. Leave out --tp "
            "and --pp to rank the layouts that fit (the best is written), or add stages (--pp), ZeRO (--zero), "
            "recomputation (--recompute) or a smaller --micro-batch."
        )


def _positive(what: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise InputError(f"{what} must be a positive number, got {value}.")


def _cluster(request: PlanRequest, cfg: JobConfig) -> layouts.Cluster:
    """The nodes and GPUs of the request, the job's [slurm] filling in what it leaves out; the numbers checked."""
    r = request
    nodes = _cluster_size("--nodes", r.nodes, "slurm.nodes", cfg.slurm.nodes)
    per_node = _cluster_size("--gpus-per-node", r.gpus_per_node, "slurm.gpus_per_node", cfg.slurm.gpus_per_node)
    most = maximum("launch.np")
    if nodes * per_node > most:
        raise InputError(
            f"{nodes:,} nodes x {per_node:,} GPUs = {nodes * per_node:,} GPUs is more than the {most:,} ranks a job "
            "may have (launch.np, one rank per GPU; far above any real cluster). Check --nodes and --gpus-per-node "
            "for a typo."
        )
    for what, value in [
        ("--tp", r.tp),
        ("--pp", r.pp),
        ("--micro-batch", r.micro_batch),
        ("--global-batch", r.global_batch),
        ("--tokens", r.tokens),
        ("--top", r.top),
    ]:
        _positive(what, value)
    gpu = gpus.gpu(
        r.gpu_name,
        memory_gb=r.gpu_memory_gb,
        peak_tflops=r.peak_tflops,
        intra_node_gbps=r.intra_node_gbps,
        inter_node_gbps=r.inter_node_gbps,
        efficiency=r.efficiency,
    )
    return layouts.Cluster(nodes, per_node, gpu)


def _cluster_size(flag: str, given: int | None, key: str, in_job: int) -> int:
    """The flag's number, else the job's key: at least 1, and at most the job file's own bound on the key (the
    plan's job carries the key, so what the plan takes a job file may hold; the bound is far above any real
    cluster, so a larger number is a typo, which the planner would otherwise answer with absurd figures)."""
    if given is None:
        if in_job < 1:  # the job's [slurm] allows 0 (CPU-only nodes); a plan needs GPUs
            raise InputError(f"{key} is {in_job} in the job; pass {flag}.")
        return in_job
    most = maximum(key)
    if given < 1:
        raise InputError(f"{flag} must be a positive number, got {given}.")
    if given > most:
        raise InputError(
            f"{flag} {given:,} is more than the {most:,} {SIZE_WORDS[flag]} a job may have (hvdlm's bound on {key}, "
            "far above any real cluster). Check the number for a typo."
        )
    return given


def _planned_job(request: PlanRequest, cfg: JobConfig, cluster: layouts.Cluster) -> layouts.Job:
    return layouts.Job(
        model=cfg.model,
        global_batch=request.global_batch or _default_global_batch(cfg, cluster.gpus),
        optimizer=cfg.train.optimizer,
        schedule=cfg.parallel.schedule,
        accounting=request.accounting,
        virtual_stages=cfg.parallel.virtual_stages,
    )


def _horizon(request: PlanRequest, cfg: JobConfig, job: layouts.Job) -> report.Horizon:
    """The tokens the days are counted for: --tokens, else the job's train.max_steps steps of the global batch."""
    if request.tokens:
        return report.Horizon(request.tokens)
    steps = cfg.train.max_steps
    return report.Horizon(steps * job.global_batch * cfg.model.seq_len, steps)


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


def _one(
    request: PlanRequest, cfg: JobConfig, job: layouts.Job, cluster: layouts.Cluster
) -> tuple[layouts.Estimate, str | None]:
    """The layout of --tp / --pp, the job file giving whatever the command line leaves out, but the micro-batch
    chosen where the job's does not serve (see _micro_batch); and a note that says so, or None."""
    r = request
    pick = functools.partial(
        layouts.one,
        job,
        cluster,
        r.tp or cfg.parallel.tp,
        r.pp or cfg.parallel.pp,
        r.zero if r.zero is not None else cfg.train.zero,
        r.recompute or cfg.model.recompute,
    )
    if r.micro_batch:
        return pick(r.micro_batch), None
    return _micro_batch(pick, cfg.train.batch_size)


def _micro_batch(pick: Callable[[int], layouts.Estimate], own: int) -> tuple[layouts.Estimate, str | None]:
    """The layout with the job's micro-batch (train.batch_size) where it runs and fits. Else, as the ranked form
    would choose among its micro-batches: the fastest that fits; none fitting, the job's own (its figures say
    DOES NOT FIT) or the one that needs the least memory; none running, the job's reason. A stage count is
    chosen for the model, and the job's batch size, set for another layout, should not refuse it."""
    try:
        mine, why = pick(own), None
    except InputError as error:
        mine, why = None, error
    if mine is not None and mine.fits:
        return mine, None
    others = []
    for b in layouts.MICRO_BATCHES:
        if b != own:
            with contextlib.suppress(InputError):
                others.append(pick(b))
    fitting = [e for e in others if e.fits]
    if fitting:
        best = min(fitting, key=lambda e: (-e.tokens_per_s, e.memory.total))
    elif mine is not None:
        return mine, None
    elif others:
        best = min(others, key=lambda e: e.memory.total)
    else:
        raise why
    problem = "does not fit" if mine is not None else "cannot run in this layout"
    chosen = "the fastest that fits" if best.fits else "the one that needs the least memory"
    return best, (
        f"note: --micro-batch not given and train.batch_size = {own} {problem}: the figures are for micro-batch "
        f"{best.layout.micro_batch}, {chosen} (--micro-batch N for another)."
    )


def _ranked(
    request: PlanRequest, job: layouts.Job, cluster: layouts.Cluster
) -> tuple[list[layouts.Estimate], list[layouts.Dropped]]:
    """Every layout of the cluster (those the command line pins fixed), ranked; none fitting is an InputError."""
    fixed = {"zero": request.zero, "recompute": request.recompute, "micro_batch": request.micro_batch}
    fitting, dropped = layouts.rank(job, cluster, fixed)
    if not fitting:
        kinds = sorted({d.kind for d in dropped}) or ["no layout splits the global batch"]
        raise InputError(
            f"no layout of {cluster.gpus} {cluster.gpu.name} GPUs runs this job (dropped: {', '.join(kinds)}). Use "
            "more nodes or GPUs with more memory, another --global-batch, or pass --tp/--pp to see one layout's "
            "figures."
        )
    return fitting, dropped
