"""Layouts: one layout's estimate, and every layout of a cluster ranked by predicted tokens/s, with the reasons
the others were dropped.

A layout is tp x pp x dp GPUs in hvdlm's order (hvdlm.parallel.topology: TP ranks adjacent, then data parallel,
then stages), a ZeRO stage, a recomputation choice, the micro-batch size and the micro-batches per step. So a TP
group must fit in a node (it talks in every layer, over NVLink), a DP group spans nodes once tp x dp exceeds a
node, and stage boundaries cross nodes once tp x dp fills one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hvdlm.config import ModelConfig, tp_splits
from hvdlm.errors import InputError
from hvdlm.plan import counts, timing
from hvdlm.plan import memory as mem
from hvdlm.plan.candidate import Candidate
from hvdlm.plan.gpus import Gpu
from hvdlm.units import counted

RECOMPUTE = ("none", "selective", "full")
ZERO_BUILT = (0, 1, 2, 3)  # the ZeRO stages hvdlm's trainer has (train.zero)
MICRO_BATCHES = (1, 2, 4, 8)  # micro-batch sizes the ranked form tries


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: Gpu

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Job:
    """What the planner needs of a job file, besides the layout."""

    model: ModelConfig
    global_batch: int  # sequences per optimizer step, all replicas
    optimizer: str = "adamw"
    schedule: str = "1f1b"
    accounting: str = "hvdlm"
    virtual_stages: int = 1  # the job's parallel.virtual_stages: staged layouts interleave where it splits


@dataclass(frozen=True)
class Estimate:
    layout: Candidate
    memory: mem.Memory
    time: timing.StepTime
    tokens_per_s: float
    tflops_per_gpu: float  # recomputation counted, as Narayanan et al. 2021 Table 1
    mfu: float  # model FLOPs only (no recomputation) over peak
    fits: bool
    pipeline_bytes: float  # bytes a stage sends per step (forward activations and backward gradients)
    tp_bytes: float  # bytes a TP rank sends per step in its allreduces

    def as_dict(self) -> dict:
        t, m = self.time, self.memory
        gb = mem.GB
        return {
            "layout": self.layout.as_dict(),
            "memory_gb_per_gpu": round(m.total / gb, 3),
            "memory_gb": {
                "weights": round(m.weights / gb, 3),
                "gradients": round(m.gradients / gb, 3),
                "optimizer": round(m.optimizer / gb, 3),
                "activations": round(m.activations / gb, 3),
                "buffers": round(m.buffers / gb, 3),
                "stage": m.stage,
            },
            "step_time_s": round(t.total, 6),
            "step_time_parts_s": {
                k: round(getattr(t, k), 6) for k in ("compute", "tp", "bubble", "pp", "dp", "optimizer")
            },
            "tokens_per_s": round(self.tokens_per_s, 1),
            "tp_bytes_per_step": int(self.tp_bytes),
            "pipeline_bytes_per_step": int(self.pipeline_bytes),
            "tflops_per_gpu": round(self.tflops_per_gpu, 2),
            "mfu": round(self.mfu, 4),
            "fits": self.fits,
        }


# The kinds of reasons a layout is dropped for, as the ranked form groups them.
MEMORY, ACROSS_NODES, BUBBLE, SPLIT = "does not fit", "tp across nodes", "micro-batches < stages", "does not split"


def shape_problem(job: Job, cluster: Cluster, tp: int, pp: int) -> tuple[str, str] | None:
    """What is wrong with tp and pp on any cluster of these nodes: (its kind, the reason with the fix), or None."""
    m = job.model
    # The splits config validation checks (query heads, key/value heads, widths): a layout ranked here must start.
    splits = tp_splits(m)
    for _, value, what in splits:
        if value % tp:
            fits = [
                k
                for k in range(1, cluster.gpus_per_node + 1)
                if cluster.gpus_per_node % k == 0 and all(v % k == 0 for _, v, _ in splits)
            ]
            return SPLIT, f"tp {tp} does not divide the {value} {what}: use a tp among {fits}"
    if tp > cluster.gpus_per_node or cluster.gpus_per_node % tp:
        return ACROSS_NODES, (
            f"tp {tp} would put a TP group across nodes of {cluster.gpus_per_node} GPUs (it talks in every layer): "
            "use a tp that divides the GPUs per node"
        )
    if pp > m.n_layer:
        return SPLIT, f"pp {pp} is more stages than the {m.n_layer} layers: use pp <= {m.n_layer}"
    return None


def problem(job: Job, cluster: Cluster, layout: Candidate) -> tuple[str, str] | None:
    """Why a layout cannot run at all (the memory aside): (its kind, the reason with the fix); None if it can."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    shape = shape_problem(job, cluster, tp, pp)
    if shape:
        return shape
    if tp * pp * dp != cluster.gpus:
        return SPLIT, f"tp {tp} x pp {pp} x dp {dp} is not the cluster's {cluster.gpus} GPUs"
    if layout.micro_batch * layout.microbatches * dp != job.global_batch:
        return SPLIT, (
            f"micro-batch {layout.micro_batch} x {layout.microbatches} micro-batches x dp {dp} is not the global "
            f"batch {job.global_batch}"
        )
    if job.optimizer == "muon" and layout.zero:
        return SPLIT, f"zero {layout.zero} cuts the matrices that Muon orthogonalizes whole into slices: use zero 0"
    if pp > 1 and layout.microbatches < pp:
        return BUBBLE, (
            f"{counted(layout.microbatches, 'micro-batch', 'micro-batches')} per step < {pp} stages, so some stage "
            "would always wait: use smaller micro-batches, a larger global batch, or fewer stages"
        )
    return None


