"""The planner's answer as text (for people) or one JSON object (for scripts)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hvdlm.config import ModelConfig
from hvdlm.plan.layouts import Cluster, Dropped, Estimate, Job
from hvdlm.plan.memory import GB
from hvdlm.units import counted

ACCOUNTING_TEXT = {
    "hvdlm": "hvdlm's own: fp32 weights and gradients (bf16 autocast), AdamW's fp32 moments, 4 + 4 + 8 bytes per "
    "parameter",
    "mixed": "mixed-precision Adam (ZeRO paper): 16-bit weights and gradients, 12 bytes of fp32 optimizer state, "
    "2 + 2 + 12 bytes per parameter",
}


@dataclass(frozen=True)
class Horizon:
    """What the days are counted for: the tokens of --tokens, else the job's train.max_steps steps of the planned
    global batch."""

    tokens: float
    steps: int | None = None  # train.max_steps, where the tokens come from it

    @property
    def source(self) -> str:
        return "--tokens" if self.steps is None else "train.max_steps"

    def words(self) -> str:
        if self.steps is None:
            return f"{self.tokens:.4g} tokens"
        return f"{self.steps:,} steps (train.max_steps) = {self.tokens:.4g} tokens"


def summary(job: Job, cluster: Cluster, params: int, horizon: Horizon) -> dict:
    """What the answer is about: the cluster, the model and the accounting."""
    g = cluster.gpu
    return {
        "gpu": {
            "name": g.name,
            "peak_tflops": g.peak_tflops,
            "efficiency": g.efficiency,
            "memory_gb": g.memory_gb,
            "intra_node_gbps": g.intra_node_gbps,
            "inter_node_gbps": g.inter_node_gbps,
        },
        "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node,
        "gpus": cluster.gpus,
        "parameters": params,
        "global_batch": job.global_batch,
        "tokens_per_step": job.global_batch * job.model.seq_len,
        "accounting": job.accounting,
        "tokens": horizon.tokens,
        "tokens_from": horizon.source,
    }


def as_json(head: dict, best: Estimate, horizon: Horizon, fitting=None, dropped=None) -> dict:
    """One object: the (best) layout's figures at the top level; the ranked form adds `layouts` and `dropped`."""
    out = {**best.as_dict(), **head}
    out["days"] = days(best, horizon)
    if fitting is not None:
        out["layouts"] = [{**e.as_dict(), "days": days(e, horizon)} for e in fitting]
        out["dropped"] = [d.as_dict() for d in dropped or []]
    return out


def days(e: Estimate, horizon: Horizon) -> float:
    return round(horizon.tokens / e.tokens_per_s / 86400, 3)


def _header(job: Job, cluster: Cluster, params: int) -> list[str]:
    g, m = cluster.gpu, job.model
    return [
        f"cluster: {counted(cluster.nodes, 'node')} x {cluster.gpus_per_node} {g.name} = {cluster.gpus:,} GPUs "
        f"({g.peak_tflops:g} TFLOP/s bf16 peak, {g.efficiency:.1%} of it achievable, {g.memory_gb:g} GB, "
        f"{g.intra_node_gbps:g} Gbit/s in a node, {g.inter_node_gbps:g} Gbit/s per GPU between nodes)",
        f"model: {params / 1e9:.2f}B parameters ({_arch_words(m)}{m.n_layer} layers, d_model {m.d_model}, "
        f"{_heads_words(m)}, "
        f"seq_len {m.seq_len}, vocabulary {m.vocab_size}); global batch {job.global_batch:,} sequences "
        f"({job.global_batch * m.seq_len:,} tokens per step)",
        f"memory accounting: {ACCOUNTING_TEXT[job.accounting]}",
    ]


def _arch_words(m: ModelConfig) -> str:
    """A llama names its arch; GPT-2's line stays as it was before there was a choice (golden files hold it)."""
    return "llama, " if m.arch == "llama" else ""


