"""`hvdlm checkpoint inspect CKPT`: step, shapes, layout, sizes and contents of a real run's checkpoints, unsharded,
cut into TP shards as a tp = 2 job saves them, and written by two pipeline stages. One tiny run is trained once per
module, and a pp = 2 run on two real ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import mpirun, sets, train_argv, train_once


@pytest.fixture(scope="module")
def trained(tmp_path_factory, job, cache_dir) -> Path:
    """An 8-step run with EMA and checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    settings = ["train.checkpoint_interval=4", "train.sample_tokens=0", "train.tensorboard=false"]
    return train_once(job, run_dir, *settings, "train.ema_decay=0.9", cache=cache_dir).run_dir


@pytest.fixture(scope="module")
def tp2(trained, tmp_path_factory) -> Path:
    """Step 8 of the run cut into two TP shards, model and EMA, as a tp = 2 job writes them."""
    from hvdlm.checkpoint.format import save_checkpoint, sharding_of
    from hvdlm.checkpoint.reshard import load_full_state, load_model
    from hvdlm.checkpoint.store import checkpoint_path
    from hvdlm.config import ModelConfig
    from hvdlm.model import GPT
    from hvdlm.parallel.topology import Group

    full = load_full_state(trained / "checkpoints" / "step-0000008.pt")
    run_dir = tmp_path_factory.mktemp("tp2") / "run"
    for rank in range(2):
        model = GPT(ModelConfig(**full["config"]["model"]), Group(size=2, rank=rank))
        load_model(model, full, "test", rank, 2)
        names = {id(p): n for n, p in model.named_parameters()}
        state = {
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "step": 8,
            "config": full["config"],
            "tp": {
                "rank": rank,
                "size": 2,
                "sharding": sharding_of(model),
                "param_names": [[names[id(p)] for p in model.parameters()]],
            },
        }
        save_checkpoint(checkpoint_path(run_dir, 8, rank, 2), state)
    return run_dir


def _inspect(hvdlm, *args) -> dict:
    r = hvdlm("checkpoint", "inspect", *map(str, args), "--json")
    assert r.code == 0, r.out
    return json.loads(r.out)


def test_a_run_directory_names_its_newest_checkpoint(hvdlm, trained):
    info = _inspect(hvdlm, trained)
    ckpt = trained / "checkpoints" / "step-0000008.pt"
    assert info["checkpoint"] == str(ckpt) and (info["step"], info["max_steps"]) == (8, 8)
    assert info["model"] == {
        "n_layer": 2,
        "n_head": 2,
        "d_model": 32,
        "seq_len": 32,
        "vocab_size": 256,
        "dropout": 0.0,
        "bias": True,
    }
    assert info["layout"] == {"tp": 1, "files": [{"path": str(ckpt), "bytes": ckpt.stat().st_size}]}
    # GPT-2 shape with a tied head: embeddings + 2 x (12 d^2 + 13 d) + final LayerNorm.
    d = 32
    assert info["parameters"] == 256 * d + 32 * d + 2 * (12 * d * d + 13 * d) + 2 * d
    assert info["bytes"]["model"] == info["bytes"]["ema"] > 4 * info["parameters"]  # + the head, tied
    holds = info["holds"]
    assert holds["optimizer"]["name"] == "adamw" and holds["optimizer"]["state"] == ["exp_avg", "exp_avg_sq", "step"]
    assert holds["ema"] == {"decay": 0.9} and holds["scaler"] is None
    assert holds["data"]["epoch"] == 0 and holds["data"]["position"] == 8 * 4  # 8 steps of 4 sequences
    assert holds["rng"] == {"replicas": 1, "devices": ["cpu"]}
    assert set(holds["progress"]) >= {"first_val_loss", "final_val_loss"}


def test_the_text_report(hvdlm, trained):
    r = hvdlm("checkpoint", "inspect", str(trained / "checkpoints" / "step-0000004.pt"))
    assert r.code == 0, r.out
    lines = {line.split()[0]: line for line in r.out.splitlines()}
    assert lines["step"].split()[1:] == ["4", "(train.max_steps", "8)"]
    assert "n_layer 2" in lines["model"] and "d_model 32" in lines["model"]
    assert "tp 1: 1 file(s)" in lines["layout"] and "step-0000004.pt" in lines["file"]
    assert "adamw" in lines["optimizer"] and "yes (decay 0.9)" in lines["ema"]
    assert "1 data-parallel rank(s)" in lines["rng"]


