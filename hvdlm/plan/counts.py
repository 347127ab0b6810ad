"""What one hvdlm rank holds and sends, counted exactly from the configuration: arithmetic, no torch (job prep).

These are the planner's ground truth on the numbers hvdlm measures itself, and bench/plan_check.py compares them
with real runs:

- `params_per_rank`: the parameters a rank holds (memory_account's params_mb is 4 bytes each of them);
- `activation_bytes`: what one micro-batch's forward saves for backward on a rank, as
  hvdlm.training.memory_account.ActivationMeter counts it (each storage once, parameters left out);
- `tp_bytes_per_step`, `pp_bytes_per_step`: the payload bytes a rank's tensor-parallel and pipeline group
  collectives count in `Group.bytes_moved` during one optimizer step.

The activation and TP byte counts follow torch's CPU kernels, against which they are checked exactly (tests,
bench/plan_check.py): the fused attention without dropout and the math one with it, dropout masks in the
input's dtype, LayerNorm in its input's dtype under autocast. On GPUs some differ (masks of 1 byte, LayerNorm
in fp32 under autocast, attention dropout inside the fused kernel); the planner reads them as estimates there.

Notation: B sequences of a micro-batch, T = seq_len, N = B T tokens, d = d_model, H heads, p the TP size,
L_s the blocks on the rank's stage, V the vocabulary and V_p a rank's rows of the padded token table.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdlm.config import ModelConfig
from hvdlm.model.size import column_biases, matrix_parameters, norm_parameters, row_biases
from hvdlm.parallel.split import stage_layers

VOCAB_MULTIPLE = 64  # hvdlm.parallel.layers.VOCAB_MULTIPLE: a rank's vocabulary rows are padded to a multiple of it
FP32 = 4
# fp8 (torchao's float8 training) casts to fp8 inside each matmul only: what is saved and sent is bf16, as in bf16.
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # element size of the autocast matmuls' inputs and outputs
WIRE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 4, "fp8": 2}  # the pipeline's wire dtype (hvdlm.training.pipeline)


@dataclass(frozen=True)
class Shape:
    """One rank's share of one micro-batch, as activation_bytes and tp_bytes_per_step read it: the model and the
    micro-batch, where the rank sits in the layout (its TP size, its stage's blocks, whether that stage holds the
    embeddings and the head), and the choices that change what is saved and sent."""

    model: ModelConfig
    micro_batch: int  # B, sequences (train.batch_size)
    tp: int = 1
    layers: int | None = None  # L_s, the blocks on the rank's stage; None: model.n_layer (one stage)
    first: bool = True  # the stage holds the embeddings (always with one stage)
    last: bool = True  # the stage holds the head and the loss (always with one stage)
    recompute: str | None = None  # None: model.recompute
    precision: str = "fp32"  # the autocast dtype: "fp32", "bf16" or "fp16"

    def __post_init__(self) -> None:
        # The model's defaults, filled in once (a frozen dataclass is set through object.__setattr__).
        if self.layers is None:
            object.__setattr__(self, "layers", self.model.n_layer)
        if not self.recompute:
            object.__setattr__(self, "recompute", self.model.recompute)


def vocab_rows_per_rank(vocab_size: int, tp: int) -> int:
    """Rows of the token table on one TP rank: the vocabulary split p ways, each share padded up to a multiple of
    64 (hvdlm.parallel.layers.Sharding with multiple = 64; GPT-2's 50257 -> 50304 on one rank)."""
    return -(-vocab_size // (tp * VOCAB_MULTIPLE)) * VOCAB_MULTIPLE


def _check_tp(model: ModelConfig, tp: int) -> None:
    if tp < 1 or model.n_head % tp or model.d_model % tp:
        raise ValueError(f"TP size {tp} must divide n_head ({model.n_head}) and d_model ({model.d_model})")


def block_params_per_rank(model: ModelConfig, tp: int) -> int:
    """One transformer block's parameters on one TP rank.

    The matrices are split p ways (hvdlm.model.size.matrix_parameters; GPT-2: q, k, v 3 d x d, the attention
    output d x d, the MLP's 4d x d and d x 4d, 12 d^2 / p; llama: k and v n_kv_head heads wide, three MLP matrices
    of d x d_ff). The column-parallel biases are split too (GPT-2: 3d / p and 4d / p); the row-parallel biases
    (d, d) and both norms (a gain d, a LayerNorm's shift d) are replicated, whole on every rank.
    """
    _check_tp(model, tp)
    biases = column_biases(model) // tp + row_biases(model) if model.bias else 0
    return matrix_parameters(model) // tp + 2 * norm_parameters(model) + biases


def params_per_rank(
    model: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    vocab_rows: int | None = None,
    pp_layers: str | list[int] = "",
) -> int:
    """Parameters held by a rank on pipeline stage `stage` of `pp` with TP size `tp`: exact.

    Its stage's blocks (`block_params_per_rank` each, hvdlm.parallel.split.stage_layers for how many); on the first
    stage the token table (V_p x d, its vocabulary shard with padding) and the position table (T x d, replicated;
    gpt2 only); on the last the final norm (d, + d with a LayerNorm's biases) and the output head: tied to the
    token table, the same tensor when one stage holds both, its own copy (V_p x d) on the last stage otherwise
    (hvdlm.model.stage); untied, a V_p x d matrix of its own.
    `vocab_rows`: the vocabulary used in place of model.vocab_size (the dataset's, as size.parameter_count).
    With tp = pp = 1 this is size.parameter_count(model, padded vocabulary).
    """
    return params_per_stage(model, tp, pp, vocab_rows, pp_layers)[stage]


def params_per_stage(
    model: ModelConfig, tp: int = 1, pp: int = 1, vocab_rows: int | None = None, pp_layers: str | list[int] = ""
) -> list[int]:
    """`params_per_rank` of every stage at once (the planner asks for all of them, for many layouts)."""
    d = model.d_model
    table = vocab_rows_per_rank(vocab_rows or model.vocab_size, tp) * d
    positions = model.seq_len * d if model.traits.learned_positions else 0
    block = block_params_per_rank(model, tp)
    out = []
    for stage, layers in enumerate(stage_layers(model.n_layer, pp, pp_layers)):
        n = layers * block
        first, last = stage == 0, stage == pp - 1
        if first:
            n += table + positions
        if last:
            head = 0 if first and model.tie_embeddings else table  # the tied head is the table itself
            n += norm_parameters(model) + head
        out.append(n)
    return out


def _stream_bytes(model: ModelConfig, first: bool, precision: str) -> tuple[int, int, int]:
    """Element sizes of a residual branch's output, of the stage's input stream and of the stream after a residual
    add. The stream is fp32 from the embeddings; a later stage receives it in the wire dtype, and adding a branch
    keeps bf16 only if the branch is bf16 too, i.e. without the row-parallel bias (fp32, added after the reduction).
    """
    mixed = precision != "fp32"
    branch = FP32 if (not mixed or model.bias) else COMPUTE_BYTES[precision]
    stream_in = FP32 if first else WIRE_BYTES[precision]
    stream = max(stream_in, branch)  # the sum of two float tensors takes the wider dtype
    return branch, stream_in, stream


def _attention_bytes(model: ModelConfig, batch: int, tp: int, recompute: str, e: int) -> int:
    """The attention core's saved tensors in one block (see activation_bytes)."""
    n, s, a, t = batch * model.seq_len, model.d_model // tp, model.n_head // tp, model.seq_len
    if recompute == "selective":  # checkpoint keeps q, k, v (views of the qkv output) and the output projection its y
        return 4 * n * s * e
    if model.dropout == 0:  # fused (flash) kernel: q, k, v, its output (also the projection's input), logsumexp
        return 4 * n * s * e + FP32 * batch * a * t
    # With attention dropout torch's CPU kernel is the math one, in fp32 under autocast too: q, k, v copies,
    # softmax, dropout mask and dropped weights (B, H/p, T, T), and the output copied back to (B, T, d/p).
    return 3 * FP32 * n * s + 3 * FP32 * batch * a * t * t + n * s * e


def _blocks_bytes(shape: Shape, e: int, branch: int, stream_in: int, stream: int) -> int:
    """activation_bytes' part for the stage's blocks (see there): element sizes e (compute), branch (the residual
    branch's), stream_in and stream (the block inputs')."""
    model, layers = shape.model, shape.layers
    n, d = shape.micro_batch * model.seq_len, model.d_model
    # The block inputs (and so the norms' inputs): the stage's input, then the stream after each residual add.
    block_inputs = n * d * (stream_in + (layers - 1) * stream) if layers else 0
    if shape.recompute == "full" or not layers:
        return block_inputs
    per_block = BLOCK_BYTES[model.arch](shape, e)
    if model.dropout > 0:
        per_block += 2 * branch * n * d  # the residual dropouts' masks
    return block_inputs + layers * n * d * stream + layers * per_block  # with the second norm's inputs


def _gpt2_block_bytes(shape: Shape, e: int) -> int:
    """One GPT-2 block's saved tensors beyond its inputs and the residual masks (see activation_bytes)."""
    model, tp = shape.model, shape.tp
    n, d = shape.micro_batch * model.seq_len, model.d_model
    s = d // tp
    per_block = 4 * FP32 * n  # the LayerNorms' mean and rstd
    per_block += 2 * e * n * d + 8 * e * n * s  # LayerNorm outputs (as the matmuls take them), fc and GELU out
    per_block += _attention_bytes(model, shape.micro_batch, tp, shape.recompute, e)
    if shape.precision != "fp32":
        per_block += 2 * 12 * d * d // tp  # the bf16 casts of the four weight matrices
    return per_block


def _llama_block_bytes(shape: Shape, e: int) -> int:
    """One Llama block's saved tensors beyond its inputs and the residual masks. With K D / p = k a rank's key/value
    width and f = d_ff / p its MLP units:
      RMSNorm     per norm its rstd 4 N, the normalized input in fp32 4 N d, its output as the matmul takes it e N d.
      attention   fused kernel: the qkv output e N (s + 2 k) (v is a view of it), the rotated q and k e N (s + k),
                  the output e N s and the logsumexp 4 B (H/p) T; selective: as fused, less the logsumexp; with
                  dropout the math kernel's fp32 copies 12 N s + 12 B (H/p) T^2 and its output e N s, and nothing
                  of the qkv output or the rotations.
      SwiGLU      gate, up, silu(gate) and their product: 4 e N f.
      bf16        the weights' casts 2 d (2 s + 2 k + 3 f) and the attention output's copy to (B, T, d/p) 2 N s.
    """
    model, tp, b, t = shape.model, shape.tp, shape.micro_batch, shape.model.seq_len
    n, d = b * t, model.d_model
    s, f = d // tp, model.ffn_width // tp
    k = model.kv_heads * (d // model.n_head) // tp
    per_block = 2 * (FP32 * n + FP32 * n * d + e * n * d)
    if shape.recompute == "selective":
        per_block += e * n * (s + 2 * k) + e * n * (s + k) + e * n * s
    elif model.dropout == 0:
        per_block += e * n * (s + 2 * k) + e * n * (s + k) + e * n * s + FP32 * b * (model.n_head // tp) * t
    else:
        per_block += 3 * FP32 * n * s + 3 * FP32 * b * (model.n_head // tp) * t * t + e * n * s
    per_block += 4 * e * n * f
    if shape.precision != "fp32":
        per_block += 2 * d * (2 * s + 2 * k + 3 * f) + 2 * n * s
    return per_block


BLOCK_BYTES = {"gpt2": _gpt2_block_bytes, "llama": _llama_block_bytes}


def activation_bytes(shape: Shape, vocab_rows: int | None = None) -> int:
    """Bytes one micro-batch's forward saves for backward on one rank of `shape`, as ActivationMeter counts them
    (each storage once, parameters excluded); torch's CPU kernels (the fused attention without dropout, the math
    one with it). `vocab_rows`: the vocabulary used in place of model.vocab_size (as params_per_rank).

    With N = B T, s = d / p, e the compute element size (4 fp32, 2 bf16) and r the residual branch's (4, or 2
    with bf16 and no biases: a row-parallel bias is added in fp32 after the reduction), per block:
      none       LayerNorm inputs 2 x 4 N d (the stream's dtype, see below) and their mean and rstd (4 x 4 N);
                 LayerNorm outputs 2 e N d (the bf16 casts with autocast); MLP fc output and GELU output 8 e N s;
                 attention: flash 4 e N s + 4 B (H/p) T (q, k, v, output, logsumexp), or with dropout
                 12 N s + 12 B (H/p) T^2 + e N s (the math kernel, fp32); dropout > 0: two residual masks 2 r N d
                 (torch's CPU dropout keeps its scaled mask in the input's dtype).
                 bf16: the weights' bf16 casts, 2 x 12 d^2 / p (autocast makes them per forward, so they count).
      selective  as none, but the attention core keeps only q, k, v and its output: 4 e N s.
      full       the block input only: 4 N d.
    The stream is fp32 from the embeddings; a later stage receives it in the wire dtype (bf16 when training in
    bf16), and it stays bf16 after the residual adds unless a bias (fp32, added after the row-parallel reduction)
    promotes it: its LayerNorm inputs and full recompute's block inputs are then 2 N d.
    Llama's blocks differ (see _llama_block_bytes) and have no position ids; their stage keeps the RoPE tables
    (cos and sin, 2 x 4 T D) unless the blocks are recomputed whole.
    First stage: the token ids 8 N (tp > 1: the masked ids 8 N and the outside-shard mask N), the positions 8 T,
    the embedding dropout's mask 4 N d. Last stage: final LayerNorm input 4 N d and statistics 8 N, its output
    e N d (llama's final RMSNorm: input, rstd 4 N, normalized input 4 N d, output e N d), the head weight's bf16
    cast 2 V_p d; the loss keeps fp32 log-probabilities 4 N V, the targets 8 N and 4 bytes (tp = 1; tp > 1: the
    softmax shard 4 N V_p, local targets 8 N, ownership mask N); under a pipeline (a last stage that is not also
    first) 8 bytes more: the loss times its finiteness factor keeps both.
    """
    model, tp, precision = shape.model, shape.tp, shape.precision
    first, last = shape.first, shape.last
    _check_tp(model, tp)
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(COMPUTE_BYTES)}")
    mixed = precision != "fp32"
    e = COMPUTE_BYTES[precision]
    b, t, d = shape.micro_batch, model.seq_len, model.d_model
    n = b * t
    branch, stream_in, stream = _stream_bytes(model, first, precision)
    total = _blocks_bytes(shape, e, branch, stream_in, stream)
    rows = vocab_rows_per_rank(vocab_rows or model.vocab_size, tp)
    learned = model.traits.learned_positions
    if shape.layers and not learned and shape.recompute != "full":
        total += 2 * FP32 * t * (d // model.n_head)  # RoPE's cos and sin tables, shared by the blocks
    if first:
        # The token ids (tp > 1: shifted and masked, and the mask) and the position ids (learned positions only).
        total += 8 * n + (8 * t if learned else 0) + (n if tp > 1 else 0)
        if model.dropout > 0:
            total += FP32 * n * d  # the embedding dropout's mask
    if last:
        final_in = stream if shape.layers else stream_in
        # The final norm's input, what it keeps (LayerNorm: mean and rstd; RMSNorm: rstd, normalized input), output.
        kept = 2 * FP32 * n if learned else FP32 * n + FP32 * n * d
        total += final_in * n * d + kept + e * n * d
        if mixed:
            total += 2 * rows * d  # the head weight's bf16 cast
        if tp == 1:
            total += FP32 * n * (vocab_rows or model.vocab_size) + 8 * n + FP32  # log-softmax, targets, weight
        else:
            total += FP32 * n * rows + 8 * n + n  # softmax shard, local targets, ownership mask
        if not first:
            total += 2 * FP32  # the pipeline's loss times its finiteness factor: the product keeps both
    return total


def in_flight(pp: int, stage: int, microbatches: int, schedule: str = "1f1b", virtual: int = 1) -> float:
    """Micro-batches whose activations a stage holds at once: all m with GPipe; with 1F1B the warm-up forwards
    plus one, min(p - s, m) (hvdlm.parallel.schedules); 1 without stages (each backward frees its forward).
    Interleaved (v > 1 chunks, hvdlm.parallel.interleaved): the warm-up's chunk passes plus one, each a v-th of
    the stage's layers, so (min(2 (p - s - 1) + (v - 1) p, v m) + 1) / v stage micro-batches; stage 0 holds
    (1 + (p - 1) / (v p)) times 1F1B's p."""
    if pp == 1:
        return 1
    if virtual > 1:
        warmup = microbatches * virtual if microbatches == pp else 2 * (pp - stage - 1) + (virtual - 1) * pp
        return (min(warmup, microbatches * virtual) + 1) / virtual
    return microbatches if schedule == "gpipe" else min(pp - stage, microbatches)


def tp_bytes_per_step(shape: Shape, microbatches: int = 1, optimizer: str = "adamw") -> int:
    """Payload bytes the TP group's collectives count (Group.bytes_moved) on one rank of `shape` in one optimizer
    step of `microbatches` micro-batches.

    Per micro-batch, N = B T tokens, L_s blocks: forward, 2 L_s allreduces of the row-parallel outputs, N d
    elements each (in the compute dtype: bf16 under autocast), the embedding's allreduce N d fp32 (first stage)
    and the loss's 3 N fp32 (max, then the sums of exponentials with the target logits; last stage); backward,
    the column-parallel inputs' gradients, 2 L_s N d, and the head's N d (last stage), in the LayerNorm outputs'
    dtype: fp32, except on a later stage that receives a bf16 stream (see activation_bytes; torch's CPU
    LayerNorm keeps its input's dtype under autocast). Full recompute runs each block's forward again in
    backward, as far as its last saved tensor (torch's checkpoint stops early there): the attention output's
    reduction again, L_s N d more, and the MLP's too only with dropout (whose mask is saved after it). Per step:
    one fp32 for the clipping norm. For fp32 and L blocks on one stage, 4 ((4 L + 2) N d + 3 N + 1):
    bench/tp_bytes.py. Muon (hvdlm.optim.muon) gathers each block matrix's fp32 update once a step: the rank's
    slice of 12 d^2 per block.
    """
    model, tp, layers = shape.model, shape.tp, shape.layers
    _check_tp(model, tp)
    if tp == 1:
        return 0
    n, d, e = shape.micro_batch * model.seq_len, model.d_model, COMPUTE_BYTES[shape.precision]
    _, stream_in, stream = _stream_bytes(model, shape.first, shape.precision)
    reductions = 2 * layers  # the row-parallel outputs
    if shape.recompute == "full":  # recomputed: the attention's, and the MLP's when its dropout mask is saved after it
        reductions += layers * (2 if model.dropout > 0 else 1)
    per_micro = reductions * n * d * e
    if layers:  # the LayerNorm outputs' gradients (their dtype is their input's: the stream's)
        per_micro += n * d * (stream_in + (2 * layers - 1) * stream)
    if shape.first:
        per_micro += FP32 * n * d
    if shape.last:
        per_micro += (stream if layers else stream_in) * n * d + FP32 * 3 * n
    muon = FP32 * matrix_parameters(model) // tp * layers if optimizer == "muon" else 0
    return microbatches * per_micro + FP32 + muon


def pp_bytes_per_step(
    model: ModelConfig,
    micro_batch: int,
    pp: int,
    stage: int,
    microbatches: int,
    precision: str = "fp32",
    virtual: int = 1,
) -> tuple[int, int]:
    """(p2p, group) bytes a pipeline stage counts in one step: p2p is StageLink.bytes_sent, the activations it sends
    to the next stage and the gradients to the previous one, m x B T d each, in the wire dtype (bf16 when training
    in bf16, else fp32); group is the pipeline group's bytes_moved, p2p plus the loss broadcast from the last stage
    and the clipping norm's allreduce (4 bytes each). (0, 0) without stages. With v virtual stages every chunk
    sends both ways but the model's first (no gradient back) and last (nothing on): 2 v - [first] - [last]
    messages per micro-batch, v times a middle stage's of 1F1B."""
    if pp == 1:
        return 0, 0
    message = micro_batch * model.seq_len * model.d_model * WIRE_BYTES[precision]
    directions = 2 * virtual - (stage == pp - 1) - (stage == 0)
    p2p = directions * microbatches * message
    return p2p, p2p + 2 * FP32


def tp_analytic_bytes(n_layer: int, batch: int, seq_len: int, d_model: int, tp: int) -> int:
    """bench/tp_bytes.py's figure: one micro-batch, fp32, every layer on one stage, no recomputation:
    4 x ((4 L + 2) B T d + 3 B T + 1) bytes for p > 1, 0 for p = 1."""
    cfg = ModelConfig(n_layer=n_layer, n_head=tp, d_model=d_model, seq_len=seq_len)
    return tp_bytes_per_step(Shape(cfg, batch, tp, recompute="none")) if tp > 1 else 0
