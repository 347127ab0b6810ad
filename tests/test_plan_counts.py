"""hvdlm.plan.counts against the real thing, in one process: parameters held by a rank (whole models and pipeline
stages), bytes saved for backward as the ActivationMeter counts them, over recompute / precision / dropout / bias
and stage positions, for both archs; the TP byte formula against bench/tp_bytes.py's; and the module stays torch-free.

TP > 1 needs ranks: bench/plan_check.py checks those counts (parameters, activations, TP and pipeline bytes)
against real runs under mpirun.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import assert_imports_nothing_heavy

from hvdlm.config import ModelConfig
from hvdlm.model import GPT
from hvdlm.model.size import parameter_count
from hvdlm.model.stage import GPTStage
from hvdlm.parallel.split import stage_layers
from hvdlm.plan import counts
from hvdlm.training.memory_account import ActivationMeter

SHAPES = [
    dict(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=256),
    dict(n_layer=3, n_head=4, d_model=48, seq_len=24, vocab_size=250, bias=False),
    dict(n_layer=1, n_head=1, d_model=16, seq_len=8, vocab_size=300),
]


def held(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once


@pytest.mark.parametrize("shape", SHAPES)
def test_params_of_the_whole_model(shape):
    cfg = ModelConfig(**shape)
    rows = counts.vocab_rows_per_rank(cfg.vocab_size, 1)
    assert counts.params_per_rank(cfg) == held(GPT(cfg)) == parameter_count(cfg, rows)


@pytest.mark.parametrize(("shape", "pp"), [(SHAPES[0], 2), (SHAPES[1], 3), (dict(SHAPES[1], n_layer=5), 2)])
def test_params_of_each_pipeline_stage(shape, pp):
    cfg = ModelConfig(**shape)
    split = stage_layers(cfg.n_layer, pp)
    for stage in range(pp):
        assert counts.params_per_rank(cfg, 1, pp, stage) == held(GPTStage(cfg, split, stage)), stage


def test_params_of_tp_shards_add_up():
    """Summed over the p shards, the split tensors count once and the replicated ones p times."""
    cfg = ModelConfig(**SHAPES[0])
    d, layers = cfg.d_model, cfg.n_layer
    whole = counts.params_per_rank(cfg)
    replicated = layers * 6 * d + cfg.seq_len * d + 2 * d  # LayerNorms, row-parallel biases, positions, ln_f
    assert 2 * counts.params_per_rank(cfg, tp=2) == whole + replicated
    assert counts.vocab_rows_per_rank(50257, 1) == 50304 and counts.vocab_rows_per_rank(50257, 8) == 6336


def measured(cfg: ModelConfig, batch: int, precision: str, split: list[int] | None = None, stage: int = 0) -> int:
    """What the meter counts for one micro-batch's forward, as the trainer runs it (a pipeline stage as
    hvdlm.training.pipeline does: the input in the wire dtype, the last stage's finiteness factor)."""
    torch.manual_seed(0)
    model = (GPT(cfg) if split is None else GPTStage(cfg, split, stage)).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if split is not None and stage > 0:
        wire = torch.bfloat16 if precision == "bf16" else torch.float32
        x = torch.randn(batch, cfg.seq_len, cfg.d_model, generator=gen).to(wire).requires_grad_()
    meter = ActivationMeter(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with meter:
        with autocast:
            out = model(x, y)
        if split is not None and model.is_last:
            out = out * torch.where(torch.isfinite(out), 1.0, float("nan"))
    return meter.peak_bytes


GRID = list(itertools.product(["none", "selective", "full"], ["fp32", "bf16"], [0.0, 0.1], [True, False]))


@pytest.mark.parametrize(("recompute", "precision", "dropout", "bias"), GRID)
def test_activation_bytes_match_the_meter(recompute, precision, dropout, bias):
    for i, shape in enumerate(SHAPES[:2]):
        cfg = ModelConfig(**dict(shape, dropout=dropout, bias=bias, recompute=recompute))
        batch = 2 + i
        predicted = counts.activation_bytes(counts.Shape(cfg, batch, precision=precision))
        assert predicted == measured(cfg, batch, precision), (shape, predicted)


@pytest.mark.parametrize(("recompute", "precision", "dropout", "bias"), GRID[::3])
def test_activation_bytes_of_pipeline_stages(recompute, precision, dropout, bias):
    cfg = ModelConfig(**dict(SHAPES[1], n_layer=4, dropout=dropout, bias=bias, recompute=recompute))
    split = stage_layers(cfg.n_layer, 3)
    for stage in range(3):
        shape = counts.Shape(cfg, 2, 1, split[stage], first=stage == 0, last=stage == 2, precision=precision)
        predicted = counts.activation_bytes(shape)
        assert predicted == measured(cfg, 2, precision, split, stage), (stage, predicted)


LLAMA = dict(arch="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=64, seq_len=32, vocab_size=96, d_ff=96)
LLAMA_VARIANTS = [
    {},  # grouped-query attention, an untied head, no biases
    dict(n_kv_head=4, d_ff=160, seq_len=16),  # one key/value head per query head, another MLP width
    dict(n_head=8, n_kv_head=1, d_model=128, bias=True, tie_embeddings=True),
    dict(dropout=0.1),  # the math attention kernel and the dropout masks
]


@pytest.mark.parametrize(
    ("recompute", "precision"), list(itertools.product(["none", "selective", "full"], ["fp32", "bf16"]))
)
def test_llama_activation_bytes_match_the_meter(recompute, precision):
    """RMSNorm, RoPE, SwiGLU and grouped-query attention, counted exactly: the whole model and three stages."""
    split = stage_layers(LLAMA["n_layer"], 3)
    for variant in LLAMA_VARIANTS:
        cfg = ModelConfig(**dict(LLAMA, **variant, recompute=recompute))
        predicted = counts.activation_bytes(counts.Shape(cfg, 3, precision=precision))
        assert predicted == measured(cfg, 3, precision), (variant, predicted)
        for stage in range(3):
            shape = counts.Shape(cfg, 2, 1, split[stage], first=stage == 0, last=stage == 2, precision=precision)
            assert counts.activation_bytes(shape) == measured(cfg, 2, precision, split, stage), (variant, stage)


def test_in_flight_micro_batches():
    assert [counts.in_flight(4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert counts.in_flight(4, 0, 2) == 2 and counts.in_flight(2, 1, 8, "gpipe") == 8 and counts.in_flight(1, 0, 8) == 1


def test_tp_bytes_follow_the_benchmark_formula():
    for layers, batch, seq, d in [(2, 4, 128, 1024), (1, 2, 16, 32), (6, 3, 64, 96)]:
        formula = 4 * ((4 * layers + 2) * batch * seq * d + 3 * batch * seq + 1)
        assert counts.tp_analytic_bytes(layers, batch, seq, d, 2) == formula
        assert counts.tp_analytic_bytes(layers, batch, seq, d, 1) == 0
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=64, seq_len=32)
    one = counts.tp_bytes_per_step(counts.Shape(cfg, 2, 2))
    assert counts.tp_bytes_per_step(counts.Shape(cfg, 2, 2), microbatches=3) == 3 * (one - 4) + 4
    # Two stages: the blocks' collectives split between them, the embedding's on the first, the loss's on the last.
    halves = [counts.tp_bytes_per_step(counts.Shape(cfg, 2, 2, 2, first=s == 0, last=s == 1)) for s in (0, 1)]
    assert sum(halves) == one + 4
    # Full recompute: the attention output's reduction again (the recomputation stops before the MLP's, unless a
    # dropout mask is saved after it).
    assert counts.tp_bytes_per_step(counts.Shape(cfg, 2, 2, recompute="full")) - one == 4 * (2 * 32) * 64 * 4
    dropout = ModelConfig(n_layer=4, n_head=4, d_model=64, seq_len=32, dropout=0.1)  # its mask comes after the MLP's
    assert counts.tp_bytes_per_step(counts.Shape(dropout, 2, 2, recompute="full")) - one == 2 * 4 * (2 * 32) * 64 * 4


def test_pp_bytes():
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=64, seq_len=32)
    message = 2 * 32 * 64 * 4
    assert counts.pp_bytes_per_step(cfg, 2, 2, 0, 4) == (4 * message, 4 * message + 8)
    assert counts.pp_bytes_per_step(cfg, 2, 3, 1, 4, "bf16") == (4 * message, 4 * message + 8)  # both ways, bf16
    assert counts.pp_bytes_per_step(cfg, 2, 1, 0, 4) == (0, 0)


def test_imports_nothing_heavy():
    assert_imports_nothing_heavy("import hvdlm.plan.counts")
