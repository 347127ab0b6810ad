"""The llama arch in one process: its parts, its size, its layout-independent init, and the keys that configure it.

What needs ranks (every layout's losses against one rank) is tests/test_llama.py; transformers both ways is
tests/test_llama_hf.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from hvdlm.config import ModelConfig, load_config, model_shape
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.model.parts import RMSNorm, Rotary
from hvdlm.model.size import parameter_count
from hvdlm.model.stage import GPTStage, tied_parameters
from hvdlm.parallel.layers import Sharding, merge, shard
from hvdlm.parallel.topology import Group

# Grouped-query attention (4 query heads on 2 key/value heads), an untied head, a vocabulary padded at every tp.
CFG = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=16, vocab_size=257)
UNTIED = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False})


def test_the_arch_picks_its_parts_and_defaults():
    model = GPT(UNTIED)
    block = model.blocks[0]
    assert isinstance(block.ln_1, RMSNorm) and isinstance(model.ln_f, RMSNorm)
    assert model.pos_emb is None and isinstance(block.attn.rotary, Rotary)
    assert block.attn.rotary is model.blocks[1].attn.rotary  # one table for every block
    assert {n for n, _ in block.mlp.named_parameters()} == {"gate.weight", "up.weight", "down.weight"}
    assert UNTIED.bias is False and UNTIED.ffn_width == 256  # 8/3 x 32 = 85.3, up to a multiple of 256
    assert block.attn.qkv.weight.shape == (32 + 2 * 16, 32)  # q: 4 heads of 8; k, v: 2 heads each
    assert model.head.weight is not model.tok_emb.weight and model.head.weight.shape == (320, 32)
    assert "rotary.cos" not in str(list(model.state_dict()))  # the tables are rebuilt, never saved
    gpt2 = ModelConfig()
    assert gpt2.bias is True and gpt2.ffn_width == 4 * gpt2.d_model and gpt2.kv_heads == gpt2.n_head


def test_attention_is_causal_and_the_loss_starts_near_uniform():
    torch.manual_seed(0)
    model = GPT(UNTIED).eval()
    idx = torch.randint(0, 257, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 257
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(257)) < 0.3


def test_rope_rotates_the_two_halves_of_each_head_by_position():
    """The half-split convention (transformers' rotate_half): pair (i, i + D/2) turns by t theta^(-2i/D)."""
    rope = Rotary(head_dim=4, seq_len=3, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 3, 4)
    y = rope(x)[0, 0]
    for t in range(3):
        for i, freq in enumerate((1.0, 100.0 ** (-2 / 4))):
            c, s = math.cos(t * freq), math.sin(t * freq)
            a, b = x[0, 0, t, i].item(), x[0, 0, t, i + 2].item()
            assert y[t, i].item() == pytest.approx(a * c - b * s, abs=1e-6)
            assert y[t, i + 2].item() == pytest.approx(b * c + a * s, abs=1e-6)
    assert torch.equal(y[0], x[0, 0, 0])  # position 0 is not turned


@pytest.mark.parametrize("cfg", [CFG, UNTIED], ids=["tied", "untied"])
@pytest.mark.parametrize("tp", [2])
def test_sharded_init_holds_the_slices_of_the_unsharded_model(cfg, tp):
    """Each rank's q heads and key/value heads: q, k and v are cut each on its own (unequal widths)."""
    torch.manual_seed(3)
    full = dict(GPT(cfg).named_parameters())
    for r in range(tp):
        torch.manual_seed(3)
        model = GPT(cfg, Group(size=tp, rank=r))
        for name, p in model.named_parameters():
            spec = getattr(p, "tp_shard", None)
            expected = shard(full[name].detach(), spec, r, tp) if spec else full[name]
            assert torch.equal(p.detach(), expected), (name, r)
        q, k, v = model.blocks[0].attn.qkv.weight.detach().split((16, 8, 8))
        fq, fk, fv = full["blocks.0.attn.qkv.weight"].detach().split((32, 16, 16))
        assert torch.equal(q, fq.chunk(tp)[r]) and torch.equal(k, fk.chunk(tp)[r]) and torch.equal(v, fv.chunk(tp)[r])


def test_unequal_blocks_shard_and_merge_back():
    spec = Sharding(dim=0, full=12, chunks=3, parts=(6, 3, 3))
    full = torch.arange(12.0)
    shards = [shard(full, spec, r, 3) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 1, 6, 9], [2, 3, 7, 10], [4, 5, 8, 11]]
    assert torch.equal(merge(shards, spec), full)
    assert Sharding(*spec.recorded()) == spec  # as a checkpoint records it, read back
    assert Sharding(0, 12, 3).recorded() == [0, 12, 3]  # equal blocks recorded as before


