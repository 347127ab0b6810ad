"""train.optimizer = "muon" (hvdlm.optim.muon): Muon for the blocks' matrices, AdamW for the rest.

In one process: the orthogonalization, the AdamW half against torch.optim.AdamW, the size of a Muon step. Under
mpirun: 2 data-parallel ranks (Horovod averaging the gradients), 2 pipeline stages and 2 tensor-parallel ranks
against 1 rank with the same global batch, an exact resume from a checkpoint (both kinds of state must come back),
and a stages' checkpoint continued on 1 rank. Then what Muon cannot go with, for the trainer and the planner.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import sets, summary, train_argv
from survive import comparable, rows, run
from test_plan import CLUSTER, plan, plan_json

from hvdlm.config import ModelConfig, TrainConfig, load_config
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.optim.muon import is_hidden_matrix, orthogonalize
from hvdlm.optim.torch_optimizers import make_optimizer
from hvdlm.plan import counts
from hvdlm.plan.gpus import gpu

# --- in one process ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    m = u @ torch.diag(torch.logspace(-2, 0, min(shape))) @ v.T  # singular values from 0.01 to 1
    before = m.clone()
    out = orthogonalize(m)
    assert out.shape == m.shape and out.dtype == m.dtype and torch.equal(m, before)
    s = torch.linalg.svdvals(out)
    # The quintic iteration leaves them in about [0.7, 1.2] (not exactly 1) after five steps, those of the input
    # spanning two orders of magnitude; three steps leave the smallest far below.
    assert 0.6 < s.min() and s.max() < 1.3, s
    assert torch.linalg.svdvals(orthogonalize(m, steps=3)).min() < 0.25


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=64, dropout=0.0))


def step_with_shared_gradients(optimizers: list[torch.optim.Optimizer], models: list[GPT], steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for ps in zip(*(m.parameters() for m in models)):
            grad = torch.randn(ps[0].shape, generator=g)
            for p in ps:
                p.grad = grad.clone()
        for o in optimizers:
            o.step()


def test_the_other_parameters_take_torch_adamws_steps_and_the_matrices_do_not():
    muon_model, adamw_model = tiny_model(), tiny_model()
    cfg = TrainConfig(lr=3e-3, weight_decay=0.1, optimizer="muon")
    muon = make_optimizer(muon_model, cfg)
    adamw = make_optimizer(adamw_model, TrainConfig(lr=3e-3, weight_decay=0.1, optimizer="adamw"))
    step_with_shared_gradients([muon, adamw], [muon_model, adamw_model], steps=5)
    names = dict(adamw_model.named_parameters())
    hidden = 0
    for name, p in muon_model.named_parameters():
        gap = (p - names[name]).abs().max().item()
        if is_hidden_matrix(name, p):
            hidden += 1
            assert gap > 1e-3, f"{name}: Muon's step should differ from AdamW's"
        else:
            assert gap < 1e-6, f"{name}: {gap}"
    assert hidden == 2 * 4  # qkv, proj, fc, proj of each block; the embedding, tied head and LayerNorms are not
    assert {k for s in muon.state.values() for k in s} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}


def test_a_muon_step_moves_a_matrix_about_as_far_as_adamw_would():
    """The 0.2 sqrt(max(A, B)) scale gives Muon's update about AdamW's RMS (0.2 lr), so one train.lr serves both."""
    model = tiny_model()
    lr = 1e-2
    optimizer = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0, optimizer="muon"))
    fc = model.blocks[0].mlp.fc.weight  # 128 x 32
    before = fc.detach().clone()
    step_with_shared_gradients([optimizer], [model], steps=1)
    rms = (fc - before).pow(2).mean().sqrt().item()
    assert 0.12 * lr < rms < 0.3 * lr, rms / lr


# --- under mpirun --------------------------------------------------------------------------------------------

STEPS = 10
MUON = (
    "train.optimizer=muon",
    f"train.max_steps={STEPS}",
    "train.eval_interval=5",
    "train.checkpoint_interval=5",
    "train.sample_tokens=0",
    "train.tensorboard=false",
)


@pytest.fixture(scope="module")
def muon_runs(job, tmp_path_factory, cache_dir):
    """Muon on 2 ranks of 4 sequences, on 1 rank of 8, on 2 pipeline stages of 2 micro-batches of 4, on 2 TP ranks
    of 8 (the same global batch each); the 2 ranks resumed at step 5, and the stages' step-5 checkpoint continued on
    1 rank."""
    base = tmp_path_factory.mktemp("muon-runs")
    runs = {
        "dp2": (2, ("train.batch_size=4",)),
        "one": (1, ("train.batch_size=8",)),
        "pp2": (2, ("train.batch_size=4", "parallel.pp=2", "parallel.microbatches=2")),
        "tp2": (2, ("train.batch_size=8", "parallel.tp=2")),
    }
    for name, (np, extra) in runs.items():
        proc = run(np, train_argv(job, base / name, *sets(*MUON, *extra)), cache_dir)
        assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
    resumes = {  # name: (the run it continues, ranks, overrides)
        "resumed": ("dp2", 2, ("train.batch_size=4",)),
        "pp2_on_one": ("pp2", 1, ("train.batch_size=8",)),  # the stages' checkpoint joined for one rank
    }
    for name, (origin, np, extra) in resumes.items():
        run_dir = shutil.copytree(base / origin, base / name)
        checkpoint = next((run_dir / "checkpoints").glob("step-0000005*.pt"))  # a stage's file names the checkpoint
        proc = run(np, train_argv(job, run_dir, "--resume", str(checkpoint), *sets(*MUON, *extra)), cache_dir)
        assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
    return {name: base / name for name in (*runs, *resumes)}


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in rows(run_dir) if "loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["dp2", "pp2", "tp2", "pp2_on_one"])
def test_every_layout_equals_one_rank_with_its_batch(muon_runs, layout):
    got, one = losses(muon_runs[layout]), losses(muon_runs["one"])
    assert len(got) == len(one) == STEPS
    # The averaged (accumulated, sharded) gradient differs from one rank's in the last bits only (1.7e-7 seen
    # for dp2), which the orthogonalization does not blow up. TP ranks orthogonalize the gathered whole matrix:
    # orthogonalizing each rank's slice alone would differ from the first Muon step on.
    for step, (a, b) in enumerate(zip(got, one), start=1):
        assert abs(a - b) / b < 1e-5, f"step {step}: {layout} {a}, 1 rank {b}"
    assert got[-1] < got[0] - 0.3
    if layout == "dp2":
        assert summary(muon_runs[layout])["replicas_identical"]


@pytest.mark.distributed
def test_the_planner_counts_the_tp_ranks_gathers_of_the_matrices(muon_runs):
    cfg = load_config(muon_runs["tp2"] / "config.toml")
    expected = counts.tp_bytes_per_step(counts.Shape(cfg.model, cfg.train.batch_size, 2), optimizer="muon")
    adamw = counts.tp_bytes_per_step(counts.Shape(cfg.model, cfg.train.batch_size, 2))
    got = {r["tp_bytes_per_step"] for r in rows(muon_runs["tp2"]) if "loss" in r}
    assert got == {expected} and expected > adamw


@pytest.mark.distributed
def test_a_resumed_muon_run_is_bit_identical_to_the_uninterrupted_one(muon_runs):
    # Both halves of the state come back: the matrices' momentum and AdamW's moments and step count.
    got, ref = comparable(muon_runs["resumed"]), comparable(muon_runs["dp2"])
    assert got == ref
    assert summary(muon_runs["resumed"])["replica_checksums"] == summary(muon_runs["dp2"])["replica_checksums"]
    state = torch.load(muon_runs["dp2"] / "checkpoints" / "step-0000005.pt", weights_only=True)["optimizer"]
    kinds = {k for s in state["state"].values() for k in s}
    assert kinds == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}


# --- what Muon does not go with --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.zero=1"], 'train.optimizer = "muon" with train.zero > 0 is not supported'),
        (["train.zero=3"], 'train.optimizer = "muon" with train.zero > 0 is not supported'),
        (["train.fused_optimizer=on"], "there is no fused Muon kernel"),
        (["train.muon_momentum=1.0"], r"'train.muon_momentum' must be in \[0, 1\)"),
    ],
)
def test_what_muon_cannot_go_with_is_refused_with_the_fix(tiny_job, overrides, expected):
    with pytest.raises(InputError, match=expected):
        load_config(tiny_job, ["train.optimizer=muon", *overrides])


def test_the_planner_ranks_no_zero_layouts_for_muon(tmp_path):
    job = tmp_path / "muon.toml"
    job.write_text(
        "[model]\nn_layer = 36\nn_head = 32\nd_model = 4096\nseq_len = 2048\nvocab_size = 51200\n\n"
        '[train]\nbatch_size = 1\nprecision = "bf16"\noptimizer = "muon"\n'
    )
    out = plan_json(job, "--nodes", 8, "--gpus-per-node", 8, "--gpu", "h100", "--global-batch", 512)
    assert out["layouts"] and {e["layout"]["zero"] for e in out["layouts"]} == {0}
    assert {e["layout"]["tp"] for e in out["layouts"]} > {1}  # TP ranks gather each matrix whole
    assert any("Muon orthogonalizes whole" in d["reason"] for d in out["dropped"])
    code, text, err = plan(job, *CLUSTER, "--tp", 4, "--zero", 1)
    assert code == 2 and "zero 1 cuts the matrices" in text + err
    # Every rank orthogonalizes its stage's whole matrices: 5 steps of 56 d^3 FLOPs a block (h100: 989 TFLOP/s
    # at the planner's efficiency), on top of AdamW's step time.
    pp4 = ("--nodes", 8, "--gpus-per-node", 8, "--gpu", "h100", "--global-batch", 512, "--tp", 1, "--pp", 4)
    muon = plan_json(job, *pp4)
    code, text, _ = plan(job, *pp4)
    assert code == 0 and "Muon's orthogonalization" in text
    job.write_text(job.read_text().replace('optimizer = "muon"', 'optimizer = "adamw"'))
    adamw = plan_json(job, *pp4)
    seconds = 5 * 56 * 4096**3 * 9 / (989e12 * gpu("h100").efficiency)  # 9 of the 36 blocks on a stage
    assert muon["step_time_parts_s"]["optimizer"] == pytest.approx(seconds, rel=1e-3)
    assert adamw["step_time_parts_s"]["optimizer"] == 0
    assert muon["step_time_s"] == pytest.approx(adamw["step_time_s"] + seconds, rel=1e-3)
