"""Acceptance of tensor parallelism: the loss does not depend on the layout.

With the same seed, data and global batch (8 sequences), 20 steps in the layouts 1 rank, DP=2, TP=2 and
TP=2 x DP=2 (4 ranks, oversubscribed on small machines) give the same loss at every step and the same merged
final parameters; real ranks under mpirun, no mocks. Also: bad layouts and checkpoints fail with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_losses_match, hvdlm_argv, metrics, mpirun, run_cli, run_process, sets, summary, train_argv

from hvdlm.config import load_config
from hvdlm.plan import counts

pytestmark = pytest.mark.distributed

STEPS = 20
LAYOUTS = {  # name: (ranks, tp, batch_size per replica); the global batch is 8 in every layout
    "one": (1, 1, 8),
    "dp2": (2, 1, 4),
    "tp2": (2, 2, 8),
    "tp2xdp2": (4, 2, 4),
}


def _run(np: int, job: Path, run_dir: Path, cache: Path, *overrides: str):
    return mpirun(np, train_argv(job, run_dir, *sets(*overrides)), cache)


@pytest.fixture(scope="module")
def runs(job, tmp_path_factory, cache_dir) -> dict[str, Path]:
    """The four layouts, trained once for all the tests of this module."""
    base = tmp_path_factory.mktemp("tp-runs")
    out = {}
    for name, (np, tp, batch) in LAYOUTS.items():
        proc = _run(
            np,
            job,
            base / name,
            cache_dir,
            f"parallel.tp={tp}",
            f"train.batch_size={batch}",
            f"train.max_steps={STEPS}",
            "train.eval_interval=0",
            "train.sample_tokens=0",
            "train.log_interval=1",
        )
        assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
        out[name] = base / name
    return out


def merged_params(run_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The final checkpoint, merged by the real `hvdlm checkpoint merge` when it is sharded."""
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:07d}.pt"
    if not ckpt.exists():
        out = tmp_path / f"{run_dir.name}-merged.pt"
        proc = run_cli("checkpoint", "merge", ckpt, "--out", out, timeout=120)
        assert proc.code == 0, proc.out
        assert "merged 2 shard(s)" in proc.out
        ckpt = out
    return torch.load(ckpt, weights_only=True)["model"]


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2xdp2"])
def test_loss_at_every_step_matches_one_rank(runs, layout):
    assert_losses_match(runs["one"], runs[layout], STEPS, layout)


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """t, less the key bias (the middle third of qkv.bias). Its gradient is zero in exact arithmetic (softmax ignores
    a shift shared by all of a query's scores), so AdamW steps it on rounding noise, which differs with each
    layout's order of sums: on an Intel Xeon, TP=2 ended 1.2e-5 from one rank there and within 5e-6 elsewhere."""
    if not name.endswith("attn.qkv.bias"):
        return t
    q, _, v = t.chunk(3)
    return torch.cat([q, v])


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2xdp2"])
def test_merged_final_parameters_match_one_rank(runs, layout, tmp_path):
    ref, got = merged_params(runs["one"], tmp_path), merged_params(runs[layout], tmp_path)
    assert ref.keys() == got.keys()
    for name in ref:
        assert ref[name].shape == got[name].shape, name
        diff = without_key_bias(name, ref[name] - got[name])
        assert diff.abs().max().item() <= 1e-5, name


def test_replicas_in_a_dp_group_stay_bit_identical(runs):
    s = summary(runs["tp2xdp2"])
    assert (s["tp"], s["dp"], s["ranks"]) == (2, 2, 4)
    c = s["replica_checksums"]  # by global rank: DP groups {0, 2} and {1, 3}
    assert c[0] == c[2] and c[1] == c[3] and s["replicas_identical"]
    assert c[0] != c[1]  # the two TP ranks hold different shards: the comparison above is not vacuous
    assert [Path(p).name for p in s["checkpoint_shards"]] == [f"step-{STEPS:07d}.tp{r}-of-2.pt" for r in (0, 1)]


def test_a_sharded_checkpoint_starts_an_unsharded_run(runs, job, tmp_path, cache_dir):
    """init_from reshards TP=2 -> TP=1; with a vanishing learning rate the weights come through unchanged."""
    shard0 = runs["tp2"] / "checkpoints" / f"step-{STEPS:07d}.tp0-of-2.pt"
    proc = _run(
        1,
        job,
        tmp_path / "resumed",
        cache_dir,
        f"train.init_from={shard0}",
        "train.max_steps=1",
        "train.lr=1e-12",
        "train.min_lr=0",
        "train.eval_interval=0",
        "train.sample_tokens=0",
    )
    assert proc.code == 0, proc.out[-3000:]
    after = torch.load(tmp_path / "resumed" / "checkpoints" / "step-0000001.pt", weights_only=True)["model"]
    before = merged_params(runs["tp2"], tmp_path)
    for name in before:
        assert (after[name] - before[name]).abs().max().item() < 1e-6, name


def test_a_checkpoint_of_another_shape_is_refused(runs, job, tmp_path, cache_dir):
    shard0 = runs["tp2"] / "checkpoints" / f"step-{STEPS:07d}.tp0-of-2.pt"
    proc = _run(1, job, tmp_path / "bad", cache_dir, f"train.init_from={shard0}", "model.d_model=64")
    assert proc.code == 2, proc.out[-3000:]
    assert "another shape" in proc.out and "d_model=32" in proc.out and "d_model=64" in proc.out
    assert "Traceback" not in proc.out