@pytest.mark.parametrize("cfg", [CFG, UNTIED], ids=["tied", "untied"])
def test_pipeline_stages_hold_the_whole_models_tensors(cfg):
    torch.manual_seed(4)
    whole = GPT(cfg).state_dict()
    names = set()
    for stage in range(2):
        torch.manual_seed(4)
        part = GPTStage(cfg, [1, 1], stage)
        for name, t in part.state_dict().items():
            source = "tok_emb.weight" if name == "head.weight" and cfg.tie_embeddings else name
            assert torch.equal(t, whole[source]), (stage, name)
            names.add(name)
        tied = tied_parameters(part)
        assert len(tied) == (1 if cfg.tie_embeddings else 0)  # an untied head is exchanged with no one
    assert names == set(whole)


def test_a_stage_computes_what_the_whole_model_computes():
    torch.manual_seed(5)
    whole = GPT(UNTIED)
    first, last = (torch.manual_seed(5) and GPTStage(UNTIED, [1, 1], s) for s in (0, 1))
    idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(last(first(idx), idx), whole(idx, idx)[1])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv, d_ff", [(2, 0), (4, 48), (1, 40)])
def test_parameter_count_is_that_of_the_built_model(bias, tie, kv, d_ff):
    cfg = ModelConfig(**{**CFG.__dict__, "bias": bias, "tie_embeddings": tie, "n_kv_head": kv, "d_ff": d_ff})
    model = GPT(cfg)
    rows = model.tok_emb.weight.shape[0]
    assert parameter_count(cfg, vocab_rows=rows) == sum(p.numel() for p in model.parameters())
    lookups = 257 * 32 if not tie else 0  # untied: the token table (unpadded) is a lookup, the head the matmul
    assert model.num_params() == model.num_params(non_embedding=False) - lookups


def test_llama_3_8b_has_its_published_parameter_count():
    cfg = ModelConfig(
        arch="llama",
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_model=4096,
        d_ff=14336,
        vocab_size=128256,
        seq_len=8192,
        tie_embeddings=False,
    )
    assert parameter_count(cfg) == 8_030_261_248
    # Llama 2 7B: the default width (8/3 d up to 256: 11008), 32 key/value heads, 32000 tokens.
    llama2 = ModelConfig(arch="llama", n_layer=32, n_head=32, d_model=4096, vocab_size=32000, tie_embeddings=False)
    assert llama2.ffn_width == 11008 and parameter_count(llama2) == 6_738_415_616


def _refusal(*overrides: str) -> str:
    with pytest.raises(InputError) as e:
        load_config(None, ["model.arch=llama", *overrides])
    return str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_kv_head=3"], "model.n_kv_head (3) must divide model.n_head (4)"),
        (["model.n_kv_head=2", "parallel.tp=4"], "parallel.tp = 4 does not divide model.n_kv_head (2)"),
        (["model.n_kv_head=2", "parallel.tp=4"], "they are not replicated). Pick a tp among [1, 2]"),
        (["model.rope_theta=0"], "'model.rope_theta' must be positive, got 0.0"),
        (["model.rope_theta=-1e4"], "'model.rope_theta' must be positive"),
        (["model.n_kv_head=-1"], "'model.n_kv_head' must be zero or more"),
        (["model.d_ff=100", "parallel.tp=8", "model.n_head=8"], "parallel.tp = 8 does not divide model.d_ff (100)"),
        (["model.n_head=8", "model.d_model=24"], "is odd: RoPE rotates each head's dimensions in two halves"),
        (["model.arch=gpt2", "model.n_kv_head=2"], 'model.n_kv_head = 2 with model.arch = "gpt2" is not GPT-2'),
        (["model.arch=gpt2", "model.tie_embeddings=false"], "model.tie_embeddings = false with model.arch"),
        (["model.arch=mistral"], "'model.arch' must be one of gpt2, llama, got 'mistral'"),
    ],
)
def test_what_the_arch_cannot_be_is_refused_naming_the_rule(overrides, message):
    assert message in _refusal(*overrides)


