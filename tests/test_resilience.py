"""The single-process parts of resilient runs: finding, falling back over and pruning checkpoints, the EMA, the
learning-rate scaling, what precision refuses on CPU, the stop vote's signal handling, and the CLI options.
(The multi-rank behaviour, exact resume, preemption and the numerics, is in test_resume.py / test_numerics.py.)"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import run_cli

from hvdlm.checkpoint.format import load_checkpoint, save_checkpoint
from hvdlm.checkpoint.store import (
    checkpoint_path,
    find_checkpoints,
    newest_loadable,
    prune_checkpoints,
    remove_stale_temporaries,
    resolve_checkpoint,
    set_aside_newer,
)
from hvdlm.config import TrainConfig
from hvdlm.errors import InputError
from hvdlm.optim.schedule import lr_at
from hvdlm.training.ema import WeightEMA
from hvdlm.training.precision import Precision


def _save(run_dir, step, tp=1):
    for r in range(tp):
        save_checkpoint(checkpoint_path(run_dir, step, r, tp), {"model": {"w": torch.ones(2) * step}, "step": step})


def test_find_checkpoints_lists_complete_sets_newest_first(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 10)
    _save(tmp_path, 4, tp=2)
    checkpoint_path(tmp_path, 6, 0, 2).write_bytes(b"half a set")  # tp rank 1 of step 6 never written
    (tmp_path / "checkpoints" / ".step-0000012.pt.tmp-99").write_bytes(b"killed mid-write")
    (tmp_path / "checkpoints" / "notes.pt").write_bytes(b"not ours")
    found = find_checkpoints(tmp_path)
    assert [c.step for c in found] == [10, 4, 2]
    assert [p.name for p in found[1].paths] == ["step-0000004.tp0-of-2.pt", "step-0000004.tp1-of-2.pt"]
    assert resolve_checkpoint(tmp_path) == found[0].paths[0]


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_used(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    newest = checkpoint_path(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    warnings = []
    saved, states = newest_loadable(tmp_path, warn=warnings.append)
    assert saved.step == 2 and states[0]["step"] == 2
    assert len(warnings) == 1 and "step 4" in warnings[0] and "truncated" in warnings[0]
    assert newest.stat().st_size == 100  # reported, not removed
    checkpoint_path(tmp_path, 6, 1, 2).write_bytes(b"shard 1 of a save killed before shard 0")
    warnings.clear()
    assert newest_loadable(tmp_path, warn=warnings.append)[0].step == 2
    assert "step 6: incomplete, step-0000006.tp0-of-2.pt missing" in warnings[0] and "step 4" in warnings[1]


def test_no_checkpoint_at_all(tmp_path):
    assert newest_loadable(tmp_path) is None
    with pytest.raises(InputError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step)
    checkpoint_path(tmp_path, 10, 0, 2).write_bytes(b"incomplete set")
    assert prune_checkpoints(tmp_path, keep=2, newest=8) == [4, 2]
    assert [c.step for c in find_checkpoints(tmp_path)] == [8, 6]
    assert checkpoint_path(tmp_path, 10, 0, 2).exists()  # an incomplete set is left for a person to look at
    assert prune_checkpoints(tmp_path, keep=0, newest=8) == []
    # A checkpoint newer than the one just written never pushes that one out.
    assert prune_checkpoints(tmp_path, keep=1, newest=6) == []
    assert [c.step for c in find_checkpoints(tmp_path)] == [8, 6]


def test_checkpoints_after_the_resume_step_are_set_aside_not_deleted(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    checkpoint_path(tmp_path, 8, 1, 2).write_bytes(b"half a later save")
    aside = set_aside_newer(tmp_path, 2)
    assert [c.step for c in find_checkpoints(tmp_path)] == [2]
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000004.pt", "step-0000006.pt", "step-0000008.tp1-of-2.pt"]
    assert set_aside_newer(tmp_path, 2) is None  # nothing newer left


def test_a_foreign_file_is_refused_in_one_short_paragraph(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[model]\nn_layer = 2\n")
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert "weights_only" not in str(e.value) and len(str(e.value)) < 500 and "\n" not in str(e.value)


def test_the_checkpoints_folder_names_its_run(tmp_path):
    _save(tmp_path, 2)
    assert resolve_checkpoint(tmp_path / "checkpoints") == checkpoint_path(tmp_path, 2)


def test_fp16_with_tensor_parallelism_is_refused():
    from hvdlm.config import load_config

    with pytest.raises(InputError, match="tp > 1"):
        load_config(None, ['train.precision="fp16"', "parallel.tp=2"])


def test_stale_temporaries_go(tmp_path):
    _save(tmp_path, 2)
    stale = tmp_path / "checkpoints" / ".step-0000004.pt.tmp-1234"
    stale.write_bytes(b"x")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and checkpoint_path(tmp_path, 2).exists()


def test_ema_follows_the_weights_and_swaps_in_for_evaluation():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.5))
    with ema.applied():
        assert torch.allclose(model.weight, torch.full((1, 2), 0.5))
    assert torch.allclose(model.weight, torch.ones(1, 2))


def test_lr_scales_with_replicas_only_when_asked():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(50, cfg, replicas=4) == lr_at(50, cfg)
    cfg.scale_lr = True
    assert lr_at(9, cfg, replicas=4) == pytest.approx(4e-3)
    assert lr_at(100, cfg, replicas=4) == pytest.approx(4e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without GPU refuses")
@pytest.mark.parametrize("key", ["precision", "grad_compression"])
def test_fp16_is_refused_without_a_gpu(key):
    with pytest.raises(InputError, match="fp16"):
        Precision(TrainConfig(**{key: "fp16"}), torch.device("cpu"))


def test_bf16_autocasts_matmuls_on_cpu():
    precision = Precision(TrainConfig(precision="bf16"), torch.device("cpu"))
    with precision.autocast():
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.bfloat16
    assert precision.state_dict() is None  # no scaler without fp16


def test_a_signal_turns_into_a_preemption_vote():
    from hvdlm.training import preemption
    from hvdlm.training.preemption import Stop, StopVote

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        vote = StopVote(world_size=1)
        vote.start()
        assert vote.result() == Stop.NO
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this (main) thread before kill returns
        vote.start()
        assert vote.result() == Stop.PREEMPTED and vote.signal_name == "SIGUSR1"
        vote.local = Stop.NON_FINITE
        vote.start()
        assert vote.result() == Stop.NON_FINITE  # the more serious reason wins
    finally:
        preemption._received = None
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--resume", "auto"), "name the run directory"),
        (("--resume", "nowhere.pt", "--run-dir", "RUN"), "no such checkpoint"),
    ],
)
def test_resume_needs_a_run_directory_and_an_existing_checkpoint(tmp_path, args, message):
    args = tuple(str(tmp_path / "run") if a == "RUN" else a for a in args)
    for command in ("launch", "train"):
        dry_run = ("--dry-run",) if command == "launch" else ()
        r = run_cli(command, "jobs/demo.toml", *args, *dry_run, timeout=60, split=True)
        assert r.code == 2 and message in r.err and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()


def test_a_resume_from_an_older_checkpoint_keeps_its_own_and_sets_the_newer_aside(hvdlm, tiny_job, tmp_path):
    run = tmp_path / "run"
    first = hvdlm("train", str(tiny_job), "--run-dir", str(run), "--set", "train.checkpoint_interval=4")
    assert first.code == 0, first.out
    assert [c.step for c in find_checkpoints(run)] == [8, 4]
    again = hvdlm(
        "train",
        str(tiny_job),
        "--run-dir",
        str(run),
        "--resume",
        str(checkpoint_path(run, 4)),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.keep_checkpoints=1",
    )
    assert again.code == 0, again.out
    assert "checkpoints after step 4 moved to" in again.out
    assert [c.step for c in find_checkpoints(run)] == [6]  # the run's own newest, not the abandoned step 8
    assert (run / "checkpoints" / "set-aside-after-0000004" / "step-0000008.pt").is_file()
    assert max(row["step"] for row in again.metrics()) == 6


def test_a_refused_resume_leaves_the_run_directory_as_it_was(hvdlm, tiny_job, tmp_path):
    run = tmp_path / "run"
    assert hvdlm("train", str(tiny_job), "--run-dir", str(run), "--set", "train.max_steps=4").code == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # Another validation share changes the training split, so the saved data position no longer fits.
    refused = hvdlm(
        "train",
        str(tiny_job),
        "--run-dir",
        str(run),
        "--resume",
        "auto",
        "--set",
        "train.max_steps=8",
        "--set",
        "data.val_fraction=0.1",
    )
    assert refused.code == 2 and "data position" in refused.out and "Traceback" not in refused.out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