def _heads_words(m: ModelConfig) -> str:
    if m.arch == "gpt2":
        return f"{m.n_head} heads"
    return f"{m.n_head} heads ({counted(m.kv_heads, 'key/value head')})"


def layout_words(e: Estimate) -> str:
    L = e.layout
    return (
        f"tp {L.tp} x pp {L.pp} x dp {L.dp}, zero {L.zero}, recompute {L.recompute}, micro-batch {L.micro_batch} "
        f"x {counted(L.microbatches, 'micro-batch', 'micro-batches')}"
        + (f", {L.virtual_stages} virtual stages (interleaved)" if L.virtual_stages > 1 else "")
    )


def one_text(job: Job, cluster: Cluster, params: int, e: Estimate, horizon: Horizon) -> str:
    m, t = e.memory, e.time
    gb = cluster.gpu.memory_gb
    verdict = "fits" if e.fits else "DOES NOT FIT"
    lines = _header(job, cluster, params) + [
        f"layout: {layout_words(e)}",
        f"memory per GPU (stage {m.stage}, the fullest): weights {m.weights / GB:.1f} GB, gradients "
        f"{m.gradients / GB:.1f}, optimizer {m.optimizer / GB:.1f}, activations {m.activations / GB:.1f}, buffers "
        f"{m.buffers / GB:.1f} = {m.total / GB:.1f} GB of {gb:g}: {verdict}",
        f"step time {t.total:.3f} s: compute {t.compute:.3f}, TP allreduces {t.tp:.3f}, pipeline bubble "
        f"{t.bubble:.3f}, pipeline sends {t.pp:.3f}, DP allreduce not overlapped {t.dp:.3f}"
        + (f", Muon's orthogonalization {t.optimizer:.3f}" if t.optimizer else ""),
        f"throughput: {e.tokens_per_s:,.0f} tokens/s, {e.tflops_per_gpu:.1f} TFLOP/s per GPU (recomputation "
        f"counted), MFU {e.mfu:.1%}",
        f"{horizon.words()}: {days(e, horizon):.2f} days",
    ]
    return "\n".join(lines) + "\n"


def ranked_text(
    job: Job, cluster: Cluster, params: int, fitting: list[Estimate], dropped: list[Dropped], horizon: Horizon, top: int
) -> str:
    lines = _header(job, cluster, params)
    lines.append(f"days: for {horizon.words()}")
    fit = "fits" if len(fitting) == 1 else "fit"
    lines.append(f"{counted(len(fitting), 'layout')} {fit}, best first (predicted tokens/s); --json lists them all:")
    lines.append(
        f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>5} {'zero':>4} {'recompute':>9} {'mb':>3} {'micro':>6} "
        f"{'GB/GPU':>7} {'step s':>8} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'days':>6}"
    )
    for i, e in enumerate(fitting[:top], 1):
        L = e.layout
        row = (
            f"{i:>3} {L.tp:>3} {L.pp:>3} {L.dp:>5} {L.zero:>4} {L.recompute:>9} {L.micro_batch:>3} "
            f"{L.microbatches:>6} {e.memory.total / GB:>7.1f} {e.time.total:>8.3f} {e.tokens_per_s:>11,.0f} "
            f"{e.tflops_per_gpu:>8.1f} {e.mfu:>6.1%} {days(e, horizon):>6.1f}"
        )
        lines.append(row)
    if len(fitting) > top:
        lines.append(f"    ... and {len(fitting) - top} more (--top N shows more)")
    if dropped:
        kinds = Counter(d.kind for d in dropped)
        lines.append(f"{counted(len(dropped), 'layout')} dropped:")
        for kind, count in kinds.most_common():
            example = next(d for d in dropped if d.kind == kind)
            L = example.layout
            lines.append(
                f"  {kind}: {count} (e.g. tp {L.tp} pp {L.pp} dp {L.dp} zero {L.zero} {L.recompute} "
                f"micro-batch {L.micro_batch}: {example.reason})"
            )
    return "\n".join(lines) + "\n"
