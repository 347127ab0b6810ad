"""Memory per GPU: model states (weights, gradients, optimizer state) by accounting and ZeRO stage, activations by
recomputation and pipeline schedule, and an allowance for buffers. Bytes throughout; GB = 10^9 bytes.

Two accountings of the model states, per parameter the rank holds:

- "hvdlm", what hvdlm's trainer holds (`state_mb`; hvdlm.training.memory_account measures it on the live
  tensors): fp32 weights and fp32 gradients (bf16 is autocast, the weights stay fp32) and AdamW's two fp32 moments,
  4 + 4 + 8 bytes (SGD with momentum: 4 + 4 + 4). ZeRO-1 divides the optimizer state over the dp replicas; ZeRO-2
  the gradients too; ZeRO-3 the weights too, plus what is gathered at once: the module being computed and the
  next large one, prefetched (hvdlm.optim.zero3), counted as a block, or the token table where that is larger.
- "mixed", the mixed-precision Adam of the ZeRO paper (Rajbhandari et al. 2020, section 3.1): fp16 weights and
  gradients, and K = 12 bytes of optimizer state (fp32 master weights, momentum, variance): 2 + 2 + 12. Stage 1
  divides the 12 by dp, stage 2 the gradients' 2 as well. Its Figure 1 (7.5B parameters, 64 GPUs) gives
  120 / 31.4 / 16.6 GB for baseline / stage 1 / stage 2, which tests/test_plan.py checks.

Activations, per transformer layer and micro-batch, in 16-bit (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", section 4): s b h (34 + 5 a s / h) bytes without parallelism. With
tensor parallelism but no sequence parallelism (hvdlm's TP replicates the LayerNorms, dropouts and residual
stream on every TP rank) s b h (10 + 24 / t + 5 a s / (h t)); selective recomputation drops the attention core's
5 a s / (h t) term; full recomputation keeps only each layer's input, 2 s b h, plus one layer's working set while
it is recomputed. The paper's 34 counts dropout masks, which hvdlm's default dropout of 0 does not keep, and
hvdlm's autocast keeps the residual stream in fp32, which the 16-bit figure does not count: the published
formula is used as it stands (hvdlm-exact counts are bench/plan_check.py's business).
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdlm.config import ModelConfig
from hvdlm.parallel.split import stage_layers
from hvdlm.plan import counts
from hvdlm.plan.candidate import Candidate

MB = 1024**2
GB = 1e9
# fp32 moments per parameter: AdamW's two, SGD's momentum. Muon keeps one for the blocks' matrices and AdamW's two
# for the rest (embeddings, head, vectors): counted as two throughout, an upper bound.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "muon": 8}
ACCOUNTINGS = ("hvdlm", "mixed")
MIXED_OPTIMIZER_BYTES = 12  # K of the ZeRO paper: fp32 master weights, momentum and variance
# Not counted by the formulas: the CUDA context, cuBLAS workspaces and NCCL's buffers (~1 GB on A100 / H100 in
# practice), and Horovod's tensor-fusion buffer (128 MB, hvdlm's default). Added to every GPU's figure.
RUNTIME_BYTES = 1.0 * GB + 128 * MB


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the fullest pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    stage: int  # the fullest stage

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.buffers


def state_mb(
    params: int, optimizer: str, dp: int = 1, zero: int = 0, momentum: bool = True, gathered: int = 0
) -> dict[str, float]:
    """MB per rank for `params` fp32 parameters held by the rank (its TP shard or stage): weights whole, the
    optimizer state split over the dp replicas with ZeRO-1 (padded to equal slices), the gradients too with ZeRO-2
    (its slice; the buckets in flight during backward, a few train.zero_bucket_mb, come on top), the weights too
    with ZeRO-3 (its slice and `gathered`, the parameters whole at once at the peak). The trainer's account
    (hvdlm.training.memory_account) measures the same from the live tensors."""
    per_param = OPTIMIZER_STATE_BYTES[optimizer] if (optimizer != "sgd" or momentum) else 0
    held = -(-params // dp) if zero else params
    grads = held if zero >= 2 else params
    weights = held + min(gathered, params) if zero >= 3 else params
    return {"params_mb": 4 * weights / MB, "grads_mb": 4 * grads / MB, "optimizer_mb": per_param * held / MB}


def gathered_params(m: ModelConfig, tp: int) -> int:
    """ZeRO-3's parameters whole at once on a rank: a block's attention and MLP (one computing, the other
    prefetched), or the token table and the part next to it where the table is larger."""
    block = counts.block_params_per_rank(m, tp)
    return max(block, counts.vocab_rows_per_rank(m.vocab_size, tp) * m.d_model + block)


def state_bytes(
    params: int, accounting: str, zero: int, dp: int, optimizer: str = "adamw", gathered: int = 0
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) in bytes for `params` parameters held by one rank (ZeRO-3:
    `gathered` of them whole at once besides the shard)."""
    if accounting == "mixed":
        shard = params / dp
        weights = shard + min(gathered, params) if zero >= 3 else params
        return 2 * weights, 2 * (shard if zero >= 2 else params), MIXED_OPTIMIZER_BYTES * (shard if zero else params)
    # hvdlm's own: state_mb is the trainer's account (slices padded to equal size).
    mb = state_mb(params, optimizer, dp=dp, zero=zero, gathered=gathered)
    return mb["params_mb"] * MB, mb["grads_mb"] * MB, mb["optimizer_mb"] * MB


