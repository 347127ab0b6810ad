"""Loss-spike rollback (train.spike_rollback, issue 34): the detector's statistics on a real loss curve, and real
ranks under mpirun rolling back from a real spike.

The spike is real: HVDLM_INJECT_LR_SPIKE multiplies the learning rate of one step by 1000 (hvdlm.training.spike),
which wrecks the weights, so the losses after it jump ten-fold. Once, the run rolls back to the checkpoint before
the spike, skips the data since, and finishes; at every attempt, it stops after train.spike_max_rollbacks
rollbacks with SPIKE_EXIT_CODE. No mocks: the detector sees the trainer's own global loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Result, cli_env, metrics, mpirun_argv, run_cli, run_process, sets, train_argv

from hvdlm.config import load_config
from hvdlm.errors import InputError
from hvdlm.launch.elastic import refuse_unsupported
from hvdlm.launch.restarts import failure_cause
from hvdlm.runfiles import SPIKE_EXIT_CODE
from hvdlm.training.spike import REL_STD_FLOOR, SpikeDetector

CURVE = Path(__file__).with_name("data") / "demo-loss-curve.json"

STEPS = 40
INJECT_AT = 20  # the step whose update the lr multiplier wrecks: its loss is normal, the next ones are not
COMMON = (
    f"train.max_steps={STEPS}",
    "train.checkpoint_interval=4",
    "train.keep_checkpoints=3",
    "train.spike_rollback=true",
    "train.spike_window=8",
    "train.eval_interval=0",
    "train.sample_tokens=0",
    "train.log_interval=5",  # the detector reads every step's loss, logged or not
    "train.tensorboard=false",
)


# --- the detector's statistics --------------------------------------------------------------------------------


def recorded_curve() -> list[float]:
    """Every step's loss of a real run of jobs/demo.toml (2 ranks, 300 steps; how it was recorded is in the file)."""
    return json.loads(CURVE.read_text())["losses"]


def spikes_in(losses: list[float], **settings) -> list[tuple[int, int]]:
    """(first high step, confirming step) of each spike the detector (default settings unless given) reports."""
    d = SpikeDetector(**{"sigma": 5.0, "steps": 3, "window": 100, **settings})
    found = []
    for step, loss in enumerate(losses, start=1):
        spike = d.observe(step, loss)
        if spike:
            found.append((spike.start, spike.detected))
            d.state.spike, d.state.streak = None, []  # as a rollback clears it
    return found


def test_no_false_spike_on_a_real_training_curve_with_the_defaults_or_a_short_window():
    losses = recorded_curve()
    assert len(losses) == 300 and losses[-1] < losses[0] - 2  # a real, falling curve, noisy step to step
    assert spikes_in(losses) == []
    assert spikes_in(losses, window=8) == []


def test_a_jump_on_the_same_curve_is_found_where_it_begins():
    losses = recorded_curve()
    jumped = losses[:200] + [x * 1.5 for x in losses[200:205]] + losses[205:]
    assert spikes_in(jumped) == [(201, 203)]
    assert spikes_in(jumped, steps=5) == [(201, 205)]
    assert spikes_in(jumped, steps=6) == []  # five high steps are not six in a row


def test_one_high_step_is_noise_and_does_not_move_the_statistics():
    losses = recorded_curve()[:150]
    d = SpikeDetector(5.0, 3, 100)
    for step, loss in enumerate(losses, start=1):
        d.observe(step, loss)
    before = (d.state.mean, d.state.var)
    assert d.observe(151, 50.0) is None  # high, but one step
    assert (d.state.mean, d.state.var) == before
    assert d.observe(152, losses[-1]) is None and d.state.streak == []


def test_the_deviation_has_a_floor_so_a_flat_curve_does_not_call_a_small_rise_a_spike():
    flat = [2.0] * 50
    assert spikes_in(flat + [2.0 * (1 + 4 * REL_STD_FLOOR)] * 3, window=10) == []
    assert spikes_in(flat + [2.0 * (1 + 6 * REL_STD_FLOOR)] * 3, window=10) == [(51, 53)]


def test_nothing_is_judged_before_a_window_of_steps():
    assert spikes_in([5.0, 4.0, 9.0, 9.0, 9.0, 9.0], window=8) == []


def test_a_recurring_spike_is_not_restarted_by_launch():
    assert failure_cause(SPIKE_EXIT_CODE) is None
    assert failure_cause(1) is not None


