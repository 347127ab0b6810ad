"""Acceptance of the llama arch on real ranks: the loss does not depend on the layout, and its runs resume exactly.

A tiny llama (2 layers, d_model 64, 4 query heads on 2 key/value heads, RoPE, RMSNorm, SwiGLU, an untied head),
6 steps of the same global batch (8 sequences) in fp32, in the layouts 1 rank, TP=2 (each rank a query head pair
and one key/value head), PP=2 (the untied head on the last stage only), DP=2 with ZeRO-1, and DP=2 with ZeRO-2
under full recomputation: the same loss at every step within 1e-5 relative, and the same merged final
parameters; Muon at TP=2 matches Muon on one rank; local SGD averaging after every step at DP=2 matches
synchronous SGD on one rank; bf16 with an EMA tracks fp32. Then: the PP=2 run resumed
from its step-3 checkpoint is bit-identical to itself uninterrupted and continues at TP=2 as one rank does,
inspect and generate read it, and a llama checkpoint is refused as the start of a gpt2 job, naming the differences.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_losses_match, losses, metrics, mpirun, run_cli, sets, summary, train_argv
from survive import comparable

from hvdlm.checkpoint.describe import describe_checkpoint
from hvdlm.config import load_config
from hvdlm.model.size import parameter_count
from hvdlm.plan import counts

pytestmark = pytest.mark.distributed

STEPS = 6
SGD = ("train.optimizer=sgd", "train.grad_clip=0", "train.lr=0.3", "train.min_lr=0.01")
LLAMA_JOB = """
[model]
arch = "llama"
n_layer = 2
n_head = 4
n_kv_head = 2
d_model = 64
seq_len = 32
tie_embeddings = false

[train]
batch_size = 8
max_steps = 6
lr = 3e-3
warmup_steps = 2
log_interval = 1
eval_interval = 0
sample_tokens = 0
checkpoint_interval = 3
keep_checkpoints = 0
tensorboard = false
"""
LAYOUTS = {  # name: (ranks, overrides); the global batch is 8 sequences in every layout
    "one": (1, ()),
    "tp2": (2, ("parallel.tp=2",)),
    "pp2": (2, ("parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4")),
    "dp2_zero1": (2, ("train.batch_size=4", "train.zero=1")),
    "dp2_zero2_recompute": (
        2,
        ("train.batch_size=4", "train.zero=2", "train.zero_bucket_mb=0.1", "model.recompute=full"),
    ),
    # Muon on SwiGLU's three matrices and on the q, k, v matrix of unequal blocks, which each TP rank gathers
    # whole (merged by its blocks) and cuts again; under selective recomputation of the GQA attention core.
    "one_muon": (1, ("train.optimizer=muon", "model.recompute=selective")),
    "tp2_muon": (2, ("train.optimizer=muon", "model.recompute=selective", "parallel.tp=2")),
    # bf16 autocast (RoPE's tables and rotation stay fp32) with an EMA of the weights.
    "one_bf16_ema": (1, ("train.precision=bf16", "train.ema_decay=0.9")),
    # Local SGD averaging the replicas after every step is synchronous SGD (plain SGD is linear in the gradient).
    "one_sgd": (1, SGD),
    "dp2_local_sgd": (2, (*SGD, "train.batch_size=4", "train.local_sgd_interval=1")),
}
REFERENCE = {
    "one_muon": "one_muon",
    "tp2_muon": "one_muon",
    "dp2_local_sgd": "one_sgd",
}  # the one-rank run each layout equals; else "one"


@pytest.fixture(scope="module")
def llama_job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama-job") / "llama.toml"
    path.write_text(LLAMA_JOB)
    return path


def _train(np: int, job: Path, run_dir: Path, cache: Path, *overrides: str, flags: tuple[str, ...] = ()):
    return mpirun(np, train_argv(job, run_dir, *flags, *sets(*overrides)), cache)


@pytest.fixture(scope="module")
def runs(llama_job, tmp_path_factory, cache_dir) -> dict[str, Path]:
    """The layouts, trained once for all the tests of this module."""
    base = tmp_path_factory.mktemp("llama-runs")
    for name, (np, overrides) in LAYOUTS.items():
        proc = _train(np, llama_job, base / name, cache_dir, *overrides)
        assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
    return {name: base / name for name in LAYOUTS}


def merged(run_dir: Path, tmp_path: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """A checkpoint's whole model, merged by the real `hvdlm checkpoint merge` where it has several files."""
    ckpt = run_dir / "checkpoints" / f"step-{step:07d}.pt"
    if not ckpt.exists():
        out = tmp_path / f"{run_dir.name}-merged.pt"
        proc = run_cli("checkpoint", "merge", ckpt, "--out", out, timeout=120)
        assert proc.code == 0, proc.out
        ckpt = out
    return torch.load(ckpt, weights_only=True)["model"]


def test_bf16_and_an_ema_compose_with_the_llama(runs):
    """bf16 tracks fp32 without being it; the EMA is saved beside every weight, and is an average of them."""
    bf16, fp32 = (torch.tensor(losses(runs[name])) for name in ("one_bf16_ema", "one"))
    assert len(bf16) == len(fp32) == STEPS and torch.isfinite(bf16).all()
    rel = ((bf16 - fp32).abs() / fp32.abs()).max().item()
    assert 0 < rel < 0.05, rel
    state = torch.load(runs["one_bf16_ema"] / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert set(state["ema"]) == set(state["model"]) and "head.weight" in state["ema"]
    assert any(not torch.equal(state["ema"][n], state["model"][n]) for n in state["model"]), "no average"


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if not name.startswith("one")])
def test_loss_at_every_step_matches_one_rank(runs, layout):
    assert_losses_match(runs[REFERENCE.get(layout, "one")], runs[layout], STEPS, layout)