def speeds(cluster: Cluster, layout: Candidate) -> timing.Speeds:
    """A GPU's rates in this layout: a DP group's ranks are tp apart, a stage's neighbour tp x dp apart, so each
    crosses nodes once that distance reaches a node (a TP group never does: `problem` refuses it)."""
    g, per_node = cluster.gpu, cluster.gpus_per_node
    intra, inter = g.intra_bytes_per_s, g.inter_bytes_per_s
    dp_link = inter if layout.tp * layout.dp > per_node else intra
    pp_link = inter if layout.tp * layout.dp >= per_node else intra
    return timing.Speeds(g.peak_tflops * 1e12 * g.efficiency, intra, pp_link, dp_link)


def estimate(job: Job, cluster: Cluster, layout: Candidate) -> Estimate:
    """Memory and step time of one layout (which `problem` accepts: its GPUs are the cluster's, its global batch
    the job's)."""
    m, g, L = job.model, cluster.gpu, layout
    need = mem.memory(m, L, accounting=job.accounting, optimizer=job.optimizer, schedule=job.schedule)
    params = max(counts.params_per_stage(m, L.tp, L.pp))
    # The gradients that are averaged: hvdlm reduces fp32 (bf16 too: docs/guides/gpus.md), the mixed accounting
    # 16-bit gradients.
    grad_bytes = params * (2 if job.accounting == "mixed" else 4)
    t = timing.step_time(m, L, speeds(cluster, L), grad_bytes, job.optimizer)
    tokens = job.global_batch * m.seq_len
    flops = timing.step_flops(m, job.global_batch, L.recompute)
    model_flops = timing.step_flops(m, job.global_batch, "none")
    activation = m.seq_len * L.micro_batch * m.d_model * 2
    return Estimate(
        layout=L,
        memory=need,
        time=t,
        tokens_per_s=tokens / t.total,
        tflops_per_gpu=flops / t.total / cluster.gpus / 1e12,
        mfu=model_flops / t.total / cluster.gpus / (g.peak_tflops * 1e12),
        fits=need.total <= g.memory_gb * mem.GB,
        pipeline_bytes=2 * L.microbatches * L.virtual_stages * activation if L.pp > 1 else 0.0,
        tp_bytes=timing.tp_payload(m, L),
    )


def one(job: Job, cluster: Cluster, tp: int, pp: int, zero: int, recompute: str, micro_batch: int) -> Estimate:
    """The estimate of the layout the user named; what cannot run is an InputError naming the fix."""
    if tp < 1 or pp < 1 or micro_batch < 1:
        raise InputError(f"tp, pp and the micro-batch must be at least 1, got {tp}, {pp} and {micro_batch}.")
    shape = shape_problem(job, cluster, tp, pp)  # wrong on any number of nodes: said first
    if shape:
        raise InputError(
            f"this layout cannot run: {shape[1]}. Or leave out --tp and --pp to rank the layouts that can."
        )
    if cluster.gpus % (tp * pp):
        raise InputError(
            f"tp {tp} x pp {pp} = {tp * pp} GPUs per replica does not divide the cluster's {cluster.gpus} GPUs "
            f"({counted(cluster.nodes, 'node')} x {cluster.gpus_per_node}). Choose tp and pp whose product divides "
            f"{cluster.gpus}, or another number of nodes."
        )
    dp = cluster.gpus // (tp * pp)
    if job.global_batch % (dp * micro_batch):
        raise InputError(
            f"the global batch of {job.global_batch} sequences does not split into micro-batches of {micro_batch} "
            f"over {dp} replicas (dp = {cluster.gpus} GPUs / (tp {tp} x pp {pp})). Pass --global-batch a multiple "
            f"of {dp * micro_batch}, or another --micro-batch."
        )
    m = job.global_batch // (dp * micro_batch)
    layout = Candidate(tp, pp, dp, zero, recompute, micro_batch, m, virtual_stages(job, pp, m))
    why = problem(job, cluster, layout)
    if why:
        raise InputError(f"this layout cannot run: {why[1]}. Or leave out --tp and --pp to rank the layouts that can.")
    return estimate(job, cluster, layout)


