"""Step time: FLOPs at a calibrated fraction of peak, tensor-parallel allreduces, the pipeline bubble and the
pipeline's sends, and the data-parallel gradient allreduce. Seconds throughout.

FLOPs of one training iteration of a GPT (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
on GPU Clusters Using Megatron-LM", section 5.1): with full recomputation

    F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))

for global batch B, sequence s, l layers, hidden size h, vocabulary V. One forward pass of a layer is
24 B s h^2 (the matmuls) + 4 B s^2 h (attention scores and their product with V); a training step runs it
3 times (forward, and backward at twice the forward) plus once more with full recomputation (96 = 4 x 24), and
the logits, 2 B s h V per pass, 3 times (6 B s h V = 96 B s l h^2 V / (16 l h)). Without recomputation the
factor is 72; selective recomputation adds one forward of the attention core only. TFLOP/s per GPU counts the
recomputation (as Table 1 of that paper does); MFU counts the model's FLOPs only (72), as PaLM defines it.

Communication, ring allreduce of n bytes among k ranks: each rank sends and receives 2 (k - 1) / k x n bytes
(Patarasuk & Yuan 2009), so it takes 2 (k - 1) / k x n / bandwidth of the slowest link in the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdlm.config import ModelConfig
from hvdlm.model.size import matrix_parameters
from hvdlm.parallel.split import stage_layers
from hvdlm.plan.candidate import Candidate

# The share of the data-parallel allreduce that cannot hide behind the backward pass even when the backward is
# long enough. Horovod starts allreducing a gradient as soon as it is ready, but fuses tensors in cycles and the
# gradients of the first layers (and the tied embedding, complete only at the very end) are ready last. Chosen so
# that Horovod's published ResNet-101 point (Sergeev & Del Balso 2018: ~90 % scaling efficiency on 512 P100s
# over 25 Gbit/s) comes out (tests/test_plan.py): a calibration, not a derivation.
EXPOSED_TAIL = 0.5


def passes(recompute: str) -> tuple[int, int]:
    """(forward passes of the layers' matmuls, of the attention core) per step: backward counts as two."""
    return {"none": (3, 3), "selective": (3, 4), "full": (4, 4)}[recompute]


def step_flops(m: ModelConfig, global_batch: int, recompute: str) -> float:
    """FLOPs of one step over all GPUs (Narayanan et al. 2021, generalised to the recomputation choice and to the
    block's own matrices: 24 h^2 per token and layer is 2 x GPT-2's 12 h^2 matrix entries; a llama block has
    q and the output d x d, k and v narrower under grouped-query attention, and SwiGLU's three d x d_ff). The
    attention scores and their product with V are 4 s h per token and layer whatever the key/value heads: every
    query head attends."""
    B, s, layers, h, V = global_batch, m.seq_len, m.n_layer, m.d_model, m.vocab_size
    dense, attention = passes(recompute)
    matmuls = 2 * B * s * matrix_parameters(m)  # one forward pass of a block's matrices
    return layers * (dense * matmuls + attention * 4 * B * s * s * h) + 6 * B * s * h * V


def muon_flops_per_layer(m: ModelConfig, ns_steps: int = 5) -> float:
    """FLOPs of Muon's orthogonalization of one block's matrices (hvdlm.optim.muon), which every rank runs whole:
    a step on an m x n matrix (m <= n) is two m x n by n x m products and one m x m square, 4 m^2 n + 2 m^3. GPT-2's
    q, k, v (d x 3d), output (d x d) and MLP (d x 4d, twice) sum to 56 d^3 a step; a llama block's q, k, v are
    d x (d + 2 K D), its MLP three d x d_ff."""
    d, f = m.d_model, m.ffn_width
    qkv = d + 2 * m.kv_heads * (d // m.n_head)
    shapes = [(d, qkv), (d, d)] + [(min(d, f), max(d, f))] * m.traits.mlp_matrices
    return ns_steps * sum(4 * a * a * b + 2 * a**3 for a, b in shapes)


def ring_allreduce_s(nbytes: float, ranks: int, bytes_per_s: float) -> float:
    """Time of a ring allreduce of `nbytes` among `ranks` over links of `bytes_per_s` each way."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


@dataclass(frozen=True)
class Speeds:
    """What one GPU of a layout computes and sends per second, each link as the layout places its group."""

    flops_per_s: float  # achievable: peak x efficiency
    tp_bytes_per_s: float  # to its TP group (inside a node)
    pp_bytes_per_s: float  # to the neighbouring stages
    dp_bytes_per_s: float  # around its DP group's ring


@dataclass(frozen=True)
class StepTime:
    compute: float  # matmul-dominated work, recomputation included
    tp: float  # tensor-parallel allreduces (not overlapped: each one's result is needed at once)
    bubble: float  # pipeline fill and drain
    pp: float  # pipeline sends on the critical path
    dp: float  # the part of the gradient allreduce that does not overlap backward
    optimizer: float = 0.0  # Muon: the orthogonalization, and with TP the gathers of the matrices

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.bubble + self.pp + self.dp + self.optimizer


def dp_exposed_s(
    grad_bytes: float,
    dp: int,
    bytes_per_s: float,
    backward_s: float,
    zero: int = 0,
    microbatches: int = 1,
    forward_s: float = 0.0,
) -> float:
    """The part of the data-parallel gradient exchange that the step waits for (`backward_s`, `forward_s`: one
    micro-batch's backward and forward)."""
    allreduce = ring_allreduce_s(grad_bytes, dp, bytes_per_s)
    if zero == 3:
        # ZeRO-3: per micro-batch an all-gather of the weights for the forward, another for the backward and the
        # reduce-scatter of the gradients, each half an allreduce's bytes (three halves, 1.5x ZeRO-2's traffic
        # without accumulation). Each module's gather is prefetched while the one before computes, and the
        # reduce-scatter runs during backward: hidden by that pass's compute, never below EXPOSED_TAIL of it (the
        # first module's gather of each pass, and the copies, wait). No all-gather after the step.
        half = allreduce / 2
        forward = max(half - forward_s, EXPOSED_TAIL * half)
        return microbatches * (forward + max(2 * half - backward_s, EXPOSED_TAIL * 2 * half))
    if zero == 1:
        # hvdlm's ZeRO-1: one reduce-scatter after backward and an all-gather after the step, together the bytes
        # of an allreduce, overlapping nothing (docs/guides/memory.md).
        return allreduce
    if zero == 2:
        # ZeRO-2: each half of an allreduce apart. The reduce-scatter runs bucket by bucket during every
        # micro-batch's backward (k times a step), hidden as Horovod's allreduce is; the all-gather of the updated
        # weights comes after the step, exposed.
        half = allreduce / 2
        return microbatches * max(half - backward_s, EXPOSED_TAIL * half) + half
    # Horovod allreduces the last micro-batch's gradients while its backward runs (earlier micro-batches only
    # accumulate): at most that backward hides, and never more than 1 - EXPOSED_TAIL of the allreduce.
    return max(allreduce - backward_s, EXPOSED_TAIL * allreduce)


def tp_bytes_per_token(d_model: int, recompute: str) -> int:
    """Bytes per layer and token that hvdlm's TP allreduces carry in one forward and backward (each rank's
    payload; the ring moves 2 (t - 1) / t of it). Forward: the two row-parallel outputs (attention, MLP), 16-bit
    under autocast. Backward: their mirrors, the gradients of the column-parallel inputs, in the dtype of the
    LayerNorm outputs, fp32 (hvdlm's residual stream stays fp32). Full recomputation runs a block's forward again
    only as far as its last saved tensor (torch's checkpoint stops early), so only the attention output's
    reduction repeats. (The hvdlm-exact count, embedding and loss included, is hvdlm.plan.counts'.)"""
    return d_model * (2 * 2 + 2 * 4 + (2 if recompute == "full" else 0))


def bubble_fraction(pp: int, microbatches: int, virtual: int = 1) -> float:
    """The share of a pipeline step its stages idle: (p - 1) / (m + p - 1) for 1F1B and GPipe (Narayanan et al.
    2021, section 2.2.1); with v virtual stages each fill and drain slot is a chunk's, a v-th of a stage's work:
    (p - 1) / (v m + p - 1) (section 2.2.2)."""
    return (pp - 1) / (virtual * microbatches + pp - 1)


def fullest_stage(m: ModelConfig, layout: Candidate) -> int:
    """The blocks on the fullest pipeline stage (hvdlm's even split, the remainder spread): it sets the pace."""
    return max(stage_layers(m.n_layer, layout.pp))


def tp_payload(m: ModelConfig, layout: Candidate) -> int:
    """Bytes a rank of the fullest stage puts into its TP allreduces in one step (0 without TP)."""
    per_micro = tp_bytes_per_token(m.d_model, layout.recompute) * m.seq_len * layout.micro_batch
    return per_micro * fullest_stage(m, layout) * layout.microbatches if layout.tp > 1 else 0


def step_time(
    m: ModelConfig, layout: Candidate, speeds: Speeds, grad_bytes: float, optimizer: str = "adamw"
) -> StepTime:
    """One optimizer step's time on one GPU of the fullest stage, `grad_bytes` of gradients to average over dp. The
    layout's GPUs and global batch are its own (tp x pp x dp; micro-batch x micro-batches x dp), and the fullest
    stage's layers over the average stage's (the imbalance) set the pipeline's pace."""
    tp, pp, dp, zero, recompute = layout.tp, layout.pp, layout.dp, layout.zero, layout.recompute
    micro_batch, microbatches = layout.micro_batch, layout.microbatches
    layers = fullest_stage(m, layout)
    imbalance = layers * pp / m.n_layer
    compute = step_flops(m, layout.global_batch, recompute) / layout.gpus / speeds.flops_per_s * imbalance
    activation = m.seq_len * micro_batch * m.d_model * 2  # one 16-bit activation of a micro-batch
    tp_time = ring_allreduce_s(tp_payload(m, layout), tp, speeds.tp_bytes_per_s)
    # 1F1B and GPipe alike: p - 1 micro-batch slots of fill and drain on top of the m slots of work, so the
    # bubble is (p - 1) / m of the work, i.e. (p - 1) / (m + p - 1) of the pipeline's time (Narayanan et al.
    # 2021, section 2.2.1). Interleaved, the slots are a chunk's: (p - 1) / (v m) of the work (bubble_fraction).
    v = layout.virtual_stages
    bubble = (compute + tp_time) * (pp - 1) / (v * microbatches)
    # Sends overlap compute in the steady state (non-blocking); the fill and drain wait for one per boundary,
    # and interleaved there are v times the boundaries (a chunk's output goes round the ring v times).
    sends = 2 * (pp - 1) * v * activation / speeds.pp_bytes_per_s if pp > 1 else 0.0
    dense, _ = passes(recompute)
    backward = compute / microbatches * (dense - 1) / dense  # the last micro-batch's backward, recomputation in it
    forward = compute / microbatches / dense
    exposed = dp_exposed_s(grad_bytes, dp, speeds.dp_bytes_per_s, backward, zero, microbatches, forward)
    orthogonalize = 0.0
    if optimizer == "muon":  # every rank orthogonalizes its stage's whole matrices, TP ranks after an allgather
        gathered = 4 * matrix_parameters(m) * layers  # fp32, the allgather's half of an allreduce's traffic
        orthogonalize = muon_flops_per_layer(m) * layers / speeds.flops_per_s
        orthogonalize += ring_allreduce_s(gathered, tp, speeds.tp_bytes_per_s) / 2
    return StepTime(compute, tp_time, bubble, sends, exposed, orthogonalize)