def test_elastic_refuses_spike_rollback():
    cfg = load_config(None, ["train.spike_rollback=true", "train.checkpoint_interval=10"])
    with pytest.raises(InputError, match="does not support train.spike_rollback"):
        refuse_unsupported(cfg)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.spike_sigma=-1"], "'train.spike_sigma' must be positive, got -1.0"),
        (["train.spike_steps=0"], "'train.spike_steps' must be positive, got 0"),
        (["train.spike_max_rollbacks=-2"], "'train.spike_max_rollbacks' must be zero or more"),
        (["train.checkpoint_interval=0"], "needs periodic checkpoints to roll back to"),
        (["train.keep_checkpoints=1"], "keeps only the newest checkpoint"),
    ],
)
def test_bad_spike_settings_are_one_clear_error(tiny_job, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    base = ["train.spike_rollback=true", "train.checkpoint_interval=4"]
    r = run_cli("train", tiny_job, "--run-dir", run_dir, *sets(*base, *overrides))
    assert r.code == 2, r.out
    assert message in r.out and "Traceback" not in r.out
    assert not run_dir.exists()


# --- real ranks -------------------------------------------------------------------------------------------------


def spiked_run(job: Path, run_dir: Path, cache: Path, inject: str, *extra: str) -> Result:
    """The tiny job on 2 ranks with COMMON and `extra`, the learning rate multiplied as `inject` says."""
    argv, env = mpirun_argv(2, train_argv(job, run_dir, *sets(*COMMON, *extra)))
    return run_process(argv, {**cli_env(cache, env), "HVDLM_INJECT_LR_SPIKE": inject}, timeout=400)


@pytest.fixture(scope="module")
def once(job, tmp_path_factory, cache_dir):
    """Two data-parallel ranks with ZeRO-3 (each rank takes its own slice file back: its part of the weights and
    of the moments); the spike injected once."""
    run_dir = tmp_path_factory.mktemp("spike-once") / "run"
    r = spiked_run(job, run_dir, cache_dir, f"{INJECT_AT}:1000", "train.zero=3")
    return r, run_dir


@pytest.fixture(scope="module")
def recurring(job, tmp_path_factory, cache_dir):
    """Two pipeline stages (the loss comes from the last stage; a rollback loads each stage's own file); the spike
    injected at every attempt, two rollbacks allowed."""
    run_dir = tmp_path_factory.mktemp("spike-every") / "run"
    extra = ("parallel.pp=2", "parallel.microbatches=2", "train.spike_max_rollbacks=2")
    r = spiked_run(job, run_dir, cache_dir, f"{INJECT_AT}:1000:every", *extra)
    return r, run_dir


def rollbacks(run_dir: Path) -> list[dict]:
    return [row["rollback"] for row in metrics(run_dir) if "rollback" in row]


@pytest.mark.distributed
def test_an_injected_spike_is_rolled_back_past_its_data_and_the_run_finishes(once):
    r, run_dir = once
    assert r.code == 0, r.out[-4000:]
    [rb] = rollbacks(run_dir)  # exactly one: no false spike anywhere else in the run
    # The update of step 20 wrecks the weights, the loss of step 21 shows it; three high steps confirm it at 23,
    # the vote carries it to every rank with step 24, and the newest checkpoint seen healthy (<= 19) is step 16.
    assert (rb["start"], rb["detected"], rb["from_step"], rb["to_step"]) == (INJECT_AT + 1, INJECT_AT + 3, 24, 16)
    assert min(rb["losses"]) > rb["threshold"] > rb["mean"]
    assert rb["skipped_steps"] == [17, 24] and rb["skipped_samples"] == 8 * 8  # 8 steps x 2 ranks x batch 4
    assert rb["skipped_positions"][1] - rb["skipped_positions"][0] == rb["skipped_samples"]
    # (each rank read its own slice of the checkpoint: its part of the weights and moments, as a resume does)
    assert "spike rollback 1 of at most 3 in a row: back to the checkpoint of step 16 (each rank read its own" in r.out
    # The checkpoint written with the wrecked weights (step 20) went aside; the steps after 16 were trained again.
    assert (Path(rb["set_aside"]) / "step-0000020.pt").is_file()
    rows = [row for row in metrics(run_dir) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(5, STEPS + 1, 5))
    assert max(row["loss"] for row in rows if row["step"] > 16) < rb["threshold"]
    # The data position moved past the skipped window: 40 steps trained plus the 8 skipped, of 8 samples each.
    state = torch.load(run_dir / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert state["data"]["position"] == (STEPS + 8) * 8
    assert state["progress"]["spike"]["rollbacks"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["replicas_identical"]


@pytest.mark.distributed
def test_a_spike_that_recurs_stops_the_run_after_the_allowed_rollbacks(recurring):
    r, run_dir = recurring
    assert r.code == SPIKE_EXIT_CODE, r.out[-4000:]
    assert "the loss spiked again from step 21" in r.out
    assert "after 2 rollback(s) in a row (train.spike_max_rollbacks = 2), so the run stops (exit 65)" in r.out
    assert "Traceback" not in r.out
    assert [(rb["to_step"], rb["in_a_row"]) for rb in rollbacks(run_dir)] == [(16, 1), (16, 2)]
    assert r.out.count("back to the checkpoint of step 16 (each rank read its own files)") == 2, r.out[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["checkpoint_step"]) == ("failed", SPIKE_EXIT_CODE, 16)
    # What --resume auto would take is from before the spike, and it verifies.
    v = run_cli("checkpoint", "verify", run_dir)
    assert v.code == 0, v.out
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))[-1].startswith("step-0000016")