def divisors(n: int, at_most: int) -> list[int]:
    """The divisors of n up to `at_most`, ascending: trial division up to `at_most` only, so a bound from the model
    (its heads, its layers), never the cluster's GPU count, sets the work."""
    return [k for k in range(1, min(n, at_most) + 1) if n % k == 0]


def candidates(job: Job, cluster: Cluster, fixed: dict) -> list[Candidate]:
    """Every layout of the cluster for the global batch: tp among the divisors of the GPUs that split the heads
    (those of gcd(GPUs, heads)), pp among the divisors of the rest up to the layers, each ZeRO stage hvdlm builds,
    each recomputation, micro-batches of 1-8 sequences; `fixed` pins any of zero, recompute, micro_batch. The
    work is bounded by the model (heads x layers), whatever the cluster's size."""
    gpus, heads, layers = cluster.gpus, job.model.n_head, job.model.n_layer
    out = []
    for tp in divisors(math.gcd(gpus, heads), heads):
        # Uneven splits too (hvdlm spreads the remainder): the fullest stage sets the pace.
        for pp in divisors(gpus // tp, layers):
            dp = gpus // (tp * pp)
            for b in [fixed["micro_batch"]] if fixed.get("micro_batch") else MICRO_BATCHES:
                if job.global_batch % (dp * b):
                    continue
                for zero in _zeros(fixed, dp):
                    for rc in [fixed["recompute"]] if fixed.get("recompute") else RECOMPUTE:
                        m = job.global_batch // (dp * b)
                        out.append(Candidate(tp, pp, dp, zero, rc, b, m, virtual_stages(job, pp, m)))
    return out


def virtual_stages(job: Job, pp: int, microbatches: int) -> int:
    """The job's virtual stages where a layout can interleave them (stages, p x v equal chunks of layers, the
    micro-batches a multiple of p: hvdlm.parallel.split.check_virtual_stages), else 1."""
    v = job.virtual_stages
    if v > 1 and pp > 1 and job.model.n_layer % (pp * v) == 0 and microbatches % pp == 0:
        return v
    return 1


def _zeros(fixed: dict, dp: int) -> tuple[int, ...]:
    """The ZeRO stages to try: the pinned one, else each hvdlm builds; with dp = 1 only 0, as ZeRO shards over
    the replicas, so zero 1, 2 and 3 of one replica are zero 0 again (the same figures, a duplicate row)."""
    if fixed.get("zero") is not None:
        return (fixed["zero"],)
    return ZERO_BUILT if dp > 1 else (0,)


@dataclass(frozen=True)
class Dropped:
    layout: Candidate
    kind: str  # MEMORY, ACROSS_NODES, BUBBLE or SPLIT
    reason: str

    def as_dict(self) -> dict:
        return {"layout": self.layout.as_dict(), "kind": self.kind, "reason": self.reason}


def rank(job: Job, cluster: Cluster, fixed: dict) -> tuple[list[Estimate], list[Dropped]]:
    """(the layouts that fit, best first by predicted tokens/s; the dropped ones with their reasons)."""
    fitting, dropped = [], []
    for layout in candidates(job, cluster, fixed):
        why = problem(job, cluster, layout)
        if why:
            dropped.append(Dropped(layout, *why))
            continue
        e = estimate(job, cluster, layout)
        if e.fits:
            fitting.append(e)
        else:
            need, have = e.memory.total / mem.GB, cluster.gpu.memory_gb
            dropped.append(Dropped(layout, MEMORY, f"needs {need:.1f} GB per GPU, the GPU has {have:g} GB"))
    # Ties (equal predictions) go to the layout that needs less memory.
    fitting.sort(key=lambda e: (-e.tokens_per_s, e.memory.total))
    return fitting, dropped
