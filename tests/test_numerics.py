"""Numerics of runs that survive: gradient accumulation, local SGD, EMA, bf16 / fp16, non-finite steps, bad names.

Real ranks under mpirun (2), no mocks. Each comparison has a control that differs, so it can fail: accumulating
4 micro-batches of 2 equals one batch of 8 but not a batch of 2; local SGD with H = 1 equals synchronous SGD but
H = 4 does not.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomllib
import torch
from helpers import sets, summary, train_argv
from survive import rows, run

pytestmark = pytest.mark.distributed

STEPS = 10
BASE = (f"train.max_steps={STEPS}", "train.eval_interval=5", "train.sample_tokens=0", "train.tensorboard=false")
SGD = ("train.optimizer=sgd", "train.grad_clip=0", "train.lr=0.3", "train.min_lr=0.01", "train.batch_size=4")
RUNS = {  # name: overrides, each trained by 2 ranks on demand, once per module
    "sync": SGD,
    "local1": (*SGD, "train.local_sgd_interval=1"),
    "local4": (*SGD, "train.local_sgd_interval=4"),  # 10 steps: averaged at 4, 8 and at the end
    "big": ("train.batch_size=8",),
    "accum": ("train.batch_size=2", "train.accumulation_steps=4"),
    "small": ("train.batch_size=2",),
    "bf16": ("train.batch_size=8", "train.precision=bf16"),
    "ema": ("train.batch_size=8", "train.ema_decay=0.9"),
}


@pytest.fixture(scope="module")
def trained(job, tmp_path_factory, cache_dir):
    base = tmp_path_factory.mktemp("numerics-runs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            proc = run(2, train_argv(job, base / name, *sets(*BASE, *RUNS[name])), cache_dir)
            assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
            done[name] = base / name
        return done[name]

    return get


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "loss" in r]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run_dir)]


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows(run_dir) if "val_loss" in r}


def worst_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


# --- gradient accumulation ---------------------------------------------------------------------------------


def test_four_micro_batches_of_2_equal_one_batch_of_8(trained):
    accum, big = trained("accum"), trained("big")
    for step, (x, y) in enumerate(zip(losses(big), losses(accum)), start=1):
        assert abs(x - y) / abs(x) <= 1e-5, f"step {step}: batch 8 {x} vs 4 x batch 2 {y}"
    assert losses(big)[-1] < losses(big)[0] - 0.3  # it learned: a wrong gradient would have shown
    # The same tokens per step: 2 ranks x 8 sequences x 32 tokens, counted cumulatively.
    assert [r["tokens"] for r in train_rows(accum)] == [512 * s for s in range(1, STEPS + 1)]
    assert [r["tokens"] for r in train_rows(big)] == [512 * s for s in range(1, STEPS + 1)]


def test_accumulation_is_not_a_no_op(trained):
    """Control: 4 micro-batches of 2 differ from one batch of 2 (the comparison above can fail)."""
    assert worst_rel(losses(trained("accum")), losses(trained("small"))) > 1e-3
    assert [r["tokens"] for r in train_rows(trained("small"))][-1] == 128 * STEPS


# --- local SGD -----------------------------------------------------------------------------------------------


def test_local_sgd_with_h1_equals_synchronous_sgd(trained):
    sync, local1 = losses(trained("sync")), losses(trained("local1"))
    for step, (x, y) in enumerate(zip(sync, local1), start=1):
        assert abs(x - y) / abs(x) <= 1e-5, f"step {step}: synchronous {x} vs local SGD H=1 {y}"
    assert sync[-1] < sync[0] - 0.1  # SGD moved the loss


def test_local_sgd_with_h4_differs_and_ends_with_identical_replicas(trained):
    local4 = trained("local4")
    assert worst_rel(losses(trained("sync")), losses(local4)) > 1e-4
    assert all(math.isfinite(x) for x in losses(local4))
    s = summary(local4)  # 10 steps is no multiple of 4: the final average is the one at the end
    assert s["replicas_identical"] and len(set(s["replica_checksums"])) == 1, s


# --- EMA -----------------------------------------------------------------------------------------------------


def test_ema_is_saved_and_evaluated_without_touching_training(trained):
    ema, plain = trained("ema"), trained("big")
    assert losses(ema) == losses(plain)  # the average never feeds back into the weights that train
    v_ema, v_plain = val_losses(ema), val_losses(plain)
    assert v_ema.keys() == v_plain.keys() and STEPS in v_ema
    assert v_ema[STEPS] != v_plain[STEPS]  # validation sees the averaged weights
    state = torch.load(ema / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert state["ema"] and set(state["ema"]) <= set(state["model"]) and "tok_emb.weight" in state["ema"]
    assert all(state["ema"][n].shape == state["model"][n].shape for n in state["ema"])
    moved = [n for n in state["ema"] if not torch.equal(state["ema"][n], state["model"][n])]
    assert moved, "the EMA equals the weights: it is not an average"
    plain_state = torch.load(plain / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert plain_state.get("ema") is None  # absent when ema_decay = 0


# --- precision -----------------------------------------------------------------------------------------------


def test_bf16_trains_on_cpu_close_to_fp32(trained):
    bf16, fp32 = losses(trained("bf16")), losses(trained("big"))
    assert all(math.isfinite(x) for x in bf16)
    assert bf16[-1] < bf16[0] - 0.3
    rel = worst_rel(fp32, bf16)
    assert 0 < rel < 0.05, rel  # bf16 arithmetic happened (not fp32), and it tracks fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 needs a GPU: this checks the refusal on a CPU machine")
@pytest.mark.parametrize("override", ["train.precision=fp16", "train.grad_compression=fp16"])
def test_fp16_on_a_cpu_machine_is_refused(job, tmp_path, cache_dir, override):
    r = run(0, train_argv(job, tmp_path / "run", *sets(*BASE, override)), cache_dir)
    assert r.code == 2, r.out[-4000:]
    assert "fp16" in r.out and "GPU" in r.out and "Traceback" not in r.out, r.out[-4000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- bad names and non-finite steps ---------------------------------------------------------------------------


@pytest.mark.parametrize("override, name", [("train.precision=int4", "'int4'"), ("train.optimizer=lamb", "'lamb'")])
def test_an_unknown_precision_or_optimizer_is_refused(job, tmp_path, cache_dir, override, name):
    r = run(0, train_argv(job, tmp_path / "run", *sets(override)), cache_dir)
    assert r.code == 2, r.out
    key = override.split("=")[0]
    assert f"'{key}' must be one of" in r.out and name in r.out and "Traceback" not in r.out, r.out
    assert not (tmp_path / "run").exists()


# dp2-fused: fused AdamW skips on the device (found_inf, hvdlm.training.verdict), and the host reads each verdict
# one step late; logging every 100 steps, no log row reads it sooner, so the stop comes from the late read.
@pytest.fixture(
    scope="module",
    params=[(), ("parallel.pp=2", "parallel.microbatches=2"), ("train.fused_optimizer=on", "train.log_interval=100")],
    ids=["dp2", "pp2", "dp2-fused"],
)
def exploded(request, job, tmp_path_factory, cache_dir):
    """lr = 1e30 without clipping: the first update sends the weights to ~1e30, every later loss is nan/inf. On 2
    replicas, on 2 pipeline stages (the loss on the last stage, the skip on both), and on 2 replicas whose fused
    optimizer skips by itself."""
    run_dir = tmp_path_factory.mktemp("exploded") / "run"
    r = run(
        2,
        train_argv(
            job,
            run_dir,
            *sets(
                *BASE,
                "train.lr=1e30",
                "train.warmup_steps=0",
                "train.grad_clip=0",
                "train.max_skipped_steps=3",
                "train.max_steps=30",
                *request.param,
            ),
        ),
        cache_dir,
    )
    return r, run_dir


def test_non_finite_steps_are_skipped_then_the_run_stops_with_exit_2(exploded):
    r, run_dir = exploded
    assert r.code == 2, r.out[-4000:]
    assert "Traceback" not in r.out
    assert "grad_clip" in r.out and "train.lr" in r.out, r.out[-4000:]  # the message names fixes
    skipped = [x for x in rows(run_dir) if "skipped" in x]
    assert {x["skipped"] for x in skipped} <= {"non-finite loss", "non-finite gradient norm"}
    steps = [x["step"] for x in skipped]
    assert steps == sorted(steps) and 2 <= steps[0] and steps[-1] < 30
    # max_skipped_steps = 3: "this many in a row stop the run" (hvdlm/config.py), so the third is the last.
    assert len(skipped) == 3, "\n".join(map(str, rows(run_dir))) + r.out[-3000:]
    assert f"3 steps in a row had a non-finite loss or gradient norm (the last at step {steps[-1]};" in r.out


def test_a_skipped_step_logs_no_nan_as_its_loss(exploded):
    """A skipped step has its {"skipped"} row; a training row with loss NaN beside it would reach every plot
    (and `NaN` is not JSON that strict readers accept)."""
    _, run_dir = exploded
    train = [x for x in rows(run_dir) if "loss" in x]
    logs_every_step = tomllib.loads((run_dir / "config.toml").read_text())["train"]["log_interval"] == 1
    assert train or not logs_every_step, "\n".join(map(str, rows(run_dir)))
    assert all(math.isfinite(x["loss"]) for x in train), "\n".join(map(str, rows(run_dir)))
    skipped_steps = {x["step"] for x in rows(run_dir) if "skipped" in x}
    assert not skipped_steps & {x["step"] for x in train}