def test_the_keys_resolve_and_gpt2_jobs_read_as_before():
    cfg = load_config(None, ["model.arch=llama", "model.n_kv_head=2", "model.tie_embeddings=false"])
    assert (cfg.model.bias, cfg.model.kv_heads, cfg.model.ffn_width) == (False, 2, 512)  # 8/3 x 128, up to 256
    assert load_config(None, ["model.arch=llama", "model.bias=true"]).model.bias is True
    assert "bias = false" in cfg.to_toml() and 'arch = "llama"' in cfg.to_toml()  # written resolved
    # A checkpoint's recorded model from before the keys existed: GPT-2 with a tied head, its shape unchanged.
    old = {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "vocab_size": 256, "bias": True}
    assert model_shape(old) == model_shape(ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=32).__dict__)
    assert model_shape(old)["d_ff"] == 128 and model_shape(old)["arch"] == "gpt2"


# --- the planner's counts (torch-free arithmetic) against the built models ------------------------------------


def held(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once


@pytest.mark.parametrize("cfg", [CFG, UNTIED, ModelConfig(**{**UNTIED.__dict__, "bias": True})], ids=str)
def test_the_planner_counts_each_ranks_parameters(cfg):
    from hvdlm.parallel.split import stage_layers
    from hvdlm.plan import counts

    assert counts.params_per_rank(cfg) == held(GPT(cfg))
    for tp in (1, 2):
        assert counts.params_per_rank(cfg, tp=tp) == held(GPT(cfg, Group(size=tp, rank=tp - 1))), tp
    for pp in (2, 3):
        split = stage_layers(3, pp)
        deeper = ModelConfig(**{**cfg.__dict__, "n_layer": 3})
        for stage in range(pp):
            got = held(GPTStage(deeper, split, stage, Group(size=2, rank=0)))
            assert counts.params_per_rank(deeper, 2, pp, stage) == got, (pp, stage)


def test_flops_count_swiglus_three_matmuls_and_gqas_narrow_keys():
    """Per token, without recomputation: 6 x the parameters that multiply (all but the token table, a lookup, and
    the norms' gains), plus the attention's 12 L T d: the 6N + 12 L T d rule (PaLM) for the 8B shape."""
    from hvdlm.plan import timing

    cfg = ModelConfig(
        arch="llama", n_layer=32, n_head=32, n_kv_head=8, d_model=4096, d_ff=14336, vocab_size=128256, seq_len=8192,
        tie_embeddings=False,
    )  # fmt: skip
    tokens = 4 * cfg.seq_len
    multiplying = parameter_count(cfg) - cfg.vocab_size * 4096 - (2 * 32 + 1) * 4096
    expected = 6 * multiplying + 12 * 32 * cfg.seq_len * 4096
    assert timing.step_flops(cfg, 4, "none") / tokens == expected
    # Muon orthogonalizes GPT-2's q, k, v, output and MLP matrices in 56 d^3 per step (five steps).
    assert timing.muon_flops_per_layer(ModelConfig(d_model=64, n_head=4)) == 5 * 56 * 64**3
    assert timing.muon_flops_per_layer(cfg) < timing.muon_flops_per_layer(
        ModelConfig(**{**cfg.__dict__, "n_kv_head": 0})
    )


def test_activation_memory_counts_gqa_and_swiglu():
    """Korthikanti's split term, 24 s b h / t for GPT-2: k and v shrink with the key/value heads, SwiGLU keeps four
    d_ff-wide tensors where GELU keeps two."""
    from hvdlm.plan.memory import layer_activation_bytes

    gpt2 = ModelConfig(n_layer=2, n_head=4, d_model=64, seq_len=32)
    assert layer_activation_bytes(gpt2, 2, 2, "selective") == 32 * 2 * 64 * (10 + 24 / 2)
    llama = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=32, d_ff=96)
    split = 4 + 4 * 32 / 64 + 8 * 96 / 64  # q and output, k and v half as wide, four 96-wide MLP tensors
    assert layer_activation_bytes(llama, 2, 2, "selective") == 32 * 2 * 64 * (10 + split / 2)


def test_compiled_parts_compute_the_eager_loss_and_gradients():
    """torch.compile of each llama block (RoPE, GQA, SwiGLU) and of the head with the loss, as data-parallel ranks
    compile them (train.compile), computes the eager loss and gradients."""
    torch.manual_seed(0)
    eager, parts = GPT(UNTIED), GPT(UNTIED)
    parts.load_state_dict(eager.state_dict())
    parts.compile_parts()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, UNTIED.vocab_size, (2, UNTIED.seq_len), generator=g)
    y = torch.randint(0, UNTIED.vocab_size, (2, UNTIED.seq_len), generator=g)
    losses = [model(x, y)[1] for model in (eager, parts)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), parts.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
