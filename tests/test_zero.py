"""ZeRO-1, ZeRO-2 and ZeRO-3 (train.zero = 1, 2, 3) against replicated data parallelism, with real ranks under
mpirun.

One replicated DP=2 run, one ZeRO-1, one ZeRO-2 and one ZeRO-3 DP=2 run of the same job (fp32, an odd parameter
count so the flat buffer is padded, 2 micro-batches, clipping that bites, an EMA; ZeRO-2 with buckets small enough
for several; ZeRO-3 under full recomputation, its gathers inside backward's recomputed forward) must agree at every
step; a ZeRO run killed with SIGKILL resumes bit-identically; checkpoints move between ZeRO and
replicated runs and between DP sizes. TP=2 x DP=2 is checked step by step inside one 4-rank program
(tests/zero_checks.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import checks_on_ranks, run_cli, sets, summary, train_argv
from survive import (
    Job,
    ckpt_steps,
    comparable,
    last_step,
    losses_by_step,
    rows,
    run,
    wait_for_checkpoint,
    wait_for_step,
)

from hvdlm.checkpoint.describe import describe_checkpoint
from hvdlm.checkpoint.reshard import load_full_state
from hvdlm.checkpoint.slices import assemble

pytestmark = pytest.mark.distributed

STEPS = 12
COMMON = (
    # d_model 33 without biases: 35,805 parameters, odd, so the two slices need a padding element.
    "model.n_layer=2",
    "model.n_head=3",
    "model.d_model=33",
    "model.bias=false",
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    "train.accumulation_steps=2",
    "train.grad_clip=0.5",
    "train.ema_decay=0.9",
    "train.checkpoint_interval=4",
    "train.keep_checkpoints=0",
    "train.eval_interval=0",
    "train.sample_tokens=0",
    "train.log_interval=1",
    "train.tensorboard=false",
)
TOL = 1e-6
# ZeRO-2's bucket size: 5,242 fp32 elements, so the 35,805 parameters fall into a dozen buckets, each padded.
BUCKET = "train.zero_bucket_mb=0.02"
RUN = {1: "zero", 2: "zero2", 3: "zero3"}  # the fixture's run of each ZeRO stage
STAGES = pytest.mark.parametrize("stage", [1, 2, 3])
ZERO3 = ("train.zero=3", "model.recompute=full")


# How a resume read its checkpoint (the banner's words): at the layout that saved, each rank its own shard file and
# ZeRO slice; at any other, every file, merged.
OWN, MERGED = "(each rank read its own files)", "(merged from its 1 shard file(s))"


def train(
    np: int, job: Path, run_dir: Path, cache: Path, *extra: str, flags: tuple[str, ...] = (), says: str = ""
) -> Path:
    proc = run(np, train_argv(job, run_dir, *flags, *sets(*COMMON, *extra)), cache)
    assert proc.code == 0, proc.out[-4000:]
    assert says in proc.out, proc.out[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(job, tmp_path_factory, cache_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("zero")
    return {
        "replicated": train(2, job, base / "replicated", cache_dir),
        "zero": train(2, job, base / "zero", cache_dir, "train.zero=1"),
        "zero2": train(2, job, base / "zero2", cache_dir, "train.zero=2", BUCKET),
        "zero3": train(2, job, base / "zero3", cache_dir, *ZERO3),
    }


def final_state(run_dir: Path) -> dict:
    """The final checkpoint as every reader sees it (a ZeRO save's slices assembled to the whole optimizer state)."""
    return load_full_state(run_dir / "checkpoints" / f"step-{STEPS:07d}.pt")


def assert_losses_close(got: Path, ref: Path, steps: range) -> None:
    a, b = losses_by_step(got), losses_by_step(ref)
    assert [s for s in steps if s in a] == list(steps), sorted(a)
    for s in steps:
        assert abs(a[s] - b[s]) <= TOL * abs(b[s]), f"step {s}: {a[s]} vs {b[s]}"


@STAGES
def test_zero_losses_match_replicated_at_every_step(runs, stage):
    assert_losses_close(runs[RUN[stage]], runs["replicated"], range(1, STEPS + 1))
    first, last = (losses_by_step(runs[RUN[stage]])[s] for s in (1, STEPS))
    assert last < first - 0.3  # it learned, so a wrong update would have shown


@STAGES
def test_zero_final_weights_ema_and_optimizer_state_match_replicated(runs, stage):
    ref, got = final_state(runs["replicated"]), final_state(runs[RUN[stage]])
    for section in ("model", "ema"):
        for name, t in ref[section].items():
            assert (got[section][name] - t).abs().max().item() <= TOL, (section, name)
    # The slices assemble to the whole optimizer state, in the replicated optimizer's own layout.
    assert got["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    assert got["tp"]["param_names"] == ref["tp"]["param_names"]
    for i, entry in ref["optimizer"]["state"].items():
        for key, t in entry.items():
            assert (got["optimizer"]["state"][i][key] - t).abs().max().item() <= TOL, (i, key)


@STAGES
def test_zero_checkpoints_hold_one_slice_per_dp_rank(runs, stage):
    """No rank holds the whole optimizer state at a save: the shard file has none, and each DP rank's own file its
    half of the padded flat buffer (ZeRO-1: one bucket; ZeRO-2: its half of every bucket), with the layout that puts
    the halves back together."""
    folder = runs[RUN[stage]] / "checkpoints"
    names = sorted(p.name for p in folder.glob(f"step-{STEPS:07d}*.pt"))
    slices = [f"step-{STEPS:07d}.zero{d}-of-2.pt" for d in (0, 1)]
    assert names == [f"step-{STEPS:07d}.pt", *slices]
    main = torch.load(folder / names[0], weights_only=True)
    assert main.get("optimizer") is None and main["zero_slices"] == {"size": 2, "files": slices}
    plain = final_state(runs["replicated"])["optimizer"]["state"]
    numels = [plain[i]["exp_avg"].numel() for i in sorted(plain)]
    for d, name in enumerate(slices):
        part = torch.load(folder / name, weights_only=True)
        layout = part["layout"]
        assert (layout["dp_rank"], layout["dp_size"], layout["numels"]) == (d, 2, numels)
        buckets = layout["buckets"]
        padded = sum(size for _, size in buckets)
        assert sorted(i for ids, _ in buckets for i in ids) == list(range(len(numels)))
        assert all(size % 2 == 0 and size >= sum(numels[i] for i in ids) for ids, size in buckets)
        assert layout["shard_numel"] == padded // 2 and layout["padding"] == padded - sum(numels)
        if stage == 1:
            assert len(buckets) == 1 and layout["padding"] == 1  # the odd count is padded
        elif stage == 3:
            # One a module: tok_emb, pos_emb, each block's ln_1, attn, ln_2 and mlp, ln_f (the head is tied).
            assert len(buckets) == 11, buckets
        else:
            assert len(buckets) >= 6, buckets
        assert sorted(part["state"]) == ["exp_avg", "exp_avg_sq"]
        assert all(t.shape == (layout["shard_numel"],) for t in part["state"].values())
    # `hvdlm checkpoint inspect` lists the slice files and reads the assembled state.
    info = describe_checkpoint(folder / names[0])
    assert info["layout"]["zero_slices"] == 2 and [Path(f["path"]).name for f in info["layout"]["files"]] == names
    assert info["holds"]["optimizer"]["parameters_with_state"] == len(plain)
    # Every save has its slices (keep_checkpoints = 0 keeps them all).
    assert len(list(folder.glob("step-*.zero*-of-2.pt"))) == 2 * len(list(folder.glob("step-???????.pt")))


@STAGES
def test_zero_replicas_stay_bit_identical(runs, stage):
    s = summary(runs[RUN[stage]])
    assert s["replicas_identical"] and s["dp"] == 2 and len(set(s["replica_checksums"])) == 1


def first_row(run_dir: Path) -> dict:
    return next(r for r in rows(run_dir) if "loss" in r)


@STAGES
def test_zero_halves_the_optimizer_state_per_rank(runs, stage):
    ref, got = first_row(runs["replicated"]), first_row(runs[RUN[stage]])
    for key in ("params_mb", "grads_mb", "optimizer_mb", "activations_mb"):
        assert ref[key] > 0 and got[key] > 0, key
    assert got["optimizer_mb"] <= 0.55 * ref["optimizer_mb"], (got["optimizer_mb"], ref["optimizer_mb"])
    if stage == 3:
        # The shard (half) and the most gathered at once, which in a model this small is most of the rest (the
        # 0.55x of a deep model: bench/memory_budget.py); recomputation keeps only the blocks' inputs.
        assert 0.5 * ref["params_mb"] < got["params_mb"] < 1.6 * ref["params_mb"], (got, ref)
        assert got["activations_mb"] < 0.5 * ref["activations_mb"]
    else:
        assert got["params_mb"] == ref["params_mb"] and got["activations_mb"] == ref["activations_mb"]


def test_zero2_holds_less_gradient_memory_than_zero1_and_replicated(runs):
    """ZeRO-1 keeps the whole gradient and its averaged slice; ZeRO-2 the slice and a few buckets in flight (here
    the embedding, a quarter of this small model, complete only at the end of backward, bounds the saving)."""
    ref, one, two = (first_row(runs[name])["grads_mb"] for name in ("replicated", "zero", "zero2"))
    assert two < ref < one, (ref, one, two)


def test_zero_killed_with_sigkill_resumes_bit_identical(runs, job, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    j = Job(2, train_argv(job, run_dir, *sets(*COMMON, "train.zero=1")), cache_dir, tmp_path / "run.log")
    try:
        seen = wait_for_step(j, run_dir, 6)
        wait_for_checkpoint(j, run_dir, 4)
    finally:
        j.kill()
    assert last_step(run_dir) < STEPS and 4 in ckpt_steps(run_dir), (seen, ckpt_steps(run_dir))
    train(2, job, run_dir, cache_dir, "train.zero=1", flags=("--resume", "auto"), says=OWN)
    assert comparable(run_dir) == comparable(runs["zero"])
    assert summary(run_dir)["replica_checksums"] == summary(runs["zero"])["replica_checksums"]


def resume_from(run_dir: Path, step: int, dest: Path) -> Path:
    """A new run directory holding `run_dir`'s checkpoint of `step` (and its metrics up to there)."""
    (dest / "checkpoints").mkdir(parents=True)
    for path in (run_dir / "checkpoints").glob(f"step-{step:07d}*.pt"):  # with ZeRO, the slice files too
        shutil.copy(path, dest / "checkpoints" / path.name)
    shutil.copy(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


@pytest.mark.parametrize("source,stage,says", [("replicated", 1, OWN), ("zero2", 2, MERGED), ("zero3", 3, MERGED)])
def test_a_checkpoint_resumes_with_zero_on_one_rank(runs, job, tmp_path, cache_dir, source, stage, says):
    """A replicated checkpoint with ZeRO-1 switched on, a ZeRO-2 one (buckets) with ZeRO-2 again, DP 2 -> 1 (the
    global batch kept: 8 sequences on one replica), full recomputation on too (ZeRO-2's hooks under
    torch.utils.checkpoint): the optimizer state is cut into other slices exactly, so the run goes on as before.
    The replicated save's one file is the rank's own (its whole state, whatever the DP size); the ZeRO saves' two
    slices are merged (ZeRO-3's into the whole model gathered after the optimizer placed it: it is never built
    whole)."""
    run_dir = resume_from(runs[source], 4, tmp_path / "run")
    extra = (f"train.zero={stage}", BUCKET, "train.batch_size=8", "model.recompute=full")
    train(1, job, run_dir, cache_dir, *extra, flags=("--resume", "auto"), says=says)
    assert_losses_close(run_dir, runs[source], range(5, STEPS + 1))


# ZeRO-2 only: its slices (bucketed) take the same path to the plain optimizer as ZeRO-1's (one bucket), which
# test_zero_final_weights_ema_and_optimizer_state_match_replicated reads too; one run less for the suite's time.
@pytest.mark.parametrize("stage", [2])
def test_a_zero_checkpoint_resumes_with_zero_off(runs, job, tmp_path, cache_dir, stage):
    run_dir = resume_from(runs[RUN[stage]], 4, tmp_path / "run")
    assert len(list((run_dir / "checkpoints").glob("*.zero*-of-2.pt"))) == 2
    train(2, job, run_dir, cache_dir, "train.zero=0", flags=("--resume", "auto"), says=MERGED)
    assert_losses_close(run_dir, runs[RUN[stage]], range(5, STEPS + 1))
    ref, got = final_state(runs[RUN[stage]]), final_state(run_dir)
    for name, t in ref["model"].items():
        assert (got["model"][name] - t).abs().max().item() <= TOL, name


def _slices(parts: list[list[float]], buckets: list | None) -> list[dict]:
    layout = {"numels": [3, 2, 4], "shapes": [[3], [2], [4]], "shard_numel": len(parts[0]), "dp_size": 2}
    if buckets is not None:
        layout["buckets"] = buckets
    return [
        {
            "state": {"exp_avg": torch.tensor(part)},
            "scalars": {"step": torch.tensor(3.0)},
            "param_groups": [{"params": [0, 1, 2]}],
            "layout": {**layout, "dp_rank": d, "padding": 1},
        }
        for d, part in enumerate(parts)
    ]


@pytest.mark.parametrize(
    "parts,buckets",
    [
        # ZeRO-1 files written before buckets: one bucket, parameters in index order, padded 9 -> 10.
        ([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]], None),
        # ZeRO-2: bucket 0 = parameter 2 (4, no padding), bucket 1 = parameters 1, 0 (5, padded to 6); each rank's
        # slice is its half of bucket 0, then its half of bucket 1.
        ([[6, 7, 4, 5, 1], [8, 9, 2, 3, 0]], [[[2], 4], [[1, 0], 6]]),
    ],
)
def test_slices_assemble_bucket_by_bucket_and_old_files_as_one_bucket(parts, buckets):
    state = assemble(_slices(parts, buckets))["state"]
    assert list(state) == [0, 1, 2]
    assert [state[i]["exp_avg"].tolist() for i in range(3)] == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert all(state[i]["step"].item() == 3.0 for i in range(3))


test_tp2_x_dp2_zero_matches_replicated = checks_on_ranks(
    4,
    "zero_checks.py",
    [
        "loss_and_norm_at_every_step",
        "bf16_autocast_loss_at_every_step",
        "final_parameters",
        "replicas_bit_identical",
        "optimizer_state_per_rank_halved",
        "checkpoint_state_is_the_plain_one",
        "a_non_finite_gradient_on_one_rank_is_seen_by_all",
        "zero2_reduces_the_buckets_during_backward",
        "zero3_holds_only_its_shard_between_passes",
    ],
)


def test_a_zero3_checkpoint_resumes_at_the_same_dp_size_and_on_one_rank_without_zero(runs, job, tmp_path, cache_dir):
    """ZeRO-3's step-4 checkpoint continued by ZeRO-3 on the same 2 ranks (bit-identical to the run that went on;
    each rank reads its own slice, weights and moments, and no other's), and by one rank with ZeRO off (the global
    batch kept): its weights gathered whole and its optimizer slices assembled, the runs go on as the first did."""
    same = resume_from(runs["zero3"], 4, tmp_path / "same")
    train(2, job, same, cache_dir, *ZERO3, flags=("--resume", "auto"), says=OWN)
    assert comparable(same) == comparable(runs["zero3"])
    assert summary(same)["replica_checksums"] == summary(runs["zero3"])["replica_checksums"]
    one = resume_from(runs["zero3"], 4, tmp_path / "one")
    train(1, job, one, cache_dir, "train.zero=0", "train.batch_size=8", flags=("--resume", "auto"), says=MERGED)
    assert_losses_close(one, runs["zero3"], range(5, STEPS + 1))


def test_a_zero2_checkpoint_resumes_at_the_same_dp_size_with_other_buckets_from_the_merged_state(
    runs, job, tmp_path, cache_dir
):
    """Same ranks, same ZeRO stage, but another bucket size: the slices cut the flat buffer otherwise, so the ranks'
    own slice files do not load as they are; every rank goes back to the merged state, and the run goes on as the
    first did."""
    run_dir = resume_from(runs["zero2"], 4, tmp_path / "run")
    train(2, job, run_dir, cache_dir, "train.zero=2", "train.zero_bucket_mb=1", flags=("--resume", "auto"), says=MERGED)
    assert_losses_close(run_dir, runs["zero2"], range(5, STEPS + 1))


def test_a_zero3_save_gathers_nothing_each_rank_writes_its_part_of_the_weights(runs):
    """The shard file holds no parameter: each DP rank's slice file holds its part of every bucket's weights (half
    of them here), so no rank ever holds the whole weights to save them; loading puts them back whole."""
    path = runs["zero3"] / "checkpoints" / f"step-{STEPS:07d}.pt"
    shard = torch.load(path, weights_only=True)
    slices = [torch.load(path.with_name(name), weights_only=True) for name in shard["zero_slices"]["files"]]
    whole = final_state(runs["replicated"])["model"]
    names = {name for s in slices for names in s["weights"]["names"] for name in names}
    assert names == set(whole) and not names & set(shard["model"]), (sorted(names), sorted(shard["model"]))
    held = [sum(t.numel() for t in s["weights"]["parts"]) for s in slices]
    assert held[0] == held[1] == slices[0]["layout"]["shard_numel"]
    weights = sum(slices[0]["layout"]["numels"])  # each parameter once (a tied weight has two names)
    assert weights <= sum(held) <= weights + len(slices[0]["layout"]["buckets"])  # each bucket padded to 2 parts
    assert describe_checkpoint(path)["layout"]["zero_weights"] is True  # `hvdlm checkpoint inspect` says so
    loaded = load_full_state(path)["model"]
    assert loaded.keys() == whole.keys()
    assert all((loaded[name] - t).abs().max().item() <= TOL for name, t in whole.items())


def test_a_zero3_checkpoint_merges_to_one_file_equal_to_replicated(runs, tmp_path):
    out = tmp_path / "merged.pt"
    proc = run_cli("checkpoint", "merge", runs["zero3"] / "checkpoints" / f"step-{STEPS:07d}.pt", "--out", out)
    assert proc.code == 0, proc.out
    merged, ref = torch.load(out, weights_only=True), final_state(runs["replicated"])
    for name, t in ref["model"].items():
        assert (merged["model"][name] - t).abs().max().item() <= TOL, name
    for i, entry in ref["optimizer"]["state"].items():
        assert (merged["optimizer"]["state"][i]["exp_avg"] - entry["exp_avg"]).abs().max().item() <= TOL, i


def test_init_from_loads_the_same_weights_into_a_zero3_run_as_into_a_replicated_one(runs, job, tmp_path, cache_dir):
    """--init-from the replicated run's final checkpoint, into a ZeRO-3 run (whose model is never built whole: the
    weights go into the model gathered once the optimizer has placed its shard) and into a replicated one: the two
    runs train alike from their first step, from the loaded weights (not from a fresh initialisation)."""
    source = ("--init-from", str(runs["replicated"] / "checkpoints" / f"step-{STEPS:07d}.pt"))
    short = ("train.max_steps=3", "train.checkpoint_interval=0", "train.ema_decay=0")
    three = train(2, job, tmp_path / "zero3", cache_dir, *ZERO3, *short, flags=source)
    plain = train(2, job, tmp_path / "plain", cache_dir, *short, flags=source)
    assert_losses_close(three, plain, range(1, 4))
    # Loaded, not drawn: the first loss is the trained model's, far below the fresh one's of the same job.
    assert losses_by_step(three)[1] < losses_by_step(runs["replicated"])[1] - 0.1