def test_an_incomplete_sharded_checkpoint_is_refused(runs, tmp_path):
    shard1 = runs["tp2"] / "checkpoints" / "step-0000020.tp1-of-2.pt"
    (tmp_path / shard1.name).write_bytes(shard1.read_bytes())  # shard 0 left behind
    proc = run_cli("checkpoint", "merge", tmp_path / "step-0000020.pt", timeout=60)
    assert proc.code == 2
    assert "incomplete: 1 of its 2 shards are missing (step-0000020.tp0-of-2.pt)" in proc.out


def test_tp_that_does_not_divide_the_ranks_is_refused_once(job, tmp_path, cache_dir):
    proc = _run(2, job, tmp_path / "run", cache_dir, "parallel.tp=4", "model.n_head=4")
    assert proc.code == 2
    assert proc.out.count("parallel.tp = 4 does not divide the number of ranks (2)") == 1, proc.out[-3000:]
    assert "Traceback" not in proc.out


def test_tp_under_horovodrun_gloo_is_refused_by_the_ranks(job, tmp_path, cache_dir):
    """Gloo-started ranks have no MPI world for the TP groups; each rank says so rather than training alone."""
    import os

    from hvdlm.launch.commands import find_executable

    argv = [find_executable("horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
    argv += hvdlm_argv("train", str(job), "--run-dir", str(tmp_path / "run"), "--set", "parallel.tp=2")
    proc = run_process(argv, {**os.environ, "HVDLM_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.code != 0  # the ranks exit 2; horovodrun turns any rank's failure into its own exit 1
    assert "Exit code: 2" in proc.out
    assert "parallel.tp = 2 needs an MPI launcher" in proc.out and "horovodrun --mpi" in proc.out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_with_another_head_count_is_refused_and_leaves_no_run(runs, job, tmp_path, cache_dir):
    """n_head shows in no tensor shape (q, k, v are (3d, d) for any head count): the recorded config catches it."""
    ckpt = runs["one"] / "checkpoints" / f"step-{STEPS:07d}.pt"
    run_dir = tmp_path / "run"
    proc = _run(1, job, run_dir, cache_dir, f"train.init_from={ckpt}", "model.n_head=4", "train.max_steps=1")
    assert proc.code == 2, proc.out[-3000:]
    assert "n_head is 2 there, 4 here" in proc.out and "Traceback" not in proc.out
    assert not run_dir.exists()  # refused before the run directory was made, so the name stays free


def test_damaged_and_foreign_files_are_refused_by_merge(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "byte.pt").write_bytes(b"x")
    for name, message in [
        ("tensor.pt", "holds a Tensor, not a checkpoint"),
        ("dict.pt", "no 'model' table of tensors"),
        ("text.pt", "truncated, damaged or not a checkpoint"),
        ("byte.pt", "truncated, damaged or not a checkpoint"),
    ]:
        proc = run_cli("checkpoint", "merge", tmp_path / name, timeout=60)
        assert proc.code == 2, (name, proc.out)
        assert message in proc.out and "Traceback" not in proc.out, (name, proc.out)
    assert not list(tmp_path.glob("*merged*"))  # nothing written for a refused input


def test_a_vocabulary_that_tp_does_not_divide_trains_and_samples(job, tmp_path, cache_dir):
    """257 tokens on 2 TP ranks: padding rows that the loss, the sampler and the merged checkpoint never see."""
    run_dir = tmp_path / "run"
    proc = _run(
        2,
        job,
        run_dir,
        cache_dir,
        "parallel.tp=2",
        "model.vocab_size=257",
        "train.max_steps=2",
        "train.eval_interval=0",
        "train.sample_tokens=12",
    )
    assert proc.code == 0, proc.out[-3000:]
    assert "sample:" in proc.out
    shards = [torch.load(p, weights_only=True)["model"] for p in sorted((run_dir / "checkpoints").glob("*.tp*.pt"))]
    emb = [sd["tok_emb.weight"] for sd in shards]
    assert [e.shape[0] for e in emb] == [192, 192]  # 257 padded to 384: each rank's share a multiple of 64
    assert emb[1][257 - 192 :].abs().max().item() == 0.0  # the padding rows never learn
    out = tmp_path / "merged.pt"
    merge = run_cli("checkpoint", "merge", run_dir / "checkpoints" / "step-0000002.pt", "--out", out, timeout=120)
    assert merge.code == 0, merge.out
    assert torch.load(out, weights_only=True)["model"]["tok_emb.weight"].shape[0] == 257


def test_the_planner_counts_the_tp_bytes_of_every_step(runs):
    """hvdlm.plan.counts (what `hvdlm plan` and bench/plan_check.py build on) against the bytes the TP collectives
    really moved, step by step."""
    cfg = load_config(runs["tp2"] / "config.toml")
    expected = counts.tp_bytes_per_step(counts.Shape(cfg.model, cfg.train.batch_size, 2, precision=cfg.train.precision))
    rows = [r for r in metrics(runs["tp2"]) if "loss" in r]
    assert len(rows) == STEPS and {r["tp_bytes_per_step"] for r in rows} == {expected}
    assert {r["pp_bytes_per_step"] for r in rows} == {0}
