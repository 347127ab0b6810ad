"""Activation recomputation and the memory account, in one process; the settings' bad values.

Recomputation: full and selective give the loss and the gradients of no recomputation (dropout 0.1 included: the
recomputed forward must draw the same masks), also at the next step (the RNG stream goes on as without it), and
save less for backward, as the ActivationMeter counts it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli

from hvdlm.config import ModelConfig, TrainConfig, load_config
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.optim.replicated import Replicated
from hvdlm.optim.zero import zero_note
from hvdlm.parallel.topology import Topology
from hvdlm.plan.memory import MB, state_mb
from hvdlm.training.memory_account import ActivationMeter, memory_account

CFG = dict(n_layer=4, n_head=2, d_model=32, seq_len=32, vocab_size=256, dropout=0.1)


def two_steps(recompute: str) -> list[tuple[float, dict[str, torch.Tensor], int]]:
    """(loss, gradients, bytes saved for backward) of two forward/backward passes from the same seeds."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG, recompute=recompute)).train()
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the dropout stream
    out = []
    for _ in range(2):
        meter = ActivationMeter(model)
        with meter:
            loss = model(x, torch.roll(x, -1, 1))[1]
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, meter.peak_bytes))
        model.zero_grad()
    return out


@pytest.fixture(scope="module")
def passes() -> dict[str, list]:
    return {mode: two_steps(mode) for mode in ("none", "selective", "full")}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_gives_the_same_losses_and_gradients(passes, mode):
    for step, ((loss, grads, _), (loss_r, grads_r, _)) in enumerate(zip(passes["none"], passes[mode])):
        assert abs(loss - loss_r) <= 1e-6 * abs(loss), (step, loss, loss_r)
        for name in grads:
            assert (grads[name] - grads_r[name]).abs().max().item() <= 1e-6, (step, name)
    assert passes["none"][0][0] != passes["none"][1][0]  # dropout drew other masks at the second pass: not vacuous


def test_recomputation_saves_less_for_backward(passes):
    none, selective, full = (passes[m][0][2] for m in ("none", "selective", "full"))
    assert selective < none
    assert full <= 0.4 * none, f"full recomputation saves {full / none:.0%} of the activations"
    # Full keeps each block's input (B, T, C) fp32, and what the embeddings and the head save.
    assert full >= CFG["n_layer"] * 4 * 32 * 32 * 4


def test_the_account_of_a_model_and_its_arithmetic_agree():
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=32))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 32, dtype=torch.long), torch.zeros(1, 32, dtype=torch.long))[1].backward()
    optimizer.step()
    n = sum(p.numel() for p in model.parameters())
    held = Replicated(optimizer, model, Topology.single(), synchronous=False)
    account = memory_account(model, held, 3 * MB, torch.device("cpu"))
    predicted = state_mb(n, "adamw")
    step_counts = 4 * len(list(model.parameters())) / MB  # AdamW keeps its step as a 4-byte tensor per parameter
    assert account["params_mb"] == predicted["params_mb"] and account["grads_mb"] == predicted["grads_mb"]
    assert account["optimizer_mb"] == pytest.approx(predicted["optimizer_mb"] + step_counts, rel=1e-12)
    assert account["activations_mb"] == 3.0
    assert state_mb(101, "adamw", dp=2, zero=1)["optimizer_mb"] == 8 * 51 / MB  # padded to equal slices
    assert state_mb(101, "adamw", dp=2, zero=1)["grads_mb"] == 4 * 101 / MB
    assert state_mb(101, "adamw", dp=2, zero=2)["grads_mb"] == 4 * 51 / MB  # ZeRO-2: the slice


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.zero=4"], "'train.zero' must be 0, 1, 2 or 3, got 4"),
        (["train.zero=-1"], "'train.zero' must be 0, 1, 2 or 3, got -1"),
        (["train.zero=3", "train.local_sgd_interval=4"], "train.zero = 3 with local SGD"),
        (["train.zero=3", "train.precision=fp16"], "own slice of the gradients only"),
        (["train.zero=3", "train.compile=on"], 'train.zero = 3 with train.compile = "on" is not supported'),
        (["train.zero=1", "train.local_sgd_interval=4"], "each local-SGD replica steps alone"),
        (["train.zero=2", "train.local_sgd_interval=4"], "train.zero = 2 with local SGD"),
        (["train.zero=1", "train.precision=fp16"], "own slice of the gradients only"),
        (["train.zero=2", "train.precision=fp16"], "own slice of the gradients only"),
        (["train.zero=2", "train.zero_bucket_mb=0"], "'train.zero_bucket_mb' must be positive"),
        (["model.recompute=some"], "'model.recompute' must be one of none, selective, full, got 'some'"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(InputError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_zero_2_and_its_bucket_size_are_accepted():
    t = load_config(None, ["train.zero=2", "train.zero_bucket_mb=0.5"]).train
    assert (t.zero, t.zero_bucket_mb) == (2, 0.5)
    assert load_config(None, []).train.zero_bucket_mb == 25.0


def test_zero_with_sgd_without_momentum_is_allowed_and_noted():
    assert load_config(None, ["train.zero=1", "train.optimizer=sgd", "train.momentum=0"]).train.zero == 1
    assert "nothing to shard" in zero_note(TrainConfig(zero=1, optimizer="sgd", momentum=0.0))
    assert zero_note(TrainConfig(zero=1)) is None


def test_a_bad_setting_on_the_command_line_exits_2_without_a_traceback(tiny_job):
    r = run_cli("config", tiny_job, "--set", "train.zero=4", timeout=60)
    assert r.code == 2 and "'train.zero' must be 0, 1, 2 or 3" in r.out and "Traceback" not in r.out, r.out
    r = run_cli("config", tiny_job, "--set", "train.zero=3", "--set", "train.local_sgd_interval=4", timeout=60)
    assert r.code == 2 and "train.zero = 3 with local SGD" in r.out and "Traceback" not in r.out, r.out