def test_tp_shards_are_described_as_one_checkpoint(hvdlm, trained, tp2):
    whole = _inspect(hvdlm, trained)
    for name in (tp2, tp2 / "checkpoints" / "step-0000008.tp1-of-2.pt", tp2 / "checkpoints" / "step-0000008.pt"):
        info = _inspect(hvdlm, name)
        assert info["layout"]["tp"] == 2
        assert [Path(f["path"]).name for f in info["layout"]["files"]] == [
            "step-0000008.tp0-of-2.pt",
            "step-0000008.tp1-of-2.pt",
        ]
        assert info["parameters"] == whole["parameters"]  # sharded tensors summed, replicated ones counted once
        assert info["holds"]["optimizer"] is None and info["holds"]["data"] is None


@pytest.fixture
def not_checkpoints(tmp_path) -> Path:
    """A folder of what `inspect` must refuse: a text file (notes.txt) and a run with no checkpoint (empty-run)."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing", "does not exist"),
        ("missing.pt", "no checkpoint at"),
        ("notes.txt", "not a checkpoint (UnpicklingError"),
        ("empty-run", "holds no complete checkpoint"),
    ],
)
def test_bad_input_is_one_clear_error(hvdlm, not_checkpoints, target, message):
    r = hvdlm("checkpoint", "inspect", str(not_checkpoints / target))
    assert r.code == 2 and message in r.out and "Traceback" not in r.out, r.out


@pytest.fixture(scope="module")
def pp2(tmp_path_factory, job, cache_dir) -> Path:
    """The same model trained on two pipeline stages (two MPI ranks), checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("pp2") / "run"
    overrides = sets("parallel.pp=2", "parallel.microbatches=2", "train.checkpoint_interval=4")
    settings = sets("train.sample_tokens=0", "train.tensorboard=false", "train.ema_decay=0.9")
    r = mpirun(2, train_argv(job, run_dir, *overrides, *settings), cache_dir)
    assert r.code == 0, r.out[-3000:]
    return run_dir


def test_a_pipeline_checkpoint_is_described_whole_and_per_stage(hvdlm, trained, pp2):
    whole, staged = _inspect(hvdlm, trained), _inspect(hvdlm, pp2)
    assert staged["layout"]["pp"] == 2 and staged["parameters"] == whole["parameters"]
    # The whole model's tensors and optimizer state, as the same model without stages has them.
    assert staged["holds"]["model"]["tensors"] == whole["holds"]["model"]["tensors"]
    for key in ("parameters_with_state", "state", "groups"):
        assert staged["holds"]["optimizer"][key] == whole["holds"]["optimizer"][key], key
    stages = staged["stages"]
    assert [s["stage"] for s in stages] == [0, 1] and [s["layers"] for s in stages] == [1, 1]
    # The last stage's copy of the tied weight is a tensor of its own, and has optimizer state of its own.
    assert sum(s["tensors"] for s in stages) == whole["holds"]["model"]["tensors"]
    assert sum(s["optimizer_parameters"] for s in stages) == whole["holds"]["optimizer"]["parameters_with_state"] + 1
    text = hvdlm("checkpoint", "inspect", str(pp2)).out
    assert f"weights     {whole['holds']['model']['tensors']} tensors" in text and "stage 1" in text, text


def test_a_damaged_newest_checkpoint_is_skipped_and_said_in_whole_sentences(hvdlm, trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    newest = run_dir / "checkpoints" / "step-0000008.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # cut off, as by a full disk or an interrupted copy
    r = hvdlm("checkpoint", "inspect", str(run_dir))
    assert r.code == 0 and "Traceback" not in r.out, r.out
    lines = {line.split()[0]: line for line in r.out.splitlines()}
    assert lines["step"].split()[1] == "4", r.out
    skipped = lines["skipped"]
    assert "step 8" in skipped and "step-0000008.pt" in skipped, skipped
    # Every sentence torch's message gave ends where torch ended it: nothing cut off in the middle.
    assert skipped.rstrip().endswith("Copy it again, or name another step's checkpoint."), skipped
    assert "(RuntimeError: " in skipped and ") . " not in skipped
    assert _inspect(hvdlm, run_dir)["skipped"] == [skipped.split(None, 1)[1].strip()]