def layer_activation_bytes(m: ModelConfig, micro_batch: int, tp: int, recompute: str) -> float:
    """Bytes one layer keeps for backward per micro-batch (Korthikanti et al. 2022, 16-bit, no sequence
    parallelism). The split term, 24 s b h / t for GPT-2, is 2 bytes per element of q and the output
    projection's input (s b h each), k and v (s b K D each: narrower with grouped-query attention) and the MLP's
    saved tensors, two d_ff wide for GELU (its input and output), four for SwiGLU (gate, its SiLU, up, their
    product)."""
    s, b, h, a = m.seq_len, micro_batch, m.d_model, m.n_head
    if recompute == "full":
        return 2 * s * b * h  # the block's input only
    kv = m.kv_heads * (h // a)
    split = (4 * h + 4 * kv + 4 * (m.traits.mlp_matrices - 1) * m.ffn_width) / h  # 24 for GPT-2
    attention_core = 0.0 if recompute == "selective" else 5 * a * s / (h * tp)
    return s * b * h * (10 + split / tp + attention_core)


def memory(
    m: ModelConfig,
    layout: Candidate,
    *,
    accounting: str = "hvdlm",
    optimizer: str = "adamw",
    schedule: str = "1f1b",
    pp_layers: str | list[int] = "",
) -> Memory:
    """Memory per GPU of the fullest stage (the first holds the most micro-batches, the last the logits)."""
    tp, pp, dp, zero, recompute = layout.tp, layout.pp, layout.dp, layout.zero, layout.recompute
    micro_batch, microbatches = layout.micro_batch, layout.microbatches
    per_stage = stage_layers(m.n_layer, pp, pp_layers)
    params = counts.params_per_stage(m, tp, pp, pp_layers=pp_layers)
    s, b, h = m.seq_len, micro_batch, m.d_model
    # While one layer is recomputed (full) its whole working set exists again, for one micro-batch.
    working = layer_activation_bytes(m, b, tp, "none") if recompute == "full" else 0.0
    # The last stage's logits for one micro-batch: 16-bit from the head, an fp32 copy for the cross-entropy
    # (6 bytes per logit; each TP rank holds its vocabulary shard).
    logits = 6 * s * b * counts.vocab_rows_per_rank(m.vocab_size, tp)
    per_layer = layer_activation_bytes(m, b, tp, recompute)
    # Pipeline stages receive and send one activation (s b h, 16-bit) per direction.
    buffers = RUNTIME_BYTES + (4 * s * b * h if pp > 1 else 0)
    # Most stages hold equal parameter counts: their states are counted once (the planner weighs thousands of
    # layouts of up to 128 stages in under half a second).
    states: dict[int, tuple[float, float, float]] = {}
    best, best_total = None, -1.0
    for stage, layers in enumerate(per_stage):
        if params[stage] not in states:
            gathered = gathered_params(m, tp) if zero >= 3 else 0
            states[params[stage]] = state_bytes(params[stage], accounting, zero, dp, optimizer, gathered)
        weights, grads, state = states[params[stage]]
        # Micro-batches the stage holds at once: 1F1B's warm-up leaves p - s on stage s (stage 0 holds p), GPipe
        # runs every forward first (m), and without stages each backward frees its forward's (1); interleaved a
        # little more than 1F1B (counts.in_flight).
        flight = counts.in_flight(pp, stage, microbatches, schedule, layout.virtual_stages)
        acts = layers * per_layer * flight + working + (logits if stage == pp - 1 else 0)
        total = weights + grads + state + acts + buffers
        if total > best_total:
            best, best_total = (weights, grads, state, acts, stage), total
    assert best is not None
    weights, grads, state, acts, stage = best
    return Memory(weights, grads, state, acts, buffers, stage)