def test_local_sgd_ends_with_identical_replicas(runs):
    s = summary(runs["dp2_local_sgd"])
    assert s["replicas_identical"] and len(set(s["replica_checksums"])) == 1, s
    assert losses(runs["one_sgd"])[-1] < losses(runs["one_sgd"])[0]  # SGD moved the loss


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_merged_final_parameters_match_one_rank(runs, layout, tmp_path):
    ref, got = merged(runs["one"], tmp_path), merged(runs[layout], tmp_path)
    assert ref.keys() == got.keys() and "head.weight" in ref and "pos_emb.weight" not in ref
    for name in ref:
        assert ref[name].shape == got[name].shape, name
        assert (ref[name] - got[name]).abs().max().item() <= 1e-5, name
    # The untied head is a matrix of its own, trained apart from the token embedding.
    assert not torch.equal(ref["head.weight"], ref["tok_emb.weight"])


def test_the_untied_head_lives_on_the_last_stage_only(runs):
    first, last = (
        torch.load(runs["pp2"] / "checkpoints" / f"step-{STEPS:07d}.pp{s}-of-2.pt", weights_only=True) for s in (0, 1)
    )
    assert "head.weight" not in first["model"] and "tok_emb.weight" in first["model"]
    assert "head.weight" in last["model"] and "tok_emb.weight" not in last["model"]
    assert "head.weight" in last["tp"]["param_names"][0] + last["tp"]["param_names"][-1]


def test_the_planner_counts_the_tp_bytes_of_every_step(runs):
    """hvdlm.plan.counts against the bytes the llama's TP collectives really moved: SwiGLU's gate and up share one
    input copy (one gradient allreduce backward, as GPT-2's fc), RoPE and RMSNorm move nothing."""
    cfg = load_config(runs["tp2"] / "config.toml")
    expected = counts.tp_bytes_per_step(counts.Shape(cfg.model, cfg.train.batch_size, 2))
    rows = [r for r in metrics(runs["tp2"]) if "loss" in r]
    assert len(rows) == STEPS and {r["tp_bytes_per_step"] for r in rows} == {expected}


def test_a_pipeline_run_resumed_from_a_checkpoint_is_bit_identical(runs, llama_job, tmp_path, cache_dir):
    """Steps 4 to 6 again from the step-3 checkpoint: the stages' weights, the untied head's optimizer state on the
    last stage and the data position come back, and every row and the final weights equal the first time's."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["pp2"], run_dir)
    step3 = run_dir / "checkpoints" / "step-0000003.pp0-of-2.pt"  # any shard names the checkpoint
    proc = _train(2, llama_job, run_dir, cache_dir, *LAYOUTS["pp2"][1], flags=("--resume", str(step3)))
    assert proc.code == 0, proc.out[-4000:]
    assert comparable(run_dir) == comparable(runs["pp2"])
    again, first = merged(run_dir, tmp_path / "a"), merged(runs["pp2"], tmp_path / "b")
    assert all(torch.equal(again[name], first[name]) for name in first)


def test_a_pipeline_checkpoint_continues_at_tp2(runs, llama_job, tmp_path, cache_dir):
    """The stages joined and cut into TP shards (the unequal q, k, v blocks, the untied head): steps 4 to 6 at
    TP=2 follow the one-rank run within 1e-5."""
    run_dir = tmp_path / "tp2"
    step3 = runs["pp2"] / "checkpoints" / "step-0000003.pp1-of-2.pt"
    proc = _train(2, llama_job, run_dir, cache_dir, *LAYOUTS["tp2"][1], flags=("--resume", str(step3)))
    assert proc.code == 0, proc.out[-4000:]
    ref, got = losses(runs["one"])[3:], losses(run_dir)
    assert len(got) == STEPS - 3
    for step, (a, b) in enumerate(zip(ref, got), start=4):
        assert abs(a - b) / abs(a) <= 1e-5, f"step {step}: 1 rank {a} vs resumed at tp 2 {b}"


def test_inspect_and_generate_read_the_pipeline_checkpoint(runs, cache_dir):
    """The two stages described as one model (the untied head counted once, with its optimizer state), and sampled
    from (the stages joined into one llama)."""
    whole, staged = (describe_checkpoint(runs[name] / "checkpoints" / "step-0000006.pt") for name in ("one", "pp2"))
    assert (
        staged["parameters"] == whole["parameters"] == parameter_count(load_config(runs["one"] / "config.toml").model)
    )
    assert staged["holds"]["optimizer"] == whole["holds"]["optimizer"]
    assert whole["model"]["arch"] == "llama" and whole["model"]["n_kv_head"] == 2
    proc = run_cli("generate", runs["pp2"], "--prompt", "def ", "--max-tokens", "8", cache=cache_dir, timeout=120)
    assert proc.code == 0, proc.out
    assert "def " in proc.out


def test_a_llama_checkpoint_does_not_start_a_gpt2_job(runs, llama_job, tmp_path, cache_dir):
    ckpt = runs["one"] / "checkpoints" / f"step-{STEPS:07d}.pt"
    gpt2 = ("model.arch=gpt2", "model.n_kv_head=0", "model.tie_embeddings=true", "model.d_ff=256")
    proc = _train(1, llama_job, tmp_path / "run", cache_dir, f"train.init_from={ckpt}", *gpt2)
    assert proc.code == 2, proc.out[-3000:]
    assert "another shape" in proc.out and "arch is llama there, gpt2 here" in proc.out
    assert "n_kv_head is 2 there, 4 here" in proc.out and "tie_embeddings is False there, True here" in proc.out
    assert "Traceback" not in proc.out
    assert not (tmp_path / "run").exists()
